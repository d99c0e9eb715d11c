"""The installed package: cheap to import, exposes the packaged model, ships its assets, and imports nothing that
its base install does not bring."""
import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_cheap_and_has_version():
    code = "import sys, moe_explained; print(moe_explained.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].count(".") == 2 and out[1] == "False"


def test_tiny_mixtral_at_top_level():
    import moe_explained
    from moe_explained import pretrained
    assert moe_explained.tiny_mixtral is pretrained.tiny_mixtral
    assert moe_explained.TINY_MIXTRAL_PATH == pretrained.TINY_MIXTRAL_PATH
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


# ---- the base install provides every import of the library ------------------------------------------------------

def _norm(name): return re.sub(r"[-_.]+", "-", name).lower()


def _base_requirements():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(re.match(r"[A-Za-z0-9_.\-]+", d).group()) for d in deps}


def _closure(names):
    "Every distribution the base install brings: the base requirements and, recursively, theirs (markers ignored)."
    seen, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in seen: continue
        seen.add(n)
        try: reqs = md.requires(n) or []
        except md.PackageNotFoundError: continue
        todo += [_norm(re.match(r"[A-Za-z0-9_.\-]+", r).group()) for r in reqs if "extra ==" not in r]
    return seen


def _imports(path):
    "Top-level modules a library file imports, except those inside `try: ... except ImportError` (optional ones)."
    tree = ast.parse(path.read_text())
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers):
            optional |= {id(n) for b in node.body for n in ast.walk(b)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in optional: continue
        if isinstance(node, ast.Import): found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0: found.add(node.module.split(".")[0])
    return found


def test_every_library_import_is_a_declared_base_dependency():
    """Each module a library file imports is the standard library, the package itself, or belongs to a distribution
    listed in [project].dependencies: nothing comes only through the dev or notebooks extras (nbdev brings fastcore,
    ipywidgets brings IPython, ...)."""
    base, owners = _base_requirements(), md.packages_distributions()
    problems = []
    for f in sorted((ROOT / "moe_explained").glob("*.py")):
        for mod in sorted(_imports(f)):
            if mod in sys.stdlib_module_names or mod in ("moe_explained", "__future__"): continue
            dists = {_norm(d) for d in owners.get(mod, [])}
            if not dists & base: problems.append(f"{f.name} imports {mod!r} (from {sorted(dists) or 'nothing installed'})")
    assert not problems, "not in the base dependencies of pyproject.toml:\n" + "\n".join(problems)


def test_every_module_imports_with_only_the_base_install(tmp_path):
    """Import every module of the library in an interpreter that sees only the standard library, this checkout and
    the distributions the base install brings (linked into a fresh site folder, with their metadata): none of the dev
    or notebooks extras (nbdev, pandas, ipywidgets, IPython, pytest, ...) is there to be imported by accident."""
    allowed = _closure(_base_requirements())
    site = tmp_path / "site"
    site.mkdir()
    linked = set()
    for d in md.distributions():
        if _norm(d.metadata["Name"]) not in allowed: continue
        for f in d.files or []:
            top = f.parts[0]
            if top in linked or top.endswith((".pth", "__pycache__")) or top == "..": continue
            src = Path(d.locate_file(top))
            if src.exists(): (site / top).symlink_to(src); linked.add(top)
    assert not {"nbdev", "pandas", "ipywidgets", "IPython", "pytest"} & linked
    modules = sorted(p.stem for p in (ROOT / "moe_explained").glob("*.py") if not p.stem.startswith("__"))
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(site)!r}]\n"
            f"import importlib\n"
            f"for m in {modules!r}: importlib.import_module('moe_explained.' + m)\n"
            f"import moe_explained; moe_explained.tiny_mixtral\n"
            f"from moe_explained.widgets import widgets_live; assert widgets_live() is False\n"
            f"print('ok')")
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
