"""The offloaded engine on a GPU: a Mixtral-8x7B-shaped model with 2-bit HQQ experts, against the transfer bound.

Prepared for a session that has a CUDA device (one script, well under 8 minutes); `--device cpu --quick` runs the
same code at a tiny shape, which is what the test suite does. Nothing is downloaded and 45B weights are never
quantized: the model is built from Mixtral-8x7B's config with `--layers` of its 32 decoder layers (the per-layer
figures are what one extrapolates from, stated as such in the results), the non-expert weights random in fp16 on the
device, and the expert store built directly in packed form — one expert is quantized (RTN, 2-bit, group 16, 8-bit
meta-quantized scales: chapter 07's layout) and its bytes fill every row, so every copy moves exactly the bytes a real
2-bit expert has.

Measured, everything in one run, variants interleaved: pinned host-to-device bandwidth (one expert row, repeated);
decode tokens/s for cache sizes 2 and 4 per layer, prefetch on and off, `miss='copy'` and `miss='host'`; per variant
the hit rate, bytes copied per token, and the transfer bound `bandwidth / bytes copied per token` (tokens/s if the
copies were all the time a token took), with the ratio measured/bound.

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
from moe_explained.offload import OFFLOAD_IMPL, ExpertStore, OffloadEngine, _offloaded_experts_forward, offload_stats
from moe_explained.quant import pack_expert, read_expert
from moe_explained.trace import find_moe_blocks


def build(device, layers, quick, cache_size, prefetch, miss, store_rows=None):
    "A Mixtral-8x7B-shaped model (or a tiny one with --quick) with an engine over a packed 2-bit store."
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    cfg = dict(get_config('mixtral-8x7b'), num_hidden_layers=layers)
    if quick: cfg |= dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    cfg.pop('architectures', None); cfg.pop('model_type', None)
    config = MixtralConfig(**{k: v for k, v in cfg.items() if k in MixtralConfig().to_dict()})
    with torch.device('meta'): model = MixtralForCausalLM(config)
    for _, _, block, _ in find_moe_blocks(model):
        for p in ('gate_up_proj', 'down_proj'): block.experts._parameters.pop(p)
    dtype = torch.float16 if torch.device(device).type == 'cuda' else torch.float32
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'norm' in n: p.fill_(1.0)
            else: p.normal_(0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)   # its buffers were left empty by to_empty
    if store_rows is None:
        H, I = config.hidden_size, config.intermediate_size
        torch.manual_seed(0)
        row = pack_expert(dict(w_in=torch.randn(2 * I, H) * 0.02, w_out=torch.randn(H, I) * 0.02), bits=2, group_size=16,
                          method='rtn')
        eb = read_expert(row)
        fmt = dict(kind='hqq', header=eb.header, start=eb.start, nbytes=row.numel())
        pin = torch.device(device).type == 'cuda'
        rows = {}
        for layer, _, block, _ in find_moe_blocks(model):
            r = torch.empty(config.num_local_experts, row.numel(), dtype=torch.uint8, pin_memory=pin)
            r.copy_(row.expand_as(r))
            rows[layer] = r
        store_rows = (rows, {l: fmt for l in rows})
    for _, _, block, _ in find_moe_blocks(model): block.experts.is_transposed = False
    store = ExpertStore(*store_rows)
    ALL_EXPERTS_FUNCTIONS.register(OFFLOAD_IMPL, _offloaded_experts_forward)
    model.moe_offload = OffloadEngine(model, store, cache_size, device, prefetch=prefetch, miss=miss)
    model.set_experts_implementation(OFFLOAD_IMPL)
    return model.eval(), store_rows


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
                         bytes_per_token=(s1.bytes_moved - s0.bytes_moved) / n)


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
    variants, rows = {}, None
    for C in (2, 4):
        for prefetch in (True, False):
            for miss in ('copy', 'host'):
                model, rows = build(a.device, a.layers, a.quick, C, prefetch, miss, rows)
                variants[f'cache {C}, prefetch {"on" if prefetch else "off"}, miss={miss}'] = model
    any_row = next(iter(rows[0].values()))[0]
    env['row_bytes'] = any_row.numel()
    env['h2d_bytes_per_s'] = bandwidth(any_row, a.device)
    vocab = next(iter(variants.values())).config.vocab_size
    times, stats = {k: [] for k in variants}, {}
    for r in range(a.repeats):
        for name in random.sample(list(variants), len(variants)):
            s, st = decode(variants[name], a.tokens, a.device, vocab)
            times[name].append(s); stats.setdefault(name, []).append(st)
            print(f'rep {r} {name:36s} {a.tokens / s:8.2f} tok/s  hit {st["hit_rate"]:.1%}  {st["bytes_per_token"] / 1e6:8.1f} MB/token', flush=True)
    res = {}
    for name, ts in times.items():
        tps = a.tokens / statistics.median(ts)
        bpt = statistics.mean(x['bytes_per_token'] for x in stats[name])
        bound = env['h2d_bytes_per_s'] / bpt if bpt else float('inf')
        res[name] = dict(tokens_per_s=tps, all_s=ts, hit_rate=statistics.mean(x['hit_rate'] for x in stats[name]),
                         bytes_per_token=bpt, transfer_bound_tokens_per_s=bound,
                         ratio_to_bound=tps / bound if bpt else None,
                         per_layer_s=statistics.median(ts) / a.tokens / a.layers)
    out = Path(a.out) if a.out else Path(__file__).parent / 'results' / ('offload_gpu_quick.json' if a.quick else 'offload_gpu.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, results=res), indent=1))
    print(f"H2D {env['h2d_bytes_per_s'] / 1e9:.2f} GB/s, row {env['row_bytes'] / 1e6:.2f} MB")
    for k, v in res.items():
        print(f"{k:36s} {v['tokens_per_s']:8.2f} tok/s  bound {v['transfer_bound_tokens_per_s']:8.2f}  ratio {v['ratio_to_bound'] or 0:.2f}")
    print('wrote', out)


if __name__ == '__main__':
    main()
