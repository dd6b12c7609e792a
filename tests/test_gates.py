"""The user's metric: `--evaluate pkg.module:function` drives the metric gate; one that raises or returns a
non-number stops the build with exit 2, naming the function, before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torch import nn

from edgeprune.cli import main


def params_k(module: nn.Module) -> float:
    """A metric that falls as the model shrinks: thousands of parameters."""
    return sum(p.numel() for p in module.parameters()) / 1e3


def raises(module: nn.Module) -> float:
    raise RuntimeError("the validation set is gone")


def not_a_number(module: nn.Module) -> float:
    return math.nan


def build(tmp_path: Path, evaluate: str, *extra: str) -> tuple[int, dict | None, list[str]]:
    out = tmp_path / "b"
    code = main(["build", "--latency", "0.6x", "--tolerance", "0.3", "--proxy", "loss", "--repair", "independent",
                 "--max-steps", "4", "--evaluate", f"{__file__}:{evaluate}",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json", *extra])
    report = next((json.loads((d / "report.json").read_text()) for d in (out, Path(f"{out}.failed"))
                   if (d / "report.json").is_file()), None)
    return code, report, []


@pytest.mark.parametrize("evaluate, words", [("raises", "failed on the unpruned model: RuntimeError: the validation "
                                                        "set is gone"),
                                             ("not_a_number", "returned nan")])
def test_an_evaluate_that_fails_stops_the_build_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          evaluate: str, words: str) -> None:
    out = tmp_path / "b"
    code = main(["build", "--latency", "0.6x", "--evaluate", f"{__file__}:{evaluate}", "--out", str(out), "--json"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and err[-1].startswith("edgeprune: error: the evaluate function") and evaluate in err[-1], err
    assert words in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists() and not Path(f"{out}.failed").exists()


def test_the_metric_gate_fails_a_build_whose_metric_drops_too_far(tmp_path: Path) -> None:
    code, r, _ = build(tmp_path, "params_k", "--max-metric-drop", "0.001")
    assert code == 4 and r is not None
    gate = r["quality_gates"]["metric_drop"]
    assert not gate["passed"] and gate["value"] == pytest.approx(r["metric"]["before"] - r["metric"]["after"])
    assert r["metric"]["after"] < r["metric"]["before"]
    assert not (tmp_path / "b").exists() and (tmp_path / "b.failed" / "model.onnx").is_file()
