"""How long the `moe-explained` commands that need no model take to start and finish (issue 20: under 1.5 s).

Each command runs as a fresh process (`python -m moe_explained.cli ...`, the installed script's entry point), wall time
from `subprocess.run` to its exit. With `--baseline REF`, the same commands also run from a temporary git worktree of
REF (the code before a change), interleaved with the current tree in a fresh random order every repeat, so background
load hits both alike; medians and minima are reported.

    python benchmarks/bench_startup.py --baseline d1941bc    # -> benchmarks/results/startup_cpu.json (as stored)
    python benchmarks/bench_startup.py --quick               # 2 repeats, current tree only: a smoke test
"""
from __future__ import annotations

import argparse, datetime as dt, json, os, platform, random, statistics, subprocess, sys, tempfile, time
from pathlib import Path

from common import cpu_model  # benchmarks/common.py (scripts run as `python benchmarks/...`)

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {'--help': ['--help'], 'models': ['models'], 'params': ['params', 'mixtral-8x7b'],
            'plan': ['plan', 'mixtral-8x7b', '--device-memory', 'T4', '--host-memory', '12.7GB', '--disk-memory', '80GB']}


def run(tree: Path, argv: list) -> float:
    env = {**os.environ, 'PYTHONPATH': str(tree), 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    t = time.perf_counter()
    res = subprocess.run([sys.executable, '-m', 'moe_explained.cli', *argv], cwd=tree, env=env, capture_output=True, text=True)
    dt_ = time.perf_counter() - t
    if res.returncode != 0: raise SystemExit(f'{tree}: moe-explained {" ".join(argv)} failed: {res.stderr[-500:]}')
    return dt_


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--baseline', default=None, help='a git revision to measure beside the current tree')
    ap.add_argument('--repeats', type=int, default=9)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    trees, tmp = {'current': ROOT}, None
    if args.baseline:
        tmp = Path(tempfile.mkdtemp(prefix='moe-explained-baseline-'))
        subprocess.run(['git', 'worktree', 'add', '--detach', str(tmp / 'tree'), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        trees['baseline'] = tmp / 'tree'
    try:
        times = {t: {c: [] for c in COMMANDS} for t in trees}
        for tree in trees.values(): run(tree, ['--help'])          # warm the file cache once
        for _ in range(repeats):
            jobs = [(t, c) for t in trees for c in COMMANDS]
            random.shuffle(jobs)
            for t, c in jobs: times[t][c].append(run(trees[t], COMMANDS[c]))
    finally:
        if tmp is not None:
            subprocess.run(['git', 'worktree', 'remove', '--force', str(tmp / 'tree')], cwd=ROOT, capture_output=True)
    import torch, transformers
    out = dict(env=dict(date=dt.date.today().isoformat(), cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version(),
                        torch=torch.__version__, transformers=transformers.__version__, baseline=args.baseline, repeats=repeats),
               target_seconds=1.5,
               results={t: {c: dict(median_s=round(statistics.median(v), 3), min_s=round(min(v), 3), max_s=round(max(v), 3))
                            for c, v in cs.items()} for t, cs in times.items()})
    print(json.dumps(out['results'], indent=1))
    path = Path(args.out) if args.out else ROOT / 'benchmarks' / 'results' / ('startup_quick.json' if args.quick else 'startup_cpu.json')
    path.write_text(json.dumps(out, indent=1) + '\n')
    print('wrote', path)


if __name__ == '__main__':
    main()
