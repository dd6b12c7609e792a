"""The user's metric: `--evaluate pkg.module:function` drives the metric gate; one that raises or returns a
non-number stops the build with exit 2, naming the function, before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torch import nn

from edgeprune.cli.commands import main


def params_k(module: nn.Module) -> float:
    """A metric that falls as the model shrinks: thousands of parameters."""
    return sum(p.numel() for p in module.parameters()) / 1e3


def raises(module: nn.Module) -> float:
    raise RuntimeError("the validation set is gone")


def not_a_number(module: nn.Module) -> float:
    return math.nan


def slow(module: nn.Module) -> float:
    import time

    time.sleep(600)
    return 1.0


def vandal(module: nn.Module) -> float:
    """Zeroes the module it is given and leaves it training (audit API-eval_mutates), then scores the wreck."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    module.train()
    return params_k(module)


def build(tmp_path: Path, evaluate: str, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "b"
    code = main(["build", "--latency", "0.6x", "--tolerance", "0.3", "--proxy", "loss", "--repair", "independent",
                 "--max-steps", "4", "--evaluate", f"{__file__}:{evaluate}",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json", *extra])
    report = next((json.loads((d / "report.json").read_text()) for d in (out, Path(f"{out}.failed"))
                   if (d / "report.json").is_file()), None)
    return code, report


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
    code, r = build(tmp_path, "params_k", "--max-metric-drop", "0.001")
    assert code == 4 and r is not None
    gate = r["quality_gates"]["metric_drop"]
    assert not gate["passed"] and gate["value"] == pytest.approx(r["metric"]["before"] - r["metric"]["after"])
    assert r["metric"]["after"] < r["metric"]["before"]
    assert not (tmp_path / "b").exists() and (tmp_path / "b.failed" / "model.onnx").is_file()


def test_assess_int8_judges_the_quantised_model_and_keeps_the_float_pruned_figures(pruned_example: dict) -> None:
    """For an int8 target the gates, the fidelity and the user's evaluate see the quantised model in ONNX Runtime
    (`OnnxModule`); the float pruned model's figures and the cost of quantisation alone are kept beside them."""
    import torch

    from edgeprune.config import BuildConfig, PruneConfig
    from edgeprune.quality.fidelity import fidelity
    from edgeprune.quality.gates import assess
    from edgeprune.export.quantize import OnnxModule, Quantizer
    from edgeprune.inputs.targets import load_target

    prep, pruned = pruned_example["prep"], pruned_example["pruned"]
    x, y = torch.from_numpy(prep.data.heldout_x), torch.from_numpy(prep.data.heldout_y)
    seen: list[str] = []

    def top1(module: nn.Module) -> float:
        seen.append(type(module).__name__)
        return float((module(x).argmax(1) == y).double().mean())

    config = BuildConfig(prune=PruneConfig(), evaluate=top1, max_accuracy_drop=1.0, min_agreement=0.98)
    q = Quantizer(load_target("cpu-int8").quantization, prep.data.calib_x)(pruned_example["onnx"])
    before = top1(prep.loaded.module)
    a = assess(config, prep.loaded.module, pruned, prep.loaded.example_input, prep.data, prep.base_outputs, before,
               pruned_example["onnx"], q)
    assert seen == ["ExampleNet", "ExampleNet", "OnnxModule"]  # before, the float pruned model, the quantised one
    float_fid = fidelity(prep.loaded.module, pruned, prep.data, prep.base_outputs)
    assert a.fidelity == fidelity(prep.loaded.module, OnnxModule(q), prep.data, prep.base_outputs)
    assert a.fidelity.output_rel_error != float_fid.output_rel_error
    assert a.quantization["float"] == float_fid.to_dict()
    cost = a.quantization["against_float"]
    assert cost["top1_agreement"] >= 0.98
    assert cost["accuracy_drop_pp"] == pytest.approx(100 * (float_fid.accuracy_after - a.fidelity.accuracy_after))
    assert a.metric["after"] == pytest.approx(a.fidelity.accuracy_after)  # evaluate ran on the quantised model
    assert a.metric["after_float"] == pytest.approx(float_fid.accuracy_after)
    assert a.metric["quantization_drop"] == pytest.approx(a.metric["after_float"] - a.metric["after"])
    assert a.gates["accuracy_drop_pp"]["value"] == pytest.approx(a.fidelity.accuracy_drop_pp)
    assert a.gates["onnx_parity"]["passed"] and a.parity.rel_error < 1e-4  # the float export against torch


def test_evaluate_gets_a_copy_and_cannot_change_the_model_edgeprune_prunes(tmp_path: Path) -> None:
    """An evaluate that zeroed what it was given made the build release the all-zero model with exit 0 ("met"):
    it zeroed edgeprune's working copy of the unpruned model. Now it gets a copy of its own."""
    import numpy as np
    import onnx
    import torch

    from edgeprune.config import BuildConfig, PruneConfig
    from edgeprune.quality.gates import run_metric
    from edgeprune.inputs.models import load_model

    module = load_model("example").module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    config = BuildConfig(prune=PruneConfig(), evaluate=vandal)
    assert run_metric(config, module, "the unpruned model") == pytest.approx(params_k(module))
    assert not module.training and all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    code, r = build(tmp_path, "vandal")
    assert code == 0 and r is not None and r["fidelity"]["top1_agreement"] > 0.9, r and r["fidelity"]
    weights = sum(float(np.abs(onnx.numpy_helper.to_array(t)).sum())
                  for t in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.initializer)
    assert weights > 100  # was 0.0: the released model.onnx held the zeroed weights


def test_an_evaluate_past_its_timeout_stops_the_job_with_exit_2_naming_it(tmp_path: Path) -> None:
    """An evaluate that sleeps 600 s ran unbounded (killed at 180 s by the audit's timeout)."""
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edgeprune", "build", "--latency", "0.6x", "--evaluate",
                        f"{__file__}:slow", "--evaluate-timeout", "2", "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line == ("edgeprune: error: the evaluate function slow ran past --evaluate-timeout 2 s on the unpruned "
                    "model; make it faster (fewer samples) or raise --evaluate-timeout (evaluate_timeout= in Python)")
    assert time.monotonic() - t0 < 120 and not (tmp_path / "b").exists()
    bad = subprocess.run([sys.executable, "-m", "edgeprune", "build", "--evaluate-timeout", "nan"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "--evaluate-timeout must be a number of seconds in (0, 86400]" in bad.stderr


# ---------------------------------------------------------------- the default agreement gate (issue 28)


def plain_build(tmp_path: Path, *extra: str) -> tuple[int, dict | None]:
    """The bundled example (digits, real calibration data) at 0.3x without the repair: slicing channels alone keeps
    the unpruned model's prediction on about a tenth of the held-out digits (README's methods table)."""
    out = tmp_path / "b"
    code = main(["build", "--latency", "0.3x", "--tolerance", "0.5", "--no-compensation", "--max-steps", "4",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json", *extra])
    report = next((json.loads((d / "report.json").read_text()) for d in (out, Path(f"{out}.failed"))
                   if (d / "report.json").is_file()), None)
    return code, report


def test_a_build_that_loses_its_predictions_fails_the_default_gate_with_the_way_out(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, report = plain_build(tmp_path)
    err = capsys.readouterr().err
    assert report is not None and report["met"]
    gate = report["quality_gates"]["top1_agreement"]
    assert gate["default"] and gate["limit"] == 0.9 and gate["value"] < 0.9 and not gate["passed"]
    assert code == 4
    assert not (tmp_path / "b").exists() and (tmp_path / "b.failed" / "model.onnx").is_file()
    line = next(ln for ln in err.splitlines() if ln.startswith("edgeprune: error:"))
    assert f"{100 * gate['value']:.1f}% of the held-out samples, under the 90% default gate" in line
    for way_out in ("--recover MINUTES", "--latency 0.4x", "--min-agreement"):
        assert way_out in line


def test_min_agreement_0_turns_the_default_gate_off(tmp_path: Path) -> None:
    code, report = plain_build(tmp_path, "--min-agreement", "0")
    assert report is not None and "top1_agreement" not in report["quality_gates"]
    assert report["fidelity"]["top1_agreement"] < 0.9  # the same model the default gate refuses
    assert code == 0 and (tmp_path / "b" / "model.onnx").is_file()


def test_random_calibration_data_has_no_default_gate_and_says_so(tmp_path: Path) -> None:
    from edgeprune.quality.gates import DEFAULT_MIN_AGREEMENT, agreement_gate
    from edgeprune.config import BuildConfig, PruneConfig

    config = BuildConfig(prune=PruneConfig())
    assert agreement_gate(config, "random") == (None, False)
    assert agreement_gate(config, "digits") == (DEFAULT_MIN_AGREEMENT, True)
    assert agreement_gate(BuildConfig(prune=PruneConfig(), min_agreement=0.5), "random") == (0.5, False)
