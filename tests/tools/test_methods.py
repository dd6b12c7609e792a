"""tools/bench_methods.py (`python -m tools.bench_methods`) without running a build: the summary's means over
seeds (the test-set accuracy only where every seed has one), the Markdown table's test column, and --merge joining
runs split by --seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"criterion=cap+comp": [], "criterion=l1-comp": ["--criterion", "l1", "--no-compensation"]}


@pytest.fixture(scope="module")
def bench():
    from tools import bench_methods

    return bench_methods


def case(seed: int, cap: float, l1: float, test: float | None) -> dict:
    """A (fashion, 0.5x, seed) row as bench_case writes it; `test` the cap release's test-set accuracy."""
    methods = {"criterion=cap+comp": {"accuracy": cap, "latency_ms": 0.2, "ratio_to_unpruned": 0.5, "met": True,
                                      "build_s": 40.0, "onnx": "m.onnx"},
               "criterion=l1-comp": {"accuracy": l1, "latency_ms": 0.1, "ratio_to_unpruned": 0.25, "met": True,
                                     "build_s": 20.0, "onnx": "m.onnx"}}
    row = {"model": "fashion", "budget": "0.5x", "seed": seed, "unpruned_accuracy": 0.9, "methods": methods,
           "recovery": []}
    if test is not None:
        row["unpruned_test_accuracy"] = 0.92
        methods["criterion=cap+comp"]["test_accuracy"] = test
        methods["criterion=l1-comp"]["test_accuracy"] = 0.1
    return row


def result(rows: list[dict]) -> dict:
    return {"benchmark": "methods", "repo": "/x", "methods": METHODS, "recovery": [], "passes": 5, "rows": rows}


def test_summary_means_over_seeds_and_the_test_column_only_where_every_seed_has_it(bench):
    both = bench.summarise([case(0, 0.80, 0.1, 0.90), case(1, 0.90, 0.2, 0.80)], list(METHODS))
    cap = next(s for s in both if s["method"] == "criterion=cap+comp")
    assert cap["accuracy"] == pytest.approx(0.85) and cap["accuracy_min"] == pytest.approx(0.80)
    assert cap["test_accuracy"] == pytest.approx(0.85) and cap["unpruned_test_accuracy"] == pytest.approx(0.92)
    assert "| 85.0 (92.0) |" in bench.markdown(both)
    partial = bench.summarise([case(0, 0.80, 0.1, 0.90), case(1, 0.90, 0.2, None)], list(METHODS))
    assert all(s["test_accuracy"] is None for s in partial)
    assert "test %" not in bench.markdown(partial)


def test_merge_joins_runs_split_by_seeds_and_a_case_run_twice_keeps_the_last(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result([case(0, 0.80, 0.1, None), case(1, 0.50, 0.1, None)])))
    b.write_text(json.dumps(result([case(1, 0.90, 0.3, None), case(2, 0.70, 0.2, None)])))
    out, md = tmp_path / "all.json", tmp_path / "all.md"
    p = subprocess.run([sys.executable, "-m", "tools.bench_methods", "--merge", str(a), str(b), "--out",
                        str(out), "--markdown", str(md)], capture_output=True, text=True, check=False, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    merged = json.loads(out.read_text())
    assert [r["seed"] for r in merged["rows"]] == [0, 1, 2]
    cap = next(s for s in merged["summary"] if s["method"] == "criterion=cap+comp")
    assert (cap["seeds"], cap["accuracy"]) == (3, pytest.approx(0.80))
    assert "| fashion | 0.5x | `criterion=cap+comp` | 3/3 | 80.0 (70.0) |" in md.read_text()


def test_merge_refuses_results_of_different_methods(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result([case(0, 0.8, 0.1, None)])))
    b.write_text(json.dumps({**result([case(1, 0.8, 0.1, None)]), "methods": {"criterion=cap+comp": []}}))
    p = subprocess.run([sys.executable, "-m", "tools.bench_methods", "--merge", str(a), str(b), "--out",
                        str(tmp_path / "all.json")], capture_output=True, text=True, check=False, cwd=ROOT)
    assert p.returncode == 2 and "same methods" in p.stderr
    assert not (tmp_path / "all.json").exists()


def test_recovery_rows_compare_with_the_unpruned_model_of_the_seeds_that_ran_recovery(bench):
    trained, untrained = case(0, 0.80, 0.1, None), case(1, 0.90, 0.2, None)
    trained["unpruned_accuracy"], untrained["unpruned_accuracy"] = 0.94, 0.90
    trained["recovery"] = [{"stage": "distill", "minutes": 1.0, "accuracy": 0.85, "untrained_accuracy": 0.80,
                            "met": True, "wall_s": 60.0}]
    rec = [s for s in bench.summarise([trained, untrained], list(METHODS)) if s.get("recovery")]
    assert len(rec) == 1 and rec[0]["seeds"] == 1
    assert rec[0]["unpruned_accuracy"] == pytest.approx(0.94)  # seed 0's, not the mean over both seeds (0.92)
