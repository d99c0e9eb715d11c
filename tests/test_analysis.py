"""Tests for moe_explained.analysis: the routing recorder against a by-hand recomputation of each router,
on tiny randomly initialised Mixtral, Qwen3-MoE, OLMoE and Qwen2-MoE models; the Table 5 baselines against
brute-force enumeration and simulation; the analyses against token-by-token loops; bad input."""
import itertools
import math

import matplotlib
matplotlib.use("Agg")
import pytest
import torch
from transformers import (GptOssConfig, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                          OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from helpers import assert_same_topk
from moe_explained.analysis import (color_tokens_html, expert_shares, plot_colored_text, plot_expert_shares,
                                    random_repeat_baselines, repeat_rates)
from moe_explained.trace import RoutingTrace, check_routing, find_moe_blocks, record_routing

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)


def _models():
    torch.manual_seed(0)
    return {
        "mixtral": (MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2)), [0, 1, 2, 3], True),
        "qwen3_moe_first_dense": (Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, num_experts=6, num_experts_per_tok=3,
                                  moe_intermediate_size=16, mlp_only_layers=[0])), [1, 2, 3], False),
        "qwen3_moe_norm": (Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=16, norm_topk_prob=True)), [0, 1, 2, 3], True),
        "olmoe": (OlmoeForCausalLM(OlmoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2, pad_token_id=None,
                                               bos_token_id=None, eos_token_id=None)), [0, 1, 2, 3], False),
        "qwen2_moe_sparse_step": (Qwen2MoeForCausalLM(Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=1,
                                  moe_intermediate_size=16, shared_expert_intermediate_size=16, decoder_sparse_step=2)), [1, 3], False),
    }


MODELS = _models()
IDS = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 17, 2, 12, 5)]


def _reference_router(h, W, k, renormalise):
    "The transformers v5 TopKRouter rule, by hand: logits = h W^T, softmax, top-k, optional renormalisation."
    logits = h @ W.T
    w, e = logits.softmax(-1).topk(k, -1)
    return logits, e, (w / w.sum(-1, keepdim=True) if renormalise else w)


@pytest.fixture(scope="module", params=list(MODELS))
def recorded(request):
    model, layers, renorm = MODELS[request.param]
    model.eval()
    return model, layers, renorm, record_routing(model, IDS, batch_size=2, domains=list("abaab"))


def test_layers_found(recorded):
    model, layers, _, tr = recorded
    assert tr.layers == layers == [l for l, *_ in find_moe_blocks(model)]
    assert tr.n_tokens == sum(map(len, IDS)) and tr.offsets.tolist() == [0, *itertools.accumulate(map(len, IDS))]
    assert tr.token_ids.tolist() == [t for s in IDS for t in s]


def test_recorded_choice_matches_router_recomputed_from_hidden_states(recorded):
    model, _, renorm, tr = recorded
    for layer, _, _, router in find_moe_blocks(model):
        lg, e, w = _reference_router(tr.hidden_at(layer), router.weight.float(), tr.k, renorm)
        torch.testing.assert_close(tr.logits_at(layer), lg, atol=1e-5, rtol=1e-5)
        assert_same_topk(tr.experts_at(layer), e, lg, atol=1e-5)
        torch.testing.assert_close(tr.weights_at(layer), w, atol=1e-6, rtol=1e-5)
    assert torch.equal(tr.first_expert, tr.experts[..., 0])


def test_padding_is_not_recorded_and_does_not_change_routing(recorded):
    model, _, _, tr = recorded
    for j, ids in enumerate(IDS):
        alone = record_routing(model, [ids])
        a, b = tr.offsets[j], tr.offsets[j + 1]
        torch.testing.assert_close(alone.router_logits, tr.router_logits[:, a:b], atol=1e-5, rtol=1e-5)
        assert_same_topk(alone.experts, tr.experts[:, a:b], tr.router_logits[:, a:b], atol=1e-5)


def test_save_load_roundtrip(recorded, tmp_path):
    tr = recorded[3]
    st, js = tr.save(tmp_path / "t")
    assert st.name == "t.safetensors" and js.name == "t.json"
    back = RoutingTrace.load(tmp_path / "t.json")
    for n in ("router_logits", "experts", "weights", "hidden_states", "token_ids", "offsets"):
        assert torch.equal(getattr(back, n), getattr(tr, n)), n
    assert (back.tokens, back.layers, back.domains, back.model_name) == (tr.tokens, tr.layers, tr.domains, tr.model_name)


def test_without_hidden_states_saves_and_loads(tmp_path):
    tr = record_routing(MODELS["mixtral"][0], IDS[:2], hidden_states=False)
    assert tr.hidden_states is None
    tr.save(tmp_path / "x")
    assert RoutingTrace.load(tmp_path / "x").hidden_states is None
    with pytest.raises(ValueError, match="no hidden states"):
        tr.hidden_at(0)


def test_probabilities_returned_as_router_logits_are_stored_as_log_probs():
    "A model whose recorder hands back softmax probabilities is stored as log-probabilities (same softmax, same top-k)."
    model = MODELS["mixtral"][0]
    ref = record_routing(model, IDS[:2])
    orig = model.forward
    def forward(*a, **kw):
        out = orig(*a, **kw)
        out.router_logits = tuple(r.softmax(-1) for r in out.router_logits)
        return out
    model.forward = forward
    try:
        tr = record_routing(model, IDS[:2])
    finally:
        del model.forward
    torch.testing.assert_close(tr.router_logits.softmax(-1), ref.router_logits.softmax(-1), atol=1e-6, rtol=1e-5)
    assert_same_topk(tr.experts, ref.experts, ref.router_logits, atol=1e-5)


def test_bad_input():
    mixtral = MODELS["mixtral"][0]
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoE layers"):
        record_routing(LlamaForCausalLM(LlamaConfig(**SMALL)), IDS)
    with pytest.raises(ValueError, match="texts is empty"):
        record_routing(mixtral, [])
    with pytest.raises(ValueError, match="2 domain labels for 5 texts"):
        record_routing(mixtral, IDS, domains=["a", "b"])
    with pytest.raises(ValueError, match="no tokenizer was given"):
        record_routing(mixtral, ["some text"])
    with pytest.raises(ValueError, match="text 1 has no tokens"):
        record_routing(mixtral, [[1, 2], []])


def test_trace_validation(tmp_path):
    tr = record_routing(MODELS["mixtral"][0], IDS[:2], hidden_states=False)
    T = tr.n_tokens
    kw = dict(router_logits=tr.router_logits, experts=tr.experts, weights=tr.weights, token_ids=tr.token_ids,
              offsets=tr.offsets, tokens=tr.tokens, layers=tr.layers)
    for change, msg in [(dict(experts=tr.experts + 8), "expert ids must lie in"),
                        (dict(weights=tr.weights[..., :1]), "weights shape"),
                        (dict(offsets=torch.tensor([0, T - 1])), "offsets must rise from 0"),
                        (dict(tokens=tr.tokens[:-1]), f"tokens must hold T={T}"),
                        (dict(layers=[0]), "layers must name"),
                        (dict(domains=["a"]), "1 labels for 2 texts"),
                        (dict(router_logits=tr.router_logits[0]), "router_logits must be")]:
        with pytest.raises(ValueError, match=msg):
            RoutingTrace(**(kw | change))
    with pytest.raises(ValueError, match="no routing trace"):
        RoutingTrace.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="layer 9 was not recorded"):
        tr.logits_at(9)


@pytest.mark.parametrize("E,k", [(8, 2), (4, 1), (6, 3), (5, 2), (6, 4), (3, 3)])
def test_random_baselines_by_enumeration(E, k):
    picks = list(itertools.permutations(range(E), k))
    pairs = list(itertools.product(picks, picks))
    got = random_repeat_baselines(E, k)
    assert got["same_first"] == pytest.approx(sum(a[0] == b[0] for a, b in pairs) / len(pairs), abs=1e-12)
    assert got["same_topk"] == pytest.approx(sum(bool(set(a) & set(b)) for a, b in pairs) / len(pairs), abs=1e-12)
    assert got["first_in_prev_topk"] == pytest.approx(sum(b[0] in a for a, b in pairs) / len(pairs), abs=1e-12)


def test_random_baselines_paper_formula_and_simulation():
    for E in range(3, 20):
        assert random_repeat_baselines(E, 2)["same_topk"] == pytest.approx(1 - (E - 2) * (E - 3) / (E * (E - 1)), abs=1e-12)
    assert random_repeat_baselines(8, 2)["same_topk"] == pytest.approx(1 - 6 / 8 * 5 / 7, abs=1e-12)  # the paper's 46%
    # a trace of uniformly random routing: measured rates within 4 standard errors of the baselines
    g = torch.Generator().manual_seed(0)
    E, k, T = 8, 2, 40_000
    ex = torch.rand(2, T, E, generator=g).argsort(-1)[..., :k]
    tr = RoutingTrace(router_logits=torch.zeros(2, T, E), experts=ex, weights=torch.full((2, T, k), 0.5),
                      token_ids=torch.zeros(T, dtype=torch.long), offsets=torch.tensor([0, T // 2, T]),
                      tokens=[""] * T, layers=[0, 1])
    base = random_repeat_baselines(E, k)
    for row in repeat_rates(tr):
        for key, p in base.items():
            assert abs(row[key] - p) < 4 * math.sqrt(p * (1 - p) / row["pairs"]), (key, row[key], p)
    with pytest.raises(ValueError, match="1 <= k <= E"):
        random_repeat_baselines(2, 3)


def _hand_trace():
    "Two texts, E=4, k=2, one layer, with choices written by hand."
    ex = torch.tensor([[[0, 1], [0, 2], [3, 0], [1, 2], [1, 3], [2, 0], [2, 1]]])  # text 0: tokens 0-3, text 1: 4-6
    T = ex.shape[1]
    return RoutingTrace(router_logits=torch.zeros(1, T, 4), experts=ex, weights=torch.full((1, T, 2), 0.5),
                        token_ids=torch.arange(T), offsets=torch.tensor([0, 4, 7]), tokens=list("abcdefg"),
                        layers=[5], domains=["code", "prose"])


def test_repeat_rates_by_hand():
    (row,) = repeat_rates(_hand_trace())
    # pairs within texts: (0,1) (1,2) (2,3) | (4,5) (5,6); the pair (3,4) crosses texts and is not counted
    assert row["pairs"] == 5
    assert row["same_first"] == pytest.approx(2 / 5)          # (0,1): 0=0 ; (5,6): 2=2
    assert row["same_topk"] == pytest.approx(3 / 5)           # all but (2,3): {3,0}/{1,2} and (4,5): {1,3}/{2,0}
    assert row["first_in_prev_topk"] == pytest.approx(2 / 5)  # (0,1): 0 in {0,1}; (5,6): 2 in {2,0}
    by = repeat_rates(_hand_trace(), by="domain")
    assert [(r["domain"], r["pairs"]) for r in by] == [("code", 3), ("prose", 2)]
    assert by[0]["same_first_indep"] == pytest.approx((2 / 4) ** 2 + (1 / 4) ** 2 * 2)


def test_expert_shares_by_hand():
    tr = _hand_trace()
    sh = expert_shares(tr, 5)
    torch.testing.assert_close(sh["code"], torch.tensor([3, 2, 2, 1]) / 8.0)
    torch.testing.assert_close(sh["prose"], torch.tensor([1, 2, 2, 1]) / 6.0)
    torch.testing.assert_close(expert_shares(tr, 5, by=None, choice="first")["all"], torch.tensor([2, 2, 2, 1]) / 7.0)
    with pytest.raises(ValueError, match="by must be None or 'domain'"):
        expert_shares(tr, 5, by="topic")
    with pytest.raises(ValueError, match="choice must be"):
        expert_shares(tr, 5, choice="second")


def test_plots_and_html():
    import matplotlib.pyplot as plt
    tr = _hand_trace()
    fig = plot_expert_shares(tr)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 4 * 2
    plt.close(fig)
    fig = plot_colored_text(tr, text=1, layers=[5])
    assert len(fig.axes[0].patches) == 3 and [t.get_text() for t in fig.axes[0].texts] == ["e", "f", "g"]
    plt.close(fig)
    h = color_tokens_html(tr, text=0, layer=5)
    assert h.count('title="expert') == 4 and "expert 3: 0.50" in h
    with pytest.raises(ValueError, match="text must be an index"):
        color_tokens_html(tr, text=2)


def _word_tokenizer():
    "A tiny offline word-level tokenizer wrapped as a transformers fast tokenizer."
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = "<pad> <unk> def self return the of and in x = + ( ) :".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_strings_with_tokenizer_and_max_length():
    tok = _word_tokenizer()
    model = MODELS["mixtral"][0]
    texts = ["def f ( self ) : return self", "the x of the x and x = x + x", "in"]
    tr = record_routing(model, texts, tok, domains=["code", "prose", "prose"], max_length=6)
    assert tr.offsets.tolist() == [0, 6, 12, 13]
    assert tr.tokens[:6] == ["def", "<unk>", "(", "self", ")", ":"]
    ids = [tok(t)["input_ids"][:6] for t in texts]
    ref = record_routing(model, ids)
    assert_same_topk(tr.experts, ref.experts, ref.router_logits, atol=1e-5)
    assert tr.token_ids.tolist() == ref.token_ids.tolist()
    with pytest.raises(ValueError, match="text 0 is a list, expected a string"):
        record_routing(model, [[1, 2]], tok)


def test_gpt_oss_router_with_bias_and_softmax_over_topk():
    "GptOssMLP (not *SparseMoeBlock) with a `router` that has a bias and softmaxes the top-k logits only."
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(**SMALL | dict(num_hidden_layers=2, intermediate_size=16), num_local_experts=8,
                                           num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                           sliding_window=8)).eval()
    tr = record_routing(model, IDS, batch_size=2)
    assert tr.layers == [0, 1]
    for layer, _, block, router in find_moe_blocks(model):
        assert type(block).__name__ == "GptOssMLP"
        lg = torch.nn.functional.linear(tr.hidden_at(layer), router.weight, router.bias)
        top, e = lg.topk(2, -1)
        torch.testing.assert_close(tr.logits_at(layer), lg, atol=1e-5, rtol=1e-5)
        assert_same_topk(tr.experts_at(layer), e, lg, atol=1e-5)
        torch.testing.assert_close(tr.weights_at(layer), top.softmax(-1), atol=1e-6, rtol=1e-5)


def test_select_matches_recording_alone():
    model = MODELS["mixtral"][0]
    tr = record_routing(model, IDS, domains=list("abcde"))
    sub = tr.select([3, 1])
    ref = record_routing(model, [IDS[3], IDS[1]])
    assert_same_topk(sub.experts, ref.experts, ref.router_logits, atol=1e-5)
    assert sub.offsets.tolist() == ref.offsets.tolist()
    torch.testing.assert_close(sub.hidden_states, ref.hidden_states, atol=1e-5, rtol=1e-5)
    assert sub.domains == ["d", "b"] and sub.token_ids.tolist() == IDS[3] + IDS[1]
    with pytest.raises(ValueError, match=r"indices in \[0, 5\)"):
        tr.select([5])


def test_check_routing_passes_the_recorder_and_catches_a_wrong_choice(recorded):
    model, _, _, tr = recorded
    got = check_routing(tr, model)
    assert got["mismatches"] == 0 and got["max_logit_err"] < 1e-5 and got["max_weight_err"] < 1e-6, got
    bad = RoutingTrace(**{**tr.__dict__, "experts": tr.experts.clone()})
    layer0 = bad.experts[0]
    layer0[3] = tr.router_logits[0, 3].topk(tr.k, largest=False).indices   # one token takes its k least likely experts
    assert check_routing(bad, model)["mismatches"] == 1
    with pytest.raises(ValueError, match="hidden_states=True"):
        check_routing(RoutingTrace(**{**tr.__dict__, "hidden_states": None}), model)


def test_a_local_model_is_named_by_its_folder_not_its_absolute_path(tmp_path):
    "A trace of a model loaded from a folder carries the folder's name; a hub id, or an explicit name, is kept as given."
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / 'my-moe')
    model = MixtralForCausalLM.from_pretrained(tmp_path / 'my-moe').eval()
    assert str(tmp_path) in model.config._name_or_path
    assert record_routing(model, [[1, 2, 3]], hidden_states=False).model_name == 'my-moe'
    assert record_routing(model, [[1, 2, 3]], hidden_states=False, model_name='owner/name').model_name == 'owner/name'
    model.config._name_or_path = 'mistralai/Mixtral-8x7B-v0.1'      # a hub id: no such folder here
    assert record_routing(model, [[1, 2, 3]], hidden_states=False).model_name == 'mistralai/Mixtral-8x7B-v0.1'
