from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.cli.commands import main


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, *needles: str) -> None:
    """The error is one line, `edgeprune: error: ...`, and the last; before it stderr may only hold the stage lines a
    log gets (`edgeprune: <stage>`) and logged warnings, never a traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("edgeprune: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err and not any(ln.startswith(("  File ", "    ")) for ln in lines), err
    for n in needles:
        assert n in errors[0], (n, errors[0])


def test_targets_json_lists_profiles(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "targets", "--json")
    names = {t["name"] for t in json.loads(out)}
    assert code == 0 and {"cpu", "jetson-orin-nano", "rpi5"} <= names


def test_profile_json_has_latency_fields(capsys: pytest.CaptureFixture, tiny_onnx: Path, tmp_path: Path) -> None:
    target = tmp_path / "fast.toml"
    target.write_text('name = "fast"\nruntime = "onnxruntime"\n[measure]\nwarmup = 1\niterations = 5\nrepeats = 2\n')
    code, out, _ = run(capsys, "profile", str(tiny_onnx), "--device", str(target), "--json")
    d = json.loads(out)
    assert code == 0 and d["source"] == "measured"
    assert {"median", "p90", "std", "n"} <= set(d["latency_ms"]) and d["latency_ms"]["n"] == 10
    code, out, _ = run(capsys, "profile", str(tiny_onnx), "--device", str(target), "--json")
    assert json.loads(out)["source"] == "cache"
    code, out, _ = run(capsys, "profile", str(tiny_onnx), "--device", str(target), "--json", "--no-cache")
    assert json.loads(out)["source"] == "measured"


def test_profile_unknown_device_exit_2_lists_targets(capsys: pytest.CaptureFixture, tiny_onnx: Path) -> None:
    code, _, err = run(capsys, "profile", str(tiny_onnx), "--device", "nosuch")
    assert code == 2
    assert_one_line_error(err, "nosuch", "cpu", "jetson-orin-nano", "rpi5")


def test_profile_misspelt_target_key_exit_2(capsys: pytest.CaptureFixture, tiny_onnx: Path, tmp_path: Path) -> None:
    target = tmp_path / "typo.toml"
    target.write_text('name = "typo"\nruntime = "onnxruntime"\nthread = 2\n')
    code, _, err = run(capsys, "profile", str(tiny_onnx), "--device", str(target))
    assert code == 2
    assert_one_line_error(err, "typo.toml", "unknown key 'thread'")


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_profile_bad_onnx_exit_2(capsys: pytest.CaptureFixture, tiny_onnx: Path, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / f"{kind}.onnx"
    if kind == "text":
        bad.write_text("name,value\n1,2\n")
    else:
        bad.write_bytes(tiny_onnx.read_bytes()[: tiny_onnx.stat().st_size * 2 // 3])
    code, _, err = run(capsys, "profile", str(bad), "--device", "cpu")
    assert code == 2
    assert_one_line_error(err, f"{kind}.onnx")


def test_export_unknown_model_spec_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run(capsys, "export", "--model", "resnet18", "-o", str(tmp_path / "x.onnx"))
    assert code == 2
    assert_one_line_error(err, "unknown model spec 'resnet18'", "torchvision:NAME")
    code, _, err = run(capsys, "export", "--model", "torchvision:resnet19", "-o", str(tmp_path / "x.onnx"))
    assert code == 2
    assert_one_line_error(err, "resnet19", "resnet18")
    assert not (tmp_path / "x.onnx").exists()


def test_export_then_profile_example(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "export", "-o", str(tmp_path / "ex.onnx"), "--json")
    d = json.loads(out)
    assert code == 0 and d["model"] == "example" and d["parity"]["rel_error"] < 1e-4


def test_console_script_runs_without_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "edgeprune", "profile", "missing.onnx"], capture_output=True, text=True)
    assert out.returncode == 2
    assert_one_line_error(out.stderr, "missing.onnx", "does not exist")


def test_export_int8_writes_a_quantised_model_whose_figures_are_its_own(capsys: pytest.CaptureFixture,
                                                                        tmp_path: Path) -> None:
    import numpy as np
    import onnx
    import torch

    from edgeprune.inputs.data import load_data
    from edgeprune.inputs.example import INPUT_SHAPE
    from edgeprune.export.quantize import OnnxModule, has_qdq
    from edgeprune.inputs.recipe import load_recipe

    out = tmp_path / "ex8.onnx"
    code, stdout, _ = run(capsys, "export", "--int8", "--calibration", "digits", "--exporter", "torchscript", "-o",
                          str(out), "--json")
    r = json.loads(stdout)
    assert code == 0 and has_qdq(onnx.load(str(out)))
    q, fid = r["int8"], r["int8"]["fidelity"]
    assert q["settings"]["method"] == "minmax" and q["calibration_samples"] == 256 and r["parity"]["rel_error"] < 1e-4
    assert fid["samples"] == 199 and fid["top1_agreement"] >= 0.98
    # the accuracy reported is the written file's, run in ONNX Runtime
    data = load_data(load_recipe("digits"), INPUT_SHAPE)
    with torch.no_grad():
        pred = OnnxModule(out)(torch.from_numpy(data.heldout_x)).argmax(1).numpy()
    assert fid["accuracy"]["after"] == pytest.approx(float(np.mean(pred == data.heldout_y)))


@pytest.mark.parametrize("extra, words", [
    (["--int8"], "--int8 needs --calibration RECIPE"),
    (["--int8", "--calibration", "digits", "--device", "cpu"], "--device cpu is a fp32 target"),
    (["--calibration", "digits"], "--calibration and --device of export go with --int8"),
])
def test_export_int8_bad_arguments_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path, extra: list[str],
                                          words: str) -> None:
    code, _, err = run(capsys, "export", "-o", str(tmp_path / "x.onnx"), *extra)
    assert code == 2
    assert_one_line_error(err, words)
    assert not any(tmp_path.iterdir())


def test_export_int8_calibration_of_the_wrong_shape_exit_2_nothing_written(capsys: pytest.CaptureFixture,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The calibration reader checks every batch against the model's input: 16x16 samples for the 32x32 example stop
    with one line naming both shapes, not ONNX Runtime's stack trace, and -o is not written."""
    import dataclasses

    import edgeprune.inputs.data

    real = edgeprune.inputs.data.load_data

    def cropped(recipe: object, input_shape: tuple[int, ...], arrays: object = None) -> object:
        d = real(recipe, input_shape, arrays)
        return dataclasses.replace(d, calib_x=d.calib_x[..., :16, :16].copy(),
                                   heldout_x=d.heldout_x[..., :16, :16].copy())

    monkeypatch.setattr(edgeprune.inputs.data, "load_data", cropped)
    out = tmp_path / "ex8.onnx"
    code, _, err = run(capsys, "export", "--int8", "--calibration", "digits", "--exporter", "torchscript", "-o",
                       str(out))
    assert code == 2
    assert_one_line_error(err, "the calibration data yields input input of shape [1, 1, 16, 16] (float32) for batch "
                               "0; the model takes float32 1x1x32x32")
    assert not any(tmp_path.iterdir())
