"""The docs: README generated from index.ipynb, every chapter follows the Colab/docs
conventions, and `nbdev-proc-nbs` (the docs build up to Quarto) succeeds."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))


def _cells(nb):
    return json.loads(nb.read_text())["cells"]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_readme_is_generated_from_index():
    import make_readme
    assert (ROOT / "README.md").read_text() == make_readme.render(), \
        "README.md is stale: run `python tools/make_readme.py`"


def test_readme_names_exactly_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    cmds = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert len(cmds) == 2, cmds
    run_cmd, test_cmd = cmds
    assert "moe-explained" in run_cmd and "pip install" in run_cmd
    assert "pytest" in test_cmd and ".[dev]" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text(), ".ci/run must run the README's test command"


@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_chapter_conventions(nb):
    cells = _cells(nb)
    first = _src(cells[0])
    assert cells[0]["cell_type"] == "markdown" and re.match(r"# .+\n+> .+", first), \
        f"{nb.name}: first cell must be '# Title' then '> summary'"
    badge = f"colab.research.google.com/github/moe-explained/moe_explained/blob/main/nbs/{nb.name}"
    assert badge in _src(cells[1]), f"{nb.name}: second cell must be the Open-in-Colab badge for this notebook"
    install = _src(cells[2])
    assert cells[2]["cell_type"] == "code" and "#| hide" in install and "#| eval: false" in install \
        and "/content" in install and "pip install" in install, f"{nb.name}: third cell must be the hidden Colab install cell"
    if nb.name != "index.ipynb":
        assert any(_src(c).startswith("#| default_exp ") for c in cells if c["cell_type"] == "code"), \
            f"{nb.name}: no #| default_exp"


CHAPTERS = [p for p in NBS if re.match(r"\d\d[a-z]?_", p.name) and int(p.name[:2]) < 90]


def _visible(cell):
    return not re.search(r"^#\|\s*hide\b", _src(cell), flags=re.M)


@pytest.mark.parametrize("nb", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_reading_path(nb):
    """Every chapter ends with its exercises (two or three, each solution collapsed in <details>) after a
    'Where this is used' section, and keeps its bad-input checks out of the reading path."""
    cells = _cells(nb)
    md = [_src(c) for c in cells if c["cell_type"] == "markdown"]
    ex = [s for s in md if re.search(r"^## Exercises\b", s, flags=re.M)]
    assert len(ex) == 1, f"{nb.name}: needs one '## Exercises' section"
    body = ex[0].split("## Exercises", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\. \*\*", body, flags=re.M)
    solutions = body.count("<details><summary>Solution</summary>")
    assert 2 <= len(items) <= 3 and solutions == len(items), \
        f"{nb.name}: {len(items)} exercises, {solutions} collapsed solutions (want 2-3, one each)"
    assert body.count("<details>") == body.count("</details>"), f"{nb.name}: unbalanced <details>"
    assert any(re.search(r"^## Where this is used\b", s, flags=re.M) for s in md), f"{nb.name}: no 'Where this is used'"
    loud = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and _visible(c) and "test_fail(" in _src(c)]
    assert not loud, f"{nb.name}: visible test_fail cells {loud}: bad-input checks belong in #| hide cells or tests/"


@pytest.mark.parametrize("num", sorted({p.name[:2] for p in CHAPTERS}))
def test_every_chapter_has_a_picture(num):
    """One diagram per chapter (a chapter may be two notebooks), drawn by code in a `#| echo: false` cell (most with
    `widgets.diagram`), so the figure is stored with the outputs and renders wherever the notebook is read."""
    nbs = [p for p in CHAPTERS if p.name.startswith(num)]
    drawn = [p.name for p in nbs for c in _cells(p) if c["cell_type"] == "code" and _src(c).startswith("#| echo: false")
             and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert drawn, f"chapter {num}: no '#| echo: false' cell with a stored figure in {[p.name for p in nbs]}"


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_nbdev_proc_nbs_succeeds_and_leaves_the_checkout_clean(tmp_path, venv_tool):
    """The docs build up to Quarto, in a git checkout of this working tree (tracked and untracked-but-not-ignored
    files, committed): it must succeed and leave `git status` clean -- no tracked file rewritten (e.g. nbs/nbdev.yml
    disagreeing with pyproject.toml), no untracked file left behind (e.g. nbs/sidebar.yml)."""
    files = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / f).write_bytes((ROOT / f).read_bytes())
    _git("init", "-q", cwd=tmp_path)
    _git("add", "-A", cwd=tmp_path)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot", cwd=tmp_path)
    res = subprocess.run([venv_tool("nbdev-proc-nbs")], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert (tmp_path / "_proc").exists()
    status = _git("status", "--porcelain", "--untracked-files=all", cwd=tmp_path)
    assert status == "", f"nbdev-proc-nbs left the checkout dirty:\n{status}\n{_git('diff', cwd=tmp_path)[:3000]}"


def _mixed_import_cells(nb):
    """Code cells that hold an import *and* other code. nbdev's docs processor executes every cell
    that contains an import (to resolve `show_doc` links), so such a cell would run -- explorer,
    training loop and all -- at docs-build time, without the notebook state it relies on."""
    import ast
    bad = []
    for i, c in enumerate(_cells(nb)):
        s = _src(c)
        if c["cell_type"] != "code" or "#| eval: false" in s:
            continue
        if any(l.startswith(("#| export", "#| exporti", "#| exports", "#| exec_doc")) for l in s.splitlines()):
            continue
        try:
            tree = ast.parse("\n".join(l for l in s.splitlines() if not l.lstrip().startswith(("%", "!"))))
        except SyntaxError:
            continue
        has_import = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
        only_imports = all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)
        if has_import and not only_imports:
            bad.append(f"cell {i}: {s[:80]!r}")
    return bad


@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_imports_in_cells_of_their_own(nb):
    bad = _mixed_import_cells(nb)
    assert not bad, f"{nb.name}: move these imports into an imports-only cell:\n" + "\n".join(bad)
