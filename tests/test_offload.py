"""Chapter 10: the offloaded-inference engine. Identity with the plain model (bit for bit, fp32 on CPU) for Mixtral,
Qwen3-MoE, OLMoE and Qwen2-MoE over cache sizes, prefetch and miss policies and both store tiers; quantized experts
equal to chapter 07's in-place quantization; a property test of the slots against a slow concurrent copier; bad input;
Ctrl-C; the hub-snapshot path; the CLI."""
import copy, json, re, shutil, time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from moe_explained.cache import simulate
from moe_explained.copier import ThreadCopier
from moe_explained.hub import check_safetensors, resolve_model
from moe_explained.offload import load_and_offload, offload, offload_stats
import moe_explained.store as store_module
from moe_explained.store import ExpertStore, dense_format
from moe_explained.quant import quantize_experts

BASE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _config(arch: str, E: int = 6):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
    if arch == 'mixtral': return MixtralConfig(intermediate_size=48, num_local_experts=E, num_experts_per_tok=2, **BASE)
    if arch == 'qwen3_moe':   # a dense first layer (mlp_only_layers)
        return Qwen3MoeConfig(moe_intermediate_size=48, intermediate_size=64, num_experts=E, num_experts_per_tok=2,
                              mlp_only_layers=[0], head_dim=8, **BASE)
    if arch == 'olmoe': return OlmoeConfig(intermediate_size=48, num_experts=E, num_experts_per_tok=2, **BASE)
    if arch == 'qwen2_moe':   # a shared expert beside the routed ones
        return Qwen2MoeConfig(moe_intermediate_size=48, intermediate_size=64, shared_expert_intermediate_size=40,
                              num_experts=E, num_experts_per_tok=2, **BASE)
    raise KeyError(arch)


ARCHS = ('mixtral', 'qwen3_moe', 'olmoe', 'qwen2_moe')
_MODELS = {}


def plain_model(arch: str):
    "A tiny random model of `arch`, with transformers' eager experts (the reference)."
    if arch not in _MODELS:
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(_config(arch)).eval()
        m.set_experts_implementation('eager')
        _MODELS[arch] = m
    return _MODELS[arch]


IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('cache_size', [1, 2, 6])
@pytest.mark.parametrize('prefetch', [False, True])
@pytest.mark.parametrize('miss', ['copy', 'host'])
def test_offloaded_equals_plain(arch, cache_size, prefetch, miss):
    plain = plain_model(arch)
    m = offload(copy.deepcopy(plain), cache_size=cache_size, prefetch=prefetch, miss=miss, progress=False)
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, plain(IDS).logits)          # a batch of 2: a prefill of 22 tokens
    prompt = IDS[:1, :5]
    g_plain = plain.generate(prompt, max_new_tokens=12, do_sample=False)
    g_off = m.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(g_off, g_plain)
    s = offload_stats(m)
    assert s.requests == s.hits + s.misses > 0
    assert s.prefetches == s.prefetch_hits + s.wasted + s.pending
    if not prefetch: assert s.prefetches == 0
    nb = m.moe_offload.store.row_nbytes(m.moe_offload.store.layers[0])
    assert s.bytes_moved == s.copies * nb
    if miss == 'copy': assert s.copies == s.misses + s.prefetches      # every miss and every prefetch is one copy
    else: assert s.prefetches <= s.copies <= s.misses + s.prefetches   # host misses the cache keeps are copied after


@pytest.mark.parametrize('arch', ARCHS)
def test_disk_store_equals_plain(arch, tmp_path):
    plain = plain_model(arch)
    m = offload(copy.deepcopy(plain), cache_size=2, store='disk', offload_folder=tmp_path, progress=False)
    assert m.moe_offload.store.memory_mapped
    with torch.no_grad(): assert torch.equal(m(IDS).logits, plain(IDS).logits)
    s = offload_stats(m)
    assert s.host_bytes == 0 and s.disk_bytes == (tmp_path / 'experts.bin').stat().st_size
    # what the engine holds on the host, other than the store: nothing of the experts (their parameters are gone)
    assert not any('experts.' in n for n, _ in m.named_parameters())


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('bits', [2, 4])
def test_quantized_offload_equals_quantized_in_place(arch, bits):
    plain = plain_model(arch)
    q = quantize_experts(copy.deepcopy(plain), bits=bits, progress=False)
    m = offload(copy.deepcopy(plain), cache_size=2, experts_bits=bits, progress=False)
    with torch.no_grad(): assert torch.equal(m(IDS).logits, q(IDS).logits)
    assert offload_stats(m).host_bytes == sum(b.numel() for n, b in q.named_buffers() if n.endswith('moe_qbuf'))


def test_store_holds_every_expert_once_and_files_check(tmp_path):
    plain = plain_model('mixtral')
    m = offload(copy.deepcopy(plain), cache_size=2, store='disk', offload_folder=tmp_path, progress=False)
    store = m.moe_offload.store
    for layer in store.layers:
        ex = plain.model.layers[layer].mlp.experts
        for e in range(store.num_experts(layer)):
            views = store.views(layer, e)
            assert torch.equal(views['gate_up_proj'], ex.gate_up_proj[e]) and torch.equal(views['down_proj'], ex.down_proj[e])
    ExpertStore.open(tmp_path, verify=True)
    # a flipped byte fails the CRC-32 check; a truncated file is refused by its length
    data = bytearray((tmp_path / 'experts.bin').read_bytes())
    data[100] ^= 0xFF
    (tmp_path / 'experts.bin').write_bytes(bytes(data))
    with pytest.raises(ValueError, match='fail their CRC-32'): ExpertStore.open(tmp_path, verify=True)
    (tmp_path / 'experts.bin').write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match='truncated or corrupted expert store'): ExpertStore.open(tmp_path)
    (tmp_path / 'experts.json').unlink()
    with pytest.raises(ValueError, match='experts.json is missing'): ExpertStore.open(tmp_path)


def test_interrupted_store_build_leaves_nothing_that_opens(tmp_path, monkeypatch):
    m = copy.deepcopy(plain_model('mixtral'))
    calls = {'n': 0}
    real = dense_format
    def failing(*a, **k):
        calls['n'] += 1
        if calls['n'] == 2: raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(store_module, 'dense_format', failing)
    with pytest.raises(KeyboardInterrupt): ExpertStore.build(m, path=tmp_path, progress=False)
    assert not (tmp_path / 'experts.json').exists() and not list(tmp_path.glob('*.partial'))
    with pytest.raises(ValueError, match='missing'): ExpertStore.open(tmp_path)


class SlowCopier(ThreadCopier):
    "Every background copy sleeps first: a reader that does not wait for its copy reads the slot's previous expert."
    def _copy(self, dst, src, kind):
        time.sleep(0.002)
        dst.copy_(src)


def _prop_model():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(3)
    m = MixtralForCausalLM(MixtralConfig(**(BASE | dict(num_hidden_layers=1)), intermediate_size=24,
                                         num_local_experts=6, num_experts_per_tok=2)).eval()
    m.set_experts_implementation('eager')
    return m


PROP = _prop_model()
step = st.one_of(st.tuples(st.just('prefetch'), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
                 st.tuples(st.just('call'), st.integers(1, 4), st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_size=st.integers(1, 6), miss=st.sampled_from(['copy', 'host']), slow=st.booleans(),
       steps=st.lists(step, min_size=1, max_size=12))
def test_slots_property(cache_size, miss, slow, steps):
    """Random routing, random prefetches, random cache sizes: each call equals the eager experts exactly (so no slot is
    read before its copy lands and no wrong expert is served), the slots follow the cache, never exceed it, hold the
    store's bytes of the expert they are assigned, and the counters add up, also against chapter 08's simulator."""
    m = offload(copy.deepcopy(PROP), cache_size=cache_size, prefetch=False, miss=miss, progress=False)
    eng = m.moe_offload
    if slow:
        eng.copier.close()
        eng.copier = SlowCopier()
    layer, ref_experts = eng.layers[0], PROP.model.layers[0].mlp.experts
    requests = []
    for s in steps:
        if s[0] == 'prefetch':
            layer.prefetch(s[1])
            requests.append(None)
        else:
            T, seed = s[1], s[2]
            g = torch.Generator().manual_seed(seed)
            h = torch.randn(T, 32, generator=g)
            idx = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(T)])
            w = torch.rand(T, 2, generator=g)
            with torch.no_grad(): assert torch.equal(layer(h, idx, w), ref_experts(h, idx, w))
            requests.append(sorted(set(idx.flatten().tolist())))
        assert set(layer.slot_of) == layer.cache.cached and len(layer.slot_of) <= cache_size
        assert len(set(layer.slot_of.values())) == len(layer.slot_of)
        assert len(layer.slot_of) + len(layer.free) == cache_size
    eng.copier.drain()
    for e, slot in layer.slot_of.items(): assert torch.equal(layer.slots[slot], layer.rows[e])
    stats = layer.stats
    assert stats.requests == stats.hits + stats.misses
    assert stats.prefetches == stats.prefetch_hits + stats.wasted + len(layer.cache.pending)
    assert eng.copier.bytes == eng.copier.copies * layer.nbytes
    if not any(r is None for r in requests):   # no prefetches: chapter 08's simulator on the same requests agrees
        ref = simulate(requests, 'LRU', cache_size, num_experts=6)
        assert (stats.hits, stats.misses, stats.evictions) == (ref.hits, ref.misses, ref.evictions)
        if miss == 'copy': assert eng.copier.copies == ref.misses


def test_prefetch_copies_overlap_compute():
    "The prefetch thread really runs beside the caller: a slow copy issued by prefetch returns at once."
    m = offload(copy.deepcopy(PROP), cache_size=3, prefetch=False, progress=False)
    eng = m.moe_offload
    eng.copier.close()
    class VerySlow(ThreadCopier):
        def _copy(self, dst, src, kind): time.sleep(0.2); dst.copy_(src)
    eng.copier = VerySlow()
    t0 = time.perf_counter()
    eng.layers[0].prefetch([0, 1])
    issued = time.perf_counter() - t0
    assert issued < 0.1 and not eng.copier.last.done()
    eng.copier.drain()
    assert eng.copier.last.done()


def test_ctrl_c_leaves_the_model_usable():
    plain = plain_model('mixtral')
    m = offload(copy.deepcopy(plain), cache_size=2, progress=False)
    eng = m.moe_offload
    real, calls = eng.copier.copy, {'n': 0}
    def interrupt(*a, **k):
        calls['n'] += 1
        if calls['n'] == 7: raise KeyboardInterrupt
        return real(*a, **k)
    eng.copier.copy = interrupt
    prompt = IDS[:1, :5]
    with pytest.raises(KeyboardInterrupt): m.generate(prompt, max_new_tokens=12, do_sample=False)
    assert calls['n'] == 7
    g = m.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(g, plain.generate(prompt, max_new_tokens=12, do_sample=False))
    s = offload_stats(m)
    assert s.requests == s.hits + s.misses and s.prefetches == s.prefetch_hits + s.wasted + s.pending


# --- load_offloaded: folders, the hub, bad input --------------------------------------------------------------

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    "A tiny Mixtral saved with save_pretrained in two shards (an index file), and its plain logits."
    d = tmp_path_factory.mktemp('tiny-mixtral')
    plain = plain_model('mixtral')
    plain.save_pretrained(d, max_shard_size='100KB')
    assert (d / 'model.safetensors.index.json').exists()
    return d


def _copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_offloaded_from_a_folder(saved):
    m = load_and_offload(saved, cache_size=2, progress=False)
    with torch.no_grad(): assert torch.equal(m(IDS).logits, plain_model('mixtral')(IDS).logits)


def test_load_offloaded_from_a_hub_snapshot(saved, tmp_path, monkeypatch):
    "A hub id is resolved by huggingface_hub from its cache (laid out as a download leaves it) while offline."
    import huggingface_hub.constants as hc
    sha = 'a' * 40
    repo = tmp_path / 'models--someone--tiny-mixtral'
    shutil.copytree(saved, repo / 'snapshots' / sha)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(sha)
    monkeypatch.setattr(hc, 'HF_HUB_CACHE', str(tmp_path))
    assert resolve_model('someone/tiny-mixtral', progress=False) == (repo / 'snapshots' / sha).resolve()
    m = load_and_offload('someone/tiny-mixtral', cache_size=3, progress=False)
    with torch.no_grad(): assert torch.equal(m(IDS).logits, plain_model('mixtral')(IDS).logits)
    with pytest.raises(ValueError, match='not in the hub cache while the hub cannot be reached'):
        load_and_offload('someone/not-downloaded', progress=False)


def test_bad_input(saved, tmp_path):
    with pytest.raises(ValueError, match='no such model folder'): load_and_offload(tmp_path / 'nope', progress=False)
    with pytest.raises(ValueError, match='holds no config.json'): load_and_offload(tmp_path, progress=False)
    for cs in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match='cache_size'): load_and_offload(saved, cache_size=cs, progress=False)
    with pytest.raises(ValueError, match=r'experts_bits=5 is not supported'): load_and_offload(saved, experts_bits=5, progress=False)
    with pytest.raises(ValueError, match=r'attn_bits=16 is not supported'): load_and_offload(saved, attn_bits=16, progress=False)
    with pytest.raises(ValueError, match="miss='gpu'"): load_and_offload(saved, miss='gpu', progress=False)
    with pytest.raises(ValueError, match='needs the future'): load_and_offload(saved, policy='Belady', progress=False)
    with pytest.raises(ValueError, match="offload_folder is for store='disk'"): load_and_offload(saved, offload_folder=tmp_path / 's', progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA was requested'): load_and_offload(saved, device='cuda', progress=False)


def test_not_moe_and_no_interface(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(**BASE, intermediate_size=48)).save_pretrained(tmp_path / 'llama')
    with pytest.raises(ValueError, match='not a Mixture-of-Experts model'): load_and_offload(tmp_path / 'llama', progress=False)
    m = copy.deepcopy(plain_model('mixtral'))
    class OldExperts(torch.nn.ModuleList): pass          # experts as a list of MLPs: transformers v4's layout
    m.model.layers[1].mlp.experts = OldExperts([torch.nn.Linear(4, 4)])
    with pytest.raises(ValueError, match="layer 1 .*do not use transformers' experts interface"): offload(m, progress=False)
    q = quantize_experts(copy.deepcopy(plain_model('mixtral')), bits=2, progress=False)
    with pytest.raises(ValueError, match='already quantized'): offload(q, progress=False)
    o = offload(copy.deepcopy(plain_model('mixtral')), progress=False)
    with pytest.raises(ValueError, match='already offloaded'): offload(o, progress=False)


def test_corrupted_weights(saved, tmp_path):
    shards = sorted(saved.glob('*.safetensors'))
    bad = _copy_folder(saved, tmp_path / 'truncated')
    f = bad / shards[0].name
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f'truncated safetensors file .*{shards[0].name}'): load_and_offload(bad, progress=False)
    bad = _copy_folder(saved, tmp_path / 'header')
    f = bad / shards[1].name
    data = bytearray(f.read_bytes())
    data[8:12] = b'\xff\xfe{{'
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match='header is not valid JSON'): load_and_offload(bad, progress=False)
    bad = _copy_folder(saved, tmp_path / 'missing')
    (bad / shards[1].name).unlink()
    with pytest.raises(ValueError, match='names shards that are missing'): load_and_offload(bad, progress=False)
    bad = _copy_folder(saved, tmp_path / 'empty')
    for s in bad.glob('*.safetensors'): s.unlink()
    (bad / 'model.safetensors.index.json').unlink()
    with pytest.raises(ValueError, match='holds no \\*.safetensors'): check_safetensors(bad)


def test_offload_stats_refuses_a_plain_model():
    with pytest.raises(ValueError, match='is not offloaded'): offload_stats(plain_model('mixtral'))


# --- the command line -------------------------------------------------------------------------------------------

def _run(argv, capsys):
    from moe_explained.cli import main
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_generate_tiny_model(capsys):
    from moe_explained.pretrained import tiny_mixtral
    rc, out, err = _run(['generate', 'The king said', '--max-new-tokens', '12'], capsys)
    assert rc == 0, err
    model, tok = tiny_mixtral(dtype=torch.bfloat16)   # the checkpoint's dtype, which load_offloaded keeps by default
    model.set_experts_implementation('eager')         # the reference the engine equals bit for bit
    ids = tok('The king said', return_tensors='pt').input_ids
    ref = model.generate(ids, max_new_tokens=12, do_sample=False, temperature=None, top_k=None, top_p=None,
                         pad_token_id=tok.eos_token_id)
    assert out.startswith(tok.decode(ref[0], skip_special_tokens=True))
    assert '12 tokens in' in out and 'tokens/s' in out and 'hit rate' in out
    assert re.search(r'cache [1-8]/8 slots x 4 MoE layers', out)          # cache_size 'auto' by default


def test_cli_generate_options_and_errors(capsys, tmp_path):
    rc, out, err = _run(['generate', 'The king', '--max-new-tokens', '4', '--cache-size', '3', '--no-prefetch',
                         '--miss', 'host', '--store', 'disk', '--offload-folder', str(tmp_path), '--experts-bits', '4',
                         '--stream'], capsys)
    assert rc == 0, err
    assert 'prefetch off' in out and 'misses: host' in out and (tmp_path / 'experts.bin').exists()
    rc, out, err = _run(['generate', 'x', '--cache-size', '9'], capsys)
    assert rc == 2 and '--cache-size 9 is out of range: need 1 <= --cache-size <= 8' in err and 'Traceback' not in err
    rc, out, err = _run(['generate', 'x', '--model', str(tmp_path / 'nope')], capsys)
    assert rc == 2 and 'no such model folder' in err


def test_cli_generate_chat_template(capsys, tmp_path):
    "--chat wraps the prompt in the tokenizer's chat template; a tokenizer without one is refused by name."
    from moe_explained.pretrained import TINY_MIXTRAL_PATH
    rc, out, err = _run(['generate', 'hello', '--chat', '--max-new-tokens', '2'], capsys)
    assert rc == 2 and 'has no chat template' in err
    folder = tmp_path / 'chat'
    shutil.copytree(TINY_MIXTRAL_PATH, folder)
    cfg_file = folder / 'tokenizer_config.json'
    cfg = json.loads(cfg_file.read_text())
    cfg['chat_template'] = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"
    cfg_file.write_text(json.dumps(cfg))
    rc, out, err = _run(['generate', 'And God said', '--chat', '--max-new-tokens', '3', '--model', str(folder)], capsys)
    assert rc == 0, err
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, ref = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{'role': 'user', 'content': 'And God said'}], add_generation_prompt=True,
                                  return_tensors='pt', return_dict=True)['input_ids']
    new = ref.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert out.split('\n\n3 tokens in')[0] == tok.decode(new, skip_special_tokens=True)   # the reply only, not the template
    assert '<user>' not in out and '3 tokens in' in out


@pytest.mark.parametrize('arch', ['mixtral', 'qwen3_moe'])
def test_quantized_attention_equals_quantized_plain(arch):
    "attn_bits quantizes attention with hqq's HQQLinear (chapter 07): equal to the plain model with the same attention."
    from transformers import AutoModelForCausalLM
    from moe_explained.quant import quantize_attention
    cfg = _config(arch)
    cfg.hidden_size, cfg.head_dim = 64, 16          # rows of 64 weights: one HQQ group of the default size 64
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    base.set_experts_implementation('eager')
    plain = quantize_attention(copy.deepcopy(base), bits=4)
    m = offload(copy.deepcopy(base), cache_size=2, attn_bits=4, progress=False)
    n_hqq = lambda model: sum(type(x).__name__ == 'HQQLinear' for x in model.modules())
    assert n_hqq(m) == n_hqq(plain) == 4 * cfg.num_hidden_layers
    with torch.no_grad(): assert torch.equal(m(IDS).logits, plain(IDS).logits)


def test_top_level_names():
    import moe_explained
    from moe_explained.checkpoint import load_offloaded
    assert moe_explained.load_offloaded is load_offloaded and moe_explained.offload_stats is offload_stats


def test_background_copy_from_a_memory_mapped_store_releases_the_gil(tmp_path):
    """The CPU copier's overlap rests on `Tensor.copy_` releasing the GIL while it copies (also while it faults in pages
    of a memory-mapped file): the main thread's pure-Python loop must keep running while a 128 MB copy is in flight."""
    n = 128 * 2**20
    f = tmp_path / 'rows.bin'
    f.write_bytes(b'\x01' * n)
    src = torch.from_file(str(f), shared=False, size=n, dtype=torch.uint8)
    dst = torch.empty(n, dtype=torch.uint8)
    copier = ThreadCopier()
    try:
        handle, spins = copier.copy(dst, src), 0
        while not handle.done(): spins += 1
        handle.wait()
    finally: copier.close()
    assert torch.equal(dst[:: 2**20], src[:: 2**20])
    assert spins > 1000, f'the main thread ran only {spins} loop iterations during the copy: the copy held the GIL'


def test_a_layers_misses_are_queued_before_the_next_layers_guesses():
    """On the one in-order copy thread, layer L's guesses for the next MoE layer start only after L's own misses are
    queued, inside L's experts call: no miss waits behind a guess."""
    m = offload(copy.deepcopy(plain_model('mixtral')), cache_size=2, prefetch=True, progress=False)
    eng, log = m.moe_offload, []
    for layer, off_layer in eng.layers.items():
        real_load, real_forward = off_layer._load, off_layer._forward
        def load(e, s, after=None, kind='miss', layer=layer, real=real_load):
            log.append((layer, kind)); return real(e, s, after, kind)
        def forward(*a, layer=layer, real=real_forward):
            log.append((layer, 'call')); return real(*a)
        off_layer._load, off_layer._forward = load, forward
    m.generate(IDS[:1, :5], max_new_tokens=10, do_sample=False)
    assert any(k == 'prefetch' for _, k in log) and any(k == 'miss' for _, k in log)
    segments, order = [], sorted(eng.layers)
    for layer, kind in log:
        if kind == 'call': segments.append((layer, []))
        else: segments[-1][1].append((layer, kind))
    for layer, loads in segments:
        kinds = [k for _, k in loads]
        assert kinds == sorted(kinds, key=lambda k: k == 'prefetch'), (layer, loads)   # misses first, then guesses
        assert all(l == layer for l, k in loads if k == 'miss')
        assert all(order.index(l) == order.index(layer) + 1 for l, k in loads if k == 'prefetch'), (layer, loads)


def test_one_guess_per_layer_per_decode_step():
    """The guess applies the *next* layer's norm, whose own prefetch hook must not fire from inside it (it would guess
    two layers ahead from the wrong hidden state): each MoE layer but the first is prefetched once per decode step."""
    m = offload(copy.deepcopy(plain_model('mixtral')), cache_size=2, prefetch=True, progress=False)
    calls = {layer: 0 for layer in m.moe_offload.layers}
    for layer, off_layer in m.moe_offload.layers.items():
        real = off_layer.cache.prefetch
        def counted(ids, layer=layer, real=real):
            calls[layer] += 1; return real(ids)
        off_layer.cache.prefetch = counted
    new = 8
    m.generate(IDS[:1, :5], max_new_tokens=new, do_sample=False)
    first, *rest = sorted(calls)
    assert calls[first] == 0 and all(calls[l] == new - 1 for l in rest), calls   # the first token comes from the prefill


def test_hub_errors_become_one_line_value_errors():
    "Every download (a model, a conversion's shards, a plan's config.json) goes through hub_call: each hub error, named."
    import re as _re
    from huggingface_hub import errors as E
    from moe_explained.hub import hub_call
    def raising(cls):
        def fn(): raise cls.__new__(cls)     # the HTTP errors want a response object; the class is what is tested
        return fn
    for cls, msg in ((E.OfflineModeIsEnabled, 'not in the hub cache while the hub cannot be reached'),
                     (E.LocalEntryNotFoundError, 'not in the hub cache while the hub cannot be reached'),
                     (E.GatedRepoError, 'is gated on the hub'), (E.RepositoryNotFoundError, 'no such model (or revision) on the hub'),
                     (E.RevisionNotFoundError, 'no such model (or revision) on the hub'), (E.EntryNotFoundError, 'a file it needs')):
        with pytest.raises(ValueError, match=_re.escape(msg)): hub_call('owner/name', raising(cls), remedy='do this')
    with pytest.raises(ValueError, match='do this$'): hub_call('owner/name', raising(E.OfflineModeIsEnabled), remedy='do this')
    assert hub_call('owner/name', lambda: 42) == 42
