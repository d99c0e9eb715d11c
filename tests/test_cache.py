"""Chapter 08: the expert cache — Belady optimal by brute force under the request model, LRU against a hand-worked
sequence, counters that add up, the simulator on traces, records imported and exported, bad input."""
import json
import random
from functools import lru_cache
from itertools import combinations

import pytest
import torch

from moe_explained.cache import POLICIES, CacheStats, ExpertCache, simulate
from moe_explained.trace import RoutingTrace

HAND = [[0, 1], [0, 2], [1, 0], [3, 4], [0, 3], [0, 1], [5, 2], [0, 5], [1, 0], [4, 3], [0, 1], [2, 0]]


def fewest_misses(requests, C):
    "Brute force over every decision sequence: after each token, the cache keeps any C of its old and new experts."
    requests = [tuple(r) for r in requests]

    @lru_cache(maxsize=None)
    def best(t, cached):
        if t == len(requests): return 0
        pool = cached | set(requests[t])
        return len(set(requests[t]) - cached) + min(best(t + 1, frozenset(s)) for s in combinations(sorted(pool), min(C, len(pool))))
    return best(0, frozenset())


def random_trace(T, E, k, seed, skew=1.0):
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** skew for i in range(E)]
    out = []
    for _ in range(T):
        chosen = []
        while len(chosen) < k:
            e = rng.choices(range(E), weights)[0]
            if e not in chosen: chosen.append(e)
        out.append(chosen)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_optimal_and_no_policy_beats_it(seed):
    E, k = (5, 2) if seed % 2 else (6, 3)
    reqs = random_trace(10, E, k, seed)
    for C in range(1, E):
        opt = fewest_misses(reqs, C)
        assert simulate(reqs, "Belady", C, E).misses == opt, (C, reqs)
        for p in POLICIES:
            assert simulate(reqs, p, C, E, seed=seed).misses >= opt


def test_lru_matches_the_hand_worked_sequence():
    c = ExpertCache(6, 3, "LRU")
    got = [(c.request(ids), sorted(c.cached)) for ids in HAND]
    assert [sum(h) for h, _ in got] == [0, 1, 2, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    assert [cached for _, cached in got] == [[0, 1], [0, 1, 2], [0, 1, 2], [1, 3, 4], [0, 3, 4], [0, 1, 3], [1, 2, 5],
                                            [0, 2, 5], [0, 1, 5], [1, 3, 4], [0, 1, 4], [0, 1, 2]]
    assert (c.stats.hits, c.stats.misses, c.stats.evictions) == (9, 15, 12)


def test_a_miss_never_evicts_an_expert_the_token_needs():
    for p in POLICIES:
        if p == "Belady": continue
        c = ExpertCache(8, 3, p, seed=1)
        for ids in random_trace(200, 8, 2, 7):
            before = set(c.cached)
            c.request(ids)
            assert set(ids) <= c.cached, p                               # both experts stay after the token (C >= k)
            assert before - c.cached <= before - set(ids)               # whatever left was not needed


@pytest.mark.parametrize("policy", list(POLICIES))
def test_counts_add_up(policy):
    reqs = random_trace(300, 8, 2, 3)
    for C in range(1, 8):
        s = simulate(reqs, policy, C, 8)
        assert s.hits + s.misses == s.requests == 2 * len(reqs) and s.loads == s.misses and s.tokens == len(reqs)
        assert s.evictions <= s.misses


def test_uniform_routing_hits_about_C_over_E():
    reqs = [random.Random(i).sample(range(8), 2) for i in range(20000)]
    for C in (2, 4, 6):
        assert abs(simulate(reqs, "LRU", C, 8).hit_rate - C / 8) < 0.01


def _trace():
    g = torch.Generator().manual_seed(0)
    L, T, E, k = 2, 30, 6, 2
    experts = torch.stack([torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) for _ in range(L)])
    return RoutingTrace(router_logits=torch.randn(L, T, E, generator=g), experts=experts, weights=torch.rand(L, T, k, generator=g),
                        token_ids=torch.arange(T), offsets=torch.tensor([0, 12, 30]), tokens=[str(i) for i in range(T)],
                        layers=[1, 3], domains=["a", "b"])


def test_simulate_a_trace_layer_by_layer_and_text_by_text():
    tr = _trace()
    ex = {l: tr.experts_at(l).tolist() for l in tr.layers}
    for skip in (0, 4):
        manual = CacheStats()
        for l in tr.layers:
            for a, b in ((0, 12), (12, 30)):
                manual = manual + simulate(ex[l][a + skip:b], "LRU", 3, 6)
        assert simulate(tr, "LRU", 3, skip=skip) == manual
    assert simulate(tr, "LRU", 3, layers=[3]) == simulate(ex[3][:12], "LRU", 3, 6) + simulate(ex[3][12:], "LRU", 3, 6)


def test_records_round_trip_and_jsonl(tmp_path):
    tr = _trace()
    back = RoutingTrace.from_records(tr.to_records(), num_experts=tr.E)
    assert torch.equal(back.experts, tr.experts) and torch.equal(back.offsets, tr.offsets)
    torch.testing.assert_close(back.weights, tr.weights)
    assert back.layers == tr.layers and back.domains == tr.domains and back.tokens == tr.tokens
    assert torch.isnan(back.router_logits).all()                           # records carry no logits
    p = tmp_path / "run.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in tr.to_records()) + "\n")
    assert simulate(RoutingTrace.from_jsonl(p, tr.E), "LFU", 2) == simulate(tr, "LFU", 2)


def test_bad_input_is_refused_by_name():
    tr = _trace()
    with pytest.raises(ValueError, match="cache size 0 is out of range"): simulate(tr, "LRU", 0)
    with pytest.raises(ValueError, match="cache size 7 is out of range"): simulate(tr, "LRU", 7)
    with pytest.raises(ValueError, match="cache size must be an int|capacity must be an int"): ExpertCache(6, 2.5)
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"): simulate([[0, 6]], "LRU", 2, num_experts=6)
    with pytest.raises(ValueError, match="distinct experts"): ExpertCache(6, 2).request([1, 1])
    with pytest.raises(ValueError, match="unknown policy 'MRU'"): simulate(tr, "MRU", 2)
    with pytest.raises(ValueError, match="layer 2 was not recorded"): simulate(tr, "LRU", 2, layers=[2])
    recs = tr.to_records()
    with pytest.raises(ValueError, match=r"expert ids \[0, 9\] outside \[0, 6\)"):
        RoutingTrace.from_records(recs[:3] + [dict(recs[3], experts=[0, 9])], num_experts=6)
    with pytest.raises(ValueError, match="no record for layer 3"):
        RoutingTrace.from_records([r for r in recs if not (r["layer"] == 3 and r["sequence"] == 1)], num_experts=6)
    with pytest.raises(ValueError, match="two records for layer 1, position 0"):
        RoutingTrace.from_records(recs + recs[:1], num_experts=6)
    with pytest.raises(ValueError, match="has 3 experts, the records before it 2"):
        RoutingTrace.from_records(recs[:1] + [dict(recs[1], experts=[0, 1, 2])], num_experts=6)
    with pytest.raises(ValueError, match="needs 'sequence', 'layer', 'position'"):
        RoutingTrace.from_records([{"layer": 0}], num_experts=6)
