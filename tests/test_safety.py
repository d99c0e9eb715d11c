"""Nothing a user owns is ever lost, a conversion resumes from any interruption, a corrupted file is refused rather than
served, and every error a user can cause is one line in their own terms (issue 20)."""
import errno, json, os, shutil, subprocess, sys, threading, zlib
from pathlib import Path

import pytest
import torch

import moe_explained.convert as C
from helpers import tiny_mixtral_model
import moe_explained.offload as offload_module
import moe_explained.store as O
from moe_explained.cli import main
from moe_explained.convert import convert, load_converted, save_offloaded, verify
from moe_explained.offload import load_and_offload
import moe_explained.checkpoint as checkpoint_module
from moe_explained.store import LOCK, MANIFEST, ExpertStore
from moe_explained.pretrained import TINY_MIXTRAL_PATH

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1',
       'PYTHONPATH': os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p)}
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
_tiny = tiny_mixtral_model   # the `hub` fixture (conftest.py) holds it in the hub layout


@pytest.fixture(scope='module')
def converted(hub, tmp_path_factory):
    return convert(hub, tmp_path_factory.mktemp('conv') / 'out', experts_bits=2, attn_bits=4, progress=False)


@pytest.fixture(scope='module')
def tiny_converted(tmp_path_factory):
    "The packaged tiny Mixtral (with its tokenizer) converted, 4-bit experts: what the command line runs."
    return convert(TINY_MIXTRAL_PATH, tmp_path_factory.mktemp('tiny') / 'out', experts_bits=4, attn_bits=None, progress=False)


def _snapshot(folder) -> dict:
    "Every file under `folder` (but the lock) and its bytes."
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file() and p.name != LOCK}


def _cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(err: str) -> str:
    "The one line of an error on stderr (progress bars aside, which long work draws there)."
    lines = [l.strip() for l in err.replace('\r', '\n').splitlines() if l.strip() and '%|' not in l]
    assert 'Traceback' not in err and len(lines) == 1, err
    return lines[0]


def _logits(m):
    with torch.no_grad(): return m(IDS).logits


# --- only the project's own files are ever deleted or replaced ---

def test_overwrite_refuses_a_folder_with_the_users_files(hub, tmp_path, capsys):
    "A folder that once held an experts.bin, plus a thesis.tex: --overwrite deletes nothing and says why."
    out = tmp_path / 'out'; out.mkdir()
    (out / 'experts.bin').write_bytes(b'\x01' * 100); (out / 'thesis.tex').write_text('\\chapter{Mixtures}')
    before = _snapshot(out)
    rc, _, err = _cli(['convert', hub, out, '--overwrite'], capsys)
    assert rc == 2 and 'holds other files (thesis.tex)' in _one_line(err)
    assert _snapshot(out) == before
    with pytest.raises(ValueError, match='holds other files'): convert(hub, out, overwrite=True, progress=False)
    assert _snapshot(out) == before


def test_overwrite_refuses_a_finished_conversion_the_user_added_to(hub, converted, tmp_path):
    out = tmp_path / 'out'; shutil.copytree(converted, out)
    (out / 'notes.md').write_text('my notes')
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r'holds other files \(notes.md\)'): convert(hub, out, overwrite=True, progress=False)
    assert _snapshot(out) == before


def test_overwrite_removes_exactly_the_conversions_own_files(tmp_path):
    "A 6-layer conversion overwritten by a 4-layer one: the two weights files the new one does not write are gone too."
    six, four = tmp_path / 'six', tmp_path / 'four'
    _tiny(num_layers=6).save_pretrained(six); _tiny(num_layers=4).save_pretrained(four)
    out = convert(six, tmp_path / 'out', experts_bits=None, attn_bits=None, progress=False)
    assert (out / 'weights-layer-00005.safetensors').exists()
    convert(four, out, experts_bits=None, attn_bits=None, overwrite=True, progress=False)
    fresh = convert(four, tmp_path / 'fresh', experts_bits=None, attn_bits=None, progress=False)
    strip = lambda snap: {k: v for k, v in snap.items() if k != MANIFEST}
    assert strip(_snapshot(out)) == strip(_snapshot(fresh))
    assert json.loads((out / MANIFEST).read_text())['files'] == json.loads((fresh / MANIFEST).read_text())['files']


def test_a_disk_store_refuses_a_converted_model_or_other_files(converted, tmp_path, capsys):
    conv = tmp_path / 'conv'; shutil.copytree(converted, conv)
    before = _snapshot(conv)
    rc, _, err = _cli(['generate', 'x', '--store', 'disk', '--offload-folder', conv], capsys)
    assert rc == 2 and '--offload-folder' in _one_line(err) and 'holds a converted model' in err
    assert _snapshot(conv) == before
    assert torch.equal(_logits(load_converted(conv, progress=False)), _logits(load_converted(converted, progress=False)))
    mine = tmp_path / 'mine'; mine.mkdir(); (mine / 'photo.jpg').write_bytes(b'\xff\xd8')
    rc, _, err = _cli(['generate', 'x', '--store', 'disk', '--offload-folder', mine], capsys)
    assert rc == 2 and 'holds files this package did not write (photo.jpg)' in _one_line(err)
    assert _snapshot(mine) == {'photo.jpg': b'\xff\xd8'}


def test_a_disk_store_replaces_only_an_earlier_store(tmp_path):
    folder = tmp_path / 'store'
    a = load_and_offload(None, cache_size=2, store='disk', offload_folder=folder, dtype=torch.float32, progress=False)
    old_rows = a.moe_offload.store.rows[0].clone()
    b = load_and_offload(None, cache_size=2, store='disk', offload_folder=folder, experts_bits=4, dtype=torch.float32, progress=False)
    assert torch.equal(a.moe_offload.store.rows[0], old_rows)       # the first model's mapping still reads its own bytes
    assert sorted(p.name for p in folder.iterdir()) == sorted(['experts.bin', 'experts.json', LOCK])
    assert b.moe_offload.store.formats[0]['kind'] == 'hqq'


def _store_folders(where: Path) -> list:
    return sorted(p.name for p in where.glob('moe-explained-store-*'))


def test_a_temporary_disk_store_lives_only_as_long_as_the_process(tmp_path, monkeypatch):
    monkeypatch.setenv('TMPDIR', str(tmp_path)); import tempfile; monkeypatch.setattr(tempfile, 'tempdir', None)
    m = load_and_offload(None, cache_size=2, store='disk', dtype=torch.float32, progress=False)
    assert _store_folders(tmp_path) == []                            # deleted once mapped; the mapping keeps it readable
    st = m.moe_offload.store
    assert st.temporary and st.memory_mapped and 'temporary file' in repr(st)
    ref = load_and_offload(None, cache_size=2, dtype=torch.float32, progress=False)
    assert torch.equal(_logits(m), _logits(ref))
    real = O.write_rows
    def interrupted(out, fmt, E, fill):
        if out.tell() > 0: raise KeyboardInterrupt
        return real(out, fmt, E, fill)
    monkeypatch.setattr(O, 'write_rows', interrupted)
    with pytest.raises(KeyboardInterrupt): load_and_offload(None, cache_size=2, store='disk', progress=False)
    assert _store_folders(tmp_path) == []                            # Ctrl-C while it is written: removed too


def test_the_cli_disk_store_without_a_folder_leaves_nothing_behind(tmp_path):
    res = subprocess.run([sys.executable, '-m', 'moe_explained.cli', 'generate', 'And it came to pass', '--store', 'disk',
                          '--max-new-tokens', '4'], capture_output=True, text=True, env=ENV | {'TMPDIR': str(tmp_path)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'disk 6.0 MiB' in res.stdout and _store_folders(tmp_path) == []


def test_save_offloaded_replaces_files_by_renaming(hub, tmp_path):
    "A process that memory-mapped the old save keeps reading the old bytes while a new save replaces them."
    m2 = load_and_offload(hub, cache_size=2, experts_bits=2, progress=False)
    saved = save_offloaded(m2, tmp_path / 'saved', progress=False)
    reader = ExpertStore.open(saved)                                 # another process would see the same
    old = {l: reader.rows[l].clone() for l in reader.layers}
    m4 = load_and_offload(hub, cache_size=2, experts_bits=4, progress=False)
    save_offloaded(m4, saved, progress=False)
    assert all(torch.equal(reader.rows[l], old[l]) for l in reader.layers)
    assert reader.bad_rows() == {}
    assert torch.equal(_logits(load_converted(saved, progress=False)), _logits(m4))
    assert not [p for p in saved.iterdir() if p.name.endswith('.partial')]
    (saved / 'diary.txt').write_text('mine')
    with pytest.raises(ValueError, match=r'holds other files \(diary.txt\)'): save_offloaded(m4, saved, progress=False)
    assert (saved / 'diary.txt').read_text() == 'mine'


# --- a conversion resumes from any interruption, byte for byte ---

class _Stop(Exception): pass


def _boundaries(monkeypatch, fail_at=None, error=None):
    """Count the conversion's step boundaries — every rename into place (journal, weights, sources, index, manifest),
    every layer appended to the store, every source file copied — and raise `error` at the `fail_at`-th."""
    calls = []
    def wrap(fn):
        def f(*a, **k):
            calls.append(fn.__name__)
            if fail_at is not None and len(calls) == fail_at: raise error
            return fn(*a, **k)
        return f
    monkeypatch.setattr(os, 'replace', wrap(os.replace))
    monkeypatch.setattr(C, 'write_rows', wrap(C.write_rows))
    monkeypatch.setattr(shutil, 'copyfileobj', wrap(shutil.copyfileobj))
    return calls


@pytest.mark.parametrize('kind', ['ctrl-c', 'disk full'])
def test_conversion_resumes_byte_identical_from_every_step_boundary(hub, converted, tmp_path, kind):
    want = _snapshot(converted)
    with pytest.MonkeyPatch.context() as mp:
        calls = _boundaries(mp)
        convert(hub, tmp_path / 'count', experts_bits=2, attn_bits=4, progress=False)
    n = len(calls)
    assert n > 40
    for i in range(1, n + 1):
        out = tmp_path / f'at-{i}'
        error = KeyboardInterrupt() if kind == 'ctrl-c' else OSError(errno.ENOSPC, 'No space left on device', str(out))
        with pytest.MonkeyPatch.context() as mp:
            _boundaries(mp, i, error)
            with pytest.raises(type(error)): convert(hub, out, experts_bits=2, attn_bits=4, progress=False)
        if (out / MANIFEST).exists() is False:
            with pytest.raises(ValueError): load_converted(out, progress=False)      # nothing half-written loads
        convert(hub, out, experts_bits=2, attn_bits=4, progress=False)
        assert _snapshot(out) == want, f'resumed after an interruption at step boundary {i} of {n}'
        shutil.rmtree(out)


def test_free_disk_space_is_checked_before_anything_is_written(hub, tmp_path, monkeypatch, capsys):
    from collections import namedtuple
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: namedtuple('u', 'total used free')(10**9, 10**9 - 4096, 4096))
    rc, _, err = _cli(['convert', hub, tmp_path / 'out', '--experts-bits', '0'], capsys)
    assert rc == 2 and 'converting needs about' in _one_line(err) and 'which has 0.00 GiB free' in err
    assert '--experts-bits' in err
    assert not (tmp_path / 'out').exists() or conversion_leftovers(tmp_path / 'out') == []
    monkeypatch.setattr(shutil, 'disk_usage', real)
    assert convert(hub, tmp_path / 'out', experts_bits=None, attn_bits=None, progress=False)


def conversion_leftovers(out):
    return [p.name for p in out.iterdir() if p.name != LOCK]


def test_a_second_conversion_into_the_same_folder_is_refused(hub, converted, tmp_path, monkeypatch):
    inside, go, errors = threading.Event(), threading.Event(), []
    real = C.write_rows
    def slow(*a, **k):
        inside.set(); go.wait(60)
        return real(*a, **k)
    monkeypatch.setattr(C, 'write_rows', slow)
    out = tmp_path / 'out'
    first = threading.Thread(target=lambda: errors.append(convert(hub, out, experts_bits=2, attn_bits=4, progress=False)))
    first.start()
    assert inside.wait(60)
    monkeypatch.setattr(C, 'write_rows', real)
    with pytest.raises(ValueError, match=f'another process is writing into {out}'):
        convert(hub, out, experts_bits=2, attn_bits=4, progress=False)
    with pytest.raises(ValueError, match='another process is writing'):
        O.ExpertStore.build(_tiny(), path=out, progress=False)
    go.set(); first.join(60)
    assert errors == [out] and _snapshot(out) == _snapshot(converted)


def test_a_garbage_journal_is_named(hub, tmp_path, monkeypatch, capsys):
    real = C.write_rows
    monkeypatch.setattr(C, 'write_rows', lambda out, *a: (_ for _ in ()).throw(KeyboardInterrupt) if out.tell() else real(out, *a))
    with pytest.raises(KeyboardInterrupt): convert(hub, tmp_path / 'out', experts_bits=2, attn_bits=None, progress=False)
    monkeypatch.setattr(C, 'write_rows', real)
    journal = tmp_path / 'out' / '.convert' / 'journal.json'
    journal.write_text('garbage')
    rc, _, err = _cli(['convert', hub, tmp_path / 'out', '--attn-bits', '0'], capsys)
    assert rc == 2 and f'the conversion journal {journal} is corrupted' in _one_line(err) and '--overwrite' in err
    journal.write_text('{"version": 1, "done": []}')
    rc, _, err = _cli(['convert', hub, tmp_path / 'out', '--attn-bits', '0'], capsys)
    assert rc == 2 and 'is not one this package wrote' in _one_line(err)
    rc, out, err = _cli(['convert', hub, tmp_path / 'out', '--attn-bits', '0', '--overwrite'], capsys)
    assert rc == 0, err


# --- a corrupted expert is never served ---

def _flip(path: Path, offset: int):
    data = bytearray(path.read_bytes()); data[offset] ^= 0x01; path.write_bytes(bytes(data))


def _used_expert(model_dir):
    "(layer 0's row offset in experts.bin, an expert the first token of IDS uses in layer 0)."
    ref = load_converted(model_dir, cache_size=2, resident_layers=0, progress=False)
    seen = []
    layer = ref.moe_offload.layers[0]
    real = layer._forward
    layer._forward = lambda h, i, w: (seen.append(i[0].tolist()), real(h, i, w))[1]
    _logits(ref)
    return seen[0][0]


def test_one_flipped_byte_in_an_expert_is_refused_not_served(converted, tiny_converted, tmp_path, capsys):
    bad = tmp_path / 'bad'; shutil.copytree(converted, bad)
    e = _used_expert(bad)
    index = json.loads((bad / 'experts.json').read_text())['layers']['0']
    _flip(bad / 'experts.bin', index['offset'] + e * index['nbytes'] + index['nbytes'] // 2)
    m = load_converted(bad, cache_size=2, resident_layers=0, progress=False)   # memory-mapped: checked on first read
    with pytest.raises(ValueError, match=f'layer 0, expert {e} fails its CRC-32 check'): _logits(m)
    with pytest.raises(ValueError, match=f'layer 0, expert {e} fails its CRC-32 check'):
        load_converted(bad, cache_size=2, progress=False)             # read into RAM: checked as it is read
    tiny_bad = tmp_path / 'tiny-bad'; shutil.copytree(tiny_converted, tiny_bad)
    index = json.loads((tiny_bad / 'experts.json').read_text())['layers']['2']
    _flip(tiny_bad / 'experts.bin', index['offset'] + 5 * index['nbytes'] + 100)
    rc, out, err = _cli(['generate', 'hello', '--model', tiny_bad, '--max-new-tokens', '2'], capsys)
    assert rc == 2 and 'layer 2, expert 5 fails its CRC-32 check' in _one_line(err)
    rc, out, _ = _cli(['verify', bad], capsys)
    assert rc == 1 and f'layer 0, experts [{e}]' in out and out.strip().endswith(f'in {bad}')
    rc, out, _ = _cli(['verify', converted], capsys)
    assert rc == 0 and out.startswith('ok: ')


def test_a_checked_row_is_not_checked_again(converted):
    m = load_converted(converted, cache_size=2, resident_layers=0, progress=False)
    st = m.moe_offload.store
    _logits(m); first = st.check_bytes
    _logits(m); _logits(m)
    assert 0 < first <= st.nbytes and st.check_bytes <= st.nbytes   # each row at most once, however often it is read
    assert sum(map(sum, st.checked.values())) * st.row_nbytes(0) == st.check_bytes


@pytest.mark.parametrize('damage, said', [
    ('weights', 'weights-layer-00001.safetensors fails its CRC-32'),
    ('truncate', 'truncated safetensors file'),
    ('index', 'experts.json fails its CRC-32'),
    ('manifest-path', "corrupted or edited manifest"),
    ('manifest-dtype', "options['dtype'] is 'float17'"),
    ('manifest-json', 'corrupted manifest'),
    ('config', 'cannot read the config')])
def test_a_damaged_converted_folder_is_one_line(tiny_converted, tmp_path, capsys, damage, said):
    bad = tmp_path / 'bad'; shutil.copytree(tiny_converted, bad)
    man = json.loads((bad / MANIFEST).read_text())
    if damage == 'weights': _flip(bad / 'weights-layer-00001.safetensors', -10)
    elif damage == 'truncate':
        f = bad / 'weights-layer-00001.safetensors'; f.write_bytes(f.read_bytes()[:-100])
    elif damage == 'index':
        t = (bad / 'experts.json').read_text(); (bad / 'experts.json').write_text(t.replace('"crc32": [', '"crc32": [1, ', 1))
    elif damage == 'manifest-path': man['weights'][0] = '../../etc/passwd'; (bad / MANIFEST).write_text(json.dumps(man))
    elif damage == 'manifest-dtype': man['options']['dtype'] = 'float17'; (bad / MANIFEST).write_text(json.dumps(man))
    elif damage == 'manifest-json': (bad / MANIFEST).write_text('{"version": 1, ')
    elif damage == 'config': (bad / 'config.json').write_text('{"model_type": "mixtral", "num_hidden_layers": "four"}')
    rc, _, err = _cli(['generate', 'hello', '--model', bad, '--max-new-tokens', '2'], capsys)
    assert rc == 2 and said in _one_line(err), err


def test_verify_names_every_damaged_file(converted, tmp_path):
    bad = tmp_path / 'bad'; shutil.copytree(converted, bad)
    _flip(bad / 'weights-rest.safetensors', -3)
    t = json.loads((bad / 'tokenizer_config.json').read_text()) if (bad / 'tokenizer_config.json').exists() else None
    (bad / 'generation_config.json').write_text((bad / 'generation_config.json').read_text().replace('}', ', "top_k": 3}'))
    r = verify(bad, progress=False)
    assert list(r['bad']) == ['weights-rest.safetensors'] and r['changed'] == ['generation_config.json'] and r['bad_rows'] == {}


# --- every error a user can cause is one line, in the user's own terms ---

def test_errors_speak_the_flags_the_user_typed(hub, converted, tmp_path, capsys):
    rc, _, err = _cli(['convert', hub, converted, '--experts-bits', '3'], capsys)
    assert rc == 2 and 'already holds a converted model' in _one_line(err) and 'pass --overwrite to replace it' in err
    rc, _, err = _cli(['generate', 'x', '--device', 'tpu'], capsys)
    assert rc == 2 and "--device tpu" in _one_line(err)
    if not torch.cuda.is_available():
        rc, _, err = _cli(['generate', 'x', '--device', 'cuda'], capsys)
        assert rc == 2 and 'use --device cpu' in _one_line(err)
    rc, _, err = _cli(['generate', 'x', '--experts-bits', '5'], capsys)
    assert rc == 2 and '--experts-bits 5 is not supported' in _one_line(err) and '--experts-bits 0 to keep' in err
    rc, _, err = _cli(['generate', 'x', '--offload-folder', tmp_path], capsys)
    assert rc == 2 and '--offload-folder is for --store disk' in _one_line(err)
    rc, _, err = _cli(['plan', 'mixtral-8x7b', '--device-memory', '3GB', '--host-memory', '12GB', '--disk-memory', '80GB', '--max-tokens', '8192'], capsys)
    assert rc == 2 and 'fewer --max-tokens' in _one_line(err) and 'fewer --experts-bits' in err
    rc, _, err = _cli(['plan', 'mixtral-8x7b', '--device-memory', 'lots'], capsys)
    assert rc == 2 and "--device-memory lots: give bytes" in _one_line(err)
    from moe_explained.errors import ArgumentError
    e = ArgumentError('{cache_size} is out of range: need 1 <= {cache_size:name} <= 8; try {cache_size|four}', cache_size=9, four=4)
    assert str(e) == 'cache_size=9 is out of range: need 1 <= cache_size <= 8; try cache_size=4'


def test_a_config_whose_router_picks_more_experts_than_there_are(tmp_path, capsys):
    bad = tmp_path / 'bad'; shutil.copytree(TINY_MIXTRAL_PATH, bad)
    cfg = json.loads((bad / 'config.json').read_text()); cfg['num_experts_per_tok'] = 9
    (bad / 'config.json').write_text(json.dumps(cfg))
    rc, _, err = _cli(['generate', 'hello', '--model', bad], capsys)
    assert rc == 2 and 'num_experts_per_tok=9, but its MoE layers have 8 experts' in _one_line(err)
    rc, _, err = _cli(['convert', bad, tmp_path / 'out'], capsys)
    assert rc == 2 and 'num_experts_per_tok=9' in _one_line(err) and not (tmp_path / 'out').exists()


def test_an_empty_prompt(capsys):
    for prompt in ('', '   '):
        rc, _, err = _cli(['generate', prompt], capsys)
        assert rc == 2 and 'the prompt is empty' in _one_line(err)


def test_ctrl_c_during_a_conversion_says_how_to_resume(hub, tmp_path, monkeypatch, capsys):
    real = C.write_rows
    monkeypatch.setattr(C, 'write_rows', lambda out, *a: (_ for _ in ()).throw(KeyboardInterrupt) if out.tell() else real(out, *a))
    rc, _, err = _cli(['convert', hub, tmp_path / 'out'], capsys)
    assert rc == 130 and _one_line(err) == 'moe-explained convert: interrupted: run the same command again to resume the conversion'
    monkeypatch.setattr(C, 'write_rows', real)
    rc, out, err = _cli(['convert', hub, tmp_path / 'out'], capsys)
    assert rc == 0 and 'converted into' in out, err


def test_ctrl_c_while_loading(monkeypatch, capsys):
    def interrupted(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint_module, 'load_offloaded', interrupted)
    rc, _, err = _cli(['generate', 'hello'], capsys)
    assert rc == 130 and _one_line(err) == 'moe-explained generate: interrupted'


def test_a_real_sigint_exits_130_without_a_traceback(hub, tmp_path):
    "A real Ctrl-C (SIGINT) to a running conversion: one line, status 130; the same command then finishes it."
    import signal, time
    code = (f"import moe_explained.convert as C, time, sys\nreal = C.write_rows\n"
            f"def slow(*a, **k):\n    print('writing', flush=True); time.sleep(30); return real(*a, **k)\n"
            f"C.write_rows = slow\nfrom moe_explained.cli import main\nsys.exit(main(['convert', {str(hub)!r}, {str(tmp_path / 'out')!r}]))")
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == 'writing'
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and _one_line(err).endswith('interrupted: run the same command again to resume the conversion')
    res = subprocess.run([sys.executable, '-m', 'moe_explained.cli', 'convert', str(hub), str(tmp_path / 'out')],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr


def test_a_full_disk_and_a_read_only_folder(hub, tmp_path, monkeypatch, capsys):
    real = C.write_rows
    def full(out, *a):
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'out' / 'experts.bin'))
    monkeypatch.setattr(C, 'write_rows', full)
    rc, _, err = _cli(['convert', hub, tmp_path / 'out'], capsys)
    assert rc == 2 and _one_line(err) == (f"moe-explained convert: error: no space left on the disk ({tmp_path / 'out' / 'experts.bin'}): "
                                          f"free some space, then run the same command again to resume the conversion")
    monkeypatch.setattr(C, 'write_rows', real)
    ro = tmp_path / 'ro'; ro.mkdir()
    if os.geteuid() != 0: ro.chmod(0o555)
    else:                                                          # root writes anywhere: make the folder refuse it
        real_mkdir = Path.mkdir
        def denied(self, *a, **k):
            if self == ro / 'out': raise PermissionError(errno.EACCES, 'Permission denied', str(self))
            return real_mkdir(self, *a, **k)
        monkeypatch.setattr(Path, 'mkdir', denied)
    rc, _, err = _cli(['convert', hub, ro / 'out'], capsys)
    assert rc == 2 and f"permission denied ({ro / 'out'}): choose a folder you can write to" in _one_line(err)


def test_an_unexpected_error_is_one_line_too(monkeypatch, capsys):
    def boom(*a, **k): raise RuntimeError('something nobody planned for\nsecond line')
    monkeypatch.setattr(checkpoint_module, 'load_offloaded', boom)
    rc, _, err = _cli(['generate', 'hello'], capsys)
    assert rc == 1 and 'unexpected RuntimeError: something nobody planned for' in _one_line(err)
    monkeypatch.setenv('MOE_EXPLAINED_TRACEBACK', '1')
    with pytest.raises(RuntimeError): main(['generate', 'hello'])


# --- the command line people expect ---

def _greedy_folder(tmp_path) -> Path:
    "The packaged model with a generation config that does not sample (most hub models' default)."
    d = tmp_path / 'greedy'; shutil.copytree(TINY_MIXTRAL_PATH, d)
    g = json.loads((d / 'generation_config.json').read_text()); g['do_sample'] = False
    (d / 'generation_config.json').write_text(json.dumps(g))
    return d


def _text(out: str) -> str:
    "The generated text of `generate`'s output (before its tokens/s line)."
    import re
    return re.split(r'\n\n\d+ tokens in ', out)[0]


def test_sample_samples_whatever_the_generation_config_says(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = _greedy_folder(tmp_path)
    tok, ref = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d)
    ref.set_experts_implementation('eager')            # the engine's exact reference
    ids = tok('And it came to pass', return_tensors='pt').input_ids
    def expect(**kw):
        torch.manual_seed(kw.pop('seed', 0))
        return tok.decode(ref.generate(ids, max_new_tokens=12, pad_token_id=0, **kw)[0], skip_special_tokens=True)
    base = ['generate', 'And it came to pass', '--model', d, '--max-new-tokens', '12']
    greedy = _text(_cli(base, capsys)[1])
    assert greedy == expect(do_sample=False)
    sampled = _text(_cli(base + ['--sample', '--seed', '3'], capsys)[1])
    assert sampled == expect(do_sample=True, seed=3) and sampled != greedy
    knobs = _text(_cli(base + ['--temperature', '1.3', '--top-k', '7', '--top-p', '0.9', '--seed', '1'], capsys)[1])
    assert knobs == expect(do_sample=True, temperature=1.3, top_k=7, top_p=0.9, seed=1)
    assert _text(_cli(base + ['--temperature', '0', '--seed', '1'], capsys)[1]) == greedy
    penalised = _text(_cli(base + ['--repetition-penalty', '1.5'], capsys)[1])
    assert penalised == expect(do_sample=False, repetition_penalty=1.5)
    for bad in (['--top-p', '1.5'], ['--top-p', '0'], ['--temperature', '-1'], ['--top-k', '0'], ['--repetition-penalty', 'x']):
        with pytest.raises(SystemExit) as e: main([str(a) for a in base + bad])
        assert e.value.code == 2


def test_a_folder_without_a_tokenizer_is_refused_before_the_weights_load(tmp_path, monkeypatch, capsys):
    d = tmp_path / 'no-tok'; shutil.copytree(TINY_MIXTRAL_PATH, d)
    for f in ('tokenizer.json', 'tokenizer_config.json'): (d / f).unlink()
    monkeypatch.setattr(checkpoint_module, 'load_offloaded', lambda *a, **k: pytest.fail('the weights were loaded before the tokenizer was checked'))
    rc, _, err = _cli(['generate', 'hello', '--model', d], capsys)
    assert rc == 2 and f'cannot load the tokenizer of {d}' in _one_line(err)


def test_a_batch_of_prompts_pads_on_the_left():
    "The packaged tokenizer pads on the left, so each row of a batch predicts its next token from its own last token."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_MIXTRAL_PATH)
    model = AutoModelForCausalLM.from_pretrained(TINY_MIXTRAL_PATH, dtype=torch.float32)
    assert tok.padding_side == 'left'
    prompts = ['And God said', 'In the beginning God created the heaven and the earth. And the earth was']
    def next_logits(side):
        tok.padding_side = side
        batch = tok(prompts, return_tensors='pt', padding=True)
        with torch.no_grad(): return model(**batch).logits[:, -1]
    with torch.no_grad(): alone = model(**tok(prompts[0], return_tensors='pt')).logits[0, -1]
    # fp32, the same weights: the rows differ only by the summation order of differently shaped matmuls
    assert torch.allclose(next_logits('left')[0], alone, atol=1e-4, rtol=0)
    assert not torch.allclose(next_logits('right')[0], alone, atol=1e-1, rtol=0)   # right padding predicts after a <pad>


def test_experts_bits_0_keeps_them_in_every_command(tmp_path, capsys):
    rc, out, err = _cli(['generate', 'And it came to pass', '--experts-bits', '0', '--attn-bits', '0', '--max-new-tokens', '4'], capsys)
    assert rc == 0, err
    ref = _cli(['generate', 'And it came to pass', '--max-new-tokens', '4'], capsys)[1]
    assert _text(out) == _text(ref)
    rc, out, err = _cli(['convert', TINY_MIXTRAL_PATH, tmp_path / 'dense', '--experts-bits', '0', '--attn-bits', '0'], capsys)
    assert rc == 0 and json.loads((tmp_path / 'dense' / MANIFEST).read_text())['options']['experts_bits'] is None


def test_commands_that_need_no_model_load_no_model_library():
    """`--help`, `models` and `plan` of a shipped config start without torch, transformers or hqq; `params` of one
    without transformers or hqq (chapter 00's `ParamCount` lives beside the torch module `SwiGLU`). Their wall times are
    measured by benchmarks/bench_startup.py, not here."""
    cases = {('--help',): [], ('models',): [], ('params', 'mixtral-8x7b'): ['torch'],
             ('plan', 'mixtral-8x7b', '--device-memory', 'T4', '--host-memory', '12.7GB', '--disk-memory', '80GB'): []}
    for argv, allowed in cases.items():
        code = (f"import sys\nfrom moe_explained.cli import main\ntry: main({list(argv)!r})\nexcept SystemExit: pass\n"
                f"print(sorted(m for m in ('torch', 'transformers', 'hqq') if m in sys.modules))")
        res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().splitlines()[-1] == str(allowed), (argv, res.stdout[-300:])
