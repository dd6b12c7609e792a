"""Tests of tools/: the scripts loaded by path, as edgeprune loads a `tools/NAME.py:factory` model spec."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def tool_by_path(name: str) -> Iterator[ModuleType]:
    """tools/NAME.py loaded from its file as module `tools_NAME` (registered while in use), for a fixture to yield."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"tools_{name}"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[f"tools_{name}"]
