"""The bad-input matrix (`../shared/audit/reliability-matrix.md`) as tests: every case that gave a traceback, an
unclear message, data loss, a silent wrong result or a hang now gives its documented exit code, one line
`edgeprune: error: ...` naming what to do, and leaves the user's files, `--out` and the temporary folder as they were.

In-process rows run `edgeprune.cli.commands.main` in a scratch folder (`cwd`) with a private TMPDIR; the signal rows run
`python -m edgeprune` in a subprocess and send it a real SIGTERM; the agent rows talk to a real agent on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeprune.cli.commands import main
from tests.badinputs import make_fixtures
from tests.cli.test_commands import assert_one_line_error


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("matrix")
    make_fixtures(root)
    return root


@pytest.fixture
def scratch(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = the fixtures' root; TMPDIR = an empty folder of this test (checked empty afterwards)."""
    tmpdir = tmp_path / "TMPDIR"
    tmpdir.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.setenv("EDGEPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmpdir


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    code: int
    phrase: str  # the message must contain it
    out: str | None = None  # the path the command would write: must not exist afterwards (exit != 0)


P = ("prune", "--ratio", "0.5", "--exporter", "torchscript")
TINY = ("--input-shape", "1,3,16,16")
EXPORT = ("export", "--exporter", "torchscript", "-o", "out/m.onnx")

CASES = [
    # target files and measurement settings
    Case("T08", ("profile", "fx/good.onnx", "--device", "fx/t_hugeiter.toml", "--no-cache"), 2,
         "measure.iterations must be in 1..100000"),
    Case("T07", ("profile", "fx/good.onnx", "--device", "fx/t_negrepeats.toml"), 2,
         "target file fx/t_negrepeats.toml: measure.repeats must be in 1..100"),
    Case("T18", ("profile", "fx/good.onnx", "--device", "fx/t_nan_maxsec.toml"), 2, "max_seconds must be"),
    Case("R03", ("profile", "fx/good.onnx", "--device", "fx/t_remote_negtimeout.toml"), 2, "timeout_s must be"),
    Case("R04", ("profile", "fx/good.onnx", "--device", "fx/t_remote_badport.toml"), 2, "'http://127.0.0.1:notaport' is malformed"),
    # ONNX files
    Case("X04", ("profile", "fx/dyn.onnx", "--no-cache"), 2, "symbolic dimensions"),
    Case("X07", ("profile", "fx/ext_traversal.onnx"), 2, "external weight data that edgeprune does not read"),
    Case("X08", ("profile", "fx/ext_abs.onnx"), 2, "external weight data that edgeprune does not read"),
    Case("X11", ("profile", "fx"), 2, "ONNX file fx is a folder"),
    # models and weights
    Case("M03", (*EXPORT, "--model", "fx/bad_models.py:raises", *TINY), 2,
         "model factory fx/bad_models.py:raises failed: RuntimeError: boom", "out/m.onnx"),
    Case("M17", (*EXPORT, "--seed", str(2**70)), 2, "--seed must be an integer in 0..2**63-1", "out/m.onnx"),
    Case("W01", (*EXPORT, "--weights", "fx/evil.pt"), 2, "loading them could run code", "out/m.onnx"),
    Case("W02", (*EXPORT, "--model", "fx/bad_models.py:tiny", *TINY, "--weights", "fx/other_model_sd.pt"), 2,
         "do not fit the model", "out/m.onnx"),
    Case("W04", (*EXPORT, "--weights", "fx/random.pt"), 2, "is not a PyTorch checkpoint", "out/m.onnx"),
    Case("W05", (*EXPORT, "--model", "fx/bad_models.py:tiny", *TINY, "--weights", "fx/wrongshape_sd.pt"), 2,
         "head.weight [5, 16] in the file, [10, 16] in the model", "out/m.onnx"),
    Case("W06", (*EXPORT, "--weights", "fx"), 2, "weights fx is a folder", "out/m.onnx"),
    Case("M11", (*P, "--model", "fx/bad_models.py:value_branch", *TINY, "--calibration", "fx/c_spike_calib.toml",
                 "--out", "out/m11"), 2, "layer conv_c runs on the calibration data but not on the example input",
         "out/m11"),
    Case("M11h", (*P, "--model", "fx/bad_models.py:value_branch", *TINY, "--calibration",
                  "fx/c_spike_heldout.toml", "--out", "out/m11h"), 2, "layer conv_c runs on the held-out data",
         "out/m11h"),
    Case("M10", (*P, "--model", "fx/bad_models.py:batch_branch", *TINY, "--calibration", "fx/c_rand64.toml",
                 "--out", "out/m10"), 2, "runs on the first calibration batch", "out/m10"),
    Case("M12", (*P, "--model", "fx/bad_models.py:batch1_only", *TINY, "--calibration", "fx/c_rand64.toml",
                 "--out", "out/m12"), 2, "fails on the first calibration batch (batches of 16)", "out/m12"),
    Case("M15", (*P, "--model", "fx/bad_models.py:nan_weights", *TINY, "--calibration", "fx/c_rand64.toml",
                 "--out", "out/m15"), 2, "its parameter conv_a.weight holds 1 non-finite values", "out/m15"),
    Case("M15b", ("build", "--model", "fx/bad_models.py:nan_weights", *TINY, "--calibration", "fx/c_rand64.toml",
                  "--min-agreement", "0.99", "--out", "out/m15b"), 2, "non-finite outputs", "out/m15b"),
    Case("M18", (*P, "--ignore", "re:(", "--calibration", "fx/c_rand64.toml", "--out", "out/m18"), 2,
         "--ignore 're:(' is not a valid regular expression", "out/m18"),
    Case("M19", (*P, "--calibration", "fx/c_negseed.toml", "--out", "out/m19"), 2,
         "seed must be an integer in 0..2**63-1, found -1", "out/m19"),
    Case("M20", (*P, "--criterion", "random", "--seed", "-1", "--calibration", "fx/c_rand64.toml", "--out", "out/m20"),
         2, "--seed must be an integer", "out/m20"),
    Case("M21", (*P, "--model", "fx/bad_models.py:non_tensor_out", *TINY, "--calibration", "fx/c_rand64.toml",
                 "--out", "out/m21"), 2, "returns str at 'label'", "out/m21"),
    # calibration data
    Case("C_hugecount", (*P, "--calibration", "fx/c_hugecount.toml", "--out", "out/c"), 2, "GiB", "out/c"),
    Case("C_notnpy", (*P, "--calibration", "fx/c_notnpy.toml", "--out", "out/c"), 2,
         "is not a NumPy .npy file", "out/c"),
    Case("C_objects", (*P, "--calibration", "fx/c_objects.toml", "--out", "out/c"), 2,
         "holds Python objects (dtype object)", "out/c"),
    # budgets
    Case("L_1e400ms", ("build", "--latency", "1e400ms", "--calibration", "fx/c_rand64.toml", "--json", "--out",
                       "out/l_inf"), 2, "--latency must be a finite budget", "out/l_inf"),
    # outputs
    Case("O06", ("export", "--exporter", "torchscript", "-o", "fx"), 2, "-o fx is a folder"),
    Case("O09", ("export", "--exporter", "torchscript", "-o", "fx/good.onnx/m.onnx"), 2, "cannot write -o"),
    Case("O02", (*P, "--calibration", "fx/c_rand64.toml", "--out", "fx/good.onnx/p"), 2, "cannot write --out"),
    Case("O07", ("lut", "--device", "fx/t_ok.toml", "--out", "fx"), 2, "latency table fx is a folder"),
    # latency tables
    Case("U04", ("build", "--device", "fx/t_ok.toml", "--lut", "luts/trunc.json", "--calibration",
                 "fx/c_rand64.toml", "--out", "out/u4"), 2, "--out luts/trunc.json --fresh", "out/u4"),
    Case("U08", ("lut", "--device", "fx/t_ok.toml", "--out", "luts/trunc.json"), 2, "--out luts/trunc.json --fresh"),
    Case("U06", ("build", "--device", "fx/t_ok.toml", "--lut", "luts/edited_digest.json", "--calibration",
                 "fx/c_rand64.toml", "--out", "out/u6"), 2, "offset_ms, scale and base_ms must be numbers", "out/u6"),
    Case("U06b", ("build", "--device", "fx/t_ok.toml", "--lut", "luts/edited_digest2.json", "--calibration",
                  "fx/c_rand64.toml", "--out", "out/u6b"), 2, "cin and cout must be increasing lists", "out/u6b"),
    Case("U09", ("build", "--device", "fx/t_ok.toml", "--lut", "luts/empty_ok.json", "--calibration",
                 "fx/c_rand64.toml", "--out", "out/u9"), 2, "--device fx/t_ok.toml --out luts/empty_ok.json",
         "out/u9"),
    # the agent's command line
    Case("A12", ("agent", "--port", "0", "--token-file", "fx/token_nonutf8"), 2, "is not UTF-8 text"),
    Case("A13", ("agent", "--port", "0", "--token-file", "fx/token", "--max-request-mb", "nan"), 2,
         "--max-request-mb must be a size"),
    Case("A13b", ("agent", "--port", "0", "--token-file", "fx/token", "--max-request-mb", "inf"), 2,
         "--max-request-mb must be a size"),
    Case("A13c", ("agent", "--port", "0", "--max-seconds", "nan"), 2, "--max-seconds must be"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, root: Path, scratch: Path, capsys: pytest.CaptureFixture) -> None:
    before = tree_digest(root / "fx")
    code = main(list(case.argv))
    captured = capsys.readouterr()
    assert code == case.code, captured.err
    assert_one_line_error(captured.err, case.phrase)
    if "--json" in case.argv:
        assert captured.out == "" or json.loads(captured.out) is not None
    if case.out is not None:
        assert not (root / case.out).exists() and not list((root / case.out).parent.glob(f".{Path(case.out).name}*"))
    assert tree_digest(root / "fx") == before  # the user's files are untouched
    assert leftovers(scratch) == []  # and nothing is left in the temporary folder
    assert not (root / "PWNED").exists()


def leftovers(tmpdir: Path) -> list[str]:
    """What is left in a TMPDIR, less `.ses`: `import onnxsim` (0.8) writes that one file there, reused by every run."""
    return sorted(p.name for p in tmpdir.iterdir() if p.name != ".ses")


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------- outputs: nothing lost


def test_T16_stray_file_named_like_a_profile_does_not_shadow_it(root: Path, scratch: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    (root / "cpu").write_text("garbage [\n")
    try:
        code = main(["profile", "fx/good.onnx", "--no-cache", "--repeats", "1", "--json"])
        out = json.loads(capsys.readouterr().out)
    finally:
        (root / "cpu").unlink()
    assert code == 0 and out["target"]["name"] == "cpu" and out["latency_ms"]["median"] > 0


@pytest.mark.parametrize("kind", ["O01_file", "O05_userdir"])
def test_out_holding_users_files_is_refused_and_kept(kind: str, root: Path, scratch: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = root / "out" / kind
    out.parent.mkdir(exist_ok=True)
    if kind == "O01_file":
        out.write_text("my notes")
    else:
        out.mkdir()
        (out / "precious.txt").write_text("precious")
    before = tree_digest(out.parent)
    code = main([*P, "--calibration", "fx/c_rand64.toml", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_error(err, "is a file" if kind == "O01_file" else "holds files edgeprune did not write (precious.txt)")
    assert tree_digest(out.parent) == before and leftovers(scratch) == []


@pytest.mark.parametrize("command", ["prune", "build", "lut", "export"])
def test_users_folder_survives_every_command(command: str, root: Path, scratch: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """A slip like `--out src`: a folder of the user's given as the output of any command is refused (exit 2) before
    any work, byte for byte as it was, even with --fresh for a latency table."""
    user = root / "out" / f"src-{command}"
    (user / "pkg").mkdir(parents=True)
    (user / "main.py").write_text("print('mine')\n")
    (user / "pkg" / "model.onnx").write_bytes(b"mine too")
    before = tree_digest(user)
    argv = {"prune": [*P, "--calibration", "fx/c_rand64.toml", "--out", str(user)],
            "build": ["build", "--device", "fx/t_ok.toml", "--calibration", "fx/c_rand64.toml", "--out", str(user)],
            "lut": ["lut", "--device", "fx/t_ok.toml", "--fresh", "--out", str(user)],
            "export": [*EXPORT[:-1], str(user)]}[command]
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 2.0  # before loading the model
    assert_one_line_error(capsys.readouterr().err, str(user))
    assert tree_digest(user) == before and sorted(p.name for p in user.parent.iterdir()
                                                  if p.name.startswith((".src", f"src-{command}."))) == []
    assert leftovers(scratch) == []


def test_O04_out_dot_is_refused(root: Path, scratch: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    inner = root / "sandbox" / "inner"
    inner.mkdir(parents=True)
    (inner / "keep.txt").write_text("keep")
    monkeypatch.chdir(inner)
    for out in (".", ".."):
        code = main([*P, "--calibration", str(root / "fx/c_rand64.toml"), "--out", out, "--force"])
        assert code == 2
        assert_one_line_error(capsys.readouterr().err, "is the current folder")
    assert [p.name for p in inner.iterdir()] == ["keep.txt"] and (inner / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("command", ["O02_prune", "O09_export"])
def test_read_only_folder_is_refused_before_the_job(command: str, root: Path, scratch: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    ro = root / "out" / command
    ro.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a filesystem with the immutable flag); "
                    "O02's twin with a file as the parent runs in test_bad_input")
    try:
        t0 = time.perf_counter()
        if command == "O02_prune":
            code = main([*P, "--calibration", "fx/c_rand64.toml", "--out", str(ro / "p")])
        else:
            code = main([*EXPORT[:-1], str(ro / "m.onnx")])
        err = capsys.readouterr().err
        elapsed = time.perf_counter() - t0
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
    assert code == 2 and elapsed < 1.0  # refused before loading anything
    assert_one_line_error(err, "cannot write --out" if command == "O02_prune" else "cannot write -o",
                          "Operation not permitted")
    assert list(ro.iterdir()) == []


def test_prune_over_its_own_previous_output_replaces_it(root: Path, scratch: Path, capsys: pytest.CaptureFixture) \
        -> None:
    out = root / "out" / "again"
    for _ in range(2):
        code = main([*P, "--calibration", "fx/c_rand64.toml", "--out", str(out), "--json"])
        result = json.loads(capsys.readouterr().out)
        assert code == 0 and result["out"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "plan.json", "pruned.pt", "report.json"]
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".again")) == []
    assert leftovers(scratch) == []


def test_O08_failed_build_leaves_the_last_good_release_byte_identical(root: Path, scratch: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A release that met its budget, then a build of the same --out that cannot meet its budget (exit 3): the first
    release is untouched, hashes compared; the failed build's artifacts go to rel.failed/, and the message says so."""
    rel = root / "out" / "rel"
    common = ["build", "--device", "fx/t_ok.toml", "--calibration", "fx/c_rand64.toml", "--criterion", "l1",
              "--no-compensation", "--out", str(rel)]
    assert main([*common, "--latency", "1e9ms"]) == 0
    capsys.readouterr()
    good = tree_digest(rel)
    assert json.loads((rel / "report.json").read_text())["met"] is True
    code = main([*common, "--latency", "1us"])
    err = capsys.readouterr().err
    assert code == 3
    assert_one_line_error(err, "unreachable", f"this build's artifacts are in {rel}.failed/", "left as it was")
    assert tree_digest(rel) == good
    failed = json.loads((root / "out" / "rel.failed" / "report.json").read_text())
    assert failed["met"] is False and failed["exit_code"] == 3 and failed["out"] == f"{rel}.failed"
    assert leftovers(scratch) == []


# ---------------------------------------------------------------- silent wrong results


def test_M15c_prune_json_is_strict_json_and_nan_is_never_agreement(tmp_path: Path) -> None:
    import math

    import torch

    from edgeprune.cli.commands import emit_json
    from edgeprune.inputs.data import CalibrationData
    from edgeprune.inputs.recipe import Recipe
    from edgeprune.quality.fidelity import fidelity
    from edgeprune.report.render import clean

    assert clean({"a": {"b": float("nan")}, "c": [1.0, float("inf")]}) == \
        {"a": {"b": None}, "c": [1.0, None], "non_finite": {"a.b": "nan", "c[1]": "inf"}}
    x = torch.randn(8, 4)
    data = CalibrationData(x.numpy(), None, x.numpy(), None, Recipe(kind="random"))
    base = torch.nn.Linear(4, 3)
    broken = torch.nn.Linear(4, 3)
    with torch.no_grad():
        broken.weight.fill_(float("nan"))
    f = fidelity(base, broken, data)
    assert f.top1_agreement == 0.0 and f.nonfinite == 8 and math.isnan(f.output_rel_error)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        emit_json({"fidelity": f.to_dict()})
    d = json.loads(buf.getvalue())  # strict: bare NaN would fail to parse with the default parse_constant below
    json.loads(buf.getvalue(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert d["fidelity"]["output_rel_error"] is None and d["non_finite"] == {"fidelity.output_rel_error": "nan"}


def test_R07_ssh_profile_keeps_every_measure_setting() -> None:
    import tomllib

    from edgeprune.runtimes.remote import target_toml
    from edgeprune.inputs.targets import Target, bundled_targets

    for t in bundled_targets().values():
        back = Target.from_dict(tomllib.loads(target_toml(t)))
        assert back.measure == t.measure and back.fingerprint() == t.fingerprint(), t.name
    assert "max_seconds = 0.25" in target_toml(bundled_targets()["cpu"])


def test_build_with_non_finite_pruned_outputs_fails_its_implicit_gate() -> None:
    from edgeprune.quality.fidelity import Fidelity
    from edgeprune.config import BuildConfig, PruneConfig
    from edgeprune.quality.gates import quality_gates

    ok = Fidelity(1.0, 0.0, None, None, samples=4)
    bad = Fidelity(0.5, float("nan"), None, None, samples=4, nonfinite=2)
    config = BuildConfig(prune=PruneConfig())
    assert quality_gates(ok, config) == {"finite_outputs": {"value": 0, "limit": 0, "passed": True}}
    assert quality_gates(bad, config)["finite_outputs"]["passed"] is False


# ---------------------------------------------------------------- signals: SIGTERM cleans up like Ctrl-C


def spawn(args: list[str], cwd: Path, tmpdir: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir), "EDGEPRUNE_CACHE_DIR": str(tmpdir.parent / "cache")}
    return subprocess.Popen([sys.executable, "-m", "edgeprune", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60) -> list[str]:
    """stderr lines up to and including the first that contains `needle` (the stage lines a log gets)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    pytest.fail(f"no stderr line with {needle!r} within {timeout}s: {lines}")


SIGNAL_CASES = {
    "S02_build": (["build", "--device", "fx/t_long.toml", "--calibration", "fx/c_rand64.toml", "--out", "out/s2"],
                  "measuring unpruned model", "out/s2"),
    "prune": ([*P, "--model", "fx/bad_models.py:slow", *TINY, "--calibration", "fx/c_rand64.toml", "--criterion",
               "cap", "--out", "out/sp"], "collecting statistics", "out/sp"),
    "U03_lut": (["lut", "--device", "fx/t_long.toml", "--out", "out/lut_term.json", "--fresh"], "measuring layers",
                None),
    "export": ([*EXPORT[:-1], "out/se.onnx", "--model", "fx/bad_models.py:slow", *TINY], "exporting", "out/se.onnx"),
    "profile": (["profile", "fx/good.onnx", "--device", "fx/t_long.toml", "--no-cache"], "measuring on", None),
}


@pytest.mark.parametrize("name", list(SIGNAL_CASES))
def test_sigterm_cleans_up_and_exits_143(name: str, root: Path, tmp_path: Path) -> None:
    args, stage, out = SIGNAL_CASES[name]
    tmpdir = tmp_path / "TMPDIR"
    tmpdir.mkdir()
    proc = spawn(args, root, tmpdir)
    wait_for_line(proc, stage)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "edgeprune: terminated" and "Traceback" not in err
    assert leftovers(tmpdir) == []
    if out is not None:
        assert not (root / out).exists() and not list((root / out).parent.glob(f".{Path(out).name}*"))
    if name == "U03_lut" and (root / "out/lut_term.json").exists():
        from edgeprune.latency.table import load_lut

        load_lut(root / "out/lut_term.json")  # what was measured is a valid table the next run resumes from


def test_S05_full_disk_says_cannot_write(root: Path, tmp_path: Path) -> None:
    """A file size limit (ulimit -f, the stand-in for a full disk) is reported as a write failure, not as an
    exporter that cannot export the model."""
    import resource

    tmpdir = tmp_path / "TMPDIR"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.run([sys.executable, "-m", "edgeprune", *EXPORT[:-1], str(tmp_path / "big.onnx")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)))
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, "cannot write", "File too large")
    assert not (tmp_path / "big.onnx").exists() and leftovers(tmpdir) == []
