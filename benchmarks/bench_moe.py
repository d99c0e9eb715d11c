"""Tokens/s of the Mixtral sparse MoE block: our three dispatchers vs transformers' experts implementations.

Times the whole block (router + experts) at a scaled-down Mixtral shape for decode (1 token) and prefill
(512 tokens), in fp32 and bf16. All implementations run on the same weights; inside every repeat they run
in a fresh random order (interleaved), so background load on a shared machine hits all of them alike.
Reports medians and the ratio to the fastest transformers implementation of the same run.

    python benchmarks/bench_moe.py --threads 2 1         # CPU -> benchmarks/results/moe_cpu.json (as stored)
    python benchmarks/bench_moe.py --device cuda         # GPU -> benchmarks/results/moe_cuda.json
    python benchmarks/bench_moe.py --quick               # tiny shape, 3 repeats: a smoke test
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from common import cpu_model  # benchmarks/common.py (scripts run as `python benchmarks/...`)

OURS = ('loop', 'sorted', 'dense_masked')
HF = ('eager', 'batched_mm', 'grouped_mm')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def build(hidden, inter, experts, top_k, dtype, device, seed=0):
    "transformers' MixtralSparseMoeBlock with random weights, and our MixtralMoE loaded from it."
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from moe_explained.moe import load_hf_block
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k)
    cfg._experts_implementation = 'eager'
    hf = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in hf.parameters(): p.normal_(0, 0.02)
    hf = hf.to(device=device, dtype=dtype).eval()
    return hf, load_hf_block(hf)


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--hidden', type=int, default=1024)
    ap.add_argument('--intermediate', type=int, default=3584)
    ap.add_argument('--experts', type=int, default=8)
    ap.add_argument('--top-k', type=int, default=2)
    ap.add_argument('--tokens', type=int, nargs='+', default=[1, 512])
    ap.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=list(DTYPES))
    ap.add_argument('--repeats', type=int, default=None, help='timed repeats per (dtype, tokens); default 30 decode, 7 prefill')
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, nargs='+', default=None,
                    help='torch thread counts to measure, one after the other (default: torch.get_num_threads())')
    ap.add_argument('--max-gather-gb', type=float, default=2.0,
                    help='skip batched_mm when its gathered weight copy would exceed this many GB')
    ap.add_argument('--quick', action='store_true', help='tiny shape and 3 repeats: a smoke test, not a measurement')
    ap.add_argument('--out', default=None, help='output JSON (default benchmarks/results/moe_<device>.json)')
    a = ap.parse_args(argv)
    if a.quick: a.hidden, a.intermediate, a.tokens, a.repeats, a.warmup = 64, 128, [1, 32], 3, 1
    a.threads = a.threads or [torch.get_num_threads()]
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): ap.error('--device cuda but torch.cuda.is_available() is False')

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    import transformers
    from moe_explained.moe import grouped_mm_works

    env = dict(torch=torch.__version__, transformers=transformers.__version__, device=str(device),
               device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model(),
               cpu=cpu_model(), threads=a.threads, default_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
               loadavg_start=list(os.getloadavg()), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
               shape=dict(hidden=a.hidden, intermediate=a.intermediate, experts=a.experts, top_k=a.top_k),
               note='implementations interleaved within each repeat, in a fresh random order; loadavg_start/loadavg_end record the background load',
               grouped_mm_works={n: grouped_mm_works(device, d) for n, d in DTYPES.items() if n in a.dtypes})
    print(json.dumps(env, indent=1))
    results, skipped = [], []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for dname in a.dtypes:
            dtype = DTYPES[dname]
            hf, ours = build(a.hidden, a.intermediate, a.experts, a.top_k, dtype, device)
            for T in a.tokens:
                x = torch.randn(1, T, a.hidden, generator=torch.Generator().manual_seed(T)).to(device, dtype)
                impls = {}
                for name in OURS:
                    impls[name] = (lambda n=name: (setattr(ours, 'impl', n), ours(x))[1])
                for name in HF:
                    if name != 'eager' and name not in ALL_EXPERTS_FUNCTIONS: continue
                    if name == 'batched_mm':
                        gb = T * a.top_k * 3 * a.hidden * a.intermediate * torch.finfo(dtype).bits / 8 / 1e9
                        if gb > a.max_gather_gb:
                            skipped.append(dict(threads=threads, dtype=dname, tokens=T, impl=name, reason=f'would gather {gb:.1f} GB of expert weights (> --max-gather-gb {a.max_gather_gb})'))
                            continue
                    impls[name] = (lambda n=name: (setattr(hf.experts.config, '_experts_implementation', n), hf(x))[1])
                with torch.inference_mode():
                    ref = impls['eager']().float()
                    err = {n: (f().float() - ref).abs().max().item() for n, f in impls.items()}   # also warms up
                    for _ in range(a.warmup - 1):
                        for f in impls.values(): f()
                    reps = a.repeats or (30 if T <= 16 else 7)
                    times = {n: [] for n in impls}
                    for _ in range(reps):
                        order = list(impls); random.shuffle(order)
                        for n in order:
                            sync(device); t0 = time.perf_counter(); impls[n](); sync(device)
                            times[n].append(time.perf_counter() - t0)
                med = {n: statistics.median(v) for n, v in times.items()}
                best_hf = min((n for n in med if n in HF), key=med.get)
                for n, m in med.items():
                    r = dict(threads=threads, dtype=dname, tokens=T, impl=n, ours=n in OURS, median_s=m, tokens_per_s=T / m,
                             min_s=min(times[n]), iqr_s=(statistics.quantiles(times[n], n=4)[2] - statistics.quantiles(times[n], n=4)[0]) if len(times[n]) > 1 else 0.0,
                             repeats=len(times[n]), ratio_to_best_hf=med[best_hf] / m, best_hf=best_hf, max_abs_err_vs_eager=err[n])
                    results.append(r)
                    print(f"threads={threads} {dname} T={T:4d} {n:13s} {m * 1e3:9.2f} ms  {T / m:10.1f} tok/s  x{med[best_hf] / m:5.2f} vs {best_hf}  err {err[n]:.1e}")
            del hf, ours
    env['loadavg_end'] = list(os.getloadavg())
    out = Path(a.out) if a.out else Path(__file__).parent / 'results' / f'moe_{device.type}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, results=results, skipped=skipped), indent=1))
    print('wrote', out)


if __name__ == '__main__':
    main()
