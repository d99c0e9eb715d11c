"""Quantizing one expert, and running it from its packed buffer, against the same expert in bf16 and fp32 (CPU).

At chapter 04's scaled-down Mixtral shape (hidden 1024, intermediate 3584: w_in [7168, 1024], w_out [1024, 3584]):
seconds to quantize one expert (HQQ and RTN, 2-bit g16 / 3-bit g64 / 4-bit g64, 8-bit meta-quantized scales and
zeros), and the expert forward (SwiGLU) for decode (1 token) and prefill (128 tokens) from the packed buffer
(dequantize both weights, then matmul) vs dense bf16 and fp32 weights. Implementations are interleaved inside every
repeat, in a fresh random order, so background load hits all of them alike; medians are reported.

    python benchmarks/bench_quant.py            # -> benchmarks/results/quant_cpu.json (as stored)
    python benchmarks/bench_quant.py --full     # also quantize one full-size Mixtral-8x7B expert (slow, ~4 GB RAM)
    python benchmarks/bench_quant.py --quick    # tiny shape, 3 repeats: a smoke test
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
import torch.nn.functional as F

from moe_explained.quant import expert_nbytes, pack_expert, read_expert

SETTINGS = [(4, 64), (3, 64), (2, 16)]


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--hidden', type=int, default=1024)
    ap.add_argument('--intermediate', type=int, default=3584)
    ap.add_argument('--tokens', type=int, nargs='+', default=[1, 128])
    ap.add_argument('--repeats', type=int, default=None, help='timed repeats of the forward (default 30 decode, 10 prefill)')
    ap.add_argument('--full', action='store_true', help='also time quantizing one full Mixtral-8x7B expert (4096 x 14336)')
    ap.add_argument('--quick', action='store_true', help='tiny shape and 3 repeats: a smoke test, not a measurement')
    ap.add_argument('--out', default=None)
    a = ap.parse_args(argv)
    if a.quick: a.hidden, a.intermediate, a.repeats = 128, 256, 3
    H, I = a.hidden, a.intermediate
    g = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(2 * I, H, generator=g) * 0.02, torch.randn(H, I, generator=g) * 0.02
    act = lambda gu: F.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]
    env = dict(torch=torch.__version__, cpu=cpu_model(), threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
               loadavg_start=os.getloadavg(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
               shape=dict(hidden=H, intermediate=I, weights=w_in.numel() + w_out.numel()))
    quantize, buffers = [], {}
    for bits, gs in SETTINGS:
        for method in ('hqq', 'rtn'):
            secs = timed(lambda: buffers.__setitem__((bits, gs, method), pack_expert(dict(w_in=w_in, w_out=w_out), bits, gs, method=method)), 3)
            quantize.append(dict(bits=bits, group=gs, method=method, median_s=statistics.median(secs),
                                 bytes=buffers[(bits, gs, method)].numel()))
            print(f'quantize {bits}-bit g{gs} {method}: {statistics.median(secs):.3f} s, {quantize[-1]["bytes"]:,} bytes', flush=True)
    if a.full:
        Wf_in, Wf_out = torch.randn(2 * 14336, 4096) * 0.02, torch.randn(4096, 14336) * 0.02
        t = time.perf_counter(); b = pack_expert(dict(w_in=Wf_in, w_out=Wf_out), 2, 16); s = time.perf_counter() - t
        quantize.append(dict(bits=2, group=16, method='hqq', median_s=s, bytes=b.numel(), shape='mixtral-8x7b expert'))
        print(f'full Mixtral expert, 2-bit g16 hqq: {s:.1f} s, {b.numel() / 1e6:.2f} MB', flush=True)
        del Wf_in, Wf_out, b
    dense = {'fp32': (w_in, w_out), 'bf16': (w_in.bfloat16(), w_out.bfloat16())}
    views = {f'packed {b}-bit g{gs}': read_expert(buffers[(b, gs, 'hqq')]) for b, gs in SETTINGS}
    forward = []
    for T in a.tokens:
        reps = a.repeats or (30 if T == 1 else 10)
        xs = {'fp32': torch.randn(T, H, generator=g)}
        xs['bf16'] = xs['fp32'].bfloat16()
        impls = {name: (lambda wi=wi, wo=wo, x=xs[name]: F.linear(act(F.linear(x, wi)), wo)) for name, (wi, wo) in dense.items()}
        impls |= {name: (lambda ex=ex, x=xs['fp32']: ex.forward(x, act)) for name, ex in views.items()}
        for f in impls.values(): f(); f()                               # warm-up
        times = {name: [] for name in impls}
        for _ in range(reps):
            for name in random.sample(list(impls), len(impls)):
                t = time.perf_counter(); impls[name](); times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            med = statistics.median(ts)
            forward.append(dict(tokens=T, impl=name, median_ms=med * 1e3, tokens_per_s=T / med,
                                ratio_to_bf16=statistics.median(times['bf16']) / med))
            print(f'T={T:4d} {name:18s} {med * 1e3:8.2f} ms  x{forward[-1]["ratio_to_bf16"]:.2f} vs bf16', flush=True)
    env['loadavg_end'] = os.getloadavg()
    env['bytes_per_expert'] = {f'{b}-bit g{gs} meta8': expert_nbytes(dict(w_in=w_in.shape, w_out=w_out.shape), bits=b, group_size=gs)
                               for b, gs in SETTINGS} | {'bf16': 2 * env['shape']['weights'], 'fp32': 4 * env['shape']['weights']}
    out = Path(a.out) if a.out else Path(__file__).parent / 'results' / ('quant_quick.json' if a.quick else 'quant_cpu.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, quantize=quantize, forward=forward), indent=1))
    print('wrote', out)


if __name__ == '__main__':
    main()
