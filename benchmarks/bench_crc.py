"""What checking an expert row's CRC-32 costs, per byte, beside the copy it guards (issue 20).

The engine checks each row of a store read from a file the first time the row is read in a process (a miss, a
prefetch, a staging copy, a host computation, or a layer read into RAM); hits and later reads cost nothing. So the
price is paid once per expert: here, per GiB, next to the copy of the same bytes — from host RAM (a resident layer)
and from a memory-mapped file in the page cache (the disk tier, its pages already read once) — both on the CPU,
interleaved in a fresh random order every repeat; medians. Then the engine's own counters (`offload_stats`:
`checked_bytes`, `check_seconds`) after serving the packaged tiny model from a memory-mapped converted folder.

    python benchmarks/bench_crc.py            # -> benchmarks/results/crc_cpu.json (as stored)
    python benchmarks/bench_crc.py --quick    # 8 MiB rows, 3 repeats: a smoke test
"""
from __future__ import annotations

import argparse, datetime as dt, json, os, platform, random, statistics, tempfile, time, zlib
from pathlib import Path

import torch

from common import cpu_model  # benchmarks/common.py (scripts run as `python benchmarks/...`)

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--mib', type=int, default=64, help='bytes of one row (a 2-bit Mixtral-8x7B expert is 63.7 MiB)')
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    mib, repeats = (8, 3) if args.quick else (args.mib, args.repeats)
    n = mib * 2**20
    torch.manual_seed(0)
    host = torch.randint(0, 256, (n,), dtype=torch.uint8)
    dst = torch.empty(n, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / 'row.bin'
        f.write_bytes(host.numpy().tobytes())
        mapped = torch.from_file(str(f), shared=False, size=n, dtype=torch.uint8)
        assert zlib.crc32(mapped.numpy()) == zlib.crc32(host.numpy())
        jobs = {'crc32, host RAM': lambda: zlib.crc32(host.numpy()), 'copy, host RAM': lambda: dst.copy_(host),
                'crc32, memory-mapped (page cache)': lambda: zlib.crc32(mapped.numpy()),
                'copy, memory-mapped (page cache)': lambda: dst.copy_(mapped)}
        for fn in jobs.values(): fn()                                # fault the pages in once
        times = {k: [] for k in jobs}
        for _ in range(repeats):
            order = list(jobs); random.shuffle(order)
            for k in order: times[k].append(timed(jobs[k]))
        del mapped
    per_gib = {k: statistics.median(v) * 2**30 / n for k, v in times.items()}
    micro = {k: dict(seconds_per_gib=round(s, 4), gib_per_s=round(1 / s, 2)) for k, s in per_gib.items()}
    ratio = {src: round(per_gib[f'crc32, {src}'] / per_gib[f'copy, {src}'], 2) for src in ('host RAM', 'memory-mapped (page cache)')}

    from moe_explained.convert import convert, load_converted
    from moe_explained.offload import offload_stats
    from moe_explained.pretrained import TINY_MIXTRAL_PATH
    with tempfile.TemporaryDirectory() as d:
        out = convert(TINY_MIXTRAL_PATH, Path(d) / 'tiny', experts_bits=None, attn_bits=None, progress=False)
        m = load_converted(out, cache_size=2, resident_layers=0, progress=False)
        ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(): m.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)
        s = offload_stats(m)
        engine = dict(checked_bytes=s.checked_bytes, store_bytes=m.moe_offload.store.nbytes, check_seconds=round(s.check_seconds, 5),
                      bytes_moved=s.bytes_moved, seconds_per_gib=round(s.check_seconds * 2**30 / max(s.checked_bytes, 1), 4))
    env = dict(date=dt.date.today().isoformat(), cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version(),
               torch=torch.__version__, zlib=zlib.ZLIB_RUNTIME_VERSION, row_mib=mib, repeats=repeats)
    res = dict(env=env, micro=micro, crc_over_copy=ratio, engine_tiny_model=engine)
    print(json.dumps(res, indent=1))
    path = Path(args.out) if args.out else ROOT / 'benchmarks' / 'results' / ('crc_quick.json' if args.quick else 'crc_cpu.json')
    path.write_text(json.dumps(res, indent=1) + '\n')
    print('wrote', path)


if __name__ == '__main__':
    main()
