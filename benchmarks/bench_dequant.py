"""Dequantizing one packed expert: in the compute dtype, in place (chapter 07 today) against fp32 temporaries (before).

A Mixtral-8x7B expert (`w_in [28672, 4096]`, `w_out [4096, 14336]`: 176M weights) packed at 2 bits, group 16, 8-bit
meta-quantized scales (RTN-packed: the layout and bytes of chapter 07's, without its minute of HQQ per expert).
Timed side by side, interleaved, on this CPU: `ExpertBuffer.dequantize(name, dtype)` for bf16, fp16 and fp32 against
the code it replaced (kept here as `dequantize_before`: codes to fp32, subtract, multiply — three fp32 tensors of the
whole weight — then a cast). Besides the time, the bytes of every tensor each path creates are counted (a dispatch mode
sums the outputs of every op): measured, not estimated. The GPU figure in the results is an *expectation*, not a
measurement: the bytes each path reads and writes over a T4's 320 GB/s.

    python benchmarks/bench_dequant.py            # -> benchmarks/results/dequant_cpu.json
    python benchmarks/bench_dequant.py --quick    # a 1/16 expert, a smoke test
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from common import cpu_model  # benchmarks/common.py (scripts run as `python benchmarks/...`)

from moe_explained.quant import pack_expert, read_expert, unpack_bits


def dequantize_before(buf, name, dtype):
    "The dequantization chapter 07 shipped before issue 21: everything in fp32 temporaries, cast at the end."
    info, a = buf.header['tensors'][name], buf.arrays[name]
    params = {}
    for p in ('scale', 'zero'):
        if info['meta'] is None: v = a[p].float()
        else:
            mb, mg = info['meta']['bits'], info['meta']['group_size']
            c = unpack_bits(a[p], mb, a[p + '_scale'].numel() * mg).float().view(-1, mg)
            v = (a[p + '_min'].float()[:, None] + c * a[p + '_scale'].float()[:, None]).reshape(-1)
        params[p] = v[:info['n_groups']]
    g, axis = info['group_size'], info['axis']
    codes = unpack_bits(a['codes'], info['bits'], math.prod(info['shape'])).float()
    groups, pshape = ((-1, g), (-1, 1)) if axis == 1 else ((g, -1), (1, -1))
    W = (codes.view(groups) - params['zero'].view(pshape)) * params['scale'].view(pshape)
    return W.reshape(info['shape']).to(dtype)


class Allocated(torch.utils._python_dispatch.TorchDispatchMode):
    "Sums the bytes of every tensor the ops under it create (views excluded)."
    def __init__(self):
        super().__init__(); self.bytes = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs: self.bytes += t.numel() * t.element_size()
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--quick', action='store_true')
    p.add_argument('--out')
    a = p.parse_args()
    H, I = (1024, 3584) if a.quick else (4096, 14336)
    g = torch.Generator().manual_seed(0)
    buf = read_expert(pack_expert(dict(w_in=torch.randn(2 * I, H, generator=g) * 0.02, w_out=torch.randn(H, I, generator=g) * 0.02),
                                  bits=2, group_size=16, method='rtn'))
    n = 3 * H * I
    paths = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dn = str(dtype).removeprefix('torch.')
        paths[f'in place, {dn}'] = lambda d=dtype: [buf.dequantize(k, d) for k in ('w_in', 'w_out')]
        paths[f'fp32 temporaries, {dn} (before)'] = lambda d=dtype: [dequantize_before(buf, k, d) for k in ('w_in', 'w_out')]
    for name in [k for k in paths if 'float32' in k]:                     # fp32: both are the same arithmetic
        same = all(torch.equal(x, y) for x, y in zip(paths[name](), paths['in place, float32']()))
        assert same, name
    for dn in ('bfloat16', 'float16'):                                    # the compute dtype changes only the rounding
        x, y = paths[f'in place, {dn}'](), paths[f'fp32 temporaries, {dn} (before)']()
        for u, v in zip(x, y): torch.testing.assert_close(u.float(), v.float(), rtol=2e-2, atol=2e-3)
    allocated = {}
    for name, fn in paths.items():
        with Allocated() as m: fn()
        allocated[name] = m.bytes
    random.seed(0)
    times = {k: [] for k in paths}
    for _ in range(a.repeats):
        for name in random.sample(list(paths), len(paths)):
            t = time.perf_counter(); paths[name](); times[name].append(time.perf_counter() - t)
    T4 = 320e9
    res = {k: dict(seconds_per_expert=statistics.median(v), all_s=v, allocated_bytes=allocated[k],
                   allocated_bytes_per_weight=allocated[k] / n,
                   expected_t4_ms=None if 'float32' in k else 1e3 * 2 * allocated[k] / T4)   # each byte written once, read once
           for k, v in times.items()}
    for dn in ('bfloat16', 'float16', 'float32'):
        res[f'in place, {dn}']['speedup_over_before'] = res[f'fp32 temporaries, {dn} (before)']['seconds_per_expert'] / res[f'in place, {dn}']['seconds_per_expert']
    env = dict(date=dt.datetime.now().isoformat(timespec='seconds'), torch=torch.__version__, cpu=cpu_model(),
               threads=torch.get_num_threads(), weights=n, shapes=dict(w_in=[2 * I, H], w_out=[H, I]), quick=a.quick,
               layout='2-bit, group 16, 8-bit meta-quantized scales and zeros (groups of 128), axis 1', repeats=a.repeats,
               expectation='expected_t4_ms = 2 x allocated bytes / 320 GB/s (T4 memory bandwidth): an estimate, not measured')
    out = Path(a.out) if a.out else Path(__file__).parent / 'results' / ('dequant_cpu_quick.json' if a.quick else 'dequant_cpu.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, results=res), indent=1))
    for k, v in res.items():
        print(f"{k:34s} {v['seconds_per_expert'] * 1e3:8.1f} ms/expert  {v['allocated_bytes_per_weight']:5.2f} B/weight allocated"
              + (f"  x{v['speedup_over_before']:.2f}" if 'speedup_over_before' in v else ''))
    print('wrote', out)


if __name__ == '__main__':
    main()
