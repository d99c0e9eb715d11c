"""Tests for moe_explained.moe: the three dispatchers vs a brute-force evaluation of Mixtral §2.1's formula,
vs transformers v5's MixtralSparseMoeBlock, the hub layout, and the experts interface."""
import json
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import HostReads
from moe_explained import moe as M
from moe_explained.moe import (MOE_IMPLS, MixtralMoE, experts_forward, grouped_mm_works, load_hf_block,
                               load_hub_state_dict, moe_dense_masked, moe_loop, moe_sorted, register_experts_impl,
                               silu_and_mul, to_hf_block, to_hub_state_dict)

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # fp32, outputs of magnitude ~1


@pytest.fixture(autouse=True)
def _no_grad():
    "Forward passes only -- scoped to each test, so other test modules in the same worker keep autograd."
    with torch.no_grad():
        yield


def brute_force(x, idx, w, gate_up, down):
    "y_t = sum_i w_ti * SwiGLU_{e_ti}(x_t), one token and slot at a time, in float64."
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for i in range(idx.shape[1]):
            e = int(idx[t, i])
            h = silu_and_mul(gate_up[e].double() @ x[t].double())
            out[t] += w[t, i].double() * (down[e].double() @ h)
    return out


def random_routing(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    w = torch.rand(T, k, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


def random_weights(E, H, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2


@pytest.mark.parametrize('impl', list(MOE_IMPLS))
@pytest.mark.parametrize('E,k,T', [(4, 1, 5), (8, 2, 13), (16, 4, 9), (3, 3, 4)])
def test_impls_match_brute_force(impl, E, k, T):
    H, I = 16, 24
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    idx, w = random_routing(T, E, k)
    gu, dn = random_weights(E, H, I)
    got = MOE_IMPLS[impl](x, idx, w, gu, dn)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), brute_force(x, idx, w, gu, dn), atol=ATOL, rtol=0)


def test_sorted_segment_fallback_equals_grouped_mm():
    x = torch.randn(40, 16)
    idx, w = random_routing(40, 8, 2)
    gu, dn = random_weights(8, 16, 24)
    a = moe_sorted(x, idx, w, gu, dn, use_grouped_mm=False)
    if grouped_mm_works('cpu', torch.float32):
        torch.testing.assert_close(moe_sorted(x, idx, w, gu, dn, use_grouped_mm=True), a, atol=ATOL, rtol=0)
    torch.testing.assert_close(a, moe_loop(x, idx, w, gu, dn), atol=ATOL, rtol=0)


def test_grouped_mm_probe_is_cached_and_boolean():
    ok = grouped_mm_works('cpu', torch.float32)
    assert isinstance(ok, bool) and M._GROUPED_MM_WORKS[('cpu', torch.float32)] is ok
    assert ok == (M._grouped_mm_fn() is not None and ok)  # never True without a kernel


@pytest.mark.parametrize('impl', list(MOE_IMPLS))
def test_zero_tokens_and_unused_experts(impl):
    gu, dn = random_weights(8, 16, 24)
    x0 = torch.zeros(0, 16)
    idx0, w0 = random_routing(0, 8, 2)
    assert MOE_IMPLS[impl](x0, idx0, w0, gu, dn).shape == (0, 16)
    # every token on expert 5: experts 0-4, 6, 7 get empty groups
    x = torch.randn(6, 16)
    idx = torch.full((6, 1), 5)
    w = torch.ones(6, 1)
    torch.testing.assert_close(MOE_IMPLS[impl](x, idx, w, gu, dn).double(), brute_force(x, idx, w, gu, dn), atol=ATOL, rtol=0)


def test_dense_masked_costs_E_over_k_flops():
    T, E, k, H, I = 32, 8, 2, 16, 24
    x = torch.randn(T, H)
    idx, w = random_routing(T, E, k)
    gu, dn = random_weights(E, H, I)
    counts = {}
    for name, fn in [('loop', moe_loop), ('seg', lambda *a: moe_sorted(*a, use_grouped_mm=False)), ('dense', moe_dense_masked)]:
        with FlopCounterMode(display=False) as fc: fn(x, idx, w, gu, dn)
        counts[name] = fc.get_total_flops()
    assert counts['loop'] == 6 * T * k * H * I
    assert counts['seg'] == 6 * T * k * H * I + 2 * T * k * H      # + the [T,1,k] @ [T,k,H] weighted sum
    assert counts['dense'] == 6 * T * E * H * I == counts['loop'] * E // k


# ---- transformers' MixtralSparseMoeBlock ----------------------------------------------------------------------

def hf_block(E, k, H=32, I=48, seed=0, dtype=torch.float32):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = 'eager'
    block = MixtralSparseMoeBlock(cfg).eval()
    for p in block.parameters(): p.normal_(0, 0.1)
    return block.to(dtype)


@pytest.mark.parametrize('shape', [(1, 1), (3, 7), (2, 256)], ids=['1tok', 'b3x7', 'b2x256=512tok'])
@pytest.mark.parametrize('k', [1, 2, 4])
@pytest.mark.parametrize('E', [4, 8, 16])
def test_matches_transformers_block(E, k, shape):
    hf = hf_block(E, k, seed=E * 10 + k)
    h = torch.randn(*shape, 32, generator=torch.Generator().manual_seed(shape[1]))
    ref = hf(h)
    ours = load_hf_block(hf)
    for impl in MOE_IMPLS:
        ours.impl = impl
        torch.testing.assert_close(ours(h), ref, atol=ATOL, rtol=0, msg=lambda m: f'{impl}: {m}')
    torch.testing.assert_close(to_hf_block(ours)(h), ref, atol=0, rtol=0)   # weight round trip is exact


def test_bf16_close_to_transformers_eager():
    hf = hf_block(8, 2, dtype=torch.bfloat16)
    h = torch.randn(2, 16, 32).bfloat16()
    ref = hf.float()(h.float())       # fp32 math on the same bf16-representable weights
    ours = load_hf_block(hf.bfloat16())
    for impl in MOE_IMPLS:
        ours.impl = impl
        got = ours(h)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


def test_one_expert_equals_dense_swiglu():
    from moe_explained.dense import SwiGLU
    torch.manual_seed(0)
    ffn = SwiGLU(32, 48)
    moe = MixtralMoE(32, 48, num_experts=1, top_k=1)
    moe.gate_up_proj[0] = torch.cat([ffn.w1.weight, ffn.w3.weight])
    moe.down_proj[0] = ffn.w2.weight
    h = torch.randn(3, 5, 32)
    for impl in MOE_IMPLS:
        moe.impl = impl
        torch.testing.assert_close(moe(h), ffn(h), atol=1e-6, rtol=0)


@pytest.mark.parametrize('impl', list(MOE_IMPLS))
def test_one_expert_gradients_equal_dense_swiglu(impl):
    "Training goes through the backward pass: with one expert, d loss / d (input, W1, W3, W2) equal the dense FFN's."
    from moe_explained.dense import SwiGLU
    torch.manual_seed(0)
    ffn = SwiGLU(32, 48)
    moe = MixtralMoE(32, 48, num_experts=1, top_k=1, impl=impl)
    moe.gate_up_proj[0] = torch.cat([ffn.w1.weight, ffn.w3.weight])
    moe.down_proj[0] = ffn.w2.weight
    h = torch.randn(3, 5, 32)
    x1, x2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    with torch.enable_grad():
        moe(x1).pow(2).sum().backward()
        ffn(x2).pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(moe.gate_up_proj.grad[0], torch.cat([ffn.w1.weight.grad, ffn.w3.weight.grad]), atol=1e-5, rtol=0)
    torch.testing.assert_close(moe.down_proj.grad[0], ffn.w2.weight.grad, atol=1e-5, rtol=0)
    assert torch.equal(moe.router.weight.grad, torch.zeros_like(moe.router.weight))  # softmax of one logit is 1


# ---- hub checkpoint layout -----------------------------------------------------------------------------------

def tiny_mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**{**cfg, **kw})).eval()


def test_hub_layout_matches_transformers_save_pretrained():
    from safetensors.torch import load_file
    lm = tiny_mixtral()
    with tempfile.TemporaryDirectory() as d:
        lm.save_pretrained(d)
        saved = {}
        for f in Path(d).glob('*.safetensors'): saved.update(load_file(f))
    for layer in range(2):
        prefix = f'model.layers.{layer}.block_sparse_moe.'
        theirs = {k: v for k, v in saved.items() if k.startswith(prefix)}
        ours = to_hub_state_dict(load_hf_block(lm.model.layers[layer].mlp), prefix=prefix)
        assert sorted(ours) == sorted(theirs) and len(ours) == 1 + 3 * 4
        for key in theirs: assert torch.equal(ours[key], theirs[key]), key   # slicing/stacking copies bits
        back = load_hub_state_dict(saved, top_k=2, prefix=prefix)
        h = torch.randn(2, 5, 32)
        # our dispatcher vs the model's default experts kernel: other summation orders, so a tolerance
        lm.set_experts_implementation('grouped_mm')
        torch.testing.assert_close(back(h), lm.model.layers[layer].mlp(h), atol=ATOL, rtol=0)
        # the reloaded bits through the same `eager` kernel as the model: bitwise by construction, any thread count
        lm.set_experts_implementation('eager')
        torch.testing.assert_close(to_hf_block(back)(h), lm.model.layers[layer].mlp(h), atol=0, rtol=0)


def test_hub_state_dict_round_trip_default_prefix():
    moe = MixtralMoE(16, 24, 4, 2)
    sd = to_hub_state_dict(moe)
    assert 'block_sparse_moe.experts.3.w2.weight' in sd and sd['block_sparse_moe.experts.0.w1.weight'].shape == (24, 16)
    back = load_hub_state_dict(sd, top_k=2)
    for a, b in zip(moe.parameters(), back.parameters()): assert torch.equal(a, b)


# ---- experts interface -----------------------------------------------------------------------------------------

def greedy(model, impl, prompt, n=8):
    model.set_experts_implementation(impl)
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out, model(out).logits


def assert_same_greedy(tokens, logits, ref_tokens, ref_logits, prompt_len, atol=ATOL):
    """Greedy tokens equal the reference's, and why they must: logits agree within `atol`, and at every generated
    position the reference's best logit leads its runner-up by more than 2 * atol, so no argmax can flip."""
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=0)
    top2 = ref_logits[:, prompt_len - 1:-1].topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    assert margin > 2 * atol, f'reference argmax margin {margin:.2e} is within the tolerance: pick another seed'
    assert torch.equal(tokens, ref_tokens)


PROMPT = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def _tiny_model(arch):
    from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, num_experts_per_tok=2)
    torch.manual_seed(0)
    if arch == 'mixtral': return tiny_mixtral()
    if arch == 'qwen3_moe_gelu':
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=8, moe_intermediate_size=24, intermediate_size=64,
                                                  head_dim=8, hidden_act='gelu')).eval()
    return OlmoeForCausalLM(OlmoeConfig(**common, num_experts=8, intermediate_size=24, eos_token_id=None, pad_token_id=0)).eval()


@pytest.mark.parametrize('arch', ['mixtral', 'qwen3_moe_gelu', 'olmoe'])
def test_generate_identical_through_experts_interface(arch):
    model = _tiny_model(arch)
    ref_t, ref_l = greedy(model, 'eager', PROMPT)
    for impl in MOE_IMPLS:
        name = register_experts_impl(f'moe_explained_{impl}', impl)
        calls = []
        real = MOE_IMPLS[impl]
        spy = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
        with mock.patch.dict(MOE_IMPLS, {impl: spy}):
            t, l = greedy(model, name, PROMPT)
        assert len(calls) >= 2 * 8, f'{impl} was not dispatched to ({len(calls)} calls)'   # every layer, every step
        assert_same_greedy(t, l, ref_t, ref_l, PROMPT.shape[1])


def _layout_experts(**flags):
    "A made-up experts module with the given @use_experts_implementation layout flags (transposed / no gate)."
    from transformers.integrations.moe import use_experts_implementation

    class Cfg:  # the decorator only needs `_experts_implementation`
        _experts_implementation = 'eager'

    @use_experts_implementation(**flags)
    class Experts(nn.Module):
        def __init__(self, config, E=6, H=16, I=24):
            super().__init__()
            self.num_experts, self.act_fn = E, nn.ReLU() if not flags.get('has_gate', True) else nn.SiLU()
            out = 2 * I if flags.get('has_gate', True) else I
            w_in = torch.randn(E, H, out) if flags.get('is_transposed') else torch.randn(E, out, H)
            w_out = torch.randn(E, I, H) if flags.get('is_transposed') else torch.randn(E, H, I)
            setattr(self, 'gate_up_proj' if flags.get('has_gate', True) else 'up_proj', nn.Parameter(w_in * 0.2))
            self.down_proj = nn.Parameter(w_out * 0.2)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError('eager not used in this test')
    torch.manual_seed(0)
    return Experts(Cfg())


@pytest.mark.parametrize('flags', [dict(is_transposed=True), dict(has_gate=False)], ids=['transposed', 'no_gate_relu'])
def test_other_layouts_match_transformers_batched_mm(flags):
    from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward
    ex = _layout_experts(**flags)
    x = torch.randn(11, 16)
    idx, w = random_routing(11, 6, 2)
    ref = batched_mm_experts_forward(ex, x, idx, w)
    torch.testing.assert_close(grouped_mm_experts_forward(ex, x, idx, w), ref, atol=ATOL, rtol=0)  # the refs agree
    for impl in MOE_IMPLS:
        torch.testing.assert_close(experts_forward(ex, x, idx, w, impl=impl), ref, atol=ATOL, rtol=0)


def test_unsupported_layouts_raise_clearly():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    gx = GptOssExperts(GptOssConfig(hidden_size=16, intermediate_size=16, num_local_experts=4))
    with pytest.raises(NotImplementedError, match='has_bias=True'):
        experts_forward(gx, torch.randn(3, 16), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    ex = _layout_experts()
    ex._is_expert_parallel = True
    with pytest.raises(NotImplementedError, match='expert-parallel'):
        experts_forward(ex, torch.randn(3, 16), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    with pytest.raises(ValueError, match='unknown impl'):
        register_experts_impl('x', impl='fastest')


# ---- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('impl', list(MOE_IMPLS))
def test_bad_input_value_errors(impl):
    fn = MOE_IMPLS[impl]
    gu, dn = random_weights(4, 16, 24)
    x = torch.randn(5, 16)
    idx, w = random_routing(5, 4, 2)
    cases = [
        ((x[None], idx, w, gu, dn), 'must be 2-D'),
        ((torch.randn(5, 15), idx, w, gu, dn), 'hidden size mismatch'),
        ((x, idx, w, gu[0], dn), 'gate_up_proj must be [E, 2I, H]'),
        ((x, idx, w, gu, dn[:3]), 'does not fit gate_up_proj'),
        ((x, idx[:4], w, gu, dn), 'top_k_index must be [T, k]'),
        ((x, idx.float(), w, gu, dn), 'integer expert ids'),
        ((x, idx, w[:, :1], gu, dn), 'top_k_weights shape'),
        ((x, idx + 3, w, gu, dn), 'outside [0, 4)'),
        ((x, idx - 5, w, gu, dn), 'outside [0, 4)'),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg.replace('[', r'\[').replace(']', r'\]').replace('(', r'\(').replace(')', r'\)')):
            fn(*args)


def test_module_bad_input():
    with pytest.raises(ValueError, match='top_k=3 cannot exceed num_experts=2'): MixtralMoE(8, 8, 2, 3)
    with pytest.raises(ValueError, match='hidden_size must be a positive int'): MixtralMoE(0, 8, 2, 1)
    with pytest.raises(ValueError, match="unknown impl 'fast'"): MixtralMoE(8, 8, 2, 1, impl='fast')
    with pytest.raises(ValueError, match='expected hidden size 8'): MixtralMoE(8, 8, 2, 1)(torch.randn(3, 9))
    with pytest.raises(ValueError, match='expected a transformers MixtralSparseMoeBlock'): load_hf_block(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="missing key 'p.experts.1.w1.weight'"):
        load_hub_state_dict({'p.gate.weight': torch.zeros(2, 8), 'p.experts.0.w1.weight': torch.zeros(4, 8),
                             'p.experts.0.w3.weight': torch.zeros(4, 8), 'p.experts.0.w2.weight': torch.zeros(8, 4)}, prefix='p.')
    from transformers import MixtralConfig
    with pytest.raises(ValueError, match='does not match'):
        to_hf_block(MixtralMoE(8, 8, 2, 1), MixtralConfig(hidden_size=8, intermediate_size=8, num_local_experts=4, num_experts_per_tok=1))
    blk = hf_block(4, 2)
    blk.experts.act_fn = nn.GELU()
    with pytest.raises(ValueError, match='not SiLU'): load_hf_block(blk)


# ---- the stored benchmark --------------------------------------------------------------------------------------

def test_stored_cpu_benchmark_is_complete_and_consistent():
    res = json.loads((ROOT / 'benchmarks' / 'results' / 'moe_cpu.json').read_text())
    env = res['env']
    for key in ('torch', 'threads', 'cpu', 'loadavg_start', 'loadavg_end'): assert key in env
    assert env['shape'] == dict(hidden=1024, intermediate=3584, experts=8, top_k=2)
    rows = res['results']
    assert sorted({r['threads'] for r in rows}) == sorted(env['threads'])
    for threads in env['threads']:
        for dtype in ('fp32', 'bf16'):
            for T in (1, 512):
                sub = {r['impl']: r for r in rows if (r['threads'], r['dtype'], r['tokens']) == (threads, dtype, T)}
                assert {'loop', 'sorted', 'dense_masked', 'eager', 'grouped_mm'} <= set(sub), (threads, dtype, T)
                best = min((r for r in sub.values() if not r['ours']), key=lambda r: r['median_s'])
                for r in sub.values():
                    assert r['ratio_to_best_hf'] == pytest.approx(best['median_s'] / r['median_s'])
                    assert r['tokens_per_s'] == pytest.approx(T / r['median_s'])
                    assert r['max_abs_err_vs_eager'] < (1e-4 if dtype == 'fp32' else 5e-2)


# ---- no host synchronisation on the per-layer path ---------------------------------------------------------------

@pytest.mark.skipif(not grouped_mm_works('cpu', torch.float32), reason="torch's grouped matmul is unavailable here")
def test_per_layer_path_reads_nothing_back_to_the_host():
    "MixtralMoE.forward and the experts-interface adapter (impl='sorted', grouped matmul) never read a value to the host."
    moe = MixtralMoE(16, 24, 8, 2, impl='sorted')
    h = torch.randn(2, 5, 16)
    moe(h)                                                      # warm the grouped-mm probe (it runs once, and syncs)
    with HostReads() as mode: moe(h)
    assert mode.reads == 0
    hf = hf_block(8, 2, H=16, I=24)
    idx, w = random_routing(10, 8, 2)
    with HostReads() as mode: experts_forward(hf.experts, h.reshape(-1, 16), idx, w)
    assert mode.reads == 0
    with HostReads() as mode: moe_sorted(h.reshape(-1, 16), idx, w, moe.gate_up_proj, moe.down_proj)
    assert mode.reads == 2, mode.reads                          # called directly, the id range is checked: min and max
