"""tools/ as a package: every script imports as `tools.NAME` (run as `python -m tools.NAME` from the repository root)
without editing sys.path, and tools/harness.py's pieces the benchmarks share: build and export command lines, where
a build released its model, the budget a case's later builds aim at, the checkout and model checks, Markdown tables."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools import harness

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__")


def test_no_tool_edits_sys_path_or_imports_a_sibling_as_a_top_level_module() -> None:
    for stem in SCRIPTS:
        tree = ast.parse((ROOT / "tools" / f"{stem}.py").read_text())
        assert "sys.path" not in ast.unparse(tree), stem
        top = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        top |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not top & set(SCRIPTS), (stem, top & set(SCRIPTS))


def test_the_harness_scripts_run_as_modules_from_the_repository_root() -> None:
    p = subprocess.run([sys.executable, "-m", "tools.bench_accuracy", "--help"], cwd=ROOT, capture_output=True,
                       text=True, check=False)
    assert p.returncode == 0 and "python -m tools.bench_accuracy" in p.stdout, p.stderr
    for name in ("bench_accuracy", "bench_methods", "bench_tasks", "bench_int8", "bench_families"):
        assert callable(importlib.import_module(f"tools.{name}").main)


def test_a_model_file_loaded_by_path_builds_the_same_net_as_the_package_module() -> None:
    """edgeprune loads `tools/fashion.py:make_net` by path, outside the package: conv_bn comes from zoo.py there too."""
    import torch

    from edgeprune.inputs.models import load_callable
    from tools import fashion

    torch.manual_seed(0)
    by_path = load_callable(f"{ROOT / 'tools' / 'fashion.py'}:FashionNet")()
    torch.manual_seed(0)
    packaged = fashion.FashionNet()
    assert str(by_path) == str(packaged)
    for a, b in zip(by_path.state_dict().values(), packaged.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_build_and_export_command_lines() -> None:
    model = {"spec": "example", "input_shape": "1,1,32,32"}
    args = harness.build_args(model, "0.5x", Path("r.toml"), Path("w/out"), Path("w/cache"), ["--criterion", "l1"],
                              seed=3)
    assert args == ["build", "--model", "example", "--input-shape", "1,1,32,32", "--device", "cpu", "--latency",
                    "0.5x", "--calibration", "r.toml", "--seed", "3", "--out", "w/out", "--cache-dir", "w/cache",
                    "--json", "--criterion", "l1"]
    assert "--seed" not in harness.build_args(model, "0.5x", "random", Path("o"), Path("c"), [], device="cpu-int8")
    assert harness.export_args(model, Path("b.onnx"))[-3:] == ["--exporter", "torchscript", "--json"]
    assert harness.export_args(model, Path("b.onnx"), "r.toml")[-5:] == ["--int8", "--calibration", "r.toml",
                                                                         "--device", "cpu-int8"]


def test_released_folder_and_the_budget_later_builds_aim_at() -> None:
    out = Path("w/out")
    assert harness.released_folder({}, out, 0) == out
    assert harness.released_folder({}, out, 3) == Path("w/out.failed")
    assert harness.released_folder({"out": "elsewhere"}, out, 4) == Path("elsewhere")
    assert harness.same_budget("0.5x", None) == "0.5x"
    assert harness.same_budget("0.5x", {"budget_ms": None}) == "0.5x"
    assert harness.same_budget("0.5x", {"budget_ms": 1.25}) == "1.25000ms"


def test_checkout_and_choose_refuse_with_a_usage_error(tmp_path: Path) -> None:
    ap = argparse.ArgumentParser()
    assert harness.checkout(ap, str(ROOT)) == ROOT
    with pytest.raises(SystemExit):
        harness.checkout(ap, str(tmp_path))
    assert harness.choose(ap, "example", harness.model_table(), "model") == ["example"]
    with pytest.raises(SystemExit):
        harness.choose(ap, "example,nope", harness.model_table(), "model")


def test_markdown_table_and_cells() -> None:
    assert harness.table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert (harness.pct(0.1234), harness.ms(1.0), harness.ratio(0.5), harness.num(None, ".1f")) == \
        ("12.3", "1.000", "0.50x", "-")


def test_accuracy_and_timing_on_an_onnx_model(tmp_path: Path) -> None:
    """A fixed-batch ONNX classifier: accuracy runs it one sample at a time; interleaved timing gives every model a
    median per pass."""
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, torch.randn(1, 4), str(path), dynamo=False)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    assert harness.accuracy(path, x, y) == 1.0
    lat = harness.interleaved({"a": path, "b": path}, passes=2)
    assert set(lat) == {"a", "b"} and all(len(v["passes_ms"]) == 2 and v["median_ms"] > 0 for v in lat.values())


def test_a_build_row_from_the_report_of_a_build_that_missed_its_budget(tmp_path: Path, monkeypatch) -> None:
    """bench_accuracy's and bench_methods' rows from `edgeprune build --json` (here a stand-in that exits 3 with a
    report and no `out`): the model released under OUT.failed, the figures taken from the report."""
    from tools import bench_accuracy, bench_methods

    report = {"met": False, "budget_ms": 1.0, "base": {"latency_ms": {"median": 2.0}},
              "final": {"latency_ms": {"median": 1.1}, "macs": 5, "params": 7},
              "search": {"measured_candidates": 4, "proxy": "fidelity"}, "timings_s": {"measure": 1.0}}
    calls = []

    def fake(repo, args, log):
        calls.append(args)
        return 3, json.dumps(report), 1.234

    monkeypatch.setattr(harness, "run_edgeprune", fake)
    model = {"spec": "example", "input_shape": "1,1,32,32"}
    work = tmp_path / "case"
    row = bench_accuracy.build(ROOT, model, "0.5x", 1, Path("r.toml"), ["--criterion", "l1"], work)
    assert row["onnx"] == f"{work / 'out'}.failed/model.onnx" and row["exit_code"] == 3 and row["wall_s"] == 1.23
    assert (row["met"], row["final_ms"], row["measured_candidates"], row["params"]) == (False, 1.1, 4, 7)
    assert calls[-1][-2:] == ["--criterion", "l1"] and "--seed" in calls[-1]
    row = bench_methods.build(ROOT, model, "1.00000ms", 1, Path("r.toml"), [], work)
    assert (row["out"], row["build_s"], row["build_final_ms"]) == (f"{work / 'out'}.failed", 1.23, 1.1)
