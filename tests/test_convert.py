"""Chapter 11, part 2: streaming conversion from a hub layout, resumability, the converted-model folder, bad input."""
import json, shutil

import pytest
import torch

import moe_explained.convert as C
from helpers import tiny_mixtral_model
from moe_explained.convert import MANIFEST, convert, load_converted, read_manifest, save_offloaded
from moe_explained.offload import load_and_offload, offload_stats


_tiny = tiny_mixtral_model


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(m):
    with torch.no_grad(): return m(IDS).logits


@pytest.mark.parametrize('experts_bits,attn_bits', [(None, None), (2, 4), (3, None)])
def test_streamed_conversion_equals_loading_whole(hub, tmp_path, experts_bits, attn_bits):
    out = convert(hub, tmp_path / 'out', experts_bits=experts_bits, attn_bits=attn_bits, progress=False)
    m = load_converted(out, cache_size=2, progress=False)
    ref = load_and_offload(hub, cache_size=2, experts_bits=experts_bits, attn_bits=attn_bits, progress=False)
    assert torch.equal(_logits(m), _logits(ref))
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(IDS[:1], **gen), ref.generate(IDS[:1], **gen))
    man = read_manifest(out)
    assert man['options']['experts_bits'] == experts_bits and man['options']['attn_bits'] == attn_bits
    assert not (out / C.WORK).exists()


def test_memory_mapped_and_resident_layers(hub, tmp_path):
    out = convert(hub, tmp_path / 'out', experts_bits=4, attn_bits=None, progress=False)
    mapped = load_converted(out, cache_size=2, resident_layers=0, progress=False)
    split = load_converted(out, cache_size=2, resident_layers=2, progress=False)
    st, ss = offload_stats(mapped), offload_stats(split)
    assert st.host_bytes == 0 and st.disk_bytes == mapped.moe_offload.store.nbytes
    assert ss.host_bytes == ss.disk_bytes == split.moe_offload.store.nbytes // 2
    assert torch.equal(_logits(mapped), _logits(split))
    with pytest.raises(ValueError, match='resident_layers=5 is out of range'):
        load_converted(out, cache_size=2, resident_layers=5, progress=False)
    with pytest.raises(ValueError, match='cache_size=7 is out of range'):
        load_converted(out, cache_size=7, progress=False)


_real_rows = C.expert_rows


def _flaky(monkeypatch, fail_on_layer, calls):
    real = C.expert_rows
    def rows(m, *a, **k):
        fmt, E, fill = real(m, *a, **k)
        calls.append(E)
        def fill_or_fail(e, buf):
            if len(calls) == fail_on_layer and e == E // 2: raise KeyboardInterrupt
            fill(e, buf)
        return fmt, E, fill_or_fail
    monkeypatch.setattr(C, 'expert_rows', rows)


def test_interrupted_conversion_does_not_load_and_resumes_byte_identical(hub, tmp_path, monkeypatch):
    whole = convert(hub, tmp_path / 'whole', experts_bits=2, attn_bits=4, progress=False)
    calls = []
    _flaky(monkeypatch, 3, calls)
    with pytest.raises(KeyboardInterrupt): convert(hub, tmp_path / 'out', experts_bits=2, attn_bits=4, progress=False)
    journal = json.loads((tmp_path / 'out' / C.WORK / 'journal.json').read_text())
    assert len([u for u in journal['done'] if u != 'rest']) == 2
    assert (tmp_path / 'out' / 'experts.bin').stat().st_size > journal['store_bytes']      # half a layer was written
    with pytest.raises(ValueError, match='incomplete'): load_converted(tmp_path / 'out', progress=False)
    with pytest.raises(ValueError, match='interrupted conversion'):                     # other options: refused, not mixed
        convert(hub, tmp_path / 'out', experts_bits=3, attn_bits=4, progress=False)
    calls.clear()
    convert(hub, tmp_path / 'out', experts_bits=2, attn_bits=4, progress=False)
    assert len(calls) == 2                                    # only the two layers left were converted
    for f in ('experts.bin', 'experts.json'):
        assert (tmp_path / 'out' / f).read_bytes() == (whole / f).read_bytes()
    assert torch.equal(_logits(load_converted(tmp_path / 'out', progress=False)), _logits(load_converted(whole, progress=False)))


def _fake_hub(monkeypatch, repo_dir, seen):
    "Mock only the network calls: hub files come from `repo_dir`; record how many shards are on disk at each download."
    import huggingface_hub
    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        import fnmatch, tempfile
        d = tempfile.mkdtemp()
        for f in repo_dir.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns): shutil.copy2(f, d)
        return d
    def hf_hub_download(repo_id, filename, revision=None, local_dir=None, **kw):
        local_dir.mkdir(parents=True, exist_ok=True)
        seen.append(len(list(local_dir.glob('*.safetensors'))) + 1)
        return shutil.copy2(repo_dir / filename, local_dir / filename)
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', hf_hub_download)


def test_hub_download_is_streamed_shard_by_shard(hub, tmp_path, monkeypatch):
    "With shards larger than a layer (as on the hub: 5 GB shards, 2.9 GB Mixtral layers), at most two are ever on disk."
    big = tmp_path / 'big'
    _tiny(num_layers=6).save_pretrained(big, max_shard_size='400KB')
    seen = []
    _fake_hub(monkeypatch, big, seen)
    out = convert('someone/tiny-mixtral', tmp_path / 'out', experts_bits=2, attn_bits=None, progress=False)
    assert len(seen) == len(list(big.glob('*.safetensors'))) > 3 and max(seen) <= 2   # never more than two shards at once
    assert not list((tmp_path / 'out').rglob('model-*.safetensors'))                  # every downloaded shard was deleted
    assert read_manifest(out)['source']['repo'] == 'someone/tiny-mixtral'
    assert torch.equal(_logits(load_converted(out, progress=False)),
                       _logits(load_and_offload(big, experts_bits=2, progress=False)))


def test_hub_resume_does_not_download_finished_shards_again(tmp_path, monkeypatch):
    big = tmp_path / 'big'
    _tiny(num_layers=6).save_pretrained(big, max_shard_size='400KB')
    shards = sorted(p.name for p in big.glob('*.safetensors'))
    import huggingface_hub
    _fake_hub(monkeypatch, big, [])
    fetched, real = [], huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', lambda repo_id, filename, **kw: fetched.append(filename) or real(repo_id, filename, **kw))
    calls = []
    _flaky(monkeypatch, 4, calls)
    with pytest.raises(KeyboardInterrupt): convert('someone/tiny-mixtral', tmp_path / 'out', experts_bits=2, attn_bits=None, progress=False)
    first_run, fetched[:] = list(fetched), []
    monkeypatch.setattr(C, 'expert_rows', _real_rows)
    convert('someone/tiny-mixtral', tmp_path / 'out', experts_bits=2, attn_bits=None, progress=False)
    assert shards[0] in first_run and shards[0] not in fetched      # the embeddings were kept; the first shard is not fetched again
    whole = convert(big, tmp_path / 'whole', experts_bits=2, attn_bits=None, progress=False)
    assert (tmp_path / 'out' / 'experts.bin').read_bytes() == (whole / 'experts.bin').read_bytes()
    assert torch.equal(_logits(load_converted(tmp_path / 'out', progress=False)), _logits(load_converted(whole, progress=False)))


def test_truncated_download_is_refused(hub, tmp_path, monkeypatch):
    bad = tmp_path / 'bad-repo'; shutil.copytree(hub, bad)
    shard = sorted(bad.glob('*.safetensors'))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fake_hub(monkeypatch, bad, [])
    with pytest.raises(ValueError, match='truncated safetensors file'):
        convert('someone/tiny-mixtral', tmp_path / 'out', progress=False)
    with pytest.raises(ValueError): load_converted(tmp_path / 'out', progress=False)


def test_offline_hub_id_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match='hub cannot be reached'):
        convert('nobody/not-a-cached-model', tmp_path / 'out', progress=False)
    assert not (tmp_path / 'out').exists()


def test_bad_sources_are_refused_before_anything_is_written(hub, tmp_path):
    def copy(name):
        d = tmp_path / name; shutil.copytree(hub, d); return d
    missing = copy('missing'); sorted(missing.glob('*.safetensors'))[1].unlink()
    truncated = copy('truncated'); s = sorted(truncated.glob('*.safetensors'))[1]; s.write_bytes(s.read_bytes()[:50])
    named = copy('named'); idx = json.loads((named / 'model.safetensors.index.json').read_text())
    idx['weight_map']['model.layers.0.extra'] = 'model-99999.safetensors'
    (named / 'model.safetensors.index.json').write_text(json.dumps(idx))
    for src, msg in ((missing, 'missing'), (truncated, 'truncated'), (named, 'missing'), (tmp_path / 'nope', 'no such model folder')):
        with pytest.raises(ValueError, match=msg): convert(src, tmp_path / f'out-{src.name}', progress=False)
        assert not (tmp_path / f'out-{src.name}').exists()
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=128)).save_pretrained(tmp_path / 'dense')
    with pytest.raises(ValueError, match='not a Mixture-of-Experts model'): convert(tmp_path / 'dense', tmp_path / 'out-dense', progress=False)
    with pytest.raises(ValueError, match='experts_bits=5'): convert(hub, tmp_path / 'o', experts_bits=5, progress=False)
    with pytest.raises(ValueError, match='source folder'): convert(hub, hub, progress=False)
    other = tmp_path / 'other'; other.mkdir(); (other / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='holds other files'): convert(hub, other, progress=False)
    assert (other / 'notes.txt').exists()


def test_converted_folder_checks(hub, tmp_path):
    out = convert(hub, tmp_path / 'out', experts_bits=2, attn_bits=None, progress=False)
    with pytest.raises(ValueError, match='already holds a converted model'): convert(hub, out, progress=False)
    with pytest.raises(ValueError, match='not a converted model'): load_converted(hub, progress=False)
    with pytest.raises(ValueError, match='not a folder'): load_converted(tmp_path / 'nothing', progress=False)
    bad = tmp_path / 'bad'; shutil.copytree(out, bad)
    (bad / 'weights-layer-00001.safetensors').unlink()
    with pytest.raises(ValueError, match='missing files its manifest names'): load_converted(bad, progress=False)
    short = tmp_path / 'short'; shutil.copytree(out, short)
    data = (short / 'experts.bin').read_bytes(); (short / 'experts.bin').write_bytes(data[:-4096])
    with pytest.raises(ValueError, match='truncated or corrupted expert store'): load_converted(short, progress=False)
    again = convert(hub, out, experts_bits=2, attn_bits=None, overwrite=True, progress=False)
    assert torch.equal(_logits(load_converted(again, progress=False)), _logits(load_converted(tmp_path / 'out', progress=False)))


def test_save_offloaded_round_trip_and_refusals(hub, tmp_path):
    m = load_and_offload(hub, cache_size=2, experts_bits=4, attn_bits=4, store='disk', offload_folder=tmp_path / 'store', progress=False)
    saved = save_offloaded(m, tmp_path / 'saved', progress=False)
    back = load_converted(saved, cache_size=3, progress=False)
    assert torch.equal(_logits(back), _logits(m))
    assert read_manifest(saved)['options'] | {} == dict(experts_bits=4, group_size=16, meta_bits=8, attn_bits=4, attn_group_size=64, dtype='float32')
    with pytest.raises(ValueError, match='memory-mapped from'): save_offloaded(m, tmp_path / 'store', progress=False)
    with pytest.raises(ValueError, match='is not offloaded'): save_offloaded(_tiny(), tmp_path / 'x', progress=False)
    other = tmp_path / 'other'; other.mkdir(); (other / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='holds other files'): save_offloaded(m, other, progress=False)
    assert save_offloaded(m, saved, progress=False) == saved and read_manifest(saved)          # over an older save: replaced


def test_load_converted_from_the_hub_and_push(hub, tmp_path, monkeypatch):
    out = convert(hub, tmp_path / 'out', experts_bits=2, attn_bits=None, progress=False)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', lambda repo_id, **kw: str(out))
    assert torch.equal(_logits(load_converted('someone/tiny-2bit', progress=False)), _logits(load_converted(out, progress=False)))
    calls = []
    class Api:
        def create_repo(self, repo_id, **kw): calls.append(('create', repo_id, kw))
        def upload_folder(self, **kw): calls.append(('upload', kw))
    monkeypatch.setattr(huggingface_hub, 'HfApi', Api)
    assert C.upload(out, 'someone/tiny-2bit') == 'https://huggingface.co/someone/tiny-2bit'
    assert calls[0][:2] == ('create', 'someone/tiny-2bit') and calls[1][1]['folder_path'] == str(out)
    with pytest.raises(ValueError, match='not a converted model'): C.upload(hub, 'someone/x')


def test_packaged_model_converts_and_generates(tmp_path):
    from moe_explained.pretrained import TINY_MIXTRAL_PATH
    out = convert(TINY_MIXTRAL_PATH, tmp_path / 'tiny', experts_bits=None, attn_bits=None, progress=False)
    m, ref = load_converted(out, cache_size=2, progress=False), load_and_offload(None, cache_size=2, progress=False)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    gen = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(m.generate(ids, **gen), ref.generate(ids, **gen))


def test_top_level_names():
    import moe_explained, moe_explained.plan
    assert moe_explained.load_converted is C.load_converted and moe_explained.save_offloaded is C.save_offloaded
    assert moe_explained.plan_memory is moe_explained.plan.plan_memory


def _cli(argv, capsys):
    from moe_explained.cli import main
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_plan_convert_and_generate_a_converted_model(capsys, tmp_path):
    from moe_explained.pretrained import TINY_MIXTRAL_PATH
    rc, out, _ = _cli(['plan', 'mixtral-8x7b', '--device-memory', 'T4', '--host-memory', '12.7GB', '--disk-memory', '80GB'], capsys)
    assert rc == 0 and 'cache 5 of 8 experts per layer' in out
    rc, out, _ = _cli(['plan', 'mixtral-8x7b', '--device-memory', 'T4', '--host-memory', '12.7GB', '--disk-memory', '80GB', '--json'], capsys)
    assert rc == 0 and json.loads(out)['cache_size'] == 5
    rc, _, err = _cli(['plan', 'mixtral-8x7b', '--device-memory', '3GB', '--host-memory', '12.7GB', '--disk-memory', '80GB'], capsys)
    assert rc == 2 and 'no memory plan fits the device' in err
    rc, out, _ = _cli(['convert', str(TINY_MIXTRAL_PATH), str(tmp_path / 'tiny'), '--experts-bits', '4', '--attn-bits', '0'], capsys)
    assert rc == 0 and f'--model {tmp_path / "tiny"}' in out
    rc, out, _ = _cli(['generate', 'And it came to pass', '--model', str(tmp_path / 'tiny'), '--max-new-tokens', '8', '--store', 'disk'], capsys)
    assert rc == 0 and 'host RAM 0 B' in out
    ref = _cli(['generate', 'And it came to pass', '--max-new-tokens', '8', '--experts-bits', '4'], capsys)[1]
    assert out.splitlines()[0] == ref.splitlines()[0]                          # the same text as quantizing in RAM
    rc, _, err = _cli(['generate', 'x', '--model', str(tmp_path / 'tiny'), '--experts-bits', '2'], capsys)
    assert rc == 2 and 'quantized when it was converted' in err
    rc, _, err = _cli(['convert', str(TINY_MIXTRAL_PATH), str(tmp_path / 'tiny')], capsys)
    assert rc == 2 and 'already holds a converted model' in err
    rc, _, err = _cli(['convert', str(TINY_MIXTRAL_PATH), str(tmp_path / 'x'), '--dtype', 'float17'], capsys)
    assert rc == 2 and 'not a torch dtype' in err


def test_pre_quantized_checkpoints_and_a_damaged_journal_are_refused(hub, tmp_path, monkeypatch):
    q = tmp_path / 'fp8'; shutil.copytree(hub, q)
    cfg = json.loads((q / 'config.json').read_text())
    cfg['quantization_config'] = {'quant_method': 'fp8', 'weight_block_size': [128, 128]}
    (q / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'pre-quantized checkpoint \(fp8\)'): convert(q, tmp_path / 'out-fp8', progress=False)
    assert not (tmp_path / 'out-fp8').exists()
    calls = []
    _flaky(monkeypatch, 3, calls)
    with pytest.raises(KeyboardInterrupt): convert(hub, tmp_path / 'out', experts_bits=2, attn_bits=None, progress=False)
    monkeypatch.setattr(C, 'expert_rows', _real_rows)
    journal = json.loads((tmp_path / 'out' / C.WORK / 'journal.json').read_text())
    data = (tmp_path / 'out' / 'experts.bin').read_bytes()
    (tmp_path / 'out' / 'experts.bin').write_bytes(data[:journal['store_bytes'] - 4096])   # lost data the journal counts on
    with pytest.raises(ValueError, match="shorter than the interrupted conversion's journal"):
        convert(hub, tmp_path / 'out', experts_bits=2, attn_bits=None, progress=False)
