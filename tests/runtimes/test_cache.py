"""The measurement cache serves only entries that hold latency figures: anything else in its file is measured again
(audit FS-cache_*: a string median exited 1 formatting it, a list exited 1 on .items(), a negative one was served)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.inputs.targets import Target
from edgeprune.runtimes import MeasurementCache, measure
from edgeprune.runtimes.stats import LatencyStats


@pytest.mark.parametrize("entry", [{"median": "fast"}, {"median": -5.0}, {"median": float("nan")},
                                   {"n": "20"}, {"repeat_medians": "0.1"}, {"repeat_medians": [0.1, None]},
                                   {"target": ["cpu"]}, [1, 2], "0.02", None])
def test_a_corrupted_entry_is_measured_again_and_rewritten(tiny_onnx: Path, fast_cpu: Target, tmp_path: Path,
                                                          entry: object) -> None:
    cache = MeasurementCache(tmp_path / "m")
    first = measure(tiny_onnx, fast_cpu, cache=cache)
    assert measure(tiny_onnx, fast_cpu, cache=cache).source == "cache"
    (path,) = (tmp_path / "m").rglob("*.json")
    good = json.loads(path.read_text())
    bad = {**good, **entry} if isinstance(entry, dict) else entry
    path.write_text(json.dumps(bad))
    again = measure(tiny_onnx, fast_cpu, cache=cache)
    assert again.source == "measured" and again.median > 0 and again.n == first.n
    assert LatencyStats.from_dict(json.loads(path.read_text())).median == again.median  # the entry rewritten


def test_profile_of_a_corrupted_entry_exits_0_with_a_fresh_figure(tiny_onnx: Path, tmp_path: Path) -> None:
    run = [sys.executable, "-m", "edgeprune", "profile", str(tiny_onnx), "--cache-dir", str(tmp_path / "c")]
    first = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    for path in (tmp_path / "c").rglob("*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "median": "fast"}))
    second = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "from cache" not in second.stdout + second.stderr and "median" in second.stdout


def test_from_dict_names_the_key_that_is_wrong() -> None:
    ok = {"median": 1.0, "p90": 1.2, "std": 0.1, "min": 0.9, "max": 1.5, "mean": 1.1, "n": 10,
          "repeat_medians": [1.0, 1.0], "target": "cpu", "runtime": "onnxruntime", "runtime_version": "1",
          "precision": "fp32"}
    assert LatencyStats.from_dict(ok).median == 1.0
    with pytest.raises(ValueError, match="median must be a finite number of milliseconds >= 0, found -5"):
        LatencyStats.from_dict({**ok, "median": -5})
    with pytest.raises(TypeError, match="must be a JSON object, found list"):
        LatencyStats.from_dict([1, 2])  # type: ignore[arg-type]
