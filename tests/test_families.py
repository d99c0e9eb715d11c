"""Every transformers model family whose experts class uses `@use_experts_implementation`, against the committed table
of expected outcomes (`moe_explained/data/families.csv`): a tiny random causal LM of each is offloaded (chapter 10,
section 13) and converted (chapter 11, section 8). A family the table expects to pass must pass, bit for bit; one it
expects to be refused must still be refused cleanly; a family new to the installed transformers must be served exactly
or refused with a clear message — a crash or other logits fail the suite, whatever the table says."""
import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from moe_explained.offload import offload
from moe_explained.offload import offload_stats
from moe_explained.testing import OUTCOMES, check_family, expected_families, family_verdict, moe_families

FAMILIES = moe_families()
TABLE = expected_families()
MUST_PASS = ('mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v2', 'deepseek_v3', 'gpt_oss')


def test_discovery_finds_the_families():
    assert set(MUST_PASS) <= set(FAMILIES) and len(FAMILIES) == len(set(FAMILIES))


def test_the_table_is_well_formed():
    assert all(TABLE[f]['serve'] == TABLE[f]['convert'] == 'passed' for f in MUST_PASS)
    for family, row in TABLE.items():
        assert row['serve'] in OUTCOMES and row['convert'] in OUTCOMES, (family, row)
        if 'passed' not in (row['serve'], row['convert']): assert row['note'], f'{family}: a family that does not pass says why'


def test_the_verdict_rule():
    assert family_verdict('passed', 'passed') is None and family_verdict('passed', None) is None
    assert family_verdict('refused', 'passed').startswith('regressed')
    assert family_verdict('not built', 'passed').startswith('regressed')
    assert family_verdict('refused', 'refused') is None and family_verdict('passed', 'refused') is None
    assert family_verdict('not built', 'refused').startswith('regressed')
    for expected in (None, 'not built', 'not applicable', 'refused', 'passed'):
        assert family_verdict('failing', expected) == 'a crash or other logits'
    for status in ('passed', 'refused', 'not built', 'not applicable'): assert family_verdict(status, None) is None


@pytest.mark.parametrize('family', FAMILIES)
def test_family_is_served_as_the_table_says(family):
    status, detail = check_family(family)
    expected = TABLE.get(family, {}).get('serve')
    assert family_verdict(status, expected) is None, f'{family}: {status}: {detail} (the table expects {expected})'


@pytest.mark.parametrize('family', FAMILIES)
def test_family_converts_as_the_table_says(family, tmp_path):
    "Chapter 11, section 8: streamed conversion == transformers' from_pretrained; save_offloaded -> load_converted == itself."
    from moe_explained.convert import check_conversion
    status, detail = check_conversion(family, tmp_path)
    expected = TABLE.get(family, {}).get('convert')
    assert family_verdict(status, expected) is None, f'{family}: {status}: {detail} (the table expects {expected})'


def test_ergo_per_expert_norm_is_served_exactly():
    "transformers 5.25's Ergo: a subclass that overrides forward around the decorated projections and applies a learned norm per expert."
    if 'ergo' not in FAMILIES: pytest.skip('this transformers has no ergo family')
    status, detail = check_family('ergo')
    assert status == 'passed', detail
    assert detail.startswith('generic')


def test_prefetch_off_with_a_warning_where_speculation_does_not_apply():
    "Cohere2-MoE's MoE block does not follow a `post_attention_layernorm`: the engine runs without prefetch, and says so."
    from transformers.models.cohere2_moe.modeling_cohere2_moe import Cohere2MoeForCausalLM
    from moe_explained.testing import tiny_moe_config
    torch.manual_seed(0)
    plain = Cohere2MoeForCausalLM(tiny_moe_config(Cohere2MoeForCausalLM.config_class)).eval()
    plain.set_experts_implementation('eager')
    with pytest.warns(UserWarning, match='speculative prefetch is off for this model'):
        m = offload(copy.deepcopy(plain), cache_size=2, progress=False)
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False), plain.generate(ids, max_new_tokens=6, do_sample=False))
    assert offload_stats(m).prefetch == 0


# --- experts classes the engine has never seen: served exactly, or refused by name before anything changes ---

def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    m = MixtralForCausalLM(cfg).eval()
    m.set_experts_implementation('eager')
    return m


def _swap_experts(model, cls):
    "Give every MoE layer an experts module of class `cls`, holding the same weights as the Mixtral experts it replaces."
    for layer in model.model.layers:
        old = layer.mlp.experts
        new = cls(model.config)
        with torch.no_grad():
            for n, p in old.named_parameters(recurse=False): getattr(new, n).copy_(p)
        layer.mlp.experts = new
    model.set_experts_implementation('eager')
    return model


def _decorated(forward=None, extra=None):
    "A class like Mixtral's experts, through `@use_experts_implementation`, with its own loop `forward`."
    from transformers.integrations.moe import use_experts_implementation
    from transformers.activations import ACT2FN
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
            self.num_experts = E
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
            self.down_proj = nn.Parameter(torch.empty(E, H, I))
            self.act_fn = ACT2FN[config.hidden_act]
            if extra: extra(self, config)
    if forward: Experts.forward = forward
    return use_experts_implementation(Experts)


def _loop(self, hidden_states, top_k_index, top_k_weights, scale=None):
    final = torch.zeros_like(hidden_states)
    mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
        pos, tok = torch.where(mask[e])
        gate, up = F.linear(hidden_states[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(self.act_fn(gate) * up, self.down_proj[e])
        if scale is not None: y = y * scale(self)[e]
        final.index_add_(0, tok, y * top_k_weights[tok, pos, None])
    return final


def test_a_submodule_per_expert_tensor_inside_the_loop_is_served_exactly():
    "A learned scale per expert held by a submodule and indexed inside the class's own loop: each expert sees its own row."
    def extra(self, config):
        self.scale = nn.Module()
        self.scale.weight = nn.Parameter(torch.rand(config.num_local_experts, config.hidden_size) + 0.5)
    cls = _decorated(lambda self, h, i, w: _loop(self, h, i, w, scale=lambda s: s.scale.weight), extra)
    plain = _swap_experts(_tiny_mixtral(), cls)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): ref = plain(ids).logits
    m = offload(copy.deepcopy(plain), cache_size=2, progress=False)
    with torch.no_grad(): assert torch.equal(m(ids).logits, ref)
    assert next(iter(m.moe_offload.layers.values())).mode == 'generic'


class _Unplugged(nn.Module):
    "Has the experts interface's flags, but its forward was never wrapped by @use_experts_implementation."
    def __init__(self, config):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.has_gate, self.config = E, True, config
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
    def forward(self, h, i, w): return torch.zeros_like(h)


def _bypass_class():
    "Subclasses a decorated class and overrides forward without ever calling into it: the engine could not plug in."
    base = _decorated(_loop)
    class Bypass(base):
        def forward(self, h, i, w): return _loop(self, h, i, w)
    return Bypass


def _twice_class():
    base = _decorated(_loop)
    class Twice(base):
        def forward(self, h, i, w): return super().forward(h, i, w) + super().forward(h, i, w)
    return Twice


def _crash_class():
    base = _decorated(_loop)
    class Crash(base):
        def forward(self, h, i, w): raise NotImplementedError('this class needs a kernel the engine does not have')
    return Crash


@pytest.mark.parametrize('make, why', [
    (lambda: _Unplugged, 'has no forward wrapped by @use_experts_implementation'),
    (_bypass_class, "goes through transformers' experts interface 0 times"),
    (_twice_class, "goes through transformers' experts interface 2 times"),
    (_crash_class, "forward fails on the engine's path .NotImplementedError")])
def test_an_experts_class_the_engine_cannot_serve_is_refused_by_name_before_anything_changes(make, why):
    cls = make()
    plain = _swap_experts(_tiny_mixtral(), cls)
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    impl = plain.config._experts_implementation
    with pytest.raises(ValueError, match=f'cannot serve its experts: {cls.__name__}.*{why}') as e:
        offload(plain, cache_size=2, progress=False)
    assert len(str(e.value).splitlines()) == 1
    assert plain.state_dict().keys() == state.keys() and all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    assert plain.config._experts_implementation == impl and not hasattr(plain, 'moe_offload')


def test_a_router_that_picks_more_experts_than_a_layer_has_is_refused(tmp_path):
    "num_experts_per_tok > num_local_experts: refused by offload and by convert, before anything is written."
    from moe_explained.convert import convert
    plain = _tiny_mixtral()
    plain.config.num_experts_per_tok = 5
    with pytest.raises(ValueError, match='num_experts_per_tok=5, but its MoE layers have 4 experts'):
        offload(copy.deepcopy(plain), progress=False)
    plain.save_pretrained(tmp_path / 'hub')
    with pytest.raises(ValueError, match='num_experts_per_tok=5'): convert(tmp_path / 'hub', tmp_path / 'out', progress=False)
    assert not (tmp_path / 'out').exists()
