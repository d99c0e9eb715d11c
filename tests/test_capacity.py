"""Tests for moe_explained.capacity: expert capacity, GShard-priority token dropping, dispatch/combine, dropless.

References: a brute-force Python loop of GShard Algorithm 1 (Lepikhin et al. 2020), DeepSpeed-MoE's `_capacity`
formula, and the capacity logic of transformers' `SwitchTransformersTop1Router` and `NllbMoeTop2Router`.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moe_explained.capacity import (capacity_moe_einsum, capacity_moe_indexed, dispatch_combine_tensors,
                                    dropless_moe, dropped_fraction, expert_capacity, route_with_capacity)

ATOL = RTOL = 1e-5   # float32 layer outputs (measured worst case ~1e-6)


# ---------------------------------------------------------------- references

def route_loop(top_k_index, num_experts, capacity):
    "GShard Algorithm 1, one assignment at a time: first choices in token order, then second choices, ..."
    T, k = top_k_index.shape
    count = [0] * num_experts
    position = torch.zeros(T, k, dtype=torch.long)
    for j in range(k):
        for t in range(T):
            e = int(top_k_index[t, j])
            position[t, j] = count[e]
            count[e] += 1
    return position, position < capacity


def moe_loop(x, top_k_index, top_k_weights, experts, keep):
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k_index.shape[1]):
            if keep[t, j]:
                y[t] += top_k_weights[t, j] * experts[int(top_k_index[t, j])](x[t:t + 1])[0]
    return y


def make_swiglu_experts(E, d_model, d_ff, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def make():
        w1, w3 = (torch.randn(d_ff, d_model, generator=g, dtype=dtype) / d_model**0.5 for _ in range(2))
        w2 = torch.randn(d_model, d_ff, generator=g, dtype=dtype) / d_ff**0.5
        return lambda h: (F.silu(h @ w1.T) * (h @ w3.T)) @ w2.T
    return [make() for _ in range(E)]


def random_routing(T, E, k, seed, skew=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=dtype) - skew * torch.log(torch.arange(1, E + 1, dtype=dtype))
    w, idx = torch.topk(logits.softmax(-1), k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


# ---------------------------------------------------------------- expert_capacity

def test_capacity_matches_deepspeed_formula():
    # DeepSpeed-MoE's _capacity (top-1): ceil((num_tokens / num_experts) * capacity_factor), floored at min_capacity
    for T in (1, 7, 64, 1000, 4096):
        for E in (1, 3, 8, 64):
            for cf in (0.5, 1.0, 1.25, 2.0, 3.3):
                for m in (0, 4):
                    ds = int(max(torch.ceil(torch.tensor(T / E) * cf).to(torch.int64), torch.tensor(m)))
                    assert expert_capacity(T, E, 1, cf, m) == min(T, ds), (T, E, cf, m)


def test_capacity_examples():
    assert expert_capacity(10, 4, 1, 1.0, 0) == 3             # ceil(2.5), where int() would give 2
    assert expert_capacity(4096, 8, 2, 1.25) == 1280          # 1.25 * 4096 * 2 / 8
    assert expert_capacity(4096, 8, 2, 8 / 2) == 4096         # capacity factor E/k gives C = T
    assert expert_capacity(1, 8, 2, 1.25) == 1                # capped at T
    assert expert_capacity(100, 64, 1, 1.0) == 4              # floored at min_capacity
    assert expert_capacity(0, 8, 2, 1.0) == 0


@pytest.mark.parametrize("T,E,k", [(10, 4, 1), (333, 8, 2), (4096, 64, 6)])
def test_capacity_gives_room_for_a_perfectly_balanced_batch(T, E, k):
    # at capacity factor 1, E*C slots hold all T*k assignments (ceil), unlike int() truncation
    assert E * expert_capacity(T, E, k, 1.0, 0) >= T * k


@pytest.mark.parametrize("args,msg", [
    ((100, 8, 2, 0.0), "capacity_factor"), ((100, 8, 2, -1.25), "capacity_factor"),
    ((100, 8, 2, float("nan")), "capacity_factor"), ((100, 8, 2, float("inf")), "capacity_factor"),
    ((100, 8, 2, "1.0"), "capacity_factor"), ((100, 8, 9, 1.0), "top_k=9 is larger than num_experts=8"),
    ((100.5, 8, 2, 1.0), "num_tokens must be an integer"), ((-3, 8, 2, 1.0), "num_tokens must be >= 0"),
    ((True, 8, 2, 1.0), "num_tokens must be an integer"), ((100, 0, 1, 1.0), "num_experts must be >= 1"),
    ((100, 8, 0, 1.0), "top_k must be >= 1"), ((100, 8, 2, 1.0, -1), "min_capacity must be >= 0"),
])
def test_capacity_bad_input(args, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[")):
        expert_capacity(*args)


# ---------------------------------------------------------------- route_with_capacity

@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (17, 4, 1), (64, 8, 2), (100, 5, 3), (33, 16, 4), (256, 8, 8)])
def test_route_matches_gshard_loop(T, E, k):
    idx, _ = random_routing(T, E, k, seed=T + E + k, skew=0.7)
    for C in (0, 1, 3, expert_capacity(T, E, k, 1.0), T):
        pos, keep = route_with_capacity(idx, E, C)
        ref_pos, ref_keep = route_loop(idx, E, C)
        assert torch.equal(pos, ref_pos) and torch.equal(keep, ref_keep)


def test_first_choices_beat_second_choices():
    # token 0's second choice (expert 1) loses to the later tokens 3 and 5 whose FIRST choice is expert 1
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [1, 2]])
    _, keep = route_with_capacity(idx, 3, 2)
    assert keep.tolist() == [[True, False], [True, True], [False, False], [True, False], [True, False], [True, False]]


@pytest.mark.parametrize("T,E,cf,seed", [(64, 4, 1.0, 0), (300, 8, 1.25, 1), (300, 8, 0.5, 2), (1000, 16, 2.0, 3)])
def test_route_matches_transformers_switch_router(T, E, cf, seed):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + torch.linspace(0, 2, E)
    C = expert_capacity(T, E, 1, cf)
    router = SwitchTransformersTop1Router(SwitchTransformersConfig(d_model=E, num_experts=E, expert_capacity=C,
                                                                   router_jitter_noise=0.0)).eval()
    with torch.no_grad():
        router.classifier.weight.copy_(torch.eye(E))
        expert_mask, _, _ = router(logits[None])
    _, keep = route_with_capacity(logits.argmax(-1, keepdim=True), E, C)
    assert torch.equal(keep[:, 0], expert_mask[0].sum(-1).bool())
    assert not keep.all()   # the skew makes the comparison non-trivial


@pytest.mark.parametrize("T,E,cf,seed", [(64, 4, 1.0, 0), (300, 8, 1.25, 1), (300, 8, 0.5, 2), (1000, 16, 2.0, 3)])
def test_combine_matches_transformers_nllb_top2_router(T, E, cf, seed):
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + torch.linspace(0, 2, E)
    C = expert_capacity(T, E, 2, cf)
    cfg = NllbMoeConfig(d_model=E, num_experts=E, expert_capacity=C, second_expert_policy="all",
                        batch_prioritized_routing=False, normalize_router_prob_before_dropping=True,
                        moe_eval_capacity_token_fraction=-1.0)
    _, ref = NllbMoeTop2Router(cfg).eval().route_tokens(logits.clone())
    w, idx = torch.topk(logits.softmax(-1), 2, dim=-1)
    dispatch, combine = dispatch_combine_tensors(idx, w / w.sum(-1, keepdim=True), E, C)
    torch.testing.assert_close(combine.sum(-1), ref, atol=1e-6, rtol=0)
    assert (ref > 0).sum() < 2 * T   # something was dropped in every case


@pytest.mark.parametrize("T,E,k", [(64, 8, 2), (1000, 16, 1), (512, 6, 3)])
@pytest.mark.parametrize("cf", [0.25, 0.5, 1.0, 1.25, 2.0])
def test_dropped_fraction_matches_overflow_count(T, E, k, cf):
    idx, _ = random_routing(T, E, k, seed=T, skew=0.5)
    C = expert_capacity(T, E, k, cf)
    n = torch.bincount(idx.reshape(-1), minlength=E)
    expected = (n - C).clamp(min=0).sum().item() / (T * k)        # sum_e max(0, n_e - C), any priority rule
    assert math.isclose(dropped_fraction(route_with_capacity(idx, E, C)[1]), expected, abs_tol=1e-6)
    assert expected >= 1 - E * C / (T * k) - 1e-12                 # fewer slots than assignments => drops


# ---------------------------------------------------------------- dispatch / combine

def test_dispatch_combine_properties():
    idx, w = random_routing(200, 8, 2, seed=5, skew=1.0)
    C = expert_capacity(200, 8, 2, 1.0)
    dispatch, combine = dispatch_combine_tensors(idx, w, 8, C)
    _, keep = route_loop(idx, 8, C)
    assert dispatch.shape == combine.shape == (200, 8, C) and dispatch.dtype == torch.bool
    assert dispatch.sum(0).max() == 1                                  # one token per slot
    assert torch.equal(dispatch.sum((1, 2)), keep.sum(1))              # one slot per kept choice
    assert torch.equal(combine != 0, dispatch)
    torch.testing.assert_close(combine.sum((1, 2)), (w * keep).sum(1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the MoE layers

CASES = [(16, 4, 1, 1.0), (40, 4, 2, 0.5), (64, 8, 2, 1.25), (50, 6, 3, 1.0), (30, 5, 2, 2.5), (24, 3, 3, 1.0)]


@pytest.mark.parametrize("T,E,k,cf", CASES)
def test_einsum_indexed_and_loop_agree(T, E, k, cf):
    experts = make_swiglu_experts(E, 16, 24, seed=T)
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(T))
    idx, w = random_routing(T, E, k, seed=T + 1, skew=0.5)
    C = expert_capacity(T, E, k, cf, min_capacity=1)
    ref = moe_loop(x, idx, w, experts, route_loop(idx, E, C)[1])
    y_ein, y_idx = capacity_moe_einsum(x, idx, w, experts, C), capacity_moe_indexed(x, idx, w, experts, C)
    torch.testing.assert_close(y_ein, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y_idx, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y_ein, y_idx, atol=ATOL, rtol=RTOL)


def test_einsum_and_indexed_agree_in_float64():
    experts = make_swiglu_experts(8, 16, 24, seed=1, dtype=torch.float64)
    x = torch.randn(128, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    idx, w = random_routing(128, 8, 2, seed=2, skew=0.8, dtype=torch.float64)
    C = expert_capacity(128, 8, 2, 1.0)
    torch.testing.assert_close(capacity_moe_einsum(x, idx, w, experts, C), capacity_moe_indexed(x, idx, w, experts, C),
                               atol=1e-12, rtol=1e-12)


def test_one_expert_is_the_dense_ffn():
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    one = make_swiglu_experts(1, 16, 24, seed=9)
    idx, w = torch.zeros(20, 1, dtype=torch.long), torch.ones(20, 1)
    C = expert_capacity(20, 1, 1, 1.0)
    for y in (capacity_moe_einsum(x, idx, w, one, C), capacity_moe_indexed(x, idx, w, one, C), dropless_moe(x, idx, w, one)):
        torch.testing.assert_close(y, one[0](x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("T,E,k", [(16, 4, 1), (64, 8, 2), (50, 6, 3), (40, 5, 5)])
def test_dropless_equals_capacity_at_factor_E_over_k(T, E, k):
    experts = make_swiglu_experts(E, 16, 24, seed=T + 1)
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(T + 2))
    idx, w = random_routing(T, E, k, seed=T + 3, skew=1.0)
    C = expert_capacity(T, E, k, E / k)
    assert C == T
    y_free = dropless_moe(x, idx, w, experts)
    for y in (capacity_moe_einsum(x, idx, w, experts, C), capacity_moe_indexed(x, idx, w, experts, C),
              moe_loop(x, idx, w, experts, torch.ones_like(idx, dtype=torch.bool))):
        torch.testing.assert_close(y_free, y, atol=ATOL, rtol=RTOL)


def test_dropless_differs_from_capacity_exactly_on_dropped_tokens():
    experts = make_swiglu_experts(8, 16, 24, seed=7)
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(7))
    idx, w = random_routing(512, 8, 2, seed=11, skew=1.0)
    C = expert_capacity(512, 8, 2, 1.0)
    keep = route_with_capacity(idx, 8, C)[1]
    y_cap, y_free = capacity_moe_indexed(x, idx, w, experts, C), dropless_moe(x, idx, w, experts)
    full = keep.all(1)
    assert 0 < int((~full).sum()) < 512
    torch.testing.assert_close(y_cap[full], y_free[full], atol=ATOL, rtol=RTOL)
    assert torch.equal((y_cap - y_free).abs().amax(-1) > 1e-5, ~full)


def test_empty_batch():
    experts = make_swiglu_experts(4, 16, 24)
    x, idx, w = torch.zeros(0, 16), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    C = expert_capacity(0, 4, 2, 1.0)
    for y in (capacity_moe_einsum(x, idx, w, experts, C), capacity_moe_indexed(x, idx, w, experts, C),
              dropless_moe(x, idx, w, experts)):
        assert y.shape == (0, 16)


# ---------------------------------------------------------------- bad input

@pytest.fixture
def layer_args():
    x = torch.randn(10, 16)
    idx, w = random_routing(10, 4, 2, seed=0)
    return x, idx, w, make_swiglu_experts(4, 16, 24)


@pytest.mark.parametrize("layer", ["einsum", "indexed", "dropless"])
@pytest.mark.parametrize("bad,msg", [
    (lambda x, i, w, ex: (x, i + 4, w, ex), "top_k_index values must lie in [0, 4)"),
    (lambda x, i, w, ex: (x, i - 5, w, ex), "top_k_index values must lie in [0, 4)"),
    (lambda x, i, w, ex: (x[:9], i, w, ex), "x must be a [T, d_model] tensor with T = 10"),
    (lambda x, i, w, ex: (x[0], i, w, ex), "x must be a [T, d_model] tensor"),
    (lambda x, i, w, ex: (x, i, w[:, :1], ex), "top_k_weights must have the shape"),
    (lambda x, i, w, ex: (x, i.float(), w, ex), "top_k_index must be an integer tensor"),
    (lambda x, i, w, ex: (x, i[:, 0], w, ex), "top_k_index must be an integer tensor of shape [T, k]"),
    (lambda x, i, w, ex: (x, i, w, []), "experts must be a non-empty list"),
    (lambda x, i, w, ex: (x, i, w, ex[:1]), "top_k=2 is larger than num_experts=1"),
    (lambda x, i, w, ex: (x, i, w, [None] * 4), "experts must be a non-empty list of callables"),
])
def test_layers_bad_input(layer_args, layer, bad, msg):
    args = bad(*layer_args)
    fn = {"einsum": lambda *a: capacity_moe_einsum(*a, 4), "indexed": lambda *a: capacity_moe_indexed(*a, 4),
          "dropless": dropless_moe}[layer]
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fn(*args)


def test_route_bad_input():
    idx = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        route_with_capacity(idx, 4, -1)
    with pytest.raises(ValueError, match="capacity must be an integer"):
        route_with_capacity(idx, 4, 2.5)
    with pytest.raises(ValueError, match="top_k=5 is larger than num_experts=4"):
        route_with_capacity(torch.zeros(3, 5, dtype=torch.long), 4, 2)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        route_with_capacity(idx, 0, 2)
    with pytest.raises(ValueError, match="top_k_index must be an integer tensor"):
        route_with_capacity([[0, 1]], 4, 2)
    with pytest.raises(ValueError, match="top_k_index must be an integer tensor"):
        route_with_capacity(idx.bool(), 4, 2)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        dropped_fraction(torch.ones(3))
    with pytest.raises(ValueError, match="keep is empty"):
        dropped_fraction(torch.ones(0, dtype=torch.bool))
    with pytest.raises(ValueError, match="top_k_weights must have the shape"):
        dispatch_combine_tensors(idx, torch.ones(3), 4, 2)
