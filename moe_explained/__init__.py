__version__ = "0.0.1"

# `import moe_explained` stays cheap (no torch import); the packaged model and the engine are one attribute away:
#   model, tokenizer = moe_explained.tiny_mixtral()      (chapter 05 trains it; moe_explained/pretrained.py loads it)
#   model = moe_explained.load_offloaded("mistralai/Mixtral-8x7B-Instruct-v0.1", experts_bits=2)
#       (chapter 11b; moe_explained/checkpoint.py: converted once into a cache, streaming, then loaded; cache_size='auto';
#        without experts_bits the bf16 checkpoint is served from its own files, host_memory= as a budget)
#   print(moe_explained.offload_stats(model))            (chapter 10; moe_explained/offload.py)
#   print(moe_explained.plan_memory("mistralai/Mixtral-8x7B-Instruct-v0.1"))   (chapter 11; moe_explained/plan.py)
#   from moe_explained.convert import convert; convert(repo, "mixtral-2bit")   (chapter 11; moe_explained/convert.py)
#   model = moe_explained.load_converted("mixtral-2bit")
_LAZY = {"tiny_mixtral": "pretrained", "TINY_MIXTRAL_PATH": "pretrained",
         "load_offloaded": "checkpoint", "offload_stats": "offload", "plan_memory": "plan",
         "load_converted": "convert", "save_offloaded": "convert"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moe_explained' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
