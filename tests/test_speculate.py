"""Chapter 09: the Speculator against a by-hand computation, and the cache with speculative prefetch: counts add up,
no guesses = chapter 08's cache, bad input."""
import pytest
import torch
import torch.nn.functional as F

from helpers import HostReads
from moe_explained.cache import ExpertCache, simulate
from moe_explained.speculate import Speculator, layer_states, moe_layers, simulate_prefetch
from moe_explained.trace import RoutingTrace, record_routing


def _model():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                            num_experts_per_tok=2, max_position_embeddings=64)).eval()


MODEL = _model()
IDS = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(1))


def test_layer_states_are_what_the_router_saw():
    st = layer_states(MODEL, IDS)
    tr = record_routing(MODEL, [IDS.tolist()])
    for layer, parent, norm, router in moe_layers(MODEL):
        with torch.no_grad():
            torch.testing.assert_close(F.linear(norm(st[layer]["moe_input"]), router.weight), tr.logits_at(layer), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st[0]["residual_in"], MODEL.model.embed_tokens(IDS[None])[0].float().detach())


def test_guess_is_the_later_router_on_the_earlier_state():
    st = layer_states(MODEL, IDS)
    for a in (1, 2):
        spec = Speculator(MODEL, a)
        for L in spec.order[:-a]:
            t = spec.target(L)
            _, _, norm, router = moe_layers(MODEL)[spec.order.index(t)]
            with torch.no_grad():
                ref = (norm(st[L]["moe_input"]) @ router.weight.T).topk(3, -1).indices
            assert torch.equal(spec.guess(L, st[L]["moe_input"], 3), ref)
    assert Speculator(MODEL, 1).target(3) is None


def _trace():
    g = torch.Generator().manual_seed(0)
    L, T, E, k = 3, 40, 6, 2
    ex = torch.stack([torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) for _ in range(L)])
    return RoutingTrace(router_logits=torch.randn(L, T, E), experts=ex, weights=torch.rand(L, T, k), token_ids=torch.arange(T),
                        offsets=torch.tensor([0, 15, 40]), tokens=[str(i) for i in range(T)], layers=[0, 1, 2])


def test_prefetch_counts_add_up_and_no_guesses_is_the_plain_cache():
    tr = _trace()
    for C in (2, 3, 5):
        assert simulate_prefetch(tr, {}, "LRU", C, skip=3) == simulate(tr, "LRU", C, skip=3)
        g = torch.Generator().manual_seed(C)
        guesses = {l: torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(40)]) for l in (1, 2)}
        s = simulate_prefetch(tr, guesses, "LFU", C, skip=3)
        assert s.hits + s.misses == s.requests == 3 * 2 * (40 - 6)
        assert s.loads == s.misses + s.prefetches and s.prefetch_hits + s.wasted <= s.prefetches
        assert s.prefetches > 0


def test_perfect_guesses_leave_only_the_first_layer_missing():
    tr = _trace()
    perfect = {l: tr.experts_at(l) for l in (1, 2)}
    s = simulate_prefetch(tr, perfect, "LRU", 4)
    base = simulate(tr, "LRU", 4, layers=[0])
    assert s.misses == base.misses and s.wasted == 0 and s.prefetch_hits == s.prefetches


def test_prefetch_never_evicts_what_it_is_prefetching():
    c = ExpertCache(8, 2, "LRU")
    c.request([0, 1]); c.prefetch([2, 3, 4])                                # room for two of the three guesses
    assert c.cached == {2, 3} and c.stats.prefetches == 2 and c.stats.evictions == 2


def test_bad_input():
    with pytest.raises(ValueError, match="lookahead must be a positive int"): Speculator(MODEL, 0)
    spec = Speculator(MODEL, 1)
    h = torch.randn(4, 32)
    with pytest.raises(ValueError, match="layer 7 is not an MoE layer"): spec.guess(7, h)
    with pytest.raises(ValueError, match="past the last MoE layer"): spec.guess(3, h)
    with pytest.raises(ValueError, match=r"n=9 guesses is out of range: need 1 <= n <= 8"): spec.guess(0, h, 9)
    with pytest.raises(ValueError, match=r"guesses for layers \[5\]"): simulate_prefetch(_trace(), {5: torch.zeros(40, 2)})
    from transformers import LlamaConfig, LlamaForCausalLM
    with pytest.raises(ValueError, match="has no MoE layers"):
        Speculator(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2)))


def test_guess_reads_nothing_back_to_the_host():
    "The engine starts copies from the guesses: computing them must not make the host wait for the device."
    spec, h = Speculator(MODEL, 1), torch.randn(5, 32)
    with HostReads() as mode:
        g = spec.guess(1, h, 2)
    assert mode.reads == 0 and g.shape == (5, 2) and g.device == h.device
