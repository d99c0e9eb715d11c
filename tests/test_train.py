"""Models, parameter and FLOP accounting, training loop and speedup factor of chapter 05 (`moe_explained.train`)."""
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_explained.dense import count_params
from moe_explained.train import (KINDS, TinyConfig, build_model, compute_to_reach, evaluate, expert_usage, forward_flops,
                                 model_config, speedup_factor, train_flops, train_lm)

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny matmuls run fastest on one thread; on a busy machine extra threads only wait for each other."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = TinyConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=16, seq_len=32)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('tie', [True, False])
def test_chapter00_count_params_matches_the_trained_models(kind, tie):
    cfg = TinyConfig(**{**SMALL.__dict__, 'tie_embeddings': tie})
    m = build_model(cfg, kind)
    pc = count_params(m.config)
    assert pc.total == sum(p.numel() for p in m.parameters())
    if kind == 'moe':   # active = total minus the (E - k) experts a token does not use, read off the real tensors
        unused = sum(l.mlp.experts.gate_up_proj[cfg.k:].numel() + l.mlp.experts.down_proj[cfg.k:].numel() for l in m.model.layers)
        assert pc.active == pc.total - unused
    else:
        assert pc.active == pc.total
    # every weight multiplied per token, the LM head once even when it is tied to the embedding
    assert pc.matmul() == pc.active - pc.norms - m.config.vocab_size * m.config.hidden_size * (1 if tie else 2) \
        + m.config.vocab_size * m.config.hidden_size


def test_matched_baselines():
    router = SMALL.n_layers * SMALL.d_model * SMALL.E
    moe, act, tot = (count_params(model_config(SMALL, k)) for k in KINDS)
    assert moe.active - act.active == router and moe.total - tot.total == router
    assert model_config(SMALL, 'dense-active').intermediate_size == SMALL.k * SMALL.d_ff
    assert model_config(SMALL, 'dense-total').intermediate_size == SMALL.E * SMALL.d_ff


def _measured(model, B, T, backward):
    model.set_attn_implementation('eager')
    if getattr(model.config, 'num_local_experts', None): model.set_experts_implementation('eager')
    x = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        out = model(input_ids=x, labels=x)
        if backward: out.loss.backward()
    return fc.get_total_flops()


@pytest.mark.parametrize('kind', KINDS)
def test_flops_match_torch_flop_counter(kind):
    "The analytic count equals what PyTorch counts, exactly: forward, and forward + backward = 3 x forward."
    m = build_model(SMALL, kind)
    assert _measured(m, 3, 20, False) == forward_flops(m.config, 3, 20)
    assert _measured(m, 3, 20, True) == train_flops(m.config, 3, 20)


def test_speedup_recovers_a_known_factor():
    c = np.logspace(10, 15, 80)
    L = lambda c: 1.5 + 20 * c**-0.25
    for s in (0.5, 2.0, 7.0):
        for t in np.linspace(L(1e11 * max(s, 1)), L(1e15 / max(1 / s, 1)), 5):
            assert speedup_factor(c, L(s * c), c, L(c), t) == pytest.approx(s, rel=2e-3)


def test_compute_to_reach_details():
    assert compute_to_reach([0, 10, 20], [9.0, 5.0, 3.0], 4.0) == pytest.approx(math.sqrt(10 * 20))  # log-linear midpoint
    assert compute_to_reach([10, 20, 30], [5.0, 6.0, 3.0], 5.5) == 10          # running minimum: reached at the first point
    assert math.isnan(compute_to_reach([10, 20], [5.0, 4.0], 3.0))            # never reached: no extrapolation
    with pytest.raises(ValueError, match='equal length'): compute_to_reach([1, 2], [1.0], 1.0)
    with pytest.raises(ValueError, match='positive compute'): compute_to_reach([0], [1.0], 1.0)


def test_bad_model_input():
    with pytest.raises(ValueError, match="unknown model kind 'sparse'"): build_model(SMALL, 'sparse')
    with pytest.raises(ValueError, match='need 1 <= k <= E'): model_config(TinyConfig(k=0))
    with pytest.raises(ValueError, match='not divisible'): model_config(TinyConfig(d_model=130))
    with pytest.raises(ValueError, match='needs an MoE'): expert_usage(build_model(SMALL, 'dense-active'), torch.zeros(1, 8, dtype=torch.long))


def _toy_blocks(n, T, seed=0):
    "A learnable stream: repeated short random patterns."
    g = torch.Generator().manual_seed(seed)
    pats = torch.randint(3, 256, (8, 8), generator=g)
    return pats[torch.randint(0, 8, (n, T // 8), generator=g)].reshape(n, T)


@pytest.mark.parametrize('kind', ['moe', 'dense-active'])
def test_training_learns_and_accounts_flops(kind, tmp_path):
    torch.manual_seed(0)
    blocks, valid = _toy_blocks(64, 32), {'toy': _toy_blocks(8, 32, seed=0)}
    m = build_model(SMALL, kind, seed=0)
    h = train_lm(m, blocks, valid, steps=30, batch_size=8, lr=3e-3, eval_every=10, progress=False, log_path=tmp_path / 'h.json')
    first, last = h['evals'][0], h['evals'][-1]
    assert first['valid']['toy'] == pytest.approx(math.log(256), abs=0.15)      # untrained: about uniform
    assert last['valid']['toy'] < first['valid']['toy'] - 1.5                   # it learned
    assert last['flops'] == 30 * train_flops(m.config, 8, 32) and last['tokens'] == 30 * 8 * 32
    assert (tmp_path / 'h.json').exists()
    if kind == 'moe': assert last['aux_loss'] is not None and 1.0 < last['aux_loss'] < SMALL.E   # recorded, within its range
    h2 = train_lm(build_model(SMALL, kind, seed=0), blocks, valid, steps=30, batch_size=8, lr=3e-3, eval_every=10, progress=False)
    assert h2['evals'][-1]['valid']['toy'] == pytest.approx(last['valid']['toy'], abs=1e-5)  # seeded: reproducible


def test_evaluate_matches_hf_loss():
    m = build_model(SMALL, 'dense-active').eval()
    b = _toy_blocks(4, 32)
    with torch.no_grad(): ref = m(input_ids=b, labels=b).loss.item()
    assert evaluate(m, {'x': b})['x'] == pytest.approx(ref, rel=1e-5)


def test_expert_usage_rows_sum_to_one():
    m = build_model(SMALL, 'moe')
    u = expert_usage(m, _toy_blocks(4, 32))
    assert u.shape == (SMALL.n_layers, SMALL.E)
    torch.testing.assert_close(u.sum(-1), torch.ones(SMALL.n_layers))


def test_train_lm_bad_input():
    m = build_model(SMALL, 'dense-active')
    with pytest.raises(ValueError, match='steps must be >= 1'): train_lm(m, _toy_blocks(16, 32), {}, steps=0)
    with pytest.raises(ValueError, match='n_blocks >= batch_size'): train_lm(m, _toy_blocks(4, 32), {}, steps=1, batch_size=8)
