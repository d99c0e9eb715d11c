"""Chapter 07: RTN and HQQ quantization against the hqq library, bit packing, meta-quantization, the expert buffer,
and whole models with quantized experts through transformers' experts interface."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moe_explained.quant import (LAYOUT_VERSION, QUANT_IMPL, SUPPORTED_BITS, bits_per_weight, expert_layout, expert_nbytes,
                                 pack_bits, pack_expert, packed_nbytes, quantize_attention, quantize_experts,
                                 quantize_hqq, quantize_rtn, read_expert, unpack_bits)


def rel_err(W, W_hat):
    return ((W.float() - W_hat.float()).norm() / W.float().norm()).item()


def hqq_library(W, bits, group_size, axis):
    "The reference: the hqq library's quantize -> dequantize (float32, CPU, no meta-quantization)."
    from hqq.core.quantize import Quantizer
    Wq, meta = Quantizer.quantize(W, nbits=bits, group_size=group_size, axis=axis, device="cpu", compute_dtype=torch.float32)
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(Wq, meta)


def _matrices():
    g = torch.Generator().manual_seed(0)
    from moe_explained.pretrained import tiny_mixtral
    model, _ = tiny_mixtral()
    ex = model.model.layers[2].mlp.experts
    return {"gaussian": torch.randn(384, 256, generator=g),
            "student-t": torch.distributions.StudentT(3.0).sample((256, 256)),
            "tiny w_in": ex.gate_up_proj[3].detach(), "tiny w_out": ex.down_proj[5].detach()}


MATRICES = _matrices()
WIDTHS = [(8, 64), (4, 64), (3, 64), (3, 32), (2, 16), (2, 64)]


@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("bits,group_size", WIDTHS)
@pytest.mark.parametrize("axis", [1, 0])
def test_hqq_matches_the_hqq_library(name, bits, group_size, axis):
    W = MATRICES[name]
    ref = rel_err(W, hqq_library(W, bits, group_size, axis))
    ours = rel_err(W, quantize_hqq(W, bits, group_size, axis).dequantize())
    assert abs(ours / ref - 1) < 0.01, (ours, ref)                       # the paper's kappa=1.01: within 1%
    same = rel_err(W, quantize_hqq(W, bits, group_size, axis, kappa=1.0).dequantize())
    assert abs(same / ref - 1) < 1e-3, (same, ref)                       # hqq's fixed beta: its error


@pytest.mark.parametrize("name", list(MATRICES))
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_hqq_beats_round_to_nearest_at_every_width(name, bits):
    W = MATRICES[name]
    g = 16 if bits <= 2 else 64
    assert rel_err(W, quantize_hqq(W, bits, g).dequantize()) < rel_err(W, quantize_rtn(W, bits, g).dequantize())


def test_rtn_is_the_affine_formula():
    W = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0, 2.0, 2.0, 3.0]])
    q = quantize_rtn(W, bits=2, group_size=8)
    s, z = 4.0 / 3, 0.75                                                   # (max - min) / 3, -min / s
    torch.testing.assert_close(q.scale.flatten(), torch.tensor([s]))
    torch.testing.assert_close(q.zero.flatten(), torch.tensor([z]))
    torch.testing.assert_close(q.Wq.flatten(), torch.round(W / s + z).clamp(0, 3).flatten())
    assert q.Wq.min() == 0 and q.Wq.max() == 3


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, n, seed):
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == math.ceil(n * bits / 8 / (3 if bits == 3 else 1)) * (3 if bits == 3 else 1)
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


def test_packing_is_dense_and_lowest_bits_first():
    assert pack_bits(torch.tensor([0, 1, 2, 3]), 2).tolist() == [0b11100100]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    assert pack_bits(torch.tensor([7] * 8), 3).tolist() == [255, 255, 255]
    assert [packed_nbytes(1000, b) for b in (1, 2, 3, 4, 8)] == [125, 250, 375, 500, 1000]


def test_bits_per_weight_is_the_arithmetic():
    assert bits_per_weight(2, 16) == 4.0 and bits_per_weight(4, 64) == 4.5
    assert bits_per_weight(2, 16, 8) == 2 + 16 / 16 + 64 / (16 * 128)
    mixtral = dict(w_in=(2 * 14336, 4096), w_out=(4096, 14336))
    n = 3 * 14336 * 4096
    for b, g, meta in [(2, 16, 8), (4, 64, 8), (2, 16, None), (3, 64, None)]:
        nb = expert_nbytes(mixtral, bits=b, group_size=g, meta_bits=meta)
        assert 0 <= nb - n * bits_per_weight(b, g, meta) / 8 < 4096       # header and alignment: under 4 KB
    assert round(expert_nbytes(mixtral, bits=2, group_size=16) / 1e6, 2) == 66.75
    assert round(expert_nbytes(mixtral, bits=4, group_size=64) / 1e6, 2) == 93.76


@pytest.mark.parametrize("bits,group_size,meta_bits", [(2, 16, 8), (2, 16, None), (3, 64, 8), (4, 64, None), (1, 16, 8), (8, 32, None)])
def test_buffer_round_trip(bits, group_size, meta_bits):
    w_in, w_out = MATRICES["tiny w_in"], MATRICES["tiny w_out"]
    buf = pack_expert(dict(w_in=w_in, w_out=w_out), bits, group_size, meta_bits=meta_bits)
    assert buf.ndim == 1 and buf.dtype == torch.uint8
    assert buf.numel() == expert_nbytes(dict(w_in=w_in.shape, w_out=w_out.shape), bits=bits, group_size=group_size, meta_bits=meta_bits)
    ex = read_expert(buf)
    ptr = buf.untyped_storage().data_ptr()
    for sections in ex.arrays.values():                                   # views, not copies
        for v in sections.values():
            assert v.untyped_storage().data_ptr() == ptr and v.data_ptr() % 2 == 0
    for name, W in (("w_in", w_in), ("w_out", w_out)):
        direct = quantize_hqq(W, bits, group_size).dequantize()
        got = ex.dequantize(name)
        assert got.shape == W.shape
        shift = rel_err(direct, got)                                       # fp16 or 8-bit meta storage of s and z
        assert shift < 1e-2, shift
        assert rel_err(W, got) < 1.02 * rel_err(W, direct) + 1e-3
    x = torch.randn(4, w_in.shape[1])
    act = lambda gu: torch.nn.functional.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]
    ref = torch.nn.functional.linear(act(torch.nn.functional.linear(x, ex.dequantize("w_in"))), ex.dequantize("w_out"))
    torch.testing.assert_close(ex.forward(x, act), ref)


def test_fewer_meta_bits_shift_the_weights_more():
    W = MATRICES["tiny w_in"]
    direct = quantize_hqq(W, 4, 32).dequantize()
    shift = {mb: rel_err(direct, read_expert(pack_expert(dict(w_in=W), 4, 32, meta_bits=mb)).dequantize("w_in"))
             for mb in (None, 8, 4)}
    assert shift[None] < shift[8] < shift[4], shift


def test_bad_input_is_refused_by_name():
    w_in, w_out = MATRICES["tiny w_in"], MATRICES["tiny w_out"]
    with pytest.raises(ValueError, match="bits=5 is not supported"): quantize_hqq(w_in, 5, 64)
    with pytest.raises(ValueError, match="bits=True is not supported"): quantize_rtn(w_in, True, 64)
    with pytest.raises(ValueError, match="group_size=48 does not divide the 65536 weights"): quantize_rtn(w_in, 4, 48)
    with pytest.raises(ValueError, match=r"does not divide the last dimension \(128\)"): pack_expert(dict(w_in=w_in), group_size=256)
    with pytest.raises(ValueError, match="axis must be 0 or 1"): quantize_rtn(w_in, 4, 64, axis=2)
    with pytest.raises(ValueError, match="meta_bits=6 is not supported"): expert_layout(dict(w_in=(4, 64)), meta_bits=6)
    with pytest.raises(ValueError, match="2-D weight"): expert_layout(dict(w_in=(4, 4, 64)))
    with pytest.raises(ValueError, match="method must be 'hqq' or 'rtn'"): pack_expert(dict(w_in=w_in), method="gptq")
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"): pack_bits(torch.tensor([4]), 2)
    buf = pack_expert(dict(w_in=w_in, w_out=w_out), 2, 16)
    with pytest.raises(ValueError, match="truncated expert buffer"): read_expert(buf[:10])
    with pytest.raises(ValueError, match="truncated expert buffer"): read_expert(buf[:200])
    with pytest.raises(ValueError, match="truncated expert buffer: .* its header says"): read_expert(buf[:-64])
    for where in (40, buf.numel() // 2, buf.numel() - 1):                 # header, payload, last byte
        bad = buf.clone(); bad[where] ^= 0x10
        with pytest.raises(ValueError, match="corrupted expert buffer"): read_expert(bad)
    read_expert(bad, verify=False)                                         # the engine may skip the check it paid for once
    bad = buf.clone(); bad[4] = LAYOUT_VERSION + 1
    with pytest.raises(ValueError, match=f"layout version {LAYOUT_VERSION + 1}; this moe_explained reads version {LAYOUT_VERSION}"):
        read_expert(bad)
    bad = buf.clone(); bad[:4] = torch.tensor(list(b"GGUF"))
    with pytest.raises(ValueError, match="not a moe_explained expert buffer"): read_expert(bad)
    with pytest.raises(ValueError, match="1-D uint8 tensor"): read_expert(buf.float())


# ---- whole models --------------------------------------------------------------------------------------------

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2)


def _family(name):
    from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    if name == "mixtral": return MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4)).eval()
    if name == "qwen3_moe_gelu":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=64, intermediate_size=64,
                                                  head_dim=16, hidden_act="gelu", mlp_only_layers=[0])).eval()
    return OlmoeForCausalLM(OlmoeConfig(**COMMON, num_experts=8, intermediate_size=64, eos_token_id=None, pad_token_id=0)).eval()


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe_gelu", "olmoe"])
def test_quantized_model_error_is_bounded_and_falls_with_bits(family):
    with torch.no_grad():
        ref = _family(family)(IDS).logits
        errs = []
        for bits, g in [(2, 16), (3, 64), (4, 64), (8, 64)]:
            m = quantize_experts(_family(family), bits, g, progress=False)
            assert m.config._experts_implementation == QUANT_IMPL
            assert not any(n.endswith(("gate_up_proj", "down_proj")) for n, _ in m.named_parameters())   # dense experts dropped
            errs.append(rel_err(ref, m(IDS).logits))
    assert errs == sorted(errs, reverse=True) and errs[0] < 0.1 and errs[-1] < 0.01, errs


def test_quantized_experts_equal_the_dequantized_dense_model():
    "The quantized implementation computes exactly the MoE of the dequantized weights (the reference: a dense model holding them)."
    from moe_explained.moe import experts_forward
    with torch.no_grad():
        m = quantize_experts(_family("mixtral"), 2, 16, progress=False)
        ex = m.model.layers[0].mlp.experts
        w_in = torch.stack([read_expert(ex.moe_qbuf[e]).dequantize("w_in") for e in range(4)])
        w_out = torch.stack([read_expert(ex.moe_qbuf[e]).dequantize("w_out") for e in range(4)])
        dense = _family("mixtral").model.layers[0].mlp.experts
        dense.gate_up_proj.copy_(w_in); dense.down_proj.copy_(w_out)
        x = torch.randn(9, 64)
        idx = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
        w = torch.rand(9, 2)
        torch.testing.assert_close(ex(x, idx, w), experts_forward(dense, x, idx, w, impl="loop"), atol=1e-5, rtol=0)


def test_generate_runs_with_quantized_experts_and_attention():
    m = quantize_attention(quantize_experts(_family("olmoe"), 4, 64, progress=False), 4, 64)
    from hqq.core.quantize import HQQLinear
    assert isinstance(m.model.layers[0].self_attn.q_proj, HQQLinear)
    out = m.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 15)


def test_models_it_cannot_serve_are_refused():
    from transformers import GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}, intermediate_size=64))
    with pytest.raises(ValueError, match="no experts module using transformers' experts interface"):
        quantize_experts(llama)
    oss = GptOssForCausalLM(GptOssConfig(**COMMON | dict(num_hidden_layers=1), intermediate_size=64, num_local_experts=4,
                                         layer_types=["full_attention"]))
    with pytest.raises(NotImplementedError, match="has_bias=True"):
        quantize_experts(oss)
    m = quantize_experts(_family("mixtral"), 2, 16, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts(m)
    with pytest.raises(ValueError, match=r"does not divide the last dimension \(64\)"):
        quantize_attention(_family("mixtral"), 4, 128)


def test_meta_quantization_cannot_overflow():
    """Scales nearly equal within a meta group (spread 2e-5 around 0.01): the meta zero point -min/s would be about
    -1.3e5, past fp16's 65504 (-inf, and NaN weights); the stored minimum is a value of the group itself."""
    torch.manual_seed(0)
    base = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(4) * 0.01
    W = torch.stack([base * (1 + 2e-3 * torch.rand(())) for _ in range(4096)]).reshape(-1, 256)   # 4096 groups of 16
    q = quantize_rtn(W, 2, 16)
    assert float(q.scale.max() - q.scale.min()) < 3e-5
    buf = read_expert(pack_expert({'w_in': W, 'w_out': W}, bits=2, group_size=16))
    for name in ('w_in', 'w_out'):
        a = buf.arrays[name]
        assert 'scale_zero' not in a and bool(torch.isfinite(a['scale_min']).all())
        assert float((a['scale_min'].float() / a['scale_scale'].float()).abs().max()) > 65504   # the zero point fp16 cannot hold
        D = buf.dequantize(name)
        assert bool(torch.isfinite(D).all()) and torch.allclose(D, q.dequantize(), atol=1e-4)
