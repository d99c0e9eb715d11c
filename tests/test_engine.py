"""Issue 21: the engine's house. The hot path on a device other than the CPU (the `meta` device raises on any device
mix), the host-read budget, the lifecycle (every copy's error re-raised, no thread left by a failed construction,
`remove` giving back the plain model, an interrupted `offload` leaving the model as it was), the store read live,
compile exclusion, and no global state changed by library calls."""
import copy, threading

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_mixtral_model
from moe_explained.copier import ThreadCopier
from moe_explained.errors import ArgumentError
from moe_explained.offload import OffloadConfig, OffloadEngine, OffloadedExperts, expert_pairs, offload, offload_stats, route
from moe_explained.quant import (SUPPORTED_BITS, expert_views, pack_bits, pack_expert, quantize_experts, quantized_expert_rows,
                                 read_expert, unpack_bits)
from moe_explained.store import ExpertStore, row_views

IDS = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))


def _plain(num_layers=3, E=6):
    m = tiny_mixtral_model(num_layers, E)
    m.set_experts_implementation('eager')
    return m


def _logits(m, ids=IDS):
    with torch.no_grad(): return m(ids).logits


def _greedy(m, n=6, ids=IDS):
    return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


# ---- the hot path on a device other than the CPU -------------------------------------------------------------------

@pytest.mark.parametrize('bits', SUPPORTED_BITS)
def test_unpacking_runs_on_the_codes_device(bits):
    "The shift tables are made on the codes' device: on `meta`, a CPU table would raise a device-mismatch error."
    codes = torch.randint(0, 2 ** bits, (1000,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_bits(packed, bits, 1000), codes)
    out = unpack_bits(packed.to('meta'), bits, 1000)
    assert out.device.type == 'meta' and out.shape == (1000,) and out.dtype == torch.uint8


@pytest.mark.parametrize('bits,meta_bits', [(1, 8), (2, 8), (3, 8), (4, None), (8, None)])
def test_dequantization_and_the_quantized_forward_run_where_the_slot_is(bits, meta_bits):
    "Every step from a packed slot to an expert's weighted output creates its tensors on the slot's device."
    torch.manual_seed(0)
    w_in, w_out = torch.randn(64, 32), torch.randn(32, 32)
    host = read_expert(pack_expert(dict(w_in=w_in, w_out=w_out), bits=bits, group_size=16, meta_bits=meta_bits))
    slot = expert_views(host.buf.to('meta'), host.header, host.start)             # the same layout, in a "device" slot
    for name in ('w_in', 'w_out'):
        for dtype in (torch.float32, torch.bfloat16):
            W = slot.dequantize(name, dtype)
            assert W.device.type == 'meta' and W.dtype == dtype and W.shape == host.dequantize(name).shape
    x = torch.randn(5, 32, device='meta')
    token, which = torch.tensor([0, 2, 4], device='meta'), torch.tensor([1, 0, 1], device='meta')
    gate = lambda h: F.silu(h[..., :32]) * h[..., 32:]
    y = quantized_expert_rows(slot, token, which, x, torch.rand(5, 2, device='meta'), gate)
    assert y.device.type == 'meta' and y.shape == (3, 32)


@pytest.mark.parametrize('experts_bits', [None, 2])
def test_each_expert_forward_and_the_combine_run_on_the_slot_device(experts_bits):
    """The engine's own steps (routing, an expert's forward, the combine) on `meta` tensors: a tensor made on the CPU
    anywhere in them raises. (The generic mode hands the expert to the class's own loop, which reads its routing to
    the host — `nonzero`, `.item()` — and so cannot run on `meta`; the engine's part of it, the one-expert routing,
    is made on `x`'s device.)"""
    m = offload(_plain(2), cache_size=2, prefetch=False, experts_bits=experts_bits, progress=False)
    layer = m.moe_offload.layers[0]
    modes = ['hqq'] if experts_bits else ['eager']
    T, k, H = 4, 2, 64
    idx = torch.tensor([[0, 1], [2, 0], [1, 3], [0, 2]])
    order, counts = route(idx.to('meta'), layer.E, token_major=experts_bits is not None)
    assert order.device.type == counts.device.type == 'meta'
    host_order, host_counts = route(idx, layer.E, token_major=experts_bits is not None)
    pairs = expert_pairs(host_order.to('meta'), host_counts.tolist(), T, k, experts_bits is not None)
    h, w = torch.randn(T, H, device='meta'), torch.rand(T, k, device='meta')
    slot = torch.empty(layer.nbytes, dtype=torch.uint8, device='meta')
    views = row_views(layer.fmt, slot)
    for mode in modes:
        layer.mode = mode
        outs = {e: layer._expert(e, views, False, pairs[e], h, w) for e in pairs}
        assert all(t.device.type == 'meta' and y.device.type == 'meta' for t, y in outs.values())
        final = layer._combine(list(pairs), outs, h)
        assert final.device.type == 'meta' and final.shape == (T, H)
    m.moe_offload.copier.close()


def test_route_groups_pairs_in_the_reference_order():
    "`route` + `expert_pairs` give, per expert, exactly what `torch.where` gives the reference forwards (same order)."
    idx = torch.randint(0, 6, (9, 2), generator=torch.Generator().manual_seed(0))
    idx[:, 1] = (idx[:, 0] + 1 + idx[:, 1] % 5) % 6                      # two distinct experts per token
    mask = F.one_hot(idx, num_classes=7).permute(2, 1, 0)
    for token_major in (False, True):
        order, counts = route(idx, 6, token_major)
        pairs = expert_pairs(order, counts.tolist(), 9, 2, token_major)
        assert sorted(pairs) == sorted(set(idx.flatten().tolist()))
        for e, (token, slot) in pairs.items():
            if token_major: ref_token, ref_slot = torch.where(idx == e)
            else: ref_slot, ref_token = torch.where(mask[e])
            assert torch.equal(token, ref_token) and torch.equal(slot, ref_slot)


# ---- the host-read budget ---------------------------------------------------------------------------------------------

class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    "Ops that need a value on the host: `.item()`/`int()`/`bool()`, and ops whose output size depends on the data."
    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten._unique2.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default}
    def __init__(self):
        super().__init__(); self.reads = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING: self.reads += 1
        return func(*args, **(kwargs or {}))


def _count_reads(monkeypatch, m):
    "Count host reads inside the engine's entry points (the experts calls and the prefetch hooks) of `m`."
    counted = {'reads': 0}
    real_tolist = torch.Tensor.tolist
    def tolist(t):
        counted['reads'] += 1
        return real_tolist(t)
    def counting(fn):
        def inner(*a, **k):
            monkeypatch.setattr(torch.Tensor, 'tolist', tolist)
            try:
                with _HostReads() as mode: out = fn(*a, **k)
            finally: monkeypatch.setattr(torch.Tensor, 'tolist', real_tolist)
            counted['reads'] += mode.reads
            return out
        return inner
    for l in m.moe_offload.layers.values(): monkeypatch.setattr(l, '_guarded', counting(l._guarded))
    eng = m.moe_offload
    for h in eng.hooks: h.remove()
    eng.hooks = []
    for layer, parent, norm, router in eng.speculator.layers:
        t = eng.speculator.target(layer)
        if t is not None: eng.hooks.append(norm.register_forward_pre_hook(counting(lambda mod, args, layer=layer, t=t:
                                                                                   eng._prefetch_hook(layer, t, eng.prefetch_n, mod, args))))
    return counted


def test_one_host_read_per_moe_layer_per_decode_step(monkeypatch):
    "With prefetch on, each decode step reads routing data to the host once per MoE layer (the guess rides along)."
    m = offload(_plain(4), cache_size=2, prefetch=True, progress=False)
    from transformers import DynamicCache
    cache = DynamicCache(config=m.config)
    with torch.no_grad(): out = m(IDS, cache=cache, use_cache=True)      # the prefill
    counted = _count_reads(monkeypatch, m)
    before = m.moe_offload.host_reads
    nxt = out.logits[:, -1:].argmax(-1)
    steps = 5
    for _ in range(steps):
        with torch.no_grad(): out = m(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    L = len(m.moe_offload.layers)
    assert counted['reads'] == steps * L, counted                    # 4 MoE layers x 5 steps, and nothing else
    assert m.moe_offload.host_reads - before == steps * L
    s = offload_stats(m)
    assert s.prefetches > 0 and s.host_reads >= steps * L


def test_a_batch_prefetches_the_union_of_its_guesses():
    "Batch decode keeps prefetch on: the guesses of every sequence, best ranks first, as far as the slots allow."
    plain = _plain(3)
    m = offload(copy.deepcopy(plain), cache_size=3, prefetch=True, progress=False)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    out = m.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, plain.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0))
    assert offload_stats(m).prefetches > 0


# ---- the lifecycle -------------------------------------------------------------------------------------------------

def _failing(msg):
    def check(): raise ValueError(msg)
    return check


def test_drain_raises_the_first_error_of_any_copy():
    c = ThreadCopier()
    dst = [torch.empty(8, dtype=torch.uint8) for _ in range(4)]
    c.copy(dst[0], torch.ones(8, dtype=torch.uint8))
    c.copy(dst[1], torch.ones(8, dtype=torch.uint8), check=_failing('first'))
    c.copy(dst[2], torch.ones(8, dtype=torch.uint8), check=_failing('second'))
    c.copy(dst[3], torch.ones(8, dtype=torch.uint8))                  # the last copy succeeds: the old drain saw only it
    with pytest.raises(ValueError, match='first'): c.drain()
    c.drain()                                                         # each error once
    assert torch.equal(dst[3], torch.ones(8, dtype=torch.uint8))
    c.close()


def test_a_failed_copy_empties_every_layer_and_is_raised(caplog):
    plain = _plain(3)
    m = offload(copy.deepcopy(plain), cache_size=2, prefetch=False, progress=False)
    eng = m.moe_offload
    _logits(m)
    layer = eng.layers[1]
    layer.checks = [_failing('row fails its CRC-32')] * layer.E      # every copy of layer 1 now fails on the copy thread
    layer.cache = type(layer.cache)(layer.E, layer.capacity, 'LRU')   # empty: the next call must copy
    layer.slot_of, layer.free = {}, [(s, None) for s in range(layer.capacity)]
    with pytest.raises(ValueError, match='CRC-32'): _logits(m)
    assert 'an expert copy failed' in caplog.text
    assert all(not l.slot_of for l in eng.layers.values())            # every layer emptied
    layer.checks = [lambda: None] * layer.E
    assert torch.equal(_logits(m), _logits(plain))                    # and the model serves exactly again


def test_a_failed_construction_leaves_no_thread(monkeypatch):
    plain = _plain(3)
    before = {t for t in threading.enumerate() if t.name.startswith('moe-explained-copy')}
    real = OffloadedExperts.__init__
    def fail_on_layer_2(self, engine, layer, module, capacity):
        if layer == 2: raise RuntimeError('out of device memory')
        real(self, engine, layer, module, capacity)
    monkeypatch.setattr(OffloadedExperts, '__init__', fail_on_layer_2)
    store = ExpertStore.build(copy.deepcopy(plain), progress=False)
    for _ in range(3):
        with pytest.raises(RuntimeError, match='out of device memory'):
            OffloadEngine(copy.deepcopy(plain), store, OffloadConfig(cache_size=2))
    after = {t for t in threading.enumerate() if t.name.startswith('moe-explained-copy') and t.is_alive()}
    assert after <= before


@pytest.mark.parametrize('experts_bits', [None, 2])
@pytest.mark.parametrize('store', ['memory', 'disk'])
def test_remove_gives_back_the_plain_model(experts_bits, store):
    plain = _plain(3)
    ref = quantize_experts(copy.deepcopy(plain), bits=2, progress=False) if experts_bits else plain
    m = offload(copy.deepcopy(plain), cache_size=2, experts_bits=experts_bits, store=store, progress=False)
    impl, compile_flag = m.get_experts_implementation(), m.generation_config.disable_compile
    assert compile_flag is True
    _greedy(m)
    m.moe_offload.remove(m)
    assert not hasattr(m, 'moe_offload') and m.get_experts_implementation() != impl
    assert torch.equal(_logits(m), _logits(ref)) and torch.equal(_greedy(m), _greedy(ref))
    assert m.generation_config.disable_compile == plain.generation_config.disable_compile


@pytest.mark.parametrize('experts_bits,store', [(None, 'memory'), (None, 'disk'), (2, 'memory')])
def test_an_interrupted_offload_leaves_the_model_as_it_was(monkeypatch, experts_bits, store):
    import moe_explained.store as store_module
    plain = _plain(4)
    m = copy.deepcopy(plain)
    real, calls = store_module.expert_rows, {'n': 0}
    def interrupting(module, *a, **k):
        calls['n'] += 1
        if calls['n'] == 3: raise KeyboardInterrupt
        return real(module, *a, **k)
    monkeypatch.setattr(store_module, 'expert_rows', interrupting)
    with pytest.raises(KeyboardInterrupt): offload(m, cache_size=2, experts_bits=experts_bits, store=store, progress=False)
    assert not hasattr(m, 'moe_offload')
    assert torch.equal(_logits(m), _logits(plain))
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_every_option_is_checked_before_anything_changes():
    plain = _plain(2)
    m = copy.deepcopy(plain)
    for bad, match in [(dict(cache_size=7), 'cache_size=7'), (dict(prefetch=0), 'prefetch'), (dict(devise='cpu'), "unknown option 'devise'"),
                       (dict(device='cuda:7'), "device='cuda:7'"), (dict(group_size=0), 'group_size=0')]:
        with pytest.raises(ArgumentError, match=match): offload(m, progress=False, **bad)
    assert torch.equal(_logits(m), _logits(plain)) and not hasattr(m, 'moe_offload')
    cfg = OffloadConfig(cache_size=3)
    assert OffloadConfig.make(cfg, prefetch=False) == OffloadConfig(cache_size=3, prefetch=False)
    assert cfg.device == torch.device('cpu')


def test_the_engine_reads_the_store_as_it_is_now(tmp_path):
    "Rows read into RAM after attaching (`load_layers`, the split tier) are the ones the engine copies from."
    plain = _plain(3)
    m = offload(copy.deepcopy(plain), cache_size=2, store='disk', offload_folder=tmp_path / 's', progress=False)
    eng = m.moe_offload
    assert eng.store.memory_mapped
    eng.store.load_layers([0, 1])
    assert eng.layers[0].rows.data_ptr() == eng.store.rows[0].data_ptr() and 0 in eng.store.resident
    assert torch.equal(_logits(m), _logits(plain))
    assert offload_stats(m).host_bytes == eng.store.rows[0].numel() + eng.store.rows[1].numel()


def test_generate_never_compiles_the_engine():
    "The entry points are excluded from torch.compile, and generate's auto-compilation (a static cache) is off."
    from moe_explained.offload import _offloaded_experts_forward
    m = offload(_plain(2), cache_size=2, progress=False)
    assert getattr(_offloaded_experts_forward, '_torchdynamo_disable', False)
    assert getattr(OffloadEngine._prefetch_hook, '_torchdynamo_disable', False)
    from transformers import CompileConfig, StaticCache
    gc = copy.deepcopy(m.generation_config)
    gc.compile_config = CompileConfig()
    gc.compile_config._compile_all_devices = True                   # would compile on CPU too
    cache = StaticCache(config=m.config, max_cache_len=16)
    assert m._valid_auto_compile_criteria({'cache': cache}, gc) is False


# ---- no global state changed by library calls -------------------------------------------------------------------------

def test_seeded_library_calls_leave_the_callers_random_state():
    from moe_explained.train import TinyConfig, build_model
    state = torch.random.get_rng_state()
    build_model(TinyConfig(), seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_params_on_meta_touches_only_the_calling_thread():
    from moe_explained.convert import params_on_meta
    register = torch.nn.Module.register_parameter
    inside, other = threading.Event(), {}
    def build():
        inside.wait(5)
        other['linear'] = torch.nn.Linear(4, 4)
    t = threading.Thread(target=build); t.start()
    with params_on_meta():
        mine = torch.nn.Linear(4, 4)
        inside.set(); t.join(5)
    assert mine.weight.is_meta and not other['linear'].weight.is_meta
    assert torch.nn.Module.register_parameter is register


@pytest.mark.parametrize('where', ['attention', 'engine'])
def test_a_failure_after_the_store_is_built_leaves_the_model_as_it_was(monkeypatch, where):
    "Attention quantization or the engine's construction failing (out of memory, Ctrl-C) gives the experts back."
    import moe_explained.offload as offload_module
    plain = _plain(3)
    m = copy.deepcopy(plain)
    def boom(*a, **k): raise KeyboardInterrupt
    if where == 'attention': monkeypatch.setattr(offload_module, 'quantize_attention', boom)
    else: monkeypatch.setattr(OffloadedExperts, '__init__', boom)
    with pytest.raises(KeyboardInterrupt): offload(m, cache_size=2, attn_bits=4 if where == 'attention' else None, progress=False)
    assert not hasattr(m, 'moe_offload') and not any(hasattr(b.mlp.experts, '_moe_offload') for b in m.model.layers)
    assert m.get_experts_implementation() == plain.get_experts_implementation()
    assert torch.equal(_logits(m), _logits(plain))


def test_cache_size_auto_fills_what_the_device_has_left(monkeypatch):
    "cache_size='auto': (free - reserve - staging) // (one slot in every MoE layer), at most E; refused when not one fits."
    import moe_explained.offload as O
    from moe_explained.checkpoint import load_offloaded
    st = load_offloaded(None, cache_size=2, store='disk', progress=False).moe_offload.store
    per, staging = sum(st.row_nbytes(l) for l in st.layers), max(st.row_nbytes(l) for l in st.layers)
    cfg = O.OffloadConfig(device='cpu')
    assert cfg.cache_size == 'auto'
    for n in (1, 3, 5):
        monkeypatch.setattr(O, 'host_available', lambda n=n: O.HOST_RESERVE + staging + n * per + per - 1)
        assert O.auto_cache_size(st, cfg) == n
        assert load_offloaded(None, store='disk', progress=False).moe_offload.cache_size == n
    monkeypatch.setattr(O, 'host_available', lambda: 100 * O.HOST_RESERVE)
    assert O.auto_cache_size(st, cfg) == 8                                 # at most the experts per layer
    monkeypatch.setattr(O, 'host_available', lambda: O.HOST_RESERVE + staging + per - 1)
    with pytest.raises(ValueError, match="cache_size='auto': .* one slot per MoE layer needs"): O.auto_cache_size(st, cfg)
    with pytest.raises(ValueError, match="cache_size='most': give a number of device slots per MoE layer, or 'auto'"):
        O.OffloadConfig(cache_size='most')
