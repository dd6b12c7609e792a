"""report/contract.py: `BuildReport.to_dict()` is report.json as builds and releases have written it (keys, values,
order), `from_dict` reads it back, report.md renders from it, and `verdict` gives the exit code both jobs give."""

from __future__ import annotations

import copy
import json
import math

import pytest

from edgeprune.errors import ExitCode
from edgeprune.report.contract import BuildReport, verdict
from edgeprune.report.render import clean, render_markdown, to_json


def latency(median: float) -> dict:
    return {"latency_ms": {"median": median, "p90": median * 1.1, "std": 0.01, "n": 5},
            "latency_source": "measured", "macs": 2.0e6, "params": 3.0e4}


def build_dict() -> dict:
    """A build's report.json, its keys in the order `build_job.build_report` has always written them."""
    return {
        "edgeprune": "0.1.0", "model": "example", "weights": None, "input_shape": [1, 1, 8, 8],
        "calibration": "digits", "target": {"name": "cpu", "profile": {"runtime": "onnxruntime"}},
        "budget": "0.5x", "budget_ms": 0.5, "met": True, "base": latency(1.0), "final": latency(0.48),
        "speedup": 1.0 / 0.48, "widths": {"c1": {"before": 16, "after": 8}},
        "fidelity": {"top1_agreement": 0.9, "output_rel_error": 0.1, "samples": 50},
        "quality_gates": {"onnx_parity": {"value": 1e-6, "limit": 1e-3, "passed": True}},
        "lut": None, "device_measurements": 4, "interleaved": False,
        "search": {"criterion": "cap", "compensation": True, "repair": "direct", "proxy": "fidelity",
                   "allocation": "latency", "outer": "strength", "channel_multiple": 8, "tolerance": 0.05,
                   "converged": True, "far_under_budget": False, "measured_candidates": 2,
                   "trace": [{"step": 1, "strength": 0.5, "latency_ms": 0.48, "source": "measured",
                              "widths_digest": "abc"}]},
        "excluded_groups": [], "exporter": "torchscript", "timings_s": {"search": 1.5},
        "versions": {"edgeprune": "0.1.0"}, "parity": {"rel_error": 1e-6}, "metric": None, "recovery": None,
        "exit_code": 0, "out": "out",
    }


def release_dict() -> dict:
    """A finetune's report.json (a release's, with its training under `finetune`)."""
    d = build_dict()
    for k in ("lut", "excluded_groups", "exporter", "recovery"):
        del d[k]
    d["search"] = {"criterion": "cap", "compensation": True, "repair": "direct", "proxy": "none (released as given)",
                   "channel_multiple": 8, "tolerance": 0.05, "converged": True, "measured_candidates": 0, "trace": []}
    out = {"edgeprune": d.pop("edgeprune"), "command": "finetune"}
    for k, v in d.items():
        out[k] = v
        if k == "calibration":
            out["widths_from"] = "finetune distill of out"
    out.pop("exit_code"), out.pop("out")
    return {**out, "quantization": {"settings": None, "float": {"top1_agreement": 0.9, "output_rel_error": 0.1},
                                   "against_float": {"top1_agreement": 0.95, "output_rel_error": 0.05,
                                                     "accuracy_drop_pp": None}},
            "finetune": {"steps": 2}, "exit_code": 4, "out": "out.failed"}


@pytest.mark.parametrize("make", [build_dict, release_dict])
def test_to_dict_is_report_json_key_for_key(make) -> None:
    d = make()
    r = BuildReport.from_dict(copy.deepcopy(d))
    assert r.to_dict() == d
    assert list(r.to_dict()) == list(d) if r.is_build else set(r.to_dict()) == set(d)
    assert json.loads(to_json(r.to_dict())) == d


def test_typed_fields() -> None:
    r = BuildReport.from_dict(release_dict())
    assert (r.command, r.target, r.final_ms, r.base_ms, r.gates_passed) == ("finetune", "cpu", 0.48, 1.0, True)
    assert r.notes == {"finetune": {"steps": 2}} and not r.is_build
    b = BuildReport.from_dict({**build_dict(), "lut": "t.json", "lut_check": {"line": "ok"}})
    assert b.is_build and b.lut_check == {"line": "ok"} and list(b.to_dict()).index("lut_check") == \
        list(b.to_dict()).index("lut") + 1


def test_markdown_renders_the_type_and_the_dict_alike() -> None:
    d = build_dict()
    d["fidelity"]["output_rel_error"] = math.nan
    md = render_markdown(BuildReport.from_dict(clean(d)), [])
    assert md == render_markdown(clean(d), [])
    assert md.startswith("# edgeprune build: example on cpu\n")
    assert "**Budget 0.5x = 0.500 ms: met** (exit code 0)" in md and "output relative error: n/a" in md
    assert "## Non-finite values" in md and "- `fidelity.output_rel_error`: nan" in md
    assert render_markdown(release_dict(), []).startswith("# edgeprune finetune: example on cpu\n")


def test_verdict_budget_then_gates_then_ok() -> None:
    r = BuildReport.from_dict(build_dict())
    assert verdict(r, "missed") == (int(ExitCode.OK), None)
    assert verdict(r.__class__(**{**r.__dict__, "met": False}), "missed") == (int(ExitCode.BUDGET_UNREACHABLE), "missed")
    gates = {"onnx_parity": {"value": 0.5, "limit": 1e-3, "passed": False}}
    failed = BuildReport.from_dict({**build_dict(), "quality_gates": gates})
    code, message = verdict(failed, "missed", "; loosen it")
    assert code == int(ExitCode.QUALITY_GATE)
    assert message.startswith("quality gate failed: onnx_parity 0.5 (limit 0.001)") and message.endswith("; loosen it")
    # the budget speaks first when both fail
    both = BuildReport.from_dict({**build_dict(), "quality_gates": gates, "met": False})
    assert verdict(both, "missed") == (int(ExitCode.BUDGET_UNREACHABLE), "missed")
