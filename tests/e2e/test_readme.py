"""The README's Python API blocks run as written (collected from README.md, not copied): a user who pastes them gets
what the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_api_blocks() -> None:
    blocks = python_blocks()
    assert blocks and any("edgeprune.build(" in b for b in blocks)


def test_readme_python_api_blocks_run(tmp_path: Path) -> None:
    """Run in a fresh interpreter in an empty folder, with a measurement cache of its own. The blocks assert what
    they claim (the budget met, the metric kept); this test checks they ran and left the artifacts they name."""
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(python_blocks()))
    env = {**__import__("os").environ, "EDGEPRUNE_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for d in ("out/digits", "out/digits-finetuned"):
        assert {"model.onnx", "pruned.pt", "plan.json", "report.json"} <= {f.name for f in (tmp_path / d).iterdir()}


# A module a test imports only where the hardware is there (skipped elsewhere), and the package a test's module
# imports at run time without an import statement (torchmetrics' COCO mAP, backend="pycocotools").
HARDWARE_ONLY = {"tensorrt"}
IMPORTED_AT_RUN_TIME = {"pycocotools"}


def _name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """`names` and every distribution they require, transitively (as installed here; extras' requirements aside)."""
    from importlib import metadata

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def _imports(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _tool_modules(path: Path) -> set[str]:
    """The tools/ modules a file imports: `tools.X` (or `from tools import X`) anywhere, `.X` within tools/."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tools.")}
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] == "tools":
                parts = parts[1:]
            elif node.level != 1:
                continue
            out |= {parts[0]} if parts and parts[0] else {a.name for a in node.names}
    return out


def test_the_readme_test_command_installs_every_package_the_tests_import() -> None:
    """`pip install -e '.[dev]' && python -m pytest` on a new machine: every third-party module the tests import (and
    the tools/ scripts they load) comes with edgeprune's dependencies or the dev extra. tests/tools/test_tasks.py's
    torchmetrics did not, and passed only where it happened to be installed."""
    import tomllib
    from importlib import metadata

    root = README.parent
    assert "pip install -e '.[dev]' && python -m pytest" in README.read_text()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    installed = _closure({_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]})
    tests = sorted((root / "tests").rglob("*.py"))
    local = {p.stem for p in tests} | {p.stem for p in (root / "tools").glob("*.py")} | {"edgeprune", "tests", "tools"}
    mentioned = " ".join(p.read_text() for p in tests)
    files = tests + [p for p in (root / "tools").glob("*.py") if f"{p.stem}.py" in mentioned]
    todo = list(files)
    while todo:  # the tools/ modules these import, transitively
        for m in _tool_modules(todo.pop()):
            if (root / "tools" / f"{m}.py").is_file() and root / "tools" / f"{m}.py" not in files:
                files.append(root / "tools" / f"{m}.py")
                todo.append(files[-1])
    modules = set().union(*(_imports(f) for f in files)) - set(sys.stdlib_module_names) - local - HARDWARE_ONLY
    owners = metadata.packages_distributions()
    missing = {}
    for module in sorted(modules | IMPORTED_AT_RUN_TIME):
        dists = {_name(d) for d in owners.get(module, [module])}
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, f"modules the tests import that pip install -e '.[dev]' does not bring: {missing}"
