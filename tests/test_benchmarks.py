"""The benchmark scripts run (their --quick smoke mode, small shapes) and write results with the fields the chapters read."""
import json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_offload_quick(tmp_path):
    out = tmp_path / 'offload.json'
    res = subprocess.run([sys.executable, 'benchmarks/bench_offload.py', '--quick', '--out', str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r = json.loads(out.read_text())
    assert {'env', 'cost_model', 'overhead', 'constrained'} <= set(r)
    c = r['constrained']
    assert all(c['info']['same_tokens_as_plain'].values())          # every variant decodes the plain model's tokens
    assert c['naive (no cache)']['hit_rate'] == 0 and 0 < c['ours, no prefetch, miss=copy']['hit_rate'] <= 1
    assert all(s['same_tokens_as_eager'] for s in r['overhead'].values())


def test_bench_offload_gpu_runs_on_cpu_at_a_tiny_shape(tmp_path):
    "The GPU script, prepared for a session with a device, runs its whole path on CPU (`--device cpu --quick`)."
    out = tmp_path / 'gpu.json'
    res = subprocess.run([sys.executable, 'benchmarks/bench_offload_gpu.py', '--device', 'cpu', '--quick', '--layers', '2',
                          '--tokens', '4', '--repeats', '1', '--out', str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r = json.loads(out.read_text())
    assert len(r['results']) == 7 and r['env']['h2d_bytes_per_s'] > 0
    for name, v in r['results'].items():
        assert 0 <= v['hit_rate'] <= 1 and v['bytes_per_token'] >= 0 and v['tokens_per_s'] > 0
        assert v['host_reads_per_token'] == 2    # one read per MoE layer per decode step (--layers 2)
        if 'miss=copy' in name: assert v['forecast_tokens_per_s'] <= v['forecast_overlapped_tokens_per_s']


def test_bench_crc_and_startup_quick(tmp_path):
    "The CRC-cost and startup benchmarks run (smoke mode) and write what chapters 10 and 90 read."
    for script, keys in (('bench_crc.py', {'env', 'micro', 'crc_over_copy', 'engine_tiny_model'}),
                         ('bench_startup.py', {'env', 'target_seconds', 'results'})):
        out = tmp_path / script.replace('.py', '.json')
        res = subprocess.run([sys.executable, f'benchmarks/{script}', '--quick', '--out', str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        r = json.loads(out.read_text())
        assert keys <= set(r), (script, set(r))
    crc = json.loads((tmp_path / 'bench_crc.json').read_text())
    assert all(v['gib_per_s'] > 0 for v in crc['micro'].values())
    assert 0 < crc['engine_tiny_model']['checked_bytes'] <= crc['engine_tiny_model']['store_bytes']
    startup = json.loads((tmp_path / 'bench_startup.json').read_text())
    assert set(startup['results']['current']) == {'--help', 'models', 'params', 'plan'}


def test_bench_dequant_quick(tmp_path):
    "The dequantization benchmark runs (smoke mode): fp32 in place equals the old fp32 path, and allocates less."
    out = tmp_path / 'dq.json'
    res = subprocess.run([sys.executable, 'benchmarks/bench_dequant.py', '--quick', '--repeats', '1', '--out', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r = json.loads(out.read_text())['results']
    for dn in ('bfloat16', 'float16', 'float32'):
        assert r[f'in place, {dn}']['allocated_bytes'] < r[f'fp32 temporaries, {dn} (before)']['allocated_bytes']


def _quick(script: str, tmp_path) -> dict:
    "Run a benchmark script's --quick mode into a temporary results file, and read it."
    out = tmp_path / 'results.json'
    res = subprocess.run([sys.executable, f'benchmarks/{script}', '--quick', '--out', str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(out.read_text())


def test_bench_checkpoint_memory_quick(tmp_path):
    "A checkpoint 4x the host budget, loaded and run in fresh processes: the served variants stay within their bound, same tokens."
    r = _quick('bench_checkpoint_memory.py', tmp_path)
    assert r['experts_over_host_memory'] >= 4 and r['experts_straddling_shards'] > 0
    for v in ('plain', 'whole', 'served', 'served_disk', 'exclusive'): assert r['summary'][v]['tokens_equal_plain'], v
    for v in ('served', 'served_disk', 'exclusive'):
        s = r['summary'][v]
        assert s['within_bound'] and s['peak_growth_mib'] <= s['bound_mib'], (v, s)


def test_bench_forecast_quick(tmp_path):
    "The forecast against the engine's measured decode: the script runs and reports each cache size, with the same tokens."
    r = _quick('bench_forecast.py', tmp_path)
    assert [x['cache_size'] for x in r['rows']] == [2, 4, 6] and r['link_bandwidth'] > 0 and r['plain_tokens_per_s'] > 0
    for x in r['rows']:
        assert x['same_tokens_as_plain'] and 0 <= x['hit_rate_simulated'] <= 1 and 0 <= x['hit_rate_measured'] <= 1
        assert x['error'] == x['forecast_tokens_per_s'] / x['measured_tokens_per_s'] - 1
