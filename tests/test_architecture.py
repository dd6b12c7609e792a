"""The package's layout holds to docs/architecture.md: every module is in its table, imports only modules listed
above it (imports inside functions and `importlib` registries included), and is at most 450 lines long."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgeprune"
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 450
# Modules over MAX_LINES while they are being split (issue 14); a module leaves this list once it is short enough.
LONG_MODULES: set[str] = set()
# Names read from the package root that are not imports of __init__.py: it sets them before importing anything.
ROOT_ATTRIBUTES = {"__version__"}


def documented_order() -> list[str]:
    """The module paths of the table under "## Modules" in docs/architecture.md, bottom (first row) to top."""
    text = DOC.read_text()
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\|\s*`([^`]+\.py)`\s*\|", section, flags=re.MULTILINE)


def package_modules() -> dict[str, str]:
    """Every module of the package: its path relative to edgeprune/ ("runtimes/base.py") -> its dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        parts = ["edgeprune", *Path(rel).with_suffix("").parts]
        out[rel] = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return out


def imports_of(source: str, name: str, modules: set[str], package: bool = False) -> set[str]:
    """The package modules (dotted names) that the module `name` imports anywhere in `source`.

    `from X import Y` imports X.Y when that is a module, else X; a string constant that names a package module
    ("edgeprune.runtimes.tensorrt") is a registry entry loaded with importlib, so it counts as an import too."""
    found: set[str] = set()

    def add(dotted: str) -> None:
        while dotted and dotted not in modules:  # `import edgeprune.runtimes.stats.x` -> the module it names
            dotted = dotted.rpartition(".")[0]
        if dotted:
            found.add(dotted)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "edgeprune":
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                here = name.split(".") if package else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "edgeprune":
                continue
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif not (base == "edgeprune" and alias.name in ROOT_ATTRIBUTES):
                    add(base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("edgeprune.") \
                and node.value in modules:
            found.add(node.value)
    found.discard(name)
    return found


def test_architecture_table_lists_every_module_once():
    order = documented_order()
    modules = package_modules()
    assert len(order) > 20, f"no module table found under '## Modules' in {DOC}"
    doubled = sorted({m for m in order if order.count(m) > 1})
    missing = sorted(set(modules) - set(order))
    stale = sorted(set(order) - set(modules))
    assert not doubled, f"{DOC.name} lists {doubled} more than once"
    assert not missing, f"modules missing from the table in {DOC.name} (add a row where their imports put them): " \
                        f"{missing}"
    assert not stale, f"{DOC.name} lists modules that do not exist: {stale}"


def test_modules_import_only_modules_listed_below_them():
    order = documented_order()
    modules = package_modules()
    rank = {modules[rel]: i for i, rel in enumerate(order) if rel in modules}
    path_of = {name: rel for rel, name in modules.items()}
    upward = []
    for rel, name in modules.items():
        if name not in rank:
            continue  # reported by the test above
        source = (PACKAGE / rel).read_text()
        for dep in sorted(imports_of(source, name, set(path_of), package=rel.endswith("__init__.py"))):
            if dep in rank and rank[dep] > rank[name]:
                upward.append(f"{rel} imports {path_of[dep]}, which {DOC.name} lists above it")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_imports_of_sees_function_level_relative_and_registry_imports():
    modules = {"edgeprune", "edgeprune.lookup", "edgeprune.runtimes", "edgeprune.runtimes.base",
               "edgeprune.runtimes.stats", "edgeprune.runtimes.tensorrt"}
    source = '''
import json
from edgeprune import __version__
from edgeprune import lookup
from .stats import LatencyStats

def measure():
    from edgeprune.runtimes import runtime_for
    import edgeprune.runtimes.tensorrt.cuda_backend

RUNTIMES = {"tensorrt": "edgeprune.runtimes.tensorrt", "name": "edgeprune"}
'''
    assert imports_of(source, "edgeprune.runtimes.base", modules) == {
        "edgeprune.lookup", "edgeprune.runtimes", "edgeprune.runtimes.stats", "edgeprune.runtimes.tensorrt"}
    package_source = "from . import base\nfrom ..lookup import predict\n"
    assert imports_of(package_source, "edgeprune.runtimes", modules, package=True) == {
        "edgeprune.runtimes.base", "edgeprune.lookup"}


@pytest.mark.parametrize("rel", sorted(package_modules()))
def test_module_is_at_most_450_lines(rel: str):
    lines = len((PACKAGE / rel).read_text().splitlines())
    if rel in LONG_MODULES:
        assert lines > MAX_LINES, f"{rel} has {lines} lines now: take it off LONG_MODULES in {Path(__file__).name}"
    else:
        assert lines <= MAX_LINES, f"{rel} has {lines} lines; split it by job (at most {MAX_LINES})"
