"""The house rules, checked: the layers (import-linter), no import cycle, no module over 450
lines, at most two functions over 80 lines (each saying why), and `idx --help` without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("phisearch.indexer", "phisearch.search", "phisearch.ui")


def sources() -> list[Path]:
    return sorted(p for d in ("indexer", "search", "ui") for p in (REPO / d).rglob("*.py"))


def test_layers_hold():
    r = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_no_import_cycle():
    graph = grimp.build_graph(*PACKAGES)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append((module, imported))
    assert not cycles, cycles[:5]


def test_modules_and_functions_stay_small():
    big = [(p.name, n) for p in sources() if (n := len(p.read_text().splitlines())) > 450]
    assert not big, big
    long = []
    for p in sources():
        for f in ast.walk(ast.parse(p.read_text())):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and f.end_lineno - f.lineno + 1 > 80:
                long.append((p.name, f.name, "Over 80 lines because" in (ast.get_docstring(f) or "")))
    assert len(long) <= 2 and all(reason for *_, reason in long), long


def test_help_imports_no_torch():
    code = "import sys; from phisearch.ui.cli import app; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


# Folder names that GitHub's Python .gitignore template and common global ignore files drop
# (and pytest's default norecursedirs skips): a new module under one would be silently lost.
IGNORED_NAMES = {"build", "dist", "develop-eggs", "downloads", "eggs", "lib", "lib64", "parts",
                 "sdist", "var", "wheels", "env", "venv", "site", "target"}


def test_no_package_folder_has_a_commonly_ignored_name():
    bad = [str(p.relative_to(REPO)) for d in ("indexer", "search", "ui")
           for p in (REPO / d).rglob("*") if p.is_dir() and p.name in IGNORED_NAMES]
    assert not bad, f"rename these (a common .gitignore drops them): {bad}"
