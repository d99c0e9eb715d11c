"""The decode-speed forecast (chapter 11, `forecast_decode`) against the engine's measured tokens/s on this machine.

The Mixtral-shaped fp32 model of `bench_offload.py` (hidden 1024, intermediate 3584, 8 experts, top-2, 4 layers; one
expert row 44 MB) decodes 32 greedy tokens after an 8-token prompt: not offloaded, and offloaded with 2, 4 and 6 slots
per layer (no prefetch, `miss='copy'`, store in RAM), interleaved over the repeats in a fresh random order (medians).
The forecast of each cache size uses nothing timed on the offloaded runs: the plain model's measured time per token, the
measured bandwidth of copying one expert row into a slot, and the hit rate chapter 08's LRU simulator gives on a
routing trace of the plain model's own greedy decode (the prompt's tokens warm the cache; the new tokens are counted).

    python benchmarks/bench_forecast.py            # -> benchmarks/results/forecast_cpu.json (as stored)
    python benchmarks/bench_forecast.py --quick    # small shapes, 1 repeat (-> forecast_quick.json)
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench_offload import mixtral_shaped, run_interleaved  # benchmarks/ (scripts run as `python benchmarks/...`)
from common import cpu_model

from moe_explained.cache import ExpertCache, decode_trace
from moe_explained.offload import offload
from moe_explained.plan import forecast_decode


def copy_bandwidth(model, reps: int = 20) -> float:
    "Bytes/s of copying one expert row from the store into a device slot (median of `reps`)."
    layer = next(iter(model.moe_offload.layers.values()))
    row, slot = layer.rows[0], layer.slots[0]
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); slot.copy_(row); ts.append(time.perf_counter() - t)
    return row.numel() / statistics.median(ts)


def decode_hit_rate(trace, cache_size: int, prompt_len: int) -> float:
    """Chapter 08's LRU cache run over the trace token by token in every layer (the prompt's tokens warm it, as the
    engine's prefill does), counting only the generated tokens' requests."""
    hits = requests = 0
    for layer in trace.layers:
        cache, ex = ExpertCache(trace.E, cache_size, 'LRU'), trace.experts_at(layer).tolist()
        for pos, r in enumerate(ex):
            h = cache.request(r)
            if pos >= prompt_len: hits += sum(h); requests += len(h)
    return hits / requests


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true'); ap.add_argument('--out', default=None)
    a = ap.parse_args()
    torch.manual_seed(0); random.seed(0); torch.set_num_threads(2)
    hidden, inter, reps, n, prompt_len = (256, 896, 1, 16, 8) if a.quick else (1024, 3584, 3, 32, 8)
    caches = (2, 4, 6)
    plain = mixtral_shaped(hidden, inter, 4)
    plain.set_experts_implementation('eager')
    prompt = torch.randint(0, plain.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    trace = decode_trace(plain, [prompt[0].tolist()], max_new_tokens=n, do_sample=False)
    sim = {c: decode_hit_rate(trace, c, prompt_len) for c in caches}
    models = {}
    for c in caches:
        models[f'cache {c}'] = offload(copy.deepcopy(plain), cache_size=c, prefetch=False, miss='copy', store='memory',
                                       device='cpu', progress=False)
    bw = statistics.median(copy_bandwidth(models[f'cache {caches[0]}']) for _ in range(3))
    variants = {'plain': (plain, None)} | {k: (m, None) for k, m in models.items()}
    res, tokens = run_interleaved(variants, prompt, n, reps)
    row_bytes = next(iter(models[f'cache {caches[0]}'].moe_offload.layers.values())).nbytes
    compute_s = 1 / res['plain']['tokens_per_s']
    rows = []
    for c in caches:
        f = forecast_decode(4, 2, sim[c], row_bytes, bw, compute_s)
        meas = res[f'cache {c}']['tokens_per_s']
        rows.append(dict(cache_size=c, hit_rate_simulated=sim[c], hit_rate_measured=res[f'cache {c}']['hit_rate'],
                         forecast_tokens_per_s=f.tokens_per_s, measured_tokens_per_s=meas, error=f.tokens_per_s / meas - 1,
                         forecast=f.as_dict(), same_tokens_as_plain=tokens[f'cache {c}'] == tokens['plain']))
        print(f"cache {c}: forecast {f.tokens_per_s:.2f} tok/s, measured {meas:.2f} ({rows[-1]['error']:+.1%}); "
              f"hit rate simulated {sim[c]:.1%}, measured {rows[-1]['hit_rate_measured']:.1%}", flush=True)
    out = dict(benchmark='forecast', date=dt.datetime.now().isoformat(timespec='seconds'), cpu=cpu_model(), threads=2,
               torch=torch.__version__, transformers=__import__('transformers').__version__,
               shape=dict(hidden=hidden, inter=inter, layers=4, experts=8, k=2, dtype='float32'), decode_tokens=n,
               repeats=reps, plain_tokens_per_s=res['plain']['tokens_per_s'], link_bandwidth=bw, row_bytes=row_bytes,
               rows=rows, mean_abs_error=statistics.mean(abs(r['error']) for r in rows),
               method='forecast = 1 / (t_plain + L*k*(1-h)*row_bytes/B): t_plain measured, B the measured row copy, h from '
                      "chapter 08's LRU cache run over the plain model's greedy decode trace (prompt warms it); measured = the engine's decode "
                      'tokens/s (median over repeats, interleaved with the plain model)')
    dest = Path(a.out) if a.out else Path(__file__).parent / 'results' / f'forecast_{"quick" if a.quick else "cpu"}.json'
    dest.write_text(json.dumps(out, indent=1) + '\n')
    print('->', dest)


if __name__ == '__main__':
    main()
