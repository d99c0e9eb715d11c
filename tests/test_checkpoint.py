"""Chapter 11b: the one entry point, and a dense checkpoint served from its own safetensors files."""
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_explained.checkpoint import (Checkpoint, LayoutUnsupported, PieceRow, conversion_cache, folder_kind,
                                      load_offloaded)
from moe_explained.convert import convert, save_offloaded
from moe_explained.errors import ArgumentError
from moe_explained.hub import resolve_model
from moe_explained.cache import simulate
from moe_explained.offload import load_and_offload, offload, offload_stats
from moe_explained.pretrained import TINY_MIXTRAL_PATH
from moe_explained.store import expert_rows
from moe_explained.testing import FamilySkipped, expected_families, tiny_family_model
from moe_explained.trace import find_moe_blocks

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
SERVED = ['mixtral', 'qwen3_moe', 'qwen2_moe', 'olmoe', 'deepseek_v3', 'gpt_oss']   # per-expert keys; gpt_oss: fused 3-D


def _reference(folder):
    "transformers' own loading of the same folder, with the eager experts the engine reproduces operation for operation."
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref.set_experts_implementation('eager')
    return ref


def _rows_equal_reference(m, ref):
    "Every expert row the store serves equals, byte for byte, the row chapter 10b builds from transformers' loaded experts."
    store = m.moe_offload.store
    for layer, _, block, _ in find_moe_blocks(ref):
        fmt, E, fill = expert_rows(block.experts)
        assert fmt == store.formats[layer]
        for e in range(E):
            want = torch.zeros(fmt['nbytes'], dtype=torch.uint8); fill(e, want)
            got = store.row(layer, e)
            for name, (shape, off, dt) in fmt['fields'].items():     # the fields' bytes (the padding between is free)
                n = torch.Size(shape).numel() * torch.empty(0, dtype=getattr(torch, dt)).element_size()
                assert torch.equal(got[off:off + n], want[off:off + n]), (layer, e, name)


@pytest.mark.parametrize('family', [f for f, r in expected_families().items() if r['convert'] == 'passed'])
def test_every_family_served_from_its_checkpoint(family, tmp_path):
    "The hub's own layout (save_pretrained) served in place: same rows and same logits as from_pretrained, bit for bit."
    try: plain, ids = tiny_family_model(family)
    except FamilySkipped as e: pytest.skip(e.detail)
    plain.save_pretrained(tmp_path)
    ref = _reference(tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        m = load_offloaded(tmp_path, cache_size=2, progress=False)
    served = m.moe_offload.store.source is not None
    assert served or any('cannot be served from the checkpoint' in str(x.message) for x in w)
    if family in SERVED: assert served
    if served: _rows_equal_reference(m, ref)
    with torch.no_grad(): out, want, saved = m(ids).logits, ref(ids).logits, plain(ids).logits
    # transformers' own round trip is not exact for a few families (qwen3_5_moe, minimax_m3_vl with 5.25: the model
    # from_pretrained builds computes other logits than the model it saved, from the same state): then either of the
    # two references, bit for bit
    same = lambda x: torch.equal(x, want) or (not torch.equal(want, saved) and torch.equal(x, saved))
    assert same(out)
    if served:                                 # exclusive placement too: each expert in a slot or a host row
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')           # the family's own notes (prefetch off) were seen above
            ex = load_offloaded(tmp_path, cache_size=2, placement='exclusive', progress=False)
        with torch.no_grad(): assert same(ex(ids).logits)


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
    "The packaged tiny Mixtral saved again in small shards: some experts straddle two files."
    d = tmp_path_factory.mktemp('sharded')
    AutoModelForCausalLM.from_pretrained(TINY_MIXTRAL_PATH).save_pretrained(d, max_shard_size='300KB')
    for f in TINY_MIXTRAL_PATH.iterdir():
        if f.name.startswith('tokenizer') or f.name == 'generation_config.json': shutil.copy(f, d / f.name)
    return d


def test_an_expert_straddling_two_shards(sharded):
    ck = Checkpoint(sharded)
    files = {}
    for k, e in ck.entries.items():
        if '.experts.' in k: files.setdefault(k.split('.experts.')[0] + k.split('.experts.')[1].split('.')[0], set()).add(e[0])
    assert len(ck.maps) > 2 and any(len(f) > 1 for f in files.values())
    ref = _reference(sharded)
    m = load_offloaded(sharded, cache_size=2, store='disk', progress=False)
    _rows_equal_reference(m, ref)
    with torch.no_grad(): assert torch.equal(m(IDS).logits, ref(IDS).logits)
    assert torch.equal(m.generate(IDS, max_new_tokens=6, do_sample=False), ref.generate(IDS, max_new_tokens=6, do_sample=False))


def test_rows_are_views_of_the_files_until_read_into_ram(sharded):
    "Memory-mapped rows are pieces of the checkpoint's own mapping (no copy); `host_memory` reads whole layers in order."
    ck_store = load_offloaded(sharded, cache_size=2, store='disk', progress=False).moe_offload.store
    assert not ck_store.resident and ck_store.host_nbytes == 0 and ck_store.disk_nbytes == ck_store.nbytes
    row = ck_store.rows[ck_store.layers[0]][0]
    assert isinstance(row, PieceRow) and 1 <= len(row.pieces) <= 3      # Mixtral: w1 and w3 -> gate_up_proj, w2 -> down_proj
    maps = Checkpoint(sharded).maps
    paths = {str(sharded / f) for f in maps}
    for _, piece in row.pieces:
        assert piece.untyped_storage().nbytes() in {m.numel() for m in maps.values()}   # a slice of a whole file's mapping
    per_layer = ck_store.row_nbytes(0) * ck_store.num_experts(0)
    m = load_offloaded(sharded, cache_size=2, host_memory=2 * per_layer + 5, progress=False)
    st = m.moe_offload.store
    assert st.resident == set(st.layers[:2]) and st.host_nbytes == 2 * per_layer
    assert 'memory-mapped from the checkpoint' in repr(st) and paths
    m = load_offloaded(sharded, cache_size=2, host_memory='1GiB', progress=False)
    assert m.moe_offload.store.resident == set(m.moe_offload.store.layers)


def test_one_entry_point_loads_three_kinds_of_folder(sharded, tmp_path):
    ref = _reference(sharded)
    with torch.no_grad(): want = ref(IDS).logits
    assert folder_kind(sharded) == 'checkpoint'
    conv = convert(sharded, tmp_path / 'conv', experts_bits=None, attn_bits=None, progress=False)
    assert folder_kind(conv) == 'converted'
    m = load_offloaded(conv, cache_size=2, progress=False)
    assert m.moe_converted and m.moe_offload.store.source is None
    with torch.no_grad(): assert torch.equal(m(IDS).logits, want)
    saved = save_offloaded(load_offloaded(sharded, cache_size=2, progress=False), tmp_path / 'saved', progress=False)
    assert folder_kind(saved) == 'converted'
    with torch.no_grad(): assert torch.equal(load_offloaded(saved, cache_size=2, progress=False)(IDS).logits, want)
    with pytest.raises(ArgumentError, match='quantized when it was converted'):
        load_offloaded(conv, experts_bits=2, progress=False)


def test_a_hub_snapshot_is_served_in_place(sharded, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    sha = 'b' * 40
    repo = tmp_path / 'models--someone--sharded'
    shutil.copytree(sharded, repo / 'snapshots' / sha)
    (repo / 'refs').mkdir(); (repo / 'refs' / 'main').write_text(sha)
    monkeypatch.setattr(hc, 'HF_HUB_CACHE', str(tmp_path))
    m = load_offloaded('someone/sharded', cache_size=2, progress=False)
    assert str(resolve_model('someone/sharded', progress=False)) in m.moe_offload.store.source
    with torch.no_grad(): assert torch.equal(m(IDS).logits, _reference(sharded)(IDS).logits)


def test_experts_bits_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('MOE_EXPLAINED_CACHE', str(tmp_path / 'cache'))
    a = load_offloaded(None, cache_size=2, experts_bits=4, progress=False)
    folder = conversion_cache(TINY_MIXTRAL_PATH.resolve(), None, dict(experts_bits=4, attn_bits=None, group_size=16, dtype='None'))
    assert (folder / 'moe_offload.json').exists() and a.moe_converted
    stamp = (folder / 'experts.bin').stat().st_mtime_ns
    b = load_offloaded(None, cache_size=2, experts_bits=4, progress=False)      # reused, not converted again
    assert (folder / 'experts.bin').stat().st_mtime_ns == stamp
    whole = load_and_offload(None, cache_size=2, experts_bits=4, progress=False)  # the same quantizers, in RAM
    with torch.no_grad(): assert torch.equal(a(IDS).logits, whole(IDS).logits) and torch.equal(b(IDS).logits, whole(IDS).logits)
    other = conversion_cache(TINY_MIXTRAL_PATH.resolve(), None, dict(experts_bits=2, attn_bits=None, group_size=16, dtype='None'))
    assert other != folder and other.parent == folder.parent


def test_what_a_folder_is_is_said(tmp_path, sharded):
    store = tmp_path / 'store'; store.mkdir(); (store / 'experts.json').write_text('{}')
    with pytest.raises(ValueError, match='holds an expert store .* not a model'): load_offloaded(store, progress=False)
    half = tmp_path / 'half'; (half / '.convert').mkdir(parents=True); (half / '.convert' / 'journal.json').write_text('{}')
    with pytest.raises(ValueError, match='incomplete .* run the same convert'): load_offloaded(half, progress=False)
    with pytest.raises(ValueError, match='holds no config.json'): load_offloaded(tmp_path, progress=False)
    cfg_only = tmp_path / 'cfg'; cfg_only.mkdir(); shutil.copy(sharded / 'config.json', cfg_only)
    with pytest.raises(ValueError, match=r'holds no \*\.safetensors'): load_offloaded(cfg_only, progress=False)
    with pytest.raises(ArgumentError, match='offload_folder is not needed'):
        load_offloaded(sharded, store='disk', offload_folder=tmp_path / 'x', progress=False)
    with pytest.raises(ArgumentError, match='host_memory'): load_offloaded(sharded, host_memory='lots', progress=False)
    with pytest.raises(ArgumentError, match='host_memory'): load_offloaded(sharded, host_memory=-1, progress=False)
    with pytest.raises(ArgumentError, match='host_memory'):
        offload(AutoModelForCausalLM.from_pretrained(TINY_MIXTRAL_PATH), host_memory='1GiB', progress=False)


def test_another_dtype_is_converted_on_the_way(sharded):
    "A bf16 checkpoint served in fp16 or fp32: each piece converted as it is copied, equal to from_pretrained in that dtype."
    for dt in (torch.float16, torch.float32):
        ref = AutoModelForCausalLM.from_pretrained(sharded, dtype=dt).eval(); ref.set_experts_implementation('eager')
        for opts in (dict(store='disk'), dict(placement='exclusive')):
            m = load_offloaded(sharded, cache_size=3, dtype=dt, progress=False, **opts)
            st = m.moe_offload.store
            assert st.source is not None and st.formats[0]['fields']['down_proj'][2] == str(dt).removeprefix('torch.')
            with torch.no_grad(): assert torch.equal(m(IDS).logits, ref(IDS).logits), (dt, opts)


def test_a_layout_that_is_not_byte_ranges_falls_back_to_the_whole_load(sharded, monkeypatch):
    "A layout expert_layout cannot express (here: said so by a stand-in) is loaded whole, with a warning naming why."
    import moe_explained.checkpoint as C
    def refuse(*a, **k): raise LayoutUnsupported('transformers converts it with Transpose(dim=1), not byte ranges')
    monkeypatch.setattr(C, 'expert_layout', refuse)
    with pytest.warns(UserWarning, match='cannot be served from the checkpoint.*Transpose'):
        m = load_offloaded(sharded, cache_size=2, progress=False)
    assert m.moe_offload.store.source is None
    with torch.no_grad(): assert torch.equal(m(IDS).logits, _reference(sharded)(IDS).logits)
    assert issubclass(LayoutUnsupported, ValueError)


# --- exclusive placement ----------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st   # noqa: E402
from moe_explained.copier import ThreadCopier                           # noqa: E402


class SlowCopier(ThreadCopier):
    "Every background copy (loads and write-backs) sleeps first: a reader that does not wait reads stale bytes."
    def _copy(self, dst, src, kind):
        time.sleep(0.002)
        dst.copy_(src)


def _prop_folder():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(3)
    m = MixtralForCausalLM(MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                                         num_experts_per_tok=2, max_position_embeddings=64)).eval()
    d = Path(tempfile.mkdtemp(prefix='moe-exclusive-'))
    m.save_pretrained(d)
    ref = AutoModelForCausalLM.from_pretrained(d).eval(); ref.set_experts_implementation('eager')
    return d, ref.model.layers[0].mlp.experts


EX_FOLDER, EX_REF = _prop_folder()
step = st.one_of(st.tuples(st.just('prefetch'), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
                 st.tuples(st.just('call'), st.integers(1, 4), st.integers(0, 2**16)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_size=st.integers(1, 6), slow=st.booleans(), steps=st.lists(step, min_size=1, max_size=12))
def test_exclusive_placement_property(cache_size, slow, steps):
    """Random routing, prefetches and cache sizes under exclusive placement: every call equals the eager experts exactly;
    every expert is in exactly one place — a slot (the cache's) or one of E - C host rows — and its bytes there are the
    checkpoint's; one host row is spare; the counters add up against chapter 08's simulator."""
    m = load_offloaded(EX_FOLDER, cache_size=cache_size, prefetch=False, placement='exclusive', progress=False)
    eng = m.moe_offload
    if slow:
        eng.copier.close(); eng.copier = SlowCopier()
    layer, E = eng.layers[0], 6
    requests = []
    for s in steps:
        if s[0] == 'prefetch':
            layer.prefetch(s[1]); requests.append(None)
        else:
            g = torch.Generator().manual_seed(s[2])
            h = torch.randn(s[1], 32, generator=g)
            idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(s[1])])
            w = torch.rand(s[1], 2, generator=g)
            with torch.no_grad(): assert torch.equal(layer(h, idx, w), EX_REF(h, idx, w))
            requests.append(sorted(set(idx.flatten().tolist())))
        assert set(layer.slot_of) == layer.cache.cached and len(layer.slot_of) == cache_size
        assert set(layer.home) | set(layer.slot_of) == set(range(E)) and not set(layer.home) & set(layer.slot_of)
        assert len(layer.home) == E - cache_size and layer.spare not in layer.home.values()
    eng.copier.drain()
    st_ = eng.store
    for e, slot in layer.slot_of.items(): assert torch.equal(layer.slots[slot], st_.row(0, e)) and layer.content[slot] == e
    for e, r in layer.home.items(): assert torch.equal(layer.host[r], st_.row(0, e))
    assert layer.host.shape[0] == E - cache_size + 1
    if not any(r is None for r in requests):
        # the initial placement is the cache's first request (experts 0..C-1), not counted
        ref = simulate([list(range(cache_size))] + requests, 'LRU', cache_size, num_experts=E)
        assert (layer.stats.hits, layer.stats.misses) == (ref.hits, ref.misses - cache_size)


def test_exclusive_placement_generates_what_from_pretrained_does(sharded):
    ref = _reference(sharded)
    want = ref.generate(IDS, max_new_tokens=10, do_sample=False)
    for C in (1, 3, 7):
        for prefetch in (True, False):
            m = load_offloaded(sharded, cache_size=C, placement='exclusive', prefetch=prefetch, progress=False)
            assert torch.equal(m.generate(IDS, max_new_tokens=10, do_sample=False), want), (C, prefetch)
    s = offload_stats(m)
    per = m.moe_offload.store.row_nbytes(0)
    assert s.host_bytes == 4 * (8 - 7 + 1) * per and not m.moe_offload.store.resident


def test_exclusive_placement_refusals(sharded):
    with pytest.raises(ArgumentError, match="placement='exclusive' keeps E - C \\+ 1 experts per MoE layer"):
        load_offloaded(sharded, cache_size=2, placement='exclusive', host_memory='1MiB', progress=False)
    with pytest.raises(ArgumentError, match="miss='host' computes a missed expert where it is stored"):
        load_offloaded(sharded, placement='exclusive', miss='host', progress=False)
    with pytest.raises(ArgumentError, match="placement='exclusive' keeps E - C experts per layer in RAM"):
        offload(AutoModelForCausalLM.from_pretrained(TINY_MIXTRAL_PATH), placement='exclusive', progress=False)
    with pytest.raises(ArgumentError, match="placement='both'"): load_offloaded(sharded, placement='both', progress=False)


def test_exclusive_placement_recovers_from_a_failed_write_back():
    "A write-back that fails leaves a slot unknown: every layer is placed again from the files, and the next call is right."
    m = load_offloaded(EX_FOLDER, cache_size=2, prefetch=False, placement='exclusive', progress=False)
    eng, layer = m.moe_offload, m.moe_offload.layers[0]
    real, failed = eng.copier._copy, []
    def once(dst, src, kind):
        if kind == 'writeback' and not failed: failed.append(1); raise OSError('the copy failed')
        return real(dst, src, kind)
    eng.copier._copy = once
    h, idx, w = torch.randn(3, 32), torch.tensor([[2, 3], [4, 5], [3, 4]]), torch.rand(3, 2)
    with pytest.raises(OSError, match='the copy failed'), torch.no_grad(): layer(h, idx, w)
    assert failed and sorted(layer.slot_of) == [0, 1] and len(layer.home) == 4        # placed again, from the files
    with torch.no_grad(): assert torch.equal(layer(h, idx, w), EX_REF(h, idx, w))


def test_fp16_on_a_pre_ampere_gpu_is_chosen_and_measured(monkeypatch):
    "serving_dtype: fp16 for a bf16 checkpoint on compute capability < 8.0 only; check_fp16 refuses an overflowing model."
    from moe_explained.checkpoint import check_fp16, load_checkpoint, serving_dtype
    from moe_explained.offload import OffloadConfig
    cuda = torch.device('cuda')
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'Tesla T4')
    for cap, want in (((7, 5), torch.float16), ((8, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None, cap=cap: cap)
        assert serving_dtype(torch.bfloat16, None, cuda) == want
    assert serving_dtype('float32', None, cuda) == torch.float32                   # only bf16 is narrowed
    assert serving_dtype(torch.bfloat16, None, torch.device('cpu')) == torch.bfloat16
    assert serving_dtype(torch.bfloat16, torch.float32, cuda) == torch.float32     # what the user asks for wins
    m = load_checkpoint(TINY_MIXTRAL_PATH, OffloadConfig(cache_size=2), dtype=torch.float16, progress=False)
    assert 0 < check_fp16(m) < 65504 and offload_stats(m).requests == 0         # the probe's counts are not kept
    with torch.no_grad(): m.model.layers[2].self_attn.o_proj.weight.mul_(1e6)
    with pytest.raises(ValueError, match='decoder layer 2 overflow .* dtype=torch.float32'): check_fp16(m)


def test_generate_prints_the_plan_first_and_takes_the_new_flags(capsys):
    from moe_explained.cli import main
    rc = main(['generate', 'And it came to pass', '--max-new-tokens', '4', '--plan', '--host-memory', '6MiB',
               '--placement', 'inclusive', '--dtype', 'float32'])             # float32: 3 MiB a layer
    out, err = capsys.readouterr()
    assert rc == 0 and '4 MoE layers x 8 experts of 0.4 MiB (float32)' in err and 'host RAM: 2 of 4 layers read in (6.0 MiB)' in err
    assert 'host RAM 6.0 MiB' in out                                            # what the plan said, as the engine reports it
    rc = main(['generate', 'x', '--max-new-tokens', '2', '--placement', 'exclusive', '--cache-size', '6'])
    out, err = capsys.readouterr()
    assert rc == 0 and 'cache 6/8 slots' in out and err == ''                   # no terminal: no plan unless asked
    assert main(['generate', 'x', '--dtype', 'float17']) == 2
    assert '--dtype float17 is not a torch dtype' in capsys.readouterr().err


def test_load_plan_says_where_each_byte_goes():
    from moe_explained.checkpoint import load_plan
    from moe_explained.offload import OffloadConfig
    p = load_plan(TINY_MIXTRAL_PATH, OffloadConfig(cache_size=3, host_memory='3MiB'))
    assert 'cache 3 of 8 slots per layer' in p and '2 of 4 layers read in (3.0 MiB)' in p and 'memory-mapped' in p
    q = load_plan(TINY_MIXTRAL_PATH, OffloadConfig(cache_size=6, placement='exclusive'))
    assert 'exclusive placement, 3 rows x 4 layers' in q and 'nothing read from disk' in q
