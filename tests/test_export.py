"""The exported modules are exactly what `nbdev-export` makes of the notebooks,
and the notebooks are clean (what `nbdev-clean` leaves)."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nbdev_export_leaves_modules_unchanged(project_copy, venv_tool):
    tmp_path = project_copy
    res = subprocess.run([venv_tool("nbdev-export")], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ours = sorted(p.relative_to(ROOT) for p in (ROOT / "moe_explained").glob("*.py"))
    theirs = sorted(p.relative_to(tmp_path) for p in (tmp_path / "moe_explained").glob("*.py"))
    assert ours == theirs, f"module sets differ: {set(ours) ^ set(theirs)}"
    changed = [str(p) for p in ours if (ROOT / p).read_text() != (tmp_path / p).read_text()]
    assert not changed, f"edit the notebooks, not these exported files (or run nbdev-export): {changed}"


def test_notebooks_are_clean(project_copy, venv_tool):
    tmp_path = project_copy
    res = subprocess.run([venv_tool("nbdev-clean")], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dirty = [p.name for p in sorted((ROOT / "nbs").glob("*.ipynb"))
             if p.read_text() != (tmp_path / "nbs" / p.name).read_text()]
    assert not dirty, f"run nbdev-clean on: {dirty}"
