"""The offloaded-inference engine (chapter 10), decode speed on CPU, everything compared measured in one run, interleaved.

1. overhead: the packaged tiny Mixtral and the Mixtral-shaped model below, offloaded with every expert cached
   (cache_size = E, store in RAM) vs the same model not offloaded (transformers' eager experts, and its default
   `grouped_mm`): decode tokens/s, goal >= 0.95x plain.
2. constrained: a Mixtral-shaped model with random weights built locally (hidden 1024, intermediate 3584, 8 experts,
   top-2, 4 layers: 352M expert parameters, fp32, 1.41 GB of experts), 2 of 8 slots per layer, store memory-mapped
   from disk: ours with and without prefetch, `miss='copy'` and `miss='host'`; the naive policy (every token loads its
   experts, nothing is kept); the plain model with everything in RAM (the ceiling); Hugging Face accelerate's offloading (`device_map="auto"`, `max_memory` = the bytes our
   engine keeps resident, `offload_folder`). Goal: >= 3x accelerate's tokens/s. Reports hit rate and bytes moved
   per token.
3. the cost model of a miss: one expert's copy (bytes / measured bandwidth, from RAM and from the memory-mapped
   store) against computing it on the host (one token).

Decode = one token per forward with the KV cache, after an untimed prefill of the prompt; each repeat runs every
variant once, in a fresh random order; medians are reported.

    python benchmarks/bench_offload.py            # -> benchmarks/results/offload_cpu.json (as stored)
    python benchmarks/bench_offload.py --quick    # small shapes, 2 repeats: a smoke test (-> offload_quick.json)
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_model  # benchmarks/common.py (scripts run as `python benchmarks/...`)

from moe_explained.offload import offload, offload_stats
from moe_explained.pretrained import tiny_mixtral


def mixtral_shaped(hidden, inter, layers, experts=8, vocab=32000, seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=max(hidden // 128, 4), num_key_value_heads=max(hidden // 512, 2),
                        num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=512)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():       # weights of the scale a trained model has, so activations stay finite
        for p in model.parameters():
            if p.dim() >= 2: p.normal_(0, 0.02)
    return model


class Decoder:
    "Decode `n` tokens greedily with the KV cache, after a prefill of `prompt`; `before_step` runs before every token."
    def __init__(self, model, prompt, before_step=None):
        self.model, self.prompt, self.before_step = model, prompt, before_step

    @torch.no_grad()
    def prefill(self):
        out = self.model(input_ids=self.prompt, use_cache=True)
        self.pkv, self.next = out.cache, out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def decode(self, n):
        toks = []
        for _ in range(n):
            if self.before_step: self.before_step()
            out = self.model(input_ids=self.next, cache=self.pkv, use_cache=True)
            self.pkv, self.next = out.cache, out.logits[:, -1:].argmax(-1)
            toks.append(self.next.item())
        return toks


def run_interleaved(variants: dict, prompt, n, reps, stats_of=None):
    "Median decode tokens/s of each variant over `reps` repeats, in a fresh random order each; the tokens of the first repeat."
    times, tokens, stats = {k: [] for k in variants}, {}, {}
    for r in range(reps):
        for name in random.sample(list(variants), len(variants)):
            model, before = variants[name]
            d = Decoder(model, prompt, before)
            d.prefill()
            s0 = offload_stats(model) if hasattr(model, 'moe_offload') else None
            t = time.perf_counter(); toks = d.decode(n); times[name].append(time.perf_counter() - t)
            if r == 0: tokens[name] = toks
            if s0 is not None:
                s1 = offload_stats(model)
                d_req, d_hits = s1.requests - s0.requests, s1.hits - s0.hits
                stats.setdefault(name, []).append(dict(hit_rate=d_hits / d_req, bytes_per_token=(s1.bytes_moved - s0.bytes_moved) / n,
                                                       prefetch_hits=s1.prefetch_hits - s0.prefetch_hits,
                                                       prefetches=s1.prefetches - s0.prefetches))
            print(f'  rep {r} {name:28s} {n / times[name][-1]:8.2f} tok/s', flush=True)
    res = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = dict(tokens_per_s=n / med, median_s=med, all_s=ts)
        if name in stats:
            res[name] |= {k: statistics.mean(s[k] for s in stats[name]) for k in stats[name][0]}
    return res, tokens


def resident_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())


def overhead(models: dict, n, reps, prompt_len=8):
    out = {}
    for label, plain in models.items():
        print(f'overhead: {label}', flush=True)
        E = plain.config.num_local_experts
        eager = copy.deepcopy(plain); eager.set_experts_implementation('eager')
        default = copy.deepcopy(plain)
        cached = offload(copy.deepcopy(plain), cache_size=E, prefetch=False, progress=False)
        for layer in cached.moe_offload.layers.values(): layer.prefetch(list(range(E)))   # every expert on the device
        cached.moe_offload.copier.drain()
        prompt = torch.randint(0, plain.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        variants = {'plain eager': (eager, None), f'plain {default.config._experts_implementation}': (default, None),
                    'offloaded, all cached': (cached, None)}
        res, toks = run_interleaved(variants, prompt, n, reps)
        res['same_tokens_as_eager'] = toks['offloaded, all cached'] == toks['plain eager']
        res['ratio_to_eager'] = res['offloaded, all cached']['tokens_per_s'] / res['plain eager']['tokens_per_s']
        res['ratio_to_default'] = (res['offloaded, all cached']['tokens_per_s']
                                   / res[f'plain {default.config._experts_implementation}']['tokens_per_s'])
        out[label] = res
        print(f'  offloaded/eager x{res["ratio_to_eager"]:.3f}, offloaded/default x{res["ratio_to_default"]:.3f}', flush=True)
        del eager, default, cached; gc.collect()
    return out


def constrained(plain, n, reps, tmp, cache_size=2, with_accelerate=True, prompt_len=8):
    print('constrained', flush=True)
    prompt = torch.randint(0, plain.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    variants, info = {}, {}
    for name, kw in {'ours, prefetch, miss=copy': dict(prefetch=True, miss='copy'),
                     'ours, prefetch 1 guess, miss=copy': dict(prefetch=1, miss='copy'),
                     'ours, no prefetch, miss=copy': dict(prefetch=False, miss='copy'),
                     'ours, prefetch, miss=host': dict(prefetch=True, miss='host'),
                     'ours, no prefetch, miss=host': dict(prefetch=False, miss='host'),
                     'naive (no cache)': dict(prefetch=False, miss='copy')}.items():
        folder = Path(tmp) / name.replace(' ', '_').replace(',', '').replace('=', '-').replace('(', '').replace(')', '')
        m = offload(copy.deepcopy(plain), cache_size=cache_size, store='disk', offload_folder=folder, progress=False, **kw)
        def forget(eng=m.moe_offload):                   # the naive policy: every token starts from empty slots
            for layer in eng.layers.values(): layer.reset()
        variants[name] = (m, forget if name.startswith('naive') else None)
    ours = variants['ours, prefetch, miss=copy'][0]
    budget = resident_bytes(ours) + offload_stats(ours).device_bytes
    info['our_resident_bytes'] = budget
    info['expert_bytes'] = offload_stats(ours).disk_bytes
    info['row_bytes'] = ours.moe_offload.store.row_nbytes(0)
    if with_accelerate:
        from transformers import AutoModelForCausalLM
        saved = Path(tmp) / 'plain'
        plain.save_pretrained(saved)
        acc = AutoModelForCausalLM.from_pretrained(saved, device_map='auto', max_memory={'cpu': budget},
                                                   offload_folder=str(Path(tmp) / 'accelerate'), dtype=torch.float32)
        acc.eval(); acc.set_experts_implementation('eager')
        dm = getattr(acc, 'hf_device_map', {})
        info['accelerate_device_map'] = {k: str(v) for k, v in dm.items()}
        info['accelerate_disk_modules'] = sum(1 for v in dm.values() if v == 'disk')
        variants['accelerate device_map=auto + disk offload'] = (acc, None)
    variants['plain (not offloaded, all in RAM)'] = (plain, None)
    res, toks = run_interleaved(variants, prompt, n, reps)
    ref = Decoder(plain, prompt); ref.prefill(); ref_toks = ref.decode(n)
    info['same_tokens_as_plain'] = {k: v == ref_toks for k, v in toks.items()}
    if with_accelerate:
        a = res['accelerate device_map=auto + disk offload']['tokens_per_s']
        info['ratio_to_accelerate'] = {k: v['tokens_per_s'] / a for k, v in res.items()}
    info['ratio_to_naive'] = {k: v['tokens_per_s'] / res['naive (no cache)']['tokens_per_s'] for k, v in res.items()}
    return res | {'info': info}


def cost_model(plain, tmp, reps):
    "One expert: copy store row -> slot (RAM and memory-mapped), vs computing it on the host for one token."
    print('cost model', flush=True)
    m_ram = offload(copy.deepcopy(plain), cache_size=2, prefetch=False, progress=False)
    m_disk = offload(copy.deepcopy(plain), cache_size=2, prefetch=False, store='disk', offload_folder=Path(tmp) / 'cost', progress=False)
    L = m_ram.moe_offload.layers[0]
    rows_ram, rows_disk = L.rows, m_disk.moe_offload.layers[0].rows
    slot = torch.empty_like(L.slots[0])
    x = torch.randn(1, plain.config.hidden_size)
    host = m_ram.moe_offload.store.views(L.layer, 0)
    w_in, w_out = host['gate_up_proj'], host['down_proj']
    def compute(): torch.nn.functional.linear(L.gate_fn(torch.nn.functional.linear(x, w_in)), w_out)
    fns = {'copy from RAM': lambda: slot.copy_(rows_ram[random.randrange(8)]),
           'copy from mmap store (page cache)': lambda: slot.copy_(rows_disk[random.randrange(8)]),
           'host compute, 1 token': compute}
    for f in fns.values(): f(); f()
    times = {k: [] for k in fns}
    for _ in range(reps * 10):
        for k in random.sample(list(fns), len(fns)):
            t = time.perf_counter(); fns[k](); times[k].append(time.perf_counter() - t)
    nb = L.nbytes
    res = {k: dict(median_ms=statistics.median(v) * 1e3) for k, v in times.items()}
    for k in ('copy from RAM', 'copy from mmap store (page cache)'):
        res[k]['GB_per_s'] = nb / (res[k]['median_ms'] / 1e3) / 1e9
    res['row_bytes'] = nb
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true')
    p.add_argument('--out')
    a = p.parse_args()
    torch.manual_seed(0); random.seed(0)
    if a.quick: shape, n, reps = dict(hidden=128, inter=256, layers=2, vocab=512), 4, 2
    else: shape, n, reps = dict(hidden=1024, inter=3584, layers=4), 24, 5
    env = dict(date=dt.datetime.now().isoformat(timespec='seconds'), cpu=cpu_model(), threads=torch.get_num_threads(),
               torch=torch.__version__, shape=shape, decode_tokens=n, repeats=reps, loadavg_start=os.getloadavg())
    import transformers, accelerate
    env |= dict(transformers=transformers.__version__, accelerate=accelerate.__version__)
    big = mixtral_shaped(**shape)
    env['params'] = sum(p.numel() for p in big.parameters())
    env['expert_params'] = sum(p.numel() for n_, p in big.named_parameters() if 'experts.' in n_)
    tiny, _ = tiny_mixtral()
    with tempfile.TemporaryDirectory(prefix='bench-offload-') as tmp:
        results = dict(env=env)
        results['cost_model'] = cost_model(big, tmp, reps)
        print(json.dumps(results['cost_model'], indent=1))
        results['overhead'] = overhead({'tiny-mixtral (packaged)': tiny, 'mixtral-shaped': big}, n, reps)
        results['constrained'] = constrained(big, n, reps, tmp)
    env['loadavg_end'] = os.getloadavg()
    out = Path(a.out) if a.out else Path(__file__).parent / 'results' / ('offload_quick.json' if a.quick else 'offload_cpu.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    c = results['constrained']
    print('\nconstrained (2 of 8 slots, store memory-mapped):')
    for k, v in c.items():
        if k == 'info': continue
        print(f'  {k:44s} {v["tokens_per_s"]:8.2f} tok/s' + (f'  hit {v["hit_rate"]:.1%}  {v["bytes_per_token"] / 1e6:8.1f} MB/token' if 'hit_rate' in v else ''))
    print('  ratio to accelerate:', {k: round(v, 2) for k, v in c['info'].get('ratio_to_accelerate', {}).items()})
    print('wrote', out)


if __name__ == '__main__':
    main()
