"""The shipped configs: loading, copying, local files, bad input."""
import json

import pytest

from moe_explained.configs import (CONFIGS, PUBLISHED, SOURCES, config_from_dict, get_config, load_config,
                                   read_config_file, resolve_config)

CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "mixtral": "MixtralConfig",
           "qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig", "deepseek_v2": "DeepseekV2Config"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_config_loads_into_its_class(name):
    d = get_config(name)
    cfg = load_config(name.upper())
    assert type(cfg).__name__ == CLASSES[d["model_type"]]
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(cfg, k) == d[k]
    assert name in SOURCES


def test_at_least_two_non_mixtral_moe_models_and_published_sizes():
    moe_types = {CONFIGS[n]["model_type"] for n in CONFIGS} - {"llama", "mistral"}
    assert len(moe_types - {"mixtral"}) >= 2
    assert set(PUBLISHED) <= set(CONFIGS)


def test_get_config_returns_a_copy():
    d = get_config("qwen3-30b-a3b")
    d["mlp_only_layers"].append(3)
    assert get_config("qwen3-30b-a3b")["mlp_only_layers"] == []


def test_local_file_and_folder(tmp_path):
    d = get_config("mixtral-8x22b")
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert read_config_file(tmp_path) == d
    assert resolve_config(str(tmp_path / "config.json"))[1] == d
    assert load_config(tmp_path).num_local_experts == 8


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="known models: llama-2-7b, llama-2-13b"):
        get_config("llama-3-8b")
    with pytest.raises(ValueError, match="unknown model 'llama-3-8b'"):
        load_config("llama-3-8b")
    with pytest.raises(ValueError, match="missing the field 'model_type'"):
        config_from_dict({"hidden_size": 8})
    with pytest.raises(ValueError, match="not a transformers model type"):
        config_from_dict({"model_type": "nope"})
    with pytest.raises(ValueError, match="transformers rejected the config: .*field 'tie_word_embeddings'"):
        config_from_dict(dict(get_config("llama-2-7b"), tie_word_embeddings="yes"))
    with pytest.raises(ValueError, match="no config.json"):
        read_config_file(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("3")
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        load_config(tmp_path)


def test_resolve_config_takes_a_shipped_hub_id_and_explains_any_other(tmp_path, monkeypatch):
    from moe_explained.configs import SOURCES, resolve_config
    hub, name = SOURCES["mixtral-8x7b"][0], "mixtral-8x7b"
    assert resolve_config(hub.upper())[0] == name
    with pytest.raises(ValueError, match=r"download its config.json \(https://huggingface.co/someone/model/resolve"):
        resolve_config("someone/model")
    monkeypatch.chdir(tmp_path)                               # a local folder of that spelling wins
    (tmp_path / "someone" / "model").mkdir(parents=True)
    (tmp_path / "someone" / "model" / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_config("someone/model") == ("someone/model", {"model_type": "llama"})


def test_a_weights_file_is_refused_without_being_read(tmp_path):
    from moe_explained.configs import read_config_file
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\x00\xff" * 1000)
    with pytest.raises(ValueError, match="model.safetensors is not a config.json: it holds binary data"):
        read_config_file(w)
    late = tmp_path / "late.json"
    late.write_bytes(b" " * 10_000 + b"\xff\xfe")             # text for the first 8 KiB, binary after
    with pytest.raises(ValueError, match="late.json is not a config.json"):
        read_config_file(late)
