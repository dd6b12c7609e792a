from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.cli import main


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
