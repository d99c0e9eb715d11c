"""The offloaded engine on a GPU: a Mixtral-8x7B-shaped model with 2-bit HQQ experts, against the transfer bound.

Prepared for a session that has a CUDA device (one script, well under 8 minutes); `--device cpu --quick` runs the
same code at a tiny shape, which is what the test suite does. Nothing is downloaded and 45B weights are never
quantized: the model is built from Mixtral-8x7B's config with `--layers` of its 32 decoder layers (the per-layer
figures are what one extrapolates from, stated as such in the results), the non-expert weights random in fp16 on the
device, and the expert store built directly in packed form — one expert is quantized (RTN, 2-bit, group 16, 8-bit
meta-quantized scales: chapter 07's layout) and its bytes fill every row, so every copy moves exactly the bytes a real
2-bit expert has.

Measured, everything in one run, variants interleaved: pinned host-to-device bandwidth (one expert row, repeated);
decode tokens/s for cache sizes 2 and 4 per layer, prefetch on and off, with `miss='copy'`, and at cache 2 with
`miss='host'`, and with every expert on the device (cache 8: the compute per token, for chapter 11's forecast of the
other variants, compared with their measurement); per variant the hit rate, bytes copied per token, host reads per token, and the transfer bound
`bandwidth / bytes copied per token` (tokens/s if the copies were all the time a token took), with the ratio
measured/bound. One model and one store serve every variant: a variant is an engine (its slots) attached for its turn
and detached after it, so the device holds one variant's slots at a time (eight at once are ~14 GB, past a 16 GB card).
`miss='host'` computes missed experts on the CPU (chapter 07's dequantization in the model's dtype, fp16: about 2 s per
Mixtral expert there), so its variants decode `--host-tokens` tokens (default 2) instead of `--tokens`.

    python benchmarks/bench_offload_gpu.py                      # -> benchmarks/results/offload_gpu.json
    python benchmarks/bench_offload_gpu.py --device cpu --quick # tiny shape, a smoke test
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import time
from pathlib import Path

import torch

from common import cpu_model  # benchmarks/common.py (scripts run as `python benchmarks/...`)

from moe_explained.configs import get_config
from moe_explained.offload import OffloadConfig, attach, offload_stats
from moe_explained.plan import forecast_decode
from moe_explained.store import ExpertStore
from moe_explained.quant import pack_expert, read_expert
from moe_explained.trace import find_moe_blocks


def build(device, layers, quick):
    "A Mixtral-8x7B-shaped model (or a tiny one with --quick) without expert weights, and a packed 2-bit store for it."
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = dict(get_config('mixtral-8x7b'), num_hidden_layers=layers)
    if quick: cfg |= dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    cfg.pop('architectures', None); cfg.pop('model_type', None)
    config = MixtralConfig(**{k: v for k, v in cfg.items() if k in MixtralConfig().to_dict()})
    with torch.device('meta'): model = MixtralForCausalLM(config)
    for _, _, block, _ in find_moe_blocks(model):
        for p in ('gate_up_proj', 'down_proj'): block.experts._parameters.pop(p)
        block.experts.is_transposed = False                  # packed rows hold [out, in] weights
    dtype = torch.float16 if torch.device(device).type == 'cuda' else torch.float32
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'norm' in n: p.fill_(1.0)
            else: p.normal_(0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)   # its buffers were left empty by to_empty
    H, I = config.hidden_size, config.intermediate_size
    g = torch.Generator().manual_seed(0)
    row = pack_expert(dict(w_in=torch.randn(2 * I, H, generator=g) * 0.02, w_out=torch.randn(H, I, generator=g) * 0.02),
                      bits=2, group_size=16, method='rtn')
    eb = read_expert(row)
    fmt = dict(kind='hqq', header=eb.header, start=eb.start, nbytes=row.numel())
    pin = torch.device(device).type == 'cuda'
    rows = {}
    for layer, _, block, _ in find_moe_blocks(model):
        r = torch.empty(config.num_local_experts, row.numel(), dtype=torch.uint8, pin_memory=pin)
        rows[layer] = r.copy_(row.expand_as(r))
    return model.eval(), ExpertStore(rows, {l: fmt for l in rows})


def detach(model):
    "Stop the engine's copies and drop its slots (the store stays): the next variant attaches its own."
    eng = model.moe_offload
    eng.copier.drain(); eng.copier.close(); eng.remove_hooks()
    for l in eng.layers.values(): del l.module._moe_offload
    del model.moe_offload
    if torch.cuda.is_available(): torch.cuda.empty_cache()


def sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize(device)


@torch.no_grad()
def decode(model, n, device, vocab):
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    s0 = offload_stats(model)
    sync(device); t = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    sync(device); seconds = time.perf_counter() - t
    s1 = offload_stats(model)
    return seconds, dict(hit_rate=(s1.hits - s0.hits) / max(s1.requests - s0.requests, 1),
                         bytes_per_token=(s1.bytes_moved - s0.bytes_moved) / n,
                         host_reads_per_token=(s1.host_reads - s0.host_reads) / n)


def bandwidth(row, device, reps=20):
    "Host-to-device bytes/s of one expert row (pinned on CUDA), median of `reps` copies."
    dst = torch.empty_like(row, device=device)
    times = []
    for _ in range(reps + 2):
        sync(device); t = time.perf_counter(); dst.copy_(row, non_blocking=True); sync(device)
        times.append(time.perf_counter() - t)
    return row.numel() / statistics.median(times[2:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda')
    p.add_argument('--layers', type=int, default=4, help='decoder layers of the 32 (default 4)')
    p.add_argument('--tokens', type=int, default=16)
    p.add_argument('--host-tokens', type=int, default=2, help="tokens per miss='host' variant (its misses run on the CPU)")
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--quick', action='store_true')
    p.add_argument('--out')
    a = p.parse_args()
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit('no CUDA device here: run with --device cpu --quick for the smoke test')
    random.seed(0)
    env = dict(date=dt.datetime.now().isoformat(timespec='seconds'), torch=torch.__version__, device=a.device,
               device_name=torch.cuda.get_device_name(a.device) if a.device.startswith('cuda') else cpu_model(),
               layers=a.layers, of_layers=32, tokens=a.tokens, repeats=a.repeats, quick=a.quick,
               experts='2-bit HQQ layout (RTN-packed), group 16, 8-bit meta', extrapolation='per-layer figures from '
               f'{a.layers} of 32 layers')
    model, store = build(a.device, a.layers, a.quick)
    variants = {f'cache {C}, prefetch {"on" if prefetch else "off"}, miss=copy': OffloadConfig(cache_size=C, prefetch=prefetch, device=a.device)
                for C in (2, 4) for prefetch in (True, False)}
    variants['cache 8 (every expert on the device)'] = OffloadConfig(cache_size=8, prefetch=False, device=a.device)
    variants |= {f'cache 2, prefetch {"on" if prefetch else "off"}, miss=host': OffloadConfig(cache_size=2, prefetch=prefetch, miss='host', device=a.device)
                 for prefetch in (True, False)}
    any_row = store.rows[store.layers[0]][0]
    env['row_bytes'] = any_row.numel()
    env['h2d_bytes_per_s'] = bandwidth(any_row, a.device)
    env['host_tokens'] = a.host_tokens
    vocab = model.config.vocab_size
    times, stats = {k: [] for k in variants}, {}
    for r in range(a.repeats):
        for name in random.sample(list(variants), len(variants)):
            n = a.host_tokens if variants[name].miss == 'host' else a.tokens
            attach(model, store, variants[name])          # this variant's slots; detach frees them
            try: s, st = decode(model, n, a.device, vocab)
            finally: detach(model)
            st['tokens'] = n
            times[name].append(s); stats.setdefault(name, []).append(st)
            print(f'rep {r} {name:36s} {n / s:8.2f} tok/s  hit {st["hit_rate"]:.1%}  {st["bytes_per_token"] / 1e6:8.1f} MB/token', flush=True)
    res = {}
    for name, ts in times.items():
        n = stats[name][0]['tokens']
        tps = n / statistics.median(ts)
        bpt = statistics.mean(x['bytes_per_token'] for x in stats[name])
        bound = env['h2d_bytes_per_s'] / bpt if bpt else float('inf')
        res[name] = dict(tokens_per_s=tps, all_s=ts, hit_rate=statistics.mean(x['hit_rate'] for x in stats[name]),
                         bytes_per_token=bpt, transfer_bound_tokens_per_s=bound,
                         ratio_to_bound=tps / bound if bpt else None,
                         host_reads_per_token=statistics.mean(x['host_reads_per_token'] for x in stats[name]),
                         tokens=n, per_layer_s=statistics.median(ts) / n / a.layers)
    # the forecast (chapter 11) of each miss=copy variant from the compute per token with every expert on the device,
    # the measured bandwidth and the variant's measured hit rate: a check of the cost model's time terms
    compute_s = 1 / res['cache 8 (every expert on the device)']['tokens_per_s']
    for name, v in res.items():
        if 'miss=copy' not in name: continue
        f = forecast_decode(a.layers, 2, v['hit_rate'], env['row_bytes'], env['h2d_bytes_per_s'], compute_s)
        v |= dict(forecast_tokens_per_s=f.tokens_per_s, forecast_overlapped_tokens_per_s=f.tokens_per_s_overlapped,
                  forecast_error=f.tokens_per_s / v['tokens_per_s'] - 1)
    env['forecast'] = ('forecast_decode(layers, 2, measured hit rate, row bytes, measured H2D, compute = 1 / tokens/s of '
                       'cache 8): serial (no overlap) and overlapped (copies hidden) bounds')
    out = Path(a.out) if a.out else Path(__file__).parent / 'results' / ('offload_gpu_quick.json' if a.quick else 'offload_gpu.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, results=res), indent=1))
    print(f"H2D {env['h2d_bytes_per_s'] / 1e9:.2f} GB/s, row {env['row_bytes'] / 1e6:.2f} MB")
    for k, v in res.items():
        fc = f"  forecast {v['forecast_tokens_per_s']:.2f}..{v['forecast_overlapped_tokens_per_s']:.2f}" if 'forecast_tokens_per_s' in v else ''
        print(f"{k:36s} {v['tokens_per_s']:8.2f} tok/s  bound {v['transfer_bound_tokens_per_s']:8.2f}  ratio {v['ratio_to_bound'] or 0:.2f}{fc}")
    print('wrote', out)


if __name__ == '__main__':
    main()
