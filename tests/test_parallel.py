"""Chapter 12: expert parallelism on torch.distributed (gloo, loopback). Each launch starts real processes with torchrun,
with bounded timeouts."""
import pytest
import torch

from moe_explained.parallel import bytes_per_token_per_layer, expert_owners, launch, plan_dispatch, rank_load


def test_ep_equals_one_process_and_transformers_ep_runs():
    "3 ranks: uneven expert blocks (3, 3, 2 of 8) and uneven batch slices (1, 1, 2 of 4 sequences). 2 and 4: the notebook."
    r = launch('check', 3, timeout=240)
    for name in ('mixtral', 'qwen3_moe'):
        c = r[name]
        assert c['block']['equal'] and c['model']['equal'], c          # ours: bit for bit
        assert 0 < c['model']['stats']['remote'] < c['model']['stats']['pairs']
        t = c['transformers']
        if t['ran']:   # transformers' EP sums in another order: within 64 ulps of the largest logit
            assert t['max_abs_diff'] <= 64 * torch.finfo(torch.float32).eps * t['max_abs_logit'], t
        else: assert t['error'], t                                      # 8 experts do not split over 3 ranks for it: said why


def test_a_rank_stopped_by_torchrun_is_not_the_cause():
    "torchrun stops the other ranks with SIGTERM once one fails: the rank that said why is the cause, not the stopped one."
    from moe_explained.parallel import _why
    log = ("moe_explained.parallel: rank 1 failed: RuntimeError: rank 1 was told to fail\n"
           "[0]:\n  time : x\n  rank : 0 (local_rank: 0)\n  exitcode : -15 (pid: 1)\n"
           "Root Cause (first observed failure):\n[1]:\n  rank : 1 (local_rank: 1)\n  exitcode : 1 (pid: 2)\n")
    assert _why(log) == 'rank 1 failed: RuntimeError: rank 1 was told to fail'
    silent = "[0]:\n  rank : 0 (local_rank: 0)\n  exitcode : -15 (pid: 1)\n[1]:\n  rank : 1 (local_rank: 1)\n  exitcode : 17 (pid: 2)\n"
    assert _why(silent).startswith('rank 0 exited with code -15 without a message; rank 1 exited with code 17')


def test_failures_are_reported_and_nothing_hangs():
    import time
    for task, said in (('fail', 'rank 1 failed: RuntimeError: rank 1 was told to fail'), ('die', 'rank 1 exited with code 17 without a message')):
        t = time.perf_counter()
        with pytest.raises(RuntimeError, match=said): launch(task, 2, timeout=60)
        assert time.perf_counter() - t < 60
        assert not _workers_alive(), 'a rank outlived its failed run'


def _workers_alive() -> list:
    """Processes still running `-m moe_explained.parallel` that this test process launched (Linux /proc): `launch` marks
    them with `MOE_EXPLAINED_LAUNCH=<its pid>-...`, so another test process's ranks (pytest -n 2) are not counted."""
    import os
    from pathlib import Path
    alive, mine = [], f'MOE_EXPLAINED_LAUNCH={os.getpid()}-'.encode()
    for p in Path('/proc').glob('[0-9]*'):
        try:
            cmd = (p / 'cmdline').read_bytes().split(b'\0')
            env = (p / 'environ').read_bytes().split(b'\0')
            state = (p / 'stat').read_text().split()[2]
        except OSError: continue
        if b'moe_explained.parallel' in cmd and any(v.startswith(mine) for v in env) and state != 'Z': alive.append(p.name)
    return alive


def test_the_wall_clock_limit_stops_every_process():
    import time
    t = time.perf_counter()
    with pytest.raises(TimeoutError, match="did not finish in 8 s"): launch('hang', 2, timeout=8)
    assert time.perf_counter() - t < 20
    time.sleep(0.5)
    assert not _workers_alive(), 'a rank outlived the timeout'


def test_dispatch_plan_and_layout():
    owners = expert_owners(8, 4)
    assert owners.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    idx = torch.tensor([[0, 5], [2, 3], [7, 6], [1, 0]])
    d = plan_dispatch(idx, owners)
    assert d.send_counts.tolist() == [3, 2, 1, 2]
    assert sorted(map(tuple, d.meta.tolist())) == sorted((int(idx[t, j]), j, t) for t in range(4) for j in range(2))
    for E, W in ((6, 4), (5, 4), (9, 6), (8, 8)):                 # every rank holds an expert, blocks differ by at most one
        counts = torch.bincount(expert_owners(E, W), minlength=W)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1 and expert_owners(E, W).diff().ge(0).all()
    with pytest.raises(ValueError, match='world_size=9 > num_experts=8'): expert_owners(8, 9)
    with pytest.raises(ValueError, match='positive int'): expert_owners(8, 0)
    with pytest.raises(ValueError, match='world_size must be an int >= 2'): launch('check', 1)
    with pytest.raises(ValueError, match='unknown task'): launch('nope', 2)


def test_rank_load_and_capacity():
    idx = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 2)            # ranks of W=2: experts 0,1 -> rank 0; 2,3 -> rank 1
    r = rank_load(idx, 4, 2)
    assert r['loads'] == [12, 4] and r['imbalance'] == 1.5 and r['dropped'] == 0
    c = rank_load(idx, 4, 2, capacity_factor=1.0)              # capacity ceil(1.0 * 8 * 2 / 4) = 4 per expert
    assert c['loads'] == [8, 4] and c['dropped'] == pytest.approx(4 / 16)
    assert bytes_per_token_per_layer(2, 4096, 8, 2)['activations'] == 2 * 2 * 4096 * 2 * 7 / 8


def test_expert_parallel_needs_a_process_group():
    from moe_explained.parallel import expert_parallel, tiny_models
    with pytest.raises(ValueError, match='needs torch.distributed'): expert_parallel(tiny_models()['mixtral'])


def test_cli_ep_check(capsys):
    from moe_explained.cli import main
    assert main(['ep-check', '--task', 'bytes', '--world-size', '2', '--timeout', '120']) == 0
    out = capsys.readouterr().out
    assert 'B/token/layer measured' in out and '2kHb(W-1)/W' in out
    assert main(['ep-check', '--world-size', '9']) == 2 and 'world_size=9 > num_experts=8' in capsys.readouterr().err
