"""pruned.pt's live original: a class pickled under the module path it had before the subpackages still loads."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from edgeprune.inputs.example import BasicBlock, ExampleNet
import edgeprune.inputs.example as example
from edgeprune.inputs.models import from_module
from edgeprune.report.artifacts import _live_loaded, _live_original


def test_live_original_pickled_under_an_old_module_path_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A pruned.pt written before the package's subpackages names the example's classes `edgeprune.example.*`:
    loading it allows them at their new path under the old name, and rebuilds the same module."""
    old = types.ModuleType("edgeprune.example")
    old.ExampleNet, old.BasicBlock = ExampleNet, BasicBlock
    monkeypatch.setitem(sys.modules, "edgeprune.example", old)
    for cls in (ExampleNet, BasicBlock):
        monkeypatch.setattr(cls, "__module__", "edgeprune.example")
    loaded = from_module(ExampleNet().eval(), input_shape=(1, 1, 32, 32))
    saved = _live_original(loaded)
    monkeypatch.undo()  # the classes are back at edgeprune.inputs.example; edgeprune.example is gone
    assert "edgeprune.example.ExampleNet" in saved["original_globals"] and "edgeprune.example" not in sys.modules
    rebuilt = _live_loaded({"model": loaded.spec, **saved}, tmp_path / "pruned.pt", None).module
    assert type(rebuilt) is example.ExampleNet
    torch.testing.assert_close(rebuilt(loaded.example_input), loaded.module(loaded.example_input))
