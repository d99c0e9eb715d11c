"""One test per chapter notebook: execute it exactly as `nbdev-test` does.

Each notebook runs in its own `nbdev-test` process, so cells flagged with any of
`tst_flags` in `pyproject.toml` (`notest gpu slow`) are skipped, `#| eval: false`
cells are skipped, and a notebook cannot leak state into the next one.
Set `MOE_TEST_FLAGS="slow"` (space separated) to run flagged cells too, as
`nbdev-test --flags slow` would.
"""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def _nbdev_test_cmd(nb: Path, venv_tool) -> list[str]:
    cmd = [venv_tool("nbdev-test"), str(nb), "--n-workers", "0"]
    flags = os.environ.get("MOE_TEST_FLAGS", "").strip()
    if flags:
        cmd += ["--flags", flags]
    return cmd


def test_there_are_notebooks():
    assert (ROOT / "nbs" / "index.ipynb").exists()
    assert any(p.name.startswith("00_") for p in NBS)


def _run(nb: Path, venv_tool, **env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", **env}
    res = subprocess.run(_nbdev_test_cmd(nb, venv_tool), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=int(os.environ.get("MOE_NB_TIMEOUT", "1200")))
    assert res.returncode == 0, f"{nb.name} failed under nbdev-test:\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}"


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_notebook_runs(nb: Path, venv_tool):
    "As the docs build and nbconvert see it: no widget frontend, so every explorer draws its static figure."
    _run(nb, venv_tool)


EXPLORERS = [p for p in NBS if "widgets_live" in p.read_text()]


def test_explorers_are_found():
    assert {p.stem for p in EXPLORERS} >= {"00_dense", "01_routing", "02_losses", "03_capacity", "04_mixtral_moe",
                                           "06_routing_analysis"}


@pytest.mark.notebook
@pytest.mark.parametrize("nb", EXPLORERS, ids=[p.stem for p in EXPLORERS])
def test_notebook_runs_with_live_widgets(nb: Path, venv_tool):
    """As a reader in Jupyter or Colab runs it: `MOE_EXPLAINED_WIDGETS=live` makes every explorer build and display
    its widget, so a cell that used an explorer's return value as a figure would fail here."""
    _run(nb, venv_tool, MOE_EXPLAINED_WIDGETS="live")
