"""moe_explained.routing against its references: transformers' MixtralTopKRouter (bitwise),
the Mixtral paper's Softmax(TopK) and Shazeer et al. 2017 eqs. 3-5 (per-token transcriptions),
GShard Algorithm 1's random second expert (exact with shared uniforms, and statistically)."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from moe_explained.routing import (Router, dense_gates, expert_load, gshard_top2, noisy_topk_gating,
                                   topk_softmax)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _paper_topk_then_softmax(logits, k):
    "Mixtral paper §2.1: Softmax(TopK(l)), TopK sets the rest to -inf; float64, one token at a time."
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for t, row in enumerate(logits.double()):
        keep = torch.argsort(row, descending=True)[:k]
        masked = torch.full_like(row, -math.inf)
        masked[keep] = row[keep]
        out[t] = torch.softmax(masked, -1)
    return out


# --- softmax -> top-k -> renormalise == top-k -> softmax -----------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_topk_softmax_equals_paper_order(k):
    logits = torch.randn(4096, 8, generator=_gen(k)) * 3
    w, i = topk_softmax(logits, k)
    ref = _paper_topk_then_softmax(logits, k)
    assert torch.equal(i, torch.topk(logits, k, -1).indices)  # top-k of probs == top-k of logits (monotone)
    torch.testing.assert_close(dense_gates(w, i, 8).double(), ref, rtol=0, atol=1e-6)
    assert w.dtype == torch.float32 and i.dtype == torch.int64
    torch.testing.assert_close(w.sum(-1), torch.ones(4096), rtol=0, atol=1e-6)


def test_topk_softmax_k1_weight_is_one():
    w, _ = topk_softmax(torch.randn(10, 8, generator=_gen(0)), 1)
    assert torch.equal(w, torch.ones(10, 1))


# --- Router == MixtralTopKRouter, bitwise ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,k,shape", [(8, 2, (2, 5)), (4, 1, (7,)), (16, 4, (3, 2, 4))])
def test_router_bitwise_equal_to_transformers(dtype, E, k, shape):
    H = 24
    hf = MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=k))
    torch.nn.init.normal_(hf.weight, std=0.5, generator=_gen(1))
    hf = hf.to(dtype)
    ours = Router(H, E, k, dtype=dtype)
    ours.load_state_dict(hf.state_dict())
    h = torch.randn(*shape, H, generator=_gen(2)).to(dtype)
    a, b = ours(h), hf(h)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    assert a[0].dtype == dtype and a[1].dtype == torch.float32 and a[2].dtype == torch.int64
    # and the other way round
    ours2 = Router(H, E, k, dtype=dtype)
    hf.load_state_dict(ours2.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(ours2(h), hf(h)))


def test_router_attributes_and_init():
    r = Router(4096, 8, 2)
    assert (r.hidden_size, r.num_experts, r.top_k) == (4096, 8, 2)
    assert r.weight.shape == (8, 4096) and list(dict(r.named_parameters())) == ["weight"]
    assert abs(r.weight.std().item() - 0.02) < 0.001  # N(0, 0.02^2), transformers' initializer_range
    m = Router(16, 4, 2, device="meta")
    assert m.weight.is_meta


def test_router_bad_input():
    with pytest.raises(ValueError, match="top_k=0"):
        Router(16, 8, 0)
    with pytest.raises(ValueError, match="top_k=9"):
        Router(16, 8, 9)
    with pytest.raises(ValueError, match="num_experts"):
        Router(16, 0, 1)
    with pytest.raises(ValueError, match="hidden_size"):
        Router(0, 8, 2)
    r = Router(16, 8, 2)
    with pytest.raises(ValueError, match="hidden_size=16"):
        r(torch.randn(3, 15))
    with pytest.raises(ValueError, match="dtype"):
        r(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="k=0"):
        topk_softmax(torch.randn(3, 8), 0)
    with pytest.raises(ValueError, match=r"in \[1, 8\] for 8 experts"):
        topk_softmax(torch.randn(3, 8), 9)


# --- noisy top-k (Shazeer et al. 2017) ----------------------------------------------------------------

def _paper_noisy(x, Wg, Wn, k, eps, scale=1.0):
    "Eqs. 3-5 in float64 with given standard-normal draws eps [T, E]."
    x, Wg, Wn, eps = x.double(), Wg.double(), Wn.double(), eps.double()
    H = x @ Wg + scale * eps * F.softplus(x @ Wn)
    return H, _paper_topk_then_softmax(H, k)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_noisy_topk_matches_transcription(k):
    T, d, E = 512, 12, 8
    x, Wg, Wn = (torch.randn(T, d, generator=_gen(0)), torch.randn(d, E, generator=_gen(1)) / 3,
                 torch.randn(d, E, generator=_gen(2)) / 3)
    H, w, i = noisy_topk_gating(x, Wg, Wn, k, generator=_gen(42))
    eps = torch.randn(T, E, generator=_gen(42))  # the same draws, replayed
    H_ref, G_ref = _paper_noisy(x, Wg, Wn, k, eps)
    torch.testing.assert_close(H.double(), H_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(dense_gates(w, i, E).double(), G_ref, rtol=0, atol=1e-5)
    # reproducible with the same seed, different with another
    assert all(torch.equal(a, b) for a, b in zip((H, w, i), noisy_topk_gating(x, Wg, Wn, k, generator=_gen(42))))
    assert not torch.equal(H, noisy_topk_gating(x, Wg, Wn, k, generator=_gen(43))[0])


def test_noisy_topk_without_noise_is_plain_topk():
    x, Wg, Wn = torch.randn(256, 12, generator=_gen(0)), torch.randn(12, 8, generator=_gen(1)), torch.ones(12, 8)
    w_ref, i_ref = topk_softmax(x @ Wg, 2)
    for kw in (dict(noise_scale=0.0), dict(training=False)):
        H, w, i = noisy_topk_gating(x, Wg, Wn, 2, generator=_gen(0), **kw)
        assert torch.equal(H, x @ Wg) and torch.equal(i, i_ref)
        torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-6)


def test_noisy_topk_noise_std_is_softplus():
    # with W_noise = 0 the noise on every logit is N(0, softplus(0)^2) = N(0, ln(2)^2)
    x, Wg = torch.randn(20000, 4, generator=_gen(0)), torch.randn(4, 8, generator=_gen(1))
    H, _, _ = noisy_topk_gating(x, Wg, torch.zeros(4, 8), 2, generator=_gen(5))
    noise = H - x @ Wg
    assert abs(noise.mean().item()) < 5 * math.log(2) / math.sqrt(noise.numel())
    assert abs(noise.std().item() - math.log(2)) < 0.005  # 160k samples: std error of std ~ 0.0012


def test_noisy_topk_bad_input():
    x, Wg = torch.randn(3, 12), torch.randn(12, 8)
    with pytest.raises(ValueError, match="d_model=12"):
        noisy_topk_gating(torch.randn(3, 5), Wg, None, 2)
    with pytest.raises(ValueError, match="w_noise"):
        noisy_topk_gating(x, Wg, torch.randn(8, 12), 2)
    with pytest.raises(ValueError, match="k=9"):
        noisy_topk_gating(x, Wg, None, 9)
    with pytest.raises(ValueError, match="noise_scale"):
        noisy_topk_gating(x, Wg, None, 2, noise_scale=-1.0)
    with pytest.raises(ValueError, match="w_gate"):
        noisy_topk_gating(x, torch.randn(12), None, 2)


# --- GShard top-2 with a random second expert --------------------------------------------------------

def _paper_gshard_keep(logits, rnd):
    "GShard Algorithm 1, second loop without capacity: keep e2 iff 2*g2 > rnd, g2 normalised by g1+g2."
    keep = []
    for row, r in zip(logits.double(), rnd.tolist()):
        g1, g2 = torch.softmax(row, -1).topk(2).values.tolist()
        keep.append(2 * g2 / (g1 + g2) > r)
    return torch.tensor(keep)


def test_gshard_matches_algorithm1_with_shared_uniforms():
    logits = torch.randn(2048, 8, generator=_gen(0)) * 2
    w, i, keep = gshard_top2(logits, generator=_gen(7))
    keep_ref = _paper_gshard_keep(logits, torch.rand(2048, generator=_gen(7)))
    assert torch.equal(keep[:, 1], keep_ref) and keep[:, 0].all()
    w_ref, i_ref = topk_softmax(logits, 2)
    assert torch.equal(i, i_ref)
    assert torch.equal(w, w_ref * keep)  # g1 untouched, g2 zeroed when dropped, no renormalisation
    assert 0.05 < keep[:, 1].float().mean() < 0.95  # the draw really is random at this scale
    assert all(torch.equal(a, b) for a, b in zip((w, i, keep), gshard_top2(logits, generator=_gen(7))))
    assert gshard_top2(logits, training=False)[2].all()


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.1])
def test_gshard_keep_rate_statistics(threshold):
    N = 20000
    g2 = torch.tensor([0.01, 0.05, 0.15, 0.25, 0.4, 0.49])
    lg = torch.full((len(g2), 6), -40.0)
    lg[:, 0], lg[:, 1] = torch.log(1 - g2), torch.log(g2)
    _, _, keep = gshard_top2(lg.repeat(N, 1), threshold=threshold, generator=_gen(int(threshold * 100)))
    rate = keep[:, 1].double().view(N, len(g2)).mean(0)
    p = (g2.double() / threshold).clamp(max=1)
    tol = 5 * (p * (1 - p) / N).sqrt() + 1e-12  # 5 standard errors (<= 0.018)
    assert ((rate - p).abs() <= tol).all(), (rate, p)


def test_gshard_bad_input():
    with pytest.raises(ValueError, match="E >= 2"):
        gshard_top2(torch.randn(4, 1))
    for th in (0, -0.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            gshard_top2(torch.randn(4, 8), threshold=th)


# --- expert_load, dense_gates ------------------------------------------------------------------------

def test_expert_load_brute_force():
    idx = torch.randint(0, 16, (1000, 4), generator=_gen(0))
    mask = torch.rand(1000, 4, generator=_gen(1)) < 0.7
    load = expert_load(idx, 16)
    assert load.dtype == torch.int64 and load.tolist() == [int((idx == e).sum()) for e in range(16)]
    assert expert_load(idx, 16, mask=mask).tolist() == [int(((idx == e) & mask).sum()) for e in range(16)]
    assert expert_load(idx, 20)[16:].tolist() == [0] * 4
    assert expert_load(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_expert_load_bad_input():
    idx = torch.tensor([[0, 3]])
    with pytest.raises(ValueError, match="outside 0..2"):
        expert_load(idx, 3)
    with pytest.raises(ValueError, match="outside"):
        expert_load(torch.tensor([[-1, 0]]), 3)
    with pytest.raises(ValueError, match="integer"):
        expert_load(idx.float(), 4)
    with pytest.raises(ValueError, match="num_experts"):
        expert_load(idx, 0)
    with pytest.raises(ValueError, match="mask"):
        expert_load(idx, 4, mask=torch.ones(3, dtype=torch.bool))


def test_dense_gates():
    w, i = topk_softmax(torch.randn(64, 8, generator=_gen(0)), 3)
    G = dense_gates(w, i, 8)
    assert ((G > 0).sum(-1) == 3).all()
    assert torch.equal(G.gather(-1, i), w)
    with pytest.raises(ValueError, match="same shape"):
        dense_gates(w[:, :2], i, 8)
