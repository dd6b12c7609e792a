"""Measuring latency tables: real ONNX Runtime measurements of real layers of the bundled example (the `table_env`
fixture, tests/conftest.py, runs `edgeprune lut`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from edgeprune.cli.commands import main
from edgeprune.dependency.graph import trace
from edgeprune.inputs.models import load_model
from edgeprune.inputs.targets import load_target
from edgeprune.latency.measure_table import CALIBRATION_RANDOM, build_layer_onnx, grid_widths
from edgeprune.latency.table import LayerModel, load_lut
from edgeprune.runtimes import measure


def test_lut_table_covers_every_layer(table_env: dict) -> None:
    table = load_lut(table_env["table"])
    m = load_model("example")
    lm = LayerModel.from_model(m.module, m.example_input, trace(m.module, m.example_input), "example")
    assert {ly.signature for ly in lm.layers} <= set(table.entries)
    assert table.meta["target"] == "cpu" and table.meta["runtime"] == "onnxruntime"
    assert "example" in table.models and len(table.models["example"]["calibration"]) == 2 + CALIBRATION_RANDOM


def test_lut_entries_are_real_measurements(table_env: dict, tmp_path: Path) -> None:
    """An entry re-measured independently agrees with the table within the noise of this machine."""
    table = load_lut(table_env["table"])
    sig, e = max(table.entries.items(), key=lambda kv: kv[1]["ms"][-1][-1])
    path = build_layer_onnx(json.loads(sig), e["cin"][-1], e["cout"][-1], tmp_path / "l.onnx")
    again = measure(path, load_target(str(table_env["target"]))).median
    assert again == pytest.approx(e["ms"][-1][-1], rel=0.5)


def test_grid_widths() -> None:
    assert grid_widths(64, 16) == [16, 32, 48, 64]
    ws = grid_widths(512, 16)
    assert ws[0] == 16 and ws[-1] == 512 and all(w % 16 == 0 for w in ws) and len(ws) <= 8
    assert grid_widths(10, 16) == [10]


def test_lut_resumes_without_remeasuring(table_env: dict, tmp_path: Path) -> None:
    copy = tmp_path / "lut.json"
    shutil.copy(table_env["table"], copy)
    before = load_lut(copy).entries
    assert main(["lut", "--device", str(table_env["target"]), "--out", str(copy), "--json"]) == 0
    assert load_lut(copy).entries == before  # every signature was already there: nothing re-measured


def test_plot_lut_without_matplotlib_names_the_report_extra(tmp_path, monkeypatch, caplog):
    from edgeprune.latency.measure_table import plot_lut

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without the extra
    assert plot_lut(None, tmp_path / "lut.png") is None and not (tmp_path / "lut.png").exists()
    assert "lut.png not written" in caplog.text and "pip install 'edgeprune[report]'" in caplog.text
