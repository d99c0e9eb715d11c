"""Shared test set-up: nothing in the suite may wait on a network."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# load_offloaded(..., experts_bits=...) converts into a cache folder: the tests' own, never the user's
import atexit, tempfile
os.environ["MOE_EXPLAINED_CACHE"] = _CACHE = tempfile.mkdtemp(prefix="moe-explained-test-cache-")
atexit.register(lambda: __import__("shutil").rmtree(_CACHE, ignore_errors=True))


import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _venv_tool(name: str) -> str:
    "The console script `name` of the running interpreter's environment (so tests use this venv's nbdev etc.)."
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


@pytest.fixture
def venv_tool():
    return _venv_tool


@pytest.fixture
def project_copy(tmp_path):
    "A scratch copy of what nbdev's commands read and write: pyproject, README, nbs/, the package (without the model)."
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs")
    shutil.copytree(ROOT / "moe_explained", tmp_path / "moe_explained",
                    ignore=shutil.ignore_patterns("__pycache__", "models"))
    return tmp_path


import pytest


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    "A tiny Mixtral in the hub layout: sharded safetensors (layers straddle shards) and an index."
    from helpers import tiny_mixtral_model
    d = tmp_path_factory.mktemp('hub') / 'repo'
    tiny_mixtral_model().save_pretrained(d, max_shard_size='60KB')
    assert len(list(d.glob('*.safetensors'))) > 4
    return d
