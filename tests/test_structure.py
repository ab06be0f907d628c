"""The layering the code keeps: small modules and functions, ``vkd/`` free of Ray, the
stages importing the library at the top (not inside functions), and every stage the README
names reachable through the `vkd` command."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SOURCES = sorted(p for pkg in ("vkd", "pipelines") for p in (ROOT / pkg).rglob("*.py"))


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(_tree(path))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, f"{path.relative_to(ROOT)}: functions over 60 lines: {long}"


def _imports(node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return []


def test_the_library_imports_no_ray():
    found = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in SOURCES if p.parts[len(ROOT.parts)] == "vkd"
             for n in ast.walk(_tree(p)) for m in _imports(n) if m == "ray" or m.startswith("ray.")]
    assert not found, found


def test_stages_import_the_library_at_the_top():
    found = []
    for p in SOURCES:
        if p.parts[len(ROOT.parts)] != "pipelines":
            continue
        for fn in ast.walk(_tree(p)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{p.relative_to(ROOT)}:{n.lineno} {m}" for n in ast.walk(fn) for m in _imports(n)
                          if m == "vkd" or m.startswith(("vkd.", "pipelines"))]
    assert not found, found


def test_every_stage_the_readme_names_dispatches():
    """The README's table of stages against `vkd <stage> --help` (one process for all)."""
    table = (ROOT / "README.md").read_text().split("## What works today", 1)[1].split("\n\n", 2)[1]
    stages = re.findall(r"^\| (\w+) \| `vkd \1", table, flags=re.M)
    assert len(stages) >= 8 and "batch" in stages, stages
    code = ("import contextlib, io, sys\nfrom pipelines.cli import main\n"
            "for stage in sys.argv[1:]:\n"
            "    out = io.StringIO()\n"
            "    try:\n"
            "        with contextlib.redirect_stdout(out):\n"
            "            main([stage, '--help'])\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, (stage, done.code)\n"
            "    assert f'vkd {stage}' in out.getvalue(), (stage, out.getvalue()[:200])\n"
            "    print('ok', stage)\n")
    done = subprocess.run([sys.executable, "-c", code, *stages], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [w for s in stages for w in ("ok", s)]
