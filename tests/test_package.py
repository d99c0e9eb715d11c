"""The installed package: cheap to import, exposes the packaged model, ships its assets."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_cheap_and_has_version():
    code = "import sys, moe_explained; print(moe_explained.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].count(".") == 2 and out[1] == "False"


def test_tiny_mixtral_at_top_level():
    import moe_explained
    from moe_explained import train
    assert moe_explained.tiny_mixtral is train.tiny_mixtral
    assert moe_explained.TINY_MIXTRAL_PATH == train.TINY_MIXTRAL_PATH
    assert (moe_explained.TINY_MIXTRAL_PATH / "model.safetensors").exists()
    assert "tiny_mixtral" in dir(moe_explained)


def test_unknown_attribute_is_an_attribute_error():
    import moe_explained
    try:
        moe_explained.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_wheel_ships_the_model_and_the_cli(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    whl = next(tmp_path.glob("moe_explained-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert f"moe_explained/models/tiny-mixtral/{f}" in names, f
    assert "moe_explained/cli.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "moe-explained = moe_explained.cli:main" in zipfile.ZipFile(whl).read(entry).decode()
