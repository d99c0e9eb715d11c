"""The engine's CUDA path (issue 21), for a machine with a GPU: about a minute. Skipped without CUDA.

    pytest -m cuda tests/test_cuda.py                              # the checks
    TORCH_CUDA_SANITIZER=1 pytest -m cuda tests/test_cuda.py       # again, with torch's stream sanitizer (CSAN)

Unpacking and dequantization on the device for every width; the slots' property test with a copier that makes the copy
stream sleep before every copy (a read that does not wait for its copy's event reads the slot's previous expert);
`generate` on the device equal to the plain model on the device; rows pinned, copies asynchronous, pinned against
pageable bandwidth; the device normalised with its index."""
import copy, statistics, time

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

from moe_explained.copier import CudaCopier                                                    # noqa: E402
from moe_explained.hub import resolve_device                                                    # noqa: E402
from moe_explained.offload import offload, offload_stats                                       # noqa: E402
from moe_explained.quant import SUPPORTED_BITS, pack_bits, pack_expert, read_expert, unpack_bits  # noqa: E402
from moe_explained.quant import expert_views                                                    # noqa: E402

DEV = 'cuda'


def _model(E=6, layers=2, seed=3):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    m = MixtralForCausalLM(MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                         num_experts_per_tok=2, max_position_embeddings=64)).eval()
    m.set_experts_implementation('eager')
    return m


@pytest.mark.parametrize('bits', SUPPORTED_BITS)
def test_unpacking_and_dequantization_on_the_device(bits):
    codes = torch.randint(0, 2 ** bits, (4096,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_bits(packed.to(DEV), bits, 4096).cpu(), codes)
    torch.manual_seed(0)
    host = read_expert(pack_expert(dict(w_in=torch.randn(64, 32), w_out=torch.randn(32, 32)), bits=bits, group_size=16,
                                   meta_bits=8 if bits < 8 else None))
    dev = expert_views(host.buf.to(DEV), host.header, host.start)
    for name in ('w_in', 'w_out'):
        assert torch.equal(dev.dequantize(name, torch.float32).cpu(), host.dequantize(name, torch.float32))
        torch.testing.assert_close(dev.dequantize(name, torch.float16).float().cpu(), host.dequantize(name), rtol=1e-2, atol=1e-3)


class SleepyCopier(CudaCopier):
    "Every copy waits ~1 ms on the copy stream before it runs: a read that skips its event reads stale bytes."
    def _issue(self, dst, src, after):
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            torch.cuda._sleep(1_000_000)
        return super()._issue(dst, src, after)


@pytest.mark.parametrize('cache_size', [1, 2, 4])
@pytest.mark.parametrize('miss', ['copy', 'host'])
@pytest.mark.parametrize('store', ['memory', 'disk'])       # disk: the copy thread's double-buffered pinned bounce copies
def test_slots_with_a_sleepy_copy_stream_equal_the_eager_experts(cache_size, miss, store):
    plain = _model(layers=1)
    m = offload(copy.deepcopy(plain), cache_size=cache_size, prefetch=False, miss=miss, store=store, device=DEV, progress=False)
    eng = m.moe_offload
    eng.copier.close()
    eng.copier = SleepyCopier(eng.device, max(eng.store.row_nbytes(l) for l in eng.store.layers))
    layer, ref = eng.layers[0], plain.to(DEV).model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        if step % 4 == 3: layer.prefetch(torch.randperm(6, generator=g)[:2].tolist())
        T = 1 + step % 4
        h = torch.randn(T, 32, generator=g).to(DEV)
        idx = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(T)]).to(DEV)
        w = torch.rand(T, 2, generator=g).to(DEV)
        with torch.no_grad(): got, want = layer(h, idx, w), ref(h, idx, w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f'step {step}')   # a stale slot is far off
    eng.copier.drain()
    for e, slot in layer.slot_of.items(): assert torch.equal(layer.slots[slot].cpu(), layer.rows[e])


def test_generate_on_the_device_equals_the_plain_model_on_the_device():
    plain = _model(layers=3).to(DEV)
    m = offload(copy.deepcopy(plain), cache_size=2, device=DEV, progress=False)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.no_grad(): torch.testing.assert_close(m(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)   # fp32
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(ids, **kw), plain.generate(ids, **kw))
    s = offload_stats(m)
    assert s.device == str(resolve_device(DEV)) and s.hits > 0 and s.prefetches > 0
    q = offload(copy.deepcopy(plain.cpu()).half(), cache_size=2, experts_bits=4, group_size=8, device=DEV, progress=False)
    assert q.generate(ids, **kw).shape == (2, 21)                       # fp16, packed experts: runs on the device


def test_rows_pinned_copies_asynchronous_and_bandwidth_measured():
    m = offload(_model(), cache_size=2, prefetch=False, device=DEV, progress=False)
    eng = m.moe_offload
    assert all(eng.store.rows[l].is_pinned() for l in eng.store.layers)
    layer = eng.layers[0]
    with torch.cuda.device(eng.device), torch.cuda.stream(eng.copier.stream): torch.cuda._sleep(50_000_000)
    h = eng.copier.copy(layer.slots[0], layer.rows[0])
    assert not h.done()                                                 # issued, not finished: the host did not wait
    eng.copier.drain()
    assert h.done() and torch.equal(layer.slots[0].cpu(), layer.rows[0])
    nbytes = 64 * 2**20
    pinned, pageable = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    def rate(src):
        ts = []
        for _ in range(7):
            torch.cuda.synchronize(); t = time.perf_counter(); dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return nbytes / statistics.median(ts[2:])
    r_pinned, r_pageable = rate(pinned), rate(pageable)
    print(f'H2D pinned {r_pinned / 1e9:.2f} GB/s, pageable {r_pageable / 1e9:.2f} GB/s')   # a figure to read, not a target
    assert r_pinned > 0 and r_pageable > 0


def test_the_device_carries_its_index_and_events_follow_it():
    d = resolve_device('cuda')
    assert d.index == torch.cuda.current_device()
    with pytest.raises(ValueError, match='CUDA device'): resolve_device(f'cuda:{torch.cuda.device_count()}')
    m = offload(_model(), cache_size=2, device='cuda', progress=False)
    eng = m.moe_offload
    assert eng.device == d and eng.copier.device == d and eng.copier.stream.device == d
    layer = eng.layers[0]
    layer.reset()
    assert isinstance(layer.read_done, torch.cuda.Event)                # the first copies after a reset wait for queued reads


def test_host_buffer_is_page_locked_to_the_page_not_a_power_of_two():
    "chapter 10c's host_buffer: exact to the page, page-locked (asynchronous copies), zeroed, freed with its views."
    from moe_explained.copier import PAGE, host_buffer
    n = 5 * 2**20 + 123                                       # the pinned allocator would hold 8 MiB
    b = host_buffer(n, pin=DEV)
    assert b.numel() == n and b.is_pinned() and int(b.sum()) == 0
    assert b.untyped_storage().nbytes() == -(-n // PAGE) * PAGE
    b.copy_(torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8))
    d = torch.empty(n, dtype=torch.uint8, device=DEV)
    d.copy_(b, non_blocking=True); torch.cuda.synchronize()
    assert torch.equal(d.cpu(), b)


def test_a_checkpoint_served_on_the_device_equals_from_pretrained(tmp_path):
    "chapter 11b on the GPU: the tiny Mixtral's own checkpoint, layers read into page-locked RAM, equal to from_pretrained."
    from transformers import AutoModelForCausalLM
    from moe_explained.checkpoint import load_offloaded
    from moe_explained.pretrained import TINY_MIXTRAL_PATH
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(TINY_MIXTRAL_PATH).to(DEV).eval(); ref.set_experts_implementation('eager')
    for opts in (dict(store='disk'), dict(host_memory='1GiB')):
        m = load_offloaded(TINY_MIXTRAL_PATH, device=DEV, cache_size=2, progress=False, **opts)
        with torch.no_grad(): assert torch.equal(m(ids.to(DEV)).logits, ref(ids.to(DEV)).logits), opts
        st = m.moe_offload.store
        assert all(st.rows[l].is_pinned() for l in st.resident)
