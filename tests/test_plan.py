"""Chapter 11, part 1: the memory plan, checked against chapter 00's independent parameter count and against the bytes
the engine really allocates."""
import copy

import pytest
import torch

from moe_explained.dense import count_params
from moe_explained.plan import GiB, model_sizes, parse_bytes, plan_memory


def test_sizes_match_chapter_00_counts():
    for name in ('mixtral-8x7b', 'qwen3-30b-a3b'):
        s, ref = model_sizes(name), count_params(name).breakdown()
        assert s.expert_params * s.experts * len(s.moe_layers) == ref['experts']
        assert s.attention == ref['attention']
        assert s.embeddings == ref['embeddings'] + ref['lm_head']


def test_mixtral_on_a_t4():
    p = plan_memory('mixtral-8x7b', device_memory='T4', host_memory='12.7GB', disk_memory='80GB')
    assert p.fits and p.experts_bits == 2 and p.attn_bits == 4
    assert p.expert_nbytes == 66_749_312                        # chapter 07's packed 2-bit Mixtral expert
    assert p.total('device') <= parse_bytes('T4') < p.total('device') + p.expert_nbytes * 32   # the largest cache that fits
    # 12.7 GB of RAM cannot hold every expert (15.9 GiB) but holds the 3 of 8 per layer the device does not (+1 spare):
    # exclusive placement, nothing read from disk
    assert p.store == p.placement == 'exclusive' and p.resident_layers == 0 and p.load_kwargs()['placement'] == 'exclusive'
    rows = next(v for k, v in p.host.items() if k.startswith('exclusive placement'))
    assert rows == 32 * (-(-(8 - p.cache_size + 1) * p.expert_nbytes // 4096) * 4096)
    assert p.total('host') <= parse_bytes('12.7GB')
    assert 'expert store (experts.bin)' in str(p) and 'DOES NOT FIT' not in str(p)
    # with 9 GB of RAM not even that fits: the first layers in RAM, the rest read from disk
    q = plan_memory('mixtral-8x7b', device_memory='T4', host_memory='9GB', disk_memory='80GB')
    assert q.store == 'split' and q.placement == 'inclusive' and 0 < q.resident_layers < 32
    held = next(v for k, v in q.host.items() if k.startswith('expert store in RAM'))
    layer = 8 * q.expert_nbytes
    assert held == q.resident_layers * (-(-layer // 4096) * 4096) and held < q.resident_layers * 2**29   # to the page


@pytest.mark.parametrize('attn_bits', [4, 3])
def test_plan_bytes_are_what_the_engine_allocates(tmp_path, attn_bits):
    from transformers import MixtralConfig, MixtralForCausalLM
    from hqq.core.quantize import HQQLinear
    from moe_explained.offload import offload, offload_stats
    cfg = MixtralConfig(hidden_size=128, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, vocab_size=256, num_local_experts=6, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    p = plan_memory(cfg, device_memory=10**9, host_memory=10**9, disk_memory=10**10, experts_bits=4, attn_bits=attn_bits,
                    cache_size=3, dtype_bytes=4, device_reserve=0, host_reserve=0, shard_bytes=0)
    m = offload(copy.deepcopy(model), cache_size=3, experts_bits=4, attn_bits=attn_bits, progress=False)
    st = offload_stats(m)
    slots = sum(v for k, v in p.device.items() if k.startswith(('expert slots', 'staging')))
    assert slots == st.device_bytes
    assert p.expert_nbytes * 6 * 3 == m.moe_offload.store.nbytes
    attn = sum(t.numel() * t.element_size() for mod in m.modules() if isinstance(mod, HQQLinear)
               for t in (mod.W_q, mod.meta['scale'], mod.meta['zero']))
    assert attn == next(v for k, v in p.device.items() if k.startswith('attention'))


def test_page_locked_blocks_are_rounded_to_the_page_not_a_power_of_two():
    "host_buffer (chapter 10c) locks exact buffers: a 509 MiB layer holds 509 MiB, not the 512 MiB PyTorch's allocator would."
    from moe_explained.plan import pinned_nbytes
    assert [pinned_nbytes(n) for n in (0, 1, 4096, 4097, 509 * 2**20, 678 * 2**20 + 1)] == \
           [0, 4096, 4096, 8192, 509 * 2**20, 678 * 2**20 + 4096]


def test_refusals_name_what_to_change():
    with pytest.raises(ValueError, match='no memory plan fits the device.*fewer max_tokens'):
        plan_memory('mixtral-8x7b', device_memory='4GB', host_memory='12.7GB', disk_memory='80GB')
    with pytest.raises(ValueError, match='of disk'):
        plan_memory('mixtral-8x7b', device_memory='T4', host_memory='12.7GB', disk_memory='10GB')
    with pytest.raises(ValueError, match='cache_size=9 is out of range'):
        plan_memory('mixtral-8x7b', device_memory='80GB', cache_size=9)
    with pytest.raises(ValueError, match='experts_bits=5'):
        plan_memory('mixtral-8x7b', device_memory='80GB', experts_bits=5)
    for bad in ('16 gigs', -1, True, [16]):
        with pytest.raises(ValueError): parse_bytes(bad)
    with pytest.raises(ValueError, match='not a Mixture-of-Experts'):
        plan_memory(_dense_config(), device_memory='T4')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='no CUDA device here'): plan_memory('mixtral-8x7b')


def _dense_config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)


def test_units_parse():
    assert parse_bytes('16GB') == 16 * 10**9 and parse_bytes('12.5GiB') == int(12.5 * GiB) and parse_bytes(1024) == 1024
    assert parse_bytes('T4') == int(14.3 * GiB)


def test_the_shipped_table_is_what_the_installed_transformers_computes():
    """`data/shipped.json` (what `models`, `params` and a plan of a shipped model read without loading transformers)
    equals chapter 00's counts and `model_sizes` recomputed now; `write_shipped_table()` rewrites it if not."""
    import json
    from dataclasses import asdict
    from moe_explained.plan import SHIPPED, shipped_sizes, shipped_table
    from moe_explained.quant import SUPPORTED_BITS
    stored = json.loads(SHIPPED.read_text())
    assert stored == json.loads(json.dumps(shipped_table())), 'data/shipped.json is stale: run moe_explained.plan.write_shipped_table()'
    for name, entry in stored.items():
        if entry['sizes'] is None: continue
        sizes = shipped_sizes(name)
        assert asdict(sizes) == asdict(model_sizes(name)) and sizes == model_sizes(name)
        assert sorted(int(b) for b in sizes.row_nbytes) == sorted(SUPPORTED_BITS)


def test_a_plan_from_the_table_equals_one_from_transformers():
    from moe_explained.plan import model_sizes, shipped_name, shipped_sizes
    assert shipped_name('Mixtral-8x7B') == shipped_name('mistralai/mixtral-8x7b-v0.1') == 'mixtral-8x7b'
    assert shipped_name('nobody/nothing') is None and shipped_sizes('llama-2-7b') is None
    from moe_explained.configs import get_config
    fast = plan_memory('qwen3-30b-a3b', 'L4', '32GB', '200GB')
    slow = plan_memory(get_config('qwen3-30b-a3b'), 'L4', '32GB', '200GB')     # a dict: counted on the meta device
    assert str(fast).split('\n', 1)[1] == str(slow).split('\n', 1)[1] and fast.cache_size == slow.cache_size


# --- the forecast (chapter 11) ----------------------------------------------------------------------------------

def test_forecast_decode_is_the_sum_of_its_terms():
    from moe_explained.plan import forecast_decode
    f = forecast_decode(32, 2, 0.75, 50_000_000, 10e9, 0.02, disk_share=0.25, disk_bandwidth=1e9)
    m = 32 * 2 * 0.25                                                       # misses per token
    assert f.misses_per_token == m and f.link_s == m * 5e7 / 10e9 and f.disk_s == 0.25 * m * 5e7 / 1e9
    assert f.tokens_per_s == 1 / (0.02 + f.link_s + f.disk_s) and f.tokens_per_s_overlapped == 1 / max(0.02, f.link_s + f.disk_s)


def test_the_uniform_assumption_is_what_lru_gives_on_uniform_requests():
    "LRU over independent uniform requests hits C/E of the time: chapter 08's simulator on such requests, brute force."
    import random
    from moe_explained.cache import simulate
    rng = random.Random(0)
    reqs = [rng.sample(range(8), 2) for _ in range(20000)]
    for c in (2, 5):
        assert abs(simulate(reqs, 'LRU', c, 8).hit_rate - c / 8) < 0.01


def test_forecast_of_a_plan_and_what_it_needs():
    from moe_explained.plan import LINKS, forecast, plan_memory
    ex = plan_memory('mixtral-8x7b', device_memory='T4', host_memory='12.7GB', disk_memory='80GB')
    assert ex.placement == 'exclusive' and forecast(ex, gpu='T4').disk_s == 0           # nothing read from disk
    t4 = plan_memory('mixtral-8x7b', device_memory='T4', host_memory='9GB', disk_memory='80GB')
    f = forecast(t4, gpu='T4', disk_bandwidth=1e9)
    L, b = len(t4.sizes.moe_layers), t4.expert_nbytes
    assert f.hit_rate == t4.cache_size / 8 and f.bytes_per_miss == b
    assert f.link_s == L * 2 * (1 - f.hit_rate) * b / LINKS['T4'][0]
    assert f.disk_s == (L - t4.resident_layers) / L * f.misses_per_token * b / 1e9
    assert 'hit rate' in str(f) and 'roofline' in str(f)
    with pytest.raises(ValueError, match='disk_bandwidth'): forecast(t4, gpu='T4')
    with pytest.raises(ValueError, match='no published figures'): forecast(t4, gpu='GTX 480')
    g = forecast(t4, hit_rate=0.9, link_bandwidth=10e9, disk_bandwidth=2e9, compute_s=0.05)
    assert g.compute_s == 0.05 and g.hit_rate == 0.9 and g.sources['compute'] == 'given (measured)'
