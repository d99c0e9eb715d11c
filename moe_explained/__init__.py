__version__ = "0.0.1"

# `import moe_explained` stays cheap (no torch import); the packaged model is one attribute away:
#   model, tokenizer = moe_explained.tiny_mixtral()      (chapter 05 trains it; moe_explained/pretrained.py loads it)
_LAZY = {"tiny_mixtral": "pretrained", "TINY_MIXTRAL_PATH": "pretrained"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moe_explained' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
