"""moe_explained.losses against transformers' own loss functions, the papers' formulas written as loops,
and a Monte-Carlo brute force; properties; bad input."""
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as hf_lb
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func as hf_switch, router_z_loss_func as hf_z)

from moe_explained.losses import (cv_squared, importance_loss, load_balancing_loss, load_loss, prob_in_top_k,
                                  router_z_loss, switch_load_balancing_loss)

TOL = 1e-6   # float32 sums over a few hundred tokens


def _batch(E=8, L=3, B=4, S=16, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = tuple(torch.randn(B * S, E, generator=g) * scale for _ in range(L))
    pad = torch.randint(0, S - 1, (B,), generator=g)
    mask = (torch.arange(S)[None] >= pad[:, None]).long()      # left padding, every row keeps >= 1 token
    return layers, mask


@pytest.mark.parametrize("E,k,L", [(8, 2, 3), (8, 1, 1), (4, 4, 2), (16, 3, 2), (2, 1, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(E, k, L, masked):
    layers, mask = _batch(E=E, L=L, seed=E * 10 + k)
    m = mask if masked else None
    torch.testing.assert_close(load_balancing_loss(layers, E, k, m), hf_lb(layers, E, k, m), rtol=0, atol=TOL)


def test_load_balancing_loss_accepts_tensor_and_3d():
    layers, mask = _batch()
    x = layers[0]
    ref = hf_lb((x,), 8, 2)
    torch.testing.assert_close(load_balancing_loss(x, 8, 2), ref, rtol=0, atol=TOL)
    torch.testing.assert_close(load_balancing_loss(x.reshape(4, 16, 8), 8, 2), ref, rtol=0, atol=TOL)
    torch.testing.assert_close(load_balancing_loss(list(layers), 8, 2), hf_lb(layers, 8, 2), rtol=0, atol=TOL)


def _lb_loop(layers, E, k, mask=None):
    counts, psum, n = [0.0] * E, [0.0] * E, 0.0
    for lg in layers:
        p = lg.softmax(-1)
        m = torch.ones(len(lg)) if mask is None else mask.reshape(-1).float()
        for x in range(len(lg)):
            chosen = set(p[x].topk(k).indices.tolist())
            for i in range(E):
                counts[i] += m[x].item() * (i in chosen)
                psum[i] += m[x].item() * p[x, i].item()
            n += m[x].item()
    return E * sum((c / n) * (s / n) for c, s in zip(counts, psum))


def test_load_balancing_loss_matches_formula_loop():
    layers, mask = _batch(L=2, S=8)
    assert load_balancing_loss(layers, 8, 2, mask).item() == pytest.approx(_lb_loop(layers, 8, 2, mask), abs=1e-5)


@pytest.mark.parametrize("k", range(1, 9))
def test_uniform_routing_gives_k(k):
    g = torch.Generator().manual_seed(k)
    flat = torch.randn(8192, 8, generator=g) * 1e-6   # P_i = 1/E to 6 digits; random tie-breaking in top-k
    assert load_balancing_loss(flat, 8, k).item() == pytest.approx(k, rel=0.02)
    assert switch_load_balancing_loss(flat).item() == pytest.approx(1.0, rel=0.02)


def test_collapsed_routing_gives_E():
    logits = torch.zeros(100, 8)
    logits[:, 3] = 50.0
    assert switch_load_balancing_loss(logits).item() == pytest.approx(8.0, abs=1e-5)
    assert load_balancing_loss(logits, 8, 1).item() == pytest.approx(8.0, abs=1e-5)


def test_mask_equals_dropping_padding():
    layers, mask = _batch()
    keep = mask.reshape(-1).bool()
    dropped = tuple(l[keep] for l in layers)
    torch.testing.assert_close(load_balancing_loss(layers, 8, 2, mask), load_balancing_loss(dropped, 8, 2), rtol=0, atol=TOL)
    torch.testing.assert_close(router_z_loss(layers, mask), router_z_loss(dropped), rtol=0, atol=TOL)
    torch.testing.assert_close(switch_load_balancing_loss(layers, mask), switch_load_balancing_loss(dropped), rtol=0, atol=TOL)


def test_gradient_flows_through_P_only():
    layers, _ = _batch(L=1)
    x = layers[0].clone().requires_grad_()
    load_balancing_loss(x, 8, 2).backward()
    p = x.detach().softmax(-1)
    f = F.one_hot(p.topk(2, -1).indices, 8).sum(1).float().mean(0)
    y = x.detach().clone().requires_grad_()
    (8 * (f * y.softmax(-1).mean(0)).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-7)


def test_switch_matches_paper_and_transformers():
    layers, mask = _batch()
    x = layers[0]
    p = x.softmax(-1)
    f = F.one_hot(p.argmax(-1), 8).float().mean(0)
    paper = 8 * (f * p.mean(0)).sum()
    torch.testing.assert_close(switch_load_balancing_loss(x), paper, rtol=0, atol=TOL)
    torch.testing.assert_close(switch_load_balancing_loss(x), hf_switch(p[None], p.argmax(-1)[None]), rtol=0, atol=TOL)
    torch.testing.assert_close(switch_load_balancing_loss(layers, mask), hf_lb(layers, 8, 1, mask), rtol=0, atol=TOL)
    torch.testing.assert_close(switch_load_balancing_loss(x, alpha=1e-2), 1e-2 * paper, rtol=0, atol=1e-8)


def test_router_z_loss_matches_transformers_and_formula():
    layers, _ = _batch()
    x3 = layers[0].reshape(4, 16, 8)
    # z-loss values are ~15 here, where float32 spacing is ~1e-6: compare relatively
    torch.testing.assert_close(router_z_loss(x3), hf_z(x3), rtol=1e-6, atol=TOL)
    torch.testing.assert_close(router_z_loss(layers), hf_z(torch.stack(layers)), rtol=1e-6, atol=TOL)
    loop = sum(math.log(sum(math.exp(v) for v in row.tolist())) ** 2 for row in layers[0]) / len(layers[0])
    assert router_z_loss(layers[0]).item() == pytest.approx(loop, rel=1e-5)


def test_router_z_loss_is_zero_when_log_partition_is_zero():
    layers, _ = _batch()
    x = layers[0] - torch.logsumexp(layers[0], -1, keepdim=True)
    assert router_z_loss(x).item() == pytest.approx(0.0, abs=1e-10)
    assert router_z_loss(torch.zeros(10, 8)).item() == pytest.approx(math.log(8) ** 2, rel=1e-6)


def test_cv_squared():
    v = torch.tensor([0.3, 1.2, 0.7, 2.5, 0.1])
    ref = statistics.pstdev(v.tolist()) ** 2 / statistics.mean(v.tolist()) ** 2
    assert cv_squared(v).item() == pytest.approx(ref, rel=1e-5)
    assert cv_squared(torch.ones(8)).item() == 0.0
    assert cv_squared(torch.tensor([5.0])).item() == 0.0
    assert cv_squared(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(3.0, rel=1e-6)


def _noisy_gate(T=48, E=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, d, generator=g)
    clean = X @ (torch.randn(d, E, generator=g) / 4)
    std = F.softplus(X @ (torch.randn(d, E, generator=g) / 4))
    noisy = clean + torch.randn(T, E, generator=g) * std
    return clean, noisy, std, g


def _kth_excluding(v, k, i):
    return torch.cat([v[:i], v[i + 1:]]).sort(descending=True).values[k - 1]


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_prob_in_top_k_matches_formula_loop(k):
    clean, noisy, std, _ = _noisy_gate()
    T, E = clean.shape
    ref = torch.tensor([[0.5 * (1 + math.erf(((clean[x, i] - _kth_excluding(noisy[x], k, i)) / std[x, i]).item() / math.sqrt(2)))
                         for i in range(E)] for x in range(T)])
    torch.testing.assert_close(prob_in_top_k(clean, noisy, std, k), ref, rtol=0, atol=1e-5)


def test_prob_in_top_k_matches_monte_carlo():
    clean, noisy, std, g = _noisy_gate(T=16)
    k, n = 2, 20_000
    T, E = clean.shape
    thr = torch.stack([torch.stack([_kth_excluding(noisy[x], k, i) for i in range(E)]) for x in range(T)])
    mc = ((clean + torch.randn(n, T, E, generator=g) * std) > thr).float().mean(0)
    torch.testing.assert_close(prob_in_top_k(clean, noisy, std, k), mc, rtol=0, atol=0.02)   # SE <= 0.0035


def test_importance_and_load_loss_match_definitions():
    clean, noisy, std, _ = _noisy_gate()
    k = 2
    top = noisy.topk(k, -1)
    gates = torch.zeros_like(noisy).scatter(1, top.indices, top.values.softmax(-1))
    imp = gates.sum(0).tolist()
    assert importance_loss(gates).item() == pytest.approx(statistics.pstdev(imp) ** 2 / statistics.mean(imp) ** 2, rel=1e-5)
    assert importance_loss(gates, w=0.1).item() == pytest.approx(0.1 * importance_loss(gates).item(), rel=1e-6)
    load = prob_in_top_k(clean, noisy, std, k).sum(0).tolist()
    assert load_loss(clean, noisy, std, k).item() == pytest.approx(statistics.pstdev(load) ** 2 / statistics.mean(load) ** 2, rel=1e-5)
    mask = (torch.arange(48) < 30).reshape(3, 16)
    torch.testing.assert_close(importance_loss(gates.reshape(3, 16, 8), mask), importance_loss(gates[:30]), rtol=0, atol=TOL)
    torch.testing.assert_close(load_loss(clean, noisy, std, k, mask), load_loss(clean[:30], noisy[:30], std[:30], k), rtol=0, atol=TOL)


def test_equal_importance_can_hide_unequal_load():
    ex = torch.zeros(10, 4)
    ex[0:2, 0] = 1.0; ex[2:6, 1] = 0.5; ex[6:8, 2] = 1.0; ex[8:10, 3] = 1.0
    assert importance_loss(ex).item() == 0.0
    assert cv_squared((ex > 0).sum(0).float()).item() == pytest.approx(0.12, rel=1e-5)   # loads 2,4,2,2: var 0.75 / mean^2 6.25


def test_load_loss_has_gradient():
    clean, noisy, std, _ = _noisy_gate()
    c = clean.clone().requires_grad_()
    s = std.clone().requires_grad_()
    load_loss(c, noisy, s, 2).backward()
    assert c.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


@pytest.mark.parametrize("call,msg", [
    (lambda l, m: load_balancing_loss(l, 6, 2), "num_experts=6"),
    (lambda l, m: load_balancing_loss(l, 8, 0), "top_k=0 is out of range: need an integer in [1, 8]"),
    (lambda l, m: load_balancing_loss(l, 8, 2.0), "top_k must be an integer"),
    (lambda l, m: load_balancing_loss(l, 8, 2, m[:, :8]), "attention_mask has 32 elements"),
    (lambda l, m: load_balancing_loss(l, 8, 2, torch.zeros(4, 16)), "no real tokens"),
    (lambda l, m: load_balancing_loss(l, 8, 2, -m), "non-negative"),
    (lambda l, m: load_balancing_loss(l, 8, 2, m.tolist()), "attention_mask must be a tensor"),
    (lambda l, m: load_balancing_loss((), 8, 2), "non-empty tuple"),
    (lambda l, m: load_balancing_loss(None, 8, 2), "non-empty tuple"),
    (lambda l, m: load_balancing_loss((l[0], l[1][:5]), 8, 2), "same number of tokens"),
    (lambda l, m: load_balancing_loss(torch.ones(8), 8, 2), "shape [T, E] or [B, S, E]"),
    (lambda l, m: load_balancing_loss((l[0], [1, 2]), 8, 2), "router_logits[1] is a list"),
    (lambda l, m: switch_load_balancing_loss(torch.zeros(0, 8)), "no tokens"),
    (lambda l, m: router_z_loss(torch.ones(4, 8, dtype=torch.long)), "floating-point"),
    (lambda l, m: cv_squared(torch.ones(2, 2)), "1-D tensor"),
    (lambda l, m: cv_squared(torch.ones(0)), "empty"),
    (lambda l, m: importance_loss(torch.ones(8)), "gates must be a float tensor"),
    (lambda l, m: prob_in_top_k(l[0], l[0], l[0].abs() + 0.1, 8), "k=8 is out of range: need an integer in [1, 7]"),
    (lambda l, m: prob_in_top_k(l[0], l[0], -l[0].abs(), 2), "noise_std must be positive"),
    (lambda l, m: prob_in_top_k(l[0], l[0][:5], l[0].abs(), 2), "same shape"),
])
def test_bad_input_raises_value_error(call, msg):
    layers, mask = _batch()
    with pytest.raises(ValueError, match=None) as e:
        call(layers, mask)
    assert msg in str(e.value)
