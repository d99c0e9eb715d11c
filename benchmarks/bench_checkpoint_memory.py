"""A checkpoint bigger than its host budget, loaded and run (chapter 11b): peak anonymous memory, measured.

A bf16 Mixtral-shaped checkpoint with random weights is saved locally in the hub's layout (`save_pretrained`: per-expert
keys `block_sparse_moe.experts.{e}.w1/w2/w3`), sharded small enough that experts straddle two shards. Each variant
runs in a fresh process, one after another, interleaved over the repeats:

- `plain`: transformers' `from_pretrained` (eager experts), everything in RAM: the greedy tokens every variant must equal;
- `whole`: chapter 10's `load_and_offload` (the path `load_offloaded` took before chapter 11b), store in RAM;
- `served`: `load_offloaded` with `host_memory` = one MoE layer's experts (a quarter of them), the rest memory-mapped;
- `served_disk`: `load_offloaded(..., store='disk')`, no expert read into RAM;
- `exclusive`: `load_offloaded(..., placement='exclusive', cache_size=7)`: each expert in a slot or in one of the
  E - C + 1 = 2 host rows per layer (a quarter of the experts: the same RAM as `host_memory`), evicted ones written back.

Memory is the process's anonymous resident set (`RssAnon` of /proc/self/status, which leaves out the page cache of
memory-mapped files), sampled every millisecond by a thread from just before loading to the end of generation; the
growth is the peak less the value just before loading (torch and transformers imported). The bound checked for the
served variants: the non-expert weights + the device slots and staging buffer + the resident experts (`host_memory`)
+ a margin of 64 MiB for activations, the KV cache and the allocator (for `exclusive`, its host rows in place of the
resident experts). On CPU the "device" slots are host memory too, and counted.

    python benchmarks/bench_checkpoint_memory.py            # -> benchmarks/results/checkpoint_memory_cpu.json
    python benchmarks/bench_checkpoint_memory.py --quick    # smaller shapes, 1 repeat (-> checkpoint_memory_quick.json)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_model  # benchmarks/common.py (scripts run as `python benchmarks/...`)

MARGIN = 64 * 2**20
VARIANTS = ['plain', 'whole', 'served', 'served_disk', 'exclusive']
SHAPES = dict(full=dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, shard='120MB'),
              quick=dict(hidden_size=256, intermediate_size=896, num_hidden_layers=4, shard='8MB'))


def rss_anon() -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('RssAnon:'): return int(line.split()[1]) * 1024
    raise RuntimeError('no RssAnon in /proc/self/status (Linux only)')


class PeakAnon:
    "The peak of `rss_anon()` while the `with` block runs, sampled every millisecond by a thread."
    def __enter__(self):
        self.start = self.peak = rss_anon(); self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True); self.t.start(); return self
    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_anon()); time.sleep(0.001)
    def __exit__(self, *exc):
        self.stop = True; self.t.join(); self.peak = max(self.peak, rss_anon())


def build(folder: Path, shape: dict):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(hidden_size=shape['hidden_size'], intermediate_size=shape['intermediate_size'],
                        num_hidden_layers=shape['num_hidden_layers'], num_attention_heads=8, num_key_value_heads=2,
                        num_local_experts=8, num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device('cpu'):
        m = MixtralForCausalLM(cfg).to(torch.bfloat16)
    for p in m.parameters(): torch.nn.init.normal_(p, 0, 0.02)
    m.save_pretrained(folder, max_shard_size=shape['shard'])


def run(folder: Path, variant: str, host_memory: int, tokens: int) -> dict:
    import torch
    from moe_explained.checkpoint import Checkpoint, load_offloaded
    from moe_explained.offload import load_and_offload
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    ids = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
    with PeakAnon() as mem:
        t = time.perf_counter()
        if variant == 'plain':
            m = AutoModelForCausalLM.from_pretrained(folder); m.set_experts_implementation('eager')
        elif variant == 'whole': m = load_and_offload(folder, cache_size=2, progress=False)
        elif variant == 'served': m = load_offloaded(folder, cache_size=2, host_memory=host_memory, progress=False)
        elif variant == 'exclusive': m = load_offloaded(folder, cache_size=7, placement='exclusive', progress=False)
        else: m = load_offloaded(folder, cache_size=2, store='disk', progress=False)
        load_s = time.perf_counter() - t
        after_load = rss_anon()
        t = time.perf_counter()
        out = m.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        gen_s = time.perf_counter() - t
    res = dict(variant=variant, peak_growth=mem.peak - mem.start, load_growth=after_load - mem.start, load_s=load_s,
               generate_s=gen_s, tokens=out[0].tolist())
    eng = getattr(m, 'moe_offload', None)
    if eng is not None:
        ck = Checkpoint(folder)
        expert_bytes = eng.store.nbytes
        res |= dict(store=repr(eng.store), expert_bytes=expert_bytes,
                    resident_bytes=eng.store.host_nbytes + sum(l.host_bytes for l in eng.layers.values()),
                    non_expert_bytes=ck.nbytes - expert_bytes,
                    slot_bytes=sum(l.device_bytes for l in eng.layers.values()) + sum(b.numel() for b in eng.staging.values()))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true'); ap.add_argument('--repeats', type=int, default=None)
    ap.add_argument('--out', default=None, help='where to write the results JSON (default benchmarks/results/...)')
    ap.add_argument('--child', nargs=4, metavar=('FOLDER', 'VARIANT', 'HOST', 'TOKENS'))
    ap.add_argument('--build', nargs=2, metavar=('FOLDER', 'SHAPE'))
    a = ap.parse_args()
    if a.build: build(Path(a.build[0]), SHAPES[a.build[1]]); return
    if a.child:
        print(json.dumps(run(Path(a.child[0]), a.child[1], int(a.child[2]), int(a.child[3])))); return
    name = 'quick' if a.quick else 'full'
    repeats, tokens = a.repeats or (1 if a.quick else 2), 16
    me = [sys.executable, __file__]
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / 'mixtral-shaped-bf16'
        subprocess.run(me + ['--build', str(folder), name], check=True)
        import torch
        from moe_explained.checkpoint import Checkpoint
        ck = Checkpoint(folder)
        experts = sum(e[4] for k, e in ck.entries.items() if '.experts.' in k)
        layers = SHAPES[name]['num_hidden_layers']
        host_memory = experts // layers                     # one MoE layer's experts: a quarter of them
        straddling = _straddling(ck)
        runs = []
        for r in range(repeats):
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                p = subprocess.run(me + ['--child', str(folder), v, str(host_memory), str(tokens)], capture_output=True, text=True)
                if p.returncode: raise SystemExit(f'{v} failed:\n{p.stderr[-3000:]}')
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]) | dict(repeat=r))
                print(v, r, f"peak growth {runs[-1]['peak_growth'] / 2**20:,.1f} MiB", flush=True)
    ref = next(x['tokens'] for x in runs if x['variant'] == 'plain')
    summary = {}
    for v in VARIANTS:
        rs = [x for x in runs if x['variant'] == v]
        s = dict(peak_growth_mib=max(x['peak_growth'] for x in rs) / 2**20, load_growth_mib=max(x['load_growth'] for x in rs) / 2**20,
                 load_s=min(x['load_s'] for x in rs), generate_s=min(x['generate_s'] for x in rs),
                 tokens_equal_plain=all(x['tokens'] == ref for x in rs))
        if 'expert_bytes' in rs[0]:
            x = rs[0]
            bound = x['non_expert_bytes'] + x['slot_bytes'] + x['resident_bytes'] + MARGIN
            s |= dict(store=x['store'], non_expert_mib=x['non_expert_bytes'] / 2**20, slot_mib=x['slot_bytes'] / 2**20,
                      resident_mib=x['resident_bytes'] / 2**20, bound_mib=bound / 2**20,
                      within_bound=max(y['peak_growth'] for y in rs) <= bound)
        summary[v] = s
    out = dict(benchmark='checkpoint_memory', date=dt.date.today().isoformat(), cpu=cpu_model(), torch=torch.__version__,
               transformers=__import__('transformers').__version__, shape=SHAPES[name], experts_mib=experts / 2**20,
               checkpoint_mib=ck.nbytes / 2**20, host_memory_mib=host_memory / 2**20, experts_over_host_memory=experts / host_memory,
               experts_straddling_shards=straddling, margin_mib=MARGIN / 2**20, repeats=repeats, new_tokens=tokens,
               method='peak RssAnon (/proc/self/status) sampled every 1 ms from before loading to the end of generate(), '
                      'less its value before loading; each variant in a fresh process; growth is the max over repeats',
               summary=summary, runs=[{k: v for k, v in x.items() if k != 'tokens'} for x in runs])
    dest = Path(a.out) if a.out else Path(__file__).parent / 'results' / f'checkpoint_memory_{"quick" if a.quick else "cpu"}.json'
    dest.write_text(json.dumps(out, indent=1) + '\n')
    print(json.dumps(summary, indent=1)); print('->', dest)


def _straddling(ck) -> int:
    "How many experts have their tensors in more than one shard."
    import re
    files = {}
    for k, e in ck.entries.items():
        m = re.search(r'layers\.(\d+)\..*experts\.(\d+)\.', k)
        if m: files.setdefault(m.groups(), set()).add(e[0])
    return sum(len(f) > 1 for f in files.values())


if __name__ == '__main__':
    main()
