"""Chapter 00: the SwiGLU block and the analytical parameter counter, against transformers and brute force."""
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from moe_explained.configs import CONFIGS, PUBLISHED, get_config, load_config
from moe_explained.dense import SwiGLU, count_params, explore_moe, llama_ffn_dim, moe_variant, plot_params
from moe_explained.widgets import widgets_live

B = 1e9


def meta_numel(config) -> int:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(load_config(config))
    return sum(p.numel() for p in model.parameters())


# --- SwiGLU -------------------------------------------------------------------------------------------------------

def paper_swiglu(x, W, V, W2):
    "Shazeer 2020 eq. 6 with an explicit per-token loop (brute force)."
    out = torch.empty(x.shape[0], W2.shape[1], dtype=x.dtype)
    for t in range(x.shape[0]):
        a = x[t] @ W
        out[t] = ((a * torch.sigmoid(a)) * (x[t] @ V)) @ W2
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_swiglu_equals_llama_mlp(bias, dtype, tol):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=48, intermediate_size=128, hidden_act="silu", mlp_bias=bias,
                               num_attention_heads=4)).to(dtype)
    ffn = SwiGLU.from_llama(mlp)
    assert ffn.w1.weight.dtype == dtype and (ffn.w1.bias is not None) == bias
    x = torch.randn(3, 7, 48, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), mlp(x), atol=tol, rtol=0)
        back = ffn.to_llama()          # and back into a fresh LlamaMLP
        torch.testing.assert_close(back(x), mlp(x), atol=tol, rtol=0)


def test_swiglu_equals_paper_formula():
    torch.manual_seed(1)
    ffn = SwiGLU(16, 40).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    ref = paper_swiglu(x, ffn.w1.weight.T, ffn.w3.weight.T, ffn.w2.weight.T)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), ref, atol=1e-12, rtol=0)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 16 * 40


def test_swiglu_to_existing_llama_mlp_and_shape_mismatch():
    ffn = SwiGLU(8, 24)
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=24, num_attention_heads=2))
    assert ffn.to_llama(mlp) is mlp
    assert torch.equal(mlp.down_proj.weight, ffn.w2.weight)
    with pytest.raises(ValueError, match="this SwiGLU is 8->24"):
        ffn.to_llama(LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2)))


@pytest.mark.parametrize("args,msg", [((0, 8), "d_model"), ((8, -1), "d_ff"), ((8.0, 8), "d_model"), ((8, True), "d_ff")])
def test_swiglu_bad_sizes(args, msg):
    with pytest.raises(ValueError, match=msg):
        SwiGLU(*args)


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match="expected d_model=8"):
        SwiGLU(8, 16)(torch.randn(2, 9))
    with pytest.raises(ValueError, match="hidden_act is 'gelu'"):
        SwiGLU.from_llama(LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                               hidden_act="gelu")))
    with pytest.raises(ValueError, match="no nn.Linear named 'gate_proj'"):
        SwiGLU.from_llama(torch.nn.Linear(2, 2))


def test_llama_ffn_dim_reproduces_llama2_configs():
    assert [llama_ffn_dim(4096), llama_ffn_dim(5120), llama_ffn_dim(8192, 4096, 1.3)] == \
        [get_config(f"llama-2-{s}")["intermediate_size"] for s in ("7b", "13b", "70b")]


# --- the counter against transformers on the meta device ------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_count_equals_meta_model(name):
    pc = count_params(name)
    assert pc.total == meta_numel(name)
    assert pc.total == sum(v for k, v in pc.breakdown().items() if k not in ("total", "active"))
    assert 0 < pc.active <= pc.total
    assert (pc.active == pc.total) == (pc.n_moe_layers == 0)


VARIANTS = {
    "llama tied+biases": dict(get_config("llama-2-7b"), num_hidden_layers=2, tie_word_embeddings=True,
                              attention_bias=True, mlp_bias=True),
    "mistral head_dim": dict(get_config("mistral-7b"), num_hidden_layers=2, hidden_size=4100, head_dim=128),
    "qwen3 dense layers": dict(get_config("qwen3-30b-a3b"), num_hidden_layers=6, mlp_only_layers=[0, 5],
                               decoder_sparse_step=2),
    "deepseek q_lora": dict(get_config("deepseek-v2-lite"), num_hidden_layers=5, q_lora_rank=384,
                            first_k_dense_replace=3, attention_bias=True),
    "deepseek no shared": dict(get_config("deepseek-v2-lite"), num_hidden_layers=3, n_shared_experts=0,
                               first_k_dense_replace=0),
    "olmoe GQA": dict(get_config("olmoe-1b-7b"), num_hidden_layers=2, num_key_value_heads=4),
    "mixtral 1 expert": dict(get_config("mixtral-8x7b"), num_hidden_layers=2, num_local_experts=1, num_experts_per_tok=1),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_count_equals_meta_model_variants(name):
    assert count_params(VARIANTS[name]).total == meta_numel(VARIANTS[name])


def test_count_accepts_config_object_name_and_path(tmp_path):
    d = get_config("olmoe-1b-7b")
    (tmp_path / "config.json").write_text(json.dumps(d))
    totals = {count_params(x).total for x in (d, load_config("olmoe-1b-7b"), "OLMoE-1B-7B", tmp_path,
                                              str(tmp_path / "config.json"))}
    assert totals == {6_919_161_856}


def test_seed_tables():
    l13, mx = count_params("llama-2-13b"), count_params("mixtral-8x7b")
    assert (round(l13.total / B, 2), round(l13.attention / B, 2), round(l13.dense_mlp / B, 2)) == (13.02, 4.19, 8.49)
    assert (round(mx.total / B, 2), round(mx.attention / B, 2), round(mx.moe_block / B, 2)) == (46.70, 1.34, 45.10)
    assert round(mx.active / B, 1) == 12.9
    ratio = lambda n: get_config(n)["intermediate_size"] / get_config(n)["hidden_size"]
    assert (round(ratio("llama-2-13b"), 1), round(ratio("mixtral-8x7b"), 1)) == (2.7, 3.5)


def test_only_the_ffn_is_replicated():
    mx, mi = count_params("mixtral-8x7b"), count_params("mistral-7b")
    shared = mx.embed + mx.lm_head + mx.attention + mx.norms
    assert mx.total == shared + 8 * mi.dense_mlp + mx.router
    assert mx.active == shared + 2 * mi.dense_mlp + mx.router
    assert moe_variant("mixtral-8x7b", E=1, k=1).total == mi.total + 32 * 4096


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_sizes(name):
    t, a = PUBLISHED[name]
    unit = lambda x: 1.0 if float(x).is_integer() else 0.1
    pc = count_params(name)
    assert abs(pc.total / B - t) <= unit(t) / 2
    active = pc.active - pc.embed if name == "deepseek-v2-lite" else pc.active   # DeepSeek leaves the embedding out
    assert abs(active / B - a) <= unit(a)


# --- FLOPs against torch's FlopCounterMode, memory -------------------------------------------------------------------

TINY = {
    "llama": dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "mixtral": dict(model_type="mixtral", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=101, hidden_size=64, moe_intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                      num_experts_per_tok=3),
    "olmoe": dict(model_type="olmoe", vocab_size=101, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(model_type="deepseek_v2", vocab_size=101, hidden_size=64, intermediate_size=96,
                        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
}


@pytest.mark.parametrize("name", list(TINY))
def test_flops_equal_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode
    cfg, T = TINY[name], 12
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config(cfg), attn_implementation="eager",
                                             experts_implementation="eager").eval()
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randint(0, cfg["vocab_size"], (1, T)))
    assert fc.get_total_flops() == T * count_params(cfg).flops_per_token(T, attn_av=True)


def test_flops_and_bytes_properties():
    mx, l13 = count_params("mixtral-8x7b"), count_params("llama-2-13b")
    assert mx.flops_per_token(4096, active=False) - mx.flops_per_token(4096) == 2 * 32 * 6 * mx.expert_size
    assert mx.flops_per_token(100, training=True) == 3 * mx.flops_per_token(100)
    assert l13.flops_per_token(0) == 2 * (l13.total - l13.embed - l13.norms)        # Kaplan's 2N at n_ctx=0
    assert l13.flops_per_token(4096) - l13.flops_per_token(0) == 2 * 40 * 4096 * 5120
    assert [mx.bytes_at(b) for b in (16, 8, 4, 3, 2)] == [mx.total * b / 8 for b in (16, 8, 4, 3, 2)]
    assert mx.bytes_at(4, active=True) == mx.active / 2
    with pytest.raises(ValueError, match="bits must be a positive number"):
        mx.bytes_at(0)
    with pytest.raises(ValueError, match="n_ctx must be a non-negative integer"):
        mx.flops_per_token(-1)


# --- bad input ----------------------------------------------------------------------------------------------------

def _drop(name, field):
    return {k: v for k, v in get_config(name).items() if k != field}


@pytest.mark.parametrize("name,field", [
    ("llama-2-7b", "hidden_size"), ("llama-2-7b", "intermediate_size"), ("llama-2-7b", "vocab_size"),
    ("mixtral-8x7b", "num_local_experts"), ("mixtral-8x7b", "num_experts_per_tok"), ("mixtral-8x7b", "model_type"),
    ("qwen3-30b-a3b", "moe_intermediate_size"), ("olmoe-1b-7b", "num_experts"),
    ("deepseek-v2-lite", "kv_lora_rank"), ("deepseek-v2-lite", "q_lora_rank"), ("deepseek-v2-lite", "n_shared_experts"),
])
def test_missing_field_is_named(name, field):
    with pytest.raises(ValueError, match=f"missing the field '{field}'"):
        count_params(_drop(name, field))


@pytest.mark.parametrize("change,msg", [
    (dict(num_key_value_heads=5), r"num_attention_heads \(32\) is not divisible by num_key_value_heads \(5\)"),
    (dict(hidden_size=4100), r"hidden_size \(4100\) is not divisible by num_attention_heads \(32\) and head_dim is not given"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) is larger than num_local_experts \(8\)"),
    (dict(hidden_size="4096"), "hidden_size must be a positive integer"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(intermediate_size="x"), "field 'intermediate_size'"),
    (dict(vocab_size=None), "field 'vocab_size'"),
    (dict(num_local_experts=-1), "num_local_experts must be a positive integer"),
])
def test_inconsistent_config_is_named(change, msg):
    with pytest.raises(ValueError, match=msg):
        count_params(dict(get_config("mixtral-8x7b"), **change))


def test_inconsistent_config_object_and_other_bad_input():
    cfg = load_config("llama-2-7b")
    cfg.num_key_value_heads = 5
    with pytest.raises(ValueError, match="not divisible by num_key_value_heads"):
        count_params(cfg)
    with pytest.raises(ValueError, match="olmoe.*hidden_size|hidden_size \\(2050\\)"):
        count_params(dict(get_config("olmoe-1b-7b"), hidden_size=2050, head_dim=128))
    with pytest.raises(ValueError, match="first_k_dense_replace \\(40\\) is larger"):
        count_params(dict(get_config("deepseek-v2-lite"), first_k_dense_replace=40))
    with pytest.raises(ValueError, match="known models: llama-2-7b"):
        count_params("mixtral-8x9b")
    with pytest.raises(ValueError, match="config must be a dict"):
        count_params(3.5)
    with pytest.raises(ValueError, match="not an MoE model"):
        moe_variant("llama-2-13b", E=4)


# --- plots and the explorer fall back to static figures --------------------------------------------------------------

def test_plots_are_static_without_a_frontend(monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setenv("IN_TEST", "1")
    assert widgets_live() is False
    fig = explore_moe("olmoe-1b-7b")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 2
    fig2 = plot_params([count_params("mixtral-8x7b"), count_params("llama-2-7b")])
    assert len(fig2.axes) == 2
    plt.close("all")


def test_explorer_widgets_recount(monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    ui = explore_moe("olmoe-1b-7b", interactive=True)
    E, k, d_ff = ui.children[0].children
    assert (E.value, k.value, d_ff.value) == (64, 8, 1024)
    E.value = 4
    assert k.max == 4                      # top-k cannot exceed E
    assert (ui.count.n_experts, ui.count.top_k) == (4, 4)
    d_ff.value = 512                       # recounts
    assert ui.count.total == moe_variant("olmoe-1b-7b", E=4, k=4, d_ff=512).total


def test_widgets_live_can_be_forced_and_refuses_a_typo(monkeypatch):
    monkeypatch.setenv("IN_TEST", "1")
    monkeypatch.setenv("MOE_EXPLAINED_WIDGETS", "live")
    assert widgets_live() is True
    monkeypatch.setenv("MOE_EXPLAINED_WIDGETS", "static")
    assert widgets_live() is False
    monkeypatch.setenv("MOE_EXPLAINED_WIDGETS", "yes")
    with pytest.raises(ValueError, match="must be 'live' or 'static'"):
        widgets_live()
