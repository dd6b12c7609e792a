"""The package's layout holds to docs/architecture.md: its layers (folders, and the few modules at the top level) in
import order, every module in its folder's row; a module imports only its own layer and the layers listed above it
(imports inside functions and `importlib` registries included), without cycles inside a folder; every module is at
most 450 lines long, no folder holds more than 12 modules, no folder or module is named after an API verb, and
no parameter that always holds one of the package's types is annotated `Any`."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator

import pytest

from edgeprune import API

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgeprune"
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 450
MAX_TOP_LEVEL, MAX_FOLDER = 10, 12  # modules (`__init__.py` and `__main__.py` included)
# Modules over MAX_LINES while they are being split (issue 14); a module leaves this list once it is short enough.
LONG_MODULES: set[str] = set()
# Names read from the package root that are not imports of __init__.py: it sets them before importing anything.
ROOT_ATTRIBUTES = {"__version__"}


def documented_layers() -> list[tuple[str, list[str]]]:
    """The rows of the table under "## Layers" in docs/architecture.md, bottom (first row) to top: a folder ("common/")
    with the modules its row lists, or a module of the top level ("errors.py") with none."""
    section = DOC.read_text().split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        layer = re.fullmatch(r"`([^`]+(?:/|\.py))`", cells[0]) if line.startswith("|") else None
        if layer:
            rows.append((layer.group(1), re.findall(r"`([^`/]+\.py)`", cells[1])))
    return rows


def documented_modules() -> list[str]:
    """The module paths of the tables under "## Modules" ("common/atomic.py", "plan.py")."""
    section = DOC.read_text().split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\|\s*`([^`]+\.py)`\s*\|", section, flags=re.MULTILINE)


def package_modules() -> dict[str, str]:
    """Every module of the package: its path relative to edgeprune/ ("runtimes/base.py") -> its dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        parts = ["edgeprune", *Path(rel).with_suffix("").parts]
        out[rel] = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return out


def layer_of(rel: str) -> str:
    """The layer a module belongs to: its folder ("common/"), or itself at the top level ("errors.py")."""
    return rel.split("/", 1)[0] + "/" if "/" in rel else rel


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


def import_graph() -> dict[str, set[str]]:
    """Module path -> the module paths it imports."""
    modules = package_modules()
    path_of = {name: rel for rel, name in modules.items()}
    return {rel: {path_of[d] for d in imports_of((PACKAGE / rel).read_text(), name, set(path_of),
                                                 package=rel.endswith("__init__.py"))}
            for rel, name in modules.items()}


def test_layers_table_lists_every_folder_and_module_once():
    layers = documented_layers()
    names = [layer for layer, _ in layers]
    assert len(layers) > 10, f"no layer table found under '## Layers' in {DOC}"
    assert len(set(names)) == len(names), f"{DOC.name} lists {sorted({n for n in names if names.count(n) > 1})} twice"
    actual: dict[str, set[str]] = {}
    for rel in package_modules():
        layer = actual.setdefault(layer_of(rel), set())
        if "/" in rel and not rel.endswith("/__init__.py"):
            layer.add(rel.split("/", 1)[1])
    documented = {layer: set(listed) for layer, listed in layers}
    missing, stale = sorted(set(actual) - set(documented)), sorted(set(documented) - set(actual))
    assert not missing and not stale, f"the layers of {DOC.name} are not the package's folders and top-level " \
                                      f"modules: missing {missing}, stale {stale}"
    wrong = {layer: (sorted(actual[layer] - listed), sorted(listed - actual[layer]))
             for layer, listed in documented.items() if listed != actual[layer]}
    assert not wrong, f"{DOC.name} lists other modules than each folder holds (missing, stale): {wrong}"


def docstring_only(rel: str) -> bool:
    """Whether a module holds nothing but its docstring (a folder's plain `__init__.py`)."""
    body = ast.parse((PACKAGE / rel).read_text()).body
    return len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def test_modules_table_describes_every_module_once():
    """Every module has a row under "## Modules", but a folder's `__init__.py` that is only a docstring."""
    described = documented_modules()
    expected = sorted(rel for rel in package_modules() if not docstring_only(rel))
    doubled = sorted({m for m in described if described.count(m) > 1})
    assert not doubled, f"{DOC.name} describes {doubled} more than once"
    assert sorted(described) == expected, f"modules missing from '## Modules' in {DOC.name}: " \
                                          f"{sorted(set(expected) - set(described))}; stale rows: " \
                                          f"{sorted(set(described) - set(expected))}"


def test_modules_import_only_their_own_layer_and_layers_listed_below():
    rank = {layer: i for i, (layer, _) in enumerate(documented_layers())}
    upward = [f"{rel} imports {dep}, whose layer {DOC.name} lists above {layer_of(rel)}"
              for rel, deps in import_graph().items() for dep in sorted(deps)
              if layer_of(rel) in rank and layer_of(dep) in rank and rank[layer_of(dep)] > rank[layer_of(rel)]]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_cycle_inside_a_folder():
    graph = import_graph()
    inside = {rel: {d for d in deps if layer_of(d) == layer_of(rel)} for rel, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(rel: str, path: list[str]) -> list[str] | None:
        state[rel] = 1
        for dep in sorted(inside[rel]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [rel, dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[rel] = 2
        return None

    for rel in sorted(inside):
        if rel not in state and (cycle := visit(rel, [rel])):
            pytest.fail("an import cycle inside a folder: " + " -> ".join(cycle))


def test_imports_of_sees_function_level_relative_and_registry_imports():
    modules = {"edgeprune", "edgeprune.latency.table", "edgeprune.runtimes", "edgeprune.runtimes.base",
               "edgeprune.runtimes.stats", "edgeprune.runtimes.tensorrt"}
    source = '''
import json
from edgeprune import __version__
from edgeprune.latency import table
from .stats import LatencyStats

def measure():
    from edgeprune.runtimes import runtime_for
    import edgeprune.runtimes.tensorrt.cuda_backend

RUNTIMES = {"tensorrt": "edgeprune.runtimes.tensorrt", "name": "edgeprune"}
'''
    assert imports_of(source, "edgeprune.runtimes.base", modules) == {
        "edgeprune.latency.table", "edgeprune.runtimes", "edgeprune.runtimes.stats", "edgeprune.runtimes.tensorrt"}
    package_source = "from . import base\nfrom ..latency.table import predict\n"
    assert imports_of(package_source, "edgeprune.runtimes", modules, package=True) == {
        "edgeprune.runtimes.base", "edgeprune.latency.table"}


def test_folders_hold_at_most_12_modules_and_the_top_level_at_most_10():
    counts: dict[str, int] = {}
    for rel in package_modules():
        folder = layer_of(rel) if "/" in rel else "."
        counts[folder] = counts.get(folder, 0) + 1
    over = {f: n for f, n in counts.items() if n > (MAX_TOP_LEVEL if f == "." else MAX_FOLDER)}
    assert not over, f"too many modules (top level at most {MAX_TOP_LEVEL}, a folder {MAX_FOLDER}): {over}; " \
                     "split the folder by job"


def test_no_folder_or_module_is_named_after_an_api_verb():
    """`edgeprune.build` and the other verbs are lazy attributes of the package: a submodule of that name anywhere
    would invite shadowing them (and renaming modules around them again)."""
    named = sorted(rel for rel in package_modules() if set(Path(rel).with_suffix("").parts) & set(API))
    assert not named, f"named after an API verb ({', '.join(API)}): {named}"


@pytest.mark.parametrize("rel", sorted(package_modules()))
def test_module_is_at_most_450_lines(rel: str):
    lines = len((PACKAGE / rel).read_text().splitlines())
    if rel in LONG_MODULES:
        assert lines > MAX_LINES, f"{rel} has {lines} lines now: take it off LONG_MODULES in {Path(__file__).name}"
    else:
        assert lines <= MAX_LINES, f"{rel} has {lines} lines; split it by job (at most {MAX_LINES})"


MAX_PARAMETERS = 10  # STYLE.md §9: more go into a config dataclass


def package_functions() -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method of the package, with its module's path."""
    for rel in package_modules():
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield rel, node


def test_no_function_takes_more_than_10_parameters():
    """Counted without `self` / `cls`, with `*args` and `**options` as one each."""
    over = []
    for rel, node in package_functions():
        a = node.args
        names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
        count = len(names) - (names[:1] in (["self"], ["cls"])) + (a.vararg is not None) + (a.kwarg is not None)
        if count > MAX_PARAMETERS:
            over.append(f"{rel}:{node.lineno} {node.name} ({count})")
    assert not over, f"functions over {MAX_PARAMETERS} parameters (group them in a dataclass): {over}"


# Parameters of these names always hold one of the package's own types (a `Target`, a `Measurer`, a `Stages`, `Tick`
# or CLI `Progress`, a `Prepared` session, a `BuildRun`, a `LoadedModel`, a latency oracle, an `on_step(Candidate)`,
# `runtimes.measure` or a stand-in returning `LatencyStats`): an annotation naming `Any` there, or none, hides a type
# that exists (issue 30). Names that also hold foreign values stay off this list: `graph`, `group`, `dg` and `node`
# (torch-pruning's), `table` (also a TOML table), `cache` (also TensorRT's calibration cache), `session` (also an
# ONNX Runtime session), `entry` and `plan` (also JSON), `data` and `calibration` (also what a user hands over).
PROJECT_TYPED = {"target", "measurer", "progress", "stages", "prep", "run", "loaded", "oracle", "on_step", "measure_fn"}


def test_no_parameter_that_always_holds_a_project_type_is_annotated_any():
    loose = []
    for rel, node in package_functions():
        a = node.args
        for p in a.posonlyargs + a.args + a.kwonlyargs:
            if p.arg in PROJECT_TYPED and (p.annotation is None or any(
                    isinstance(n, ast.Name) and n.id == "Any" for n in ast.walk(p.annotation))):
                shown = "no annotation" if p.annotation is None else ast.unparse(p.annotation)
                loose.append(f"{rel}:{node.lineno} {node.name}({p.arg}: {shown})")
    assert not loose, "parameters that hold a project type, annotated Any or not at all (name the type; " \
                      "TYPE_CHECKING imports for types of other modules):\n" + "\n".join(loose)
