from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgeprune.cli.commands import main
from edgeprune.common.parallel import _DEFAULT_TORCH_THREADS, _glibc, group_workers, retained_memory
from edgeprune.config import PruneConfig
from edgeprune.errors import EdgePruneError
from edgeprune.export.onnx import parity
from edgeprune.inputs.data import load_data
from edgeprune.inputs.example import INPUT_SHAPE
from edgeprune.inputs.models import load_model
from edgeprune.inputs.recipe import load_recipe
from edgeprune.jobs.prune_job import prune_job
from edgeprune.jobs.session import prepare
from edgeprune.plan import Plan, uniform_widths
from edgeprune.quality.fidelity import fidelity
from edgeprune.report.artifacts import load_pruned, save_pruned
from tests.cli.test_commands import assert_one_line_error

MODELS_PY = '''
import torch
from torch import nn


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = conv_bn(3, 16)
        self.second = conv_bn(16, 32, 2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.second(self.first(x)).mean((2, 3)))


class TupleOut(Small):
    """Returns (logits, 0): an output that is not a tensor."""

    def forward(self, x):
        return super().forward(x), 0


class Branchy(Small):
    """Data-dependent control flow: the batch-1 trace never runs `extra`, every calibration batch does."""

    def __init__(self):
        super().__init__()
        self.extra = conv_bn(16, 16)

    def forward(self, x):
        y = self.first(x)
        if x.shape[0] > 1:
            y = self.extra(y)
        return self.head(self.second(y).mean((2, 3)))


def small():
    return Small()


def tuple_out():
    return TupleOut()


def branchy():
    return Branchy()
'''


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def write_recipe(file: Path, **table: Any) -> Path:
    file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    return file


def states(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def heldout_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@dataclass
class Run:
    out: Path
    result: dict[str, Any]


@pytest.fixture(scope="session")
def example_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """`edgeprune prune` on the bundled example with the digits recipe at --ratio 0.5: CaP with compensation, the
    same again from its plan.json, and l1 without compensation."""
    root = tmp_path_factory.mktemp("prune-example")
    runs: dict[str, Run] = {}
    common = ["prune", "--calibration", "digits", "--exporter", "torchscript", "--json"]
    for key, extra in [("cap", ["--ratio", "0.5"]),
                       ("replay", ["--plan", str(root / "cap" / "plan.json")]),
                       ("l1", ["--ratio", "0.5", "--criterion", "l1", "--no-compensation"])]:
        out = root / key
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = main([*common, *extra, "--out", str(out)])
        assert code == 0, key
        runs[key] = Run(out, json.loads(buf.getvalue()))
    return runs


@pytest.fixture(scope="session")
def digits_heldout() -> tuple[np.ndarray, np.ndarray]:
    data = load_data(load_recipe("digits"), INPUT_SHAPE)
    assert data.heldout_y is not None
    return data.heldout_x, data.heldout_y


@pytest.fixture
def models_py(tmp_path: Path) -> Path:
    path = tmp_path / "netdefs.py"
    path.write_text(MODELS_PY)
    return path


@pytest.fixture
def random_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "rnd.toml", kind="random", count=72, heldout=8, batch_size=32)


# ---------------------------------------------------------------- the example, end to end


def test_prune_cli_writes_onnx_pruned_pt_plan_and_report(example_runs: dict) -> None:
    run = example_runs["cap"]
    assert sorted(p.name for p in run.out.iterdir()) == ["model.onnx", "plan.json", "pruned.pt", "report.json"]
    assert json.loads((run.out / "report.json").read_text()) == json.loads(json.dumps(run.result))
    assert not list(run.out.parent.glob(".cap.*"))  # no temporary folder left behind
    r = run.result
    assert r["model"] == "example" and r["criterion"] == "cap" and r["compensation"] is True
    assert r["parity"]["rel_error"] <= 1e-4
    plan = Plan.load(run.out / "plan.json")
    assert plan.criterion == "cap" and plan.compensation and plan.channel_multiple == 8 and plan.model == "example"
    assert plan.repair == "sequential"  # the default on real calibration data; the replay below reproduces it
    assert {g: len(k) for g, k in plan.kept.items()} == {g: w["after"] for g, w in r["widths"].items()}
    for w in r["widths"].values():
        assert w["after"] == w["before"] // 2
    assert r["pruned"]["macs"] < 0.5 * r["base"]["macs"]


def test_load_pruned_reproduces_pruned_outputs(example_runs: dict, digits_heldout: tuple) -> None:
    run = example_runs["cap"]
    model, plan = load_pruned(run.out / "pruned.pt")
    assert plan == Plan.load(run.out / "plan.json")
    saved = states(run.out / "pruned.pt")
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # the same function as the one exported and measured during the run
    x, y = digits_heldout
    for i in range(4):  # the export has a fixed batch of 1
        assert parity(model, torch.from_numpy(x[i:i + 1]), run.out / "model.onnx").rel_error <= 1e-4
    base = load_model("example").module
    fid = fidelity(base, model, load_data(load_recipe("digits"), INPUT_SHAPE))
    want = run.result["fidelity"]
    assert fid.output_rel_error == pytest.approx(want["output_rel_error"], rel=1e-9)
    assert (fid.top1_agreement, fid.accuracy_before, fid.accuracy_after, fid.samples) == \
        (want["top1_agreement"], want["accuracy_before"], want["accuracy_after"], want["samples"])
    assert heldout_accuracy(model, x, y) == run.result["fidelity"]["accuracy_after"]


def test_prune_cli_plan_reproduces_weights_exactly(example_runs: dict) -> None:
    a, b = states(example_runs["cap"].out / "pruned.pt"), states(example_runs["replay"].out / "pruned.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert Plan.load(example_runs["replay"].out / "plan.json") == Plan.load(example_runs["cap"].out / "plan.json")
    assert example_runs["replay"].result["fidelity"] == example_runs["cap"].result["fidelity"]


def test_prune_cli_cap_with_compensation_keeps_accuracy_on_heldout_digits(example_runs: dict,
                                                                           digits_heldout: tuple) -> None:
    """Acceptance on real data: CaP + compensation at 50% keeps >= 95% of the accuracy, and beats magnitude
    pruning without compensation by at least 30 points."""
    x, y = digits_heldout
    base = heldout_accuracy(load_model("example").module, x, y)
    cap = heldout_accuracy(load_pruned(example_runs["cap"].out / "pruned.pt")[0], x, y)
    l1 = heldout_accuracy(load_pruned(example_runs["l1"].out / "pruned.pt")[0], x, y)
    assert base >= 0.95 and len(y) >= 150
    assert cap >= 0.95 * base, (cap, base)
    assert cap - l1 >= 0.30, (cap, l1)
    assert example_runs["cap"].result["fidelity"]["accuracy_after"] == cap
    assert example_runs["l1"].result["fidelity"]["accuracy_after"] == l1


def test_prune_job_then_load_pruned_equals_in_memory_model(tmp_path: Path, models_py: Path,
                                                          random_recipe: Path) -> None:
    config = PruneConfig(model=f"{models_py}:small", input_shape=(1, 3, 16, 16), calibration=str(random_recipe),
                         exporter="torchscript")
    prep = prepare(config)
    plan = prep.plan(uniform_widths(prep.graph, 0.5, 8))
    pruned = prep.prune(plan)
    save_pruned(tmp_path / "pruned.pt", pruned, plan, prep.loaded, config.ignore)
    loaded, plan2 = load_pruned(tmp_path / "pruned.pt")
    x = torch.from_numpy(prep.data.heldout_x)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert plan2 == plan
    result = prune_job(config, tmp_path / "job", ratio=0.5).report
    assert torch.equal(states(tmp_path / "job" / "pruned.pt")["head.weight"], pruned.head.weight.detach())
    assert result["widths"] == {"first.0": {"before": 16, "after": 8}, "second.0": {"before": 32, "after": 16}}


def test_prune_cli_plan_reproduces_weights_exactly_when_made_with_a_seed(capsys: pytest.CaptureFixture,
                                                                         tmp_path: Path, models_py: Path,
                                                                         random_recipe: Path) -> None:
    model = ["--model", f"{models_py}:small", "--input-shape", "1,3,16,16", "--calibration", str(random_recipe),
             "--exporter", "torchscript", "--json"]
    code, _, _ = cli(capsys, "prune", *model, "--ratio", "0.5", "--seed", "3", "--out", str(tmp_path / "a"))
    assert code == 0 and Plan.load(tmp_path / "a" / "plan.json").seed == 3
    code, _, _ = cli(capsys, "prune", *model, "--plan", str(tmp_path / "a" / "plan.json"), "--out",
                     str(tmp_path / "b"))
    assert code == 0
    a, b = states(tmp_path / "a" / "pruned.pt"), states(tmp_path / "b" / "pruned.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_cli_plan_with_other_calibration_data_warns(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
                                                         tmp_path: Path, models_py: Path, random_recipe: Path) -> None:
    """Compensated weights follow from the calibration data: the plan records which, and a replay on other data says
    that the weights will differ (a warning: re-applying a plan to new data is legitimate)."""
    model = ["--model", f"{models_py}:small", "--input-shape", "1,3,16,16", "--exporter", "torchscript", "--json",
             "--criterion", "cap"]  # compensated: on random data the default criterion repairs nothing
    code, _, _ = cli(capsys, "prune", *model, "--calibration", str(random_recipe), "--ratio", "0.5",
                     "--out", str(tmp_path / "a"))
    plan = Plan.load(tmp_path / "a" / "plan.json")
    assert code == 0 and plan.meta["calibration"] == str(random_recipe) and len(plan.meta["calibration_digest"]) == 16
    other = write_recipe(tmp_path / "other.toml", kind="random", count=80, heldout=8, batch_size=32)
    with caplog.at_level("WARNING", logger="edgeprune.jobs.prune_job"):
        code, _, _ = cli(capsys, "prune", *model, "--calibration", str(other), "--plan",
                         str(tmp_path / "a" / "plan.json"), "--out", str(tmp_path / "b"))
    assert code == 0 and "made with other calibration data" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgeprune.jobs.prune_job"):
        code, _, _ = cli(capsys, "prune", *model, "--calibration", str(random_recipe), "--plan",
                         str(tmp_path / "a" / "plan.json"), "--out", str(tmp_path / "c"))
    assert code == 0 and "other calibration data" not in caplog.text


def test_prune_job_needs_exactly_one_of_ratio_and_plan(tmp_path: Path) -> None:
    with pytest.raises(EdgePruneError, match="give exactly one of --ratio"):
        prune_job(PruneConfig(), tmp_path / "out")
    with pytest.raises(EdgePruneError, match="give exactly one of --ratio"):
        prune_job(PruneConfig(), tmp_path / "out", ratio=0.5, plan_path="plan.json")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing written


def npy_recipe(tmp_path: Path, x: np.ndarray) -> Path:
    np.save(tmp_path / "calib.npy", x)
    return write_recipe(tmp_path / "calib.toml", kind="npy", path="calib.npy", heldout=4)


def digits_like(n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)


def _nan_npy(tmp_path: Path) -> Path:
    x = digits_like(40, (1, 32, 32))
    x[7, 0, 3, 3] = np.nan
    return npy_recipe(tmp_path, x)


BAD_CALIBRATION: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "wrong_size": (lambda p: npy_recipe(p, digits_like(40, (1, 16, 16))),
                   ("the model wants samples of 1×32×32", "gives 1×16×16", "re-save the array as N×1×32×32")),
    "wrong_channels": (lambda p: npy_recipe(p, digits_like(40, (3, 32, 32))),
                       ("the model wants samples of 1×32×32", "gives 3×32×32")),
    "nan": (_nan_npy, ("1 NaN and 0 infinite values in 1 sample(s)", "sample index 7 of")),
    "too_few": (lambda p: write_recipe(p / "few.toml", kind="digits", count=4, heldout=1),
                ("layer fc needs at least 8 calibration samples", "gives 3", "raise `count`")),
}


@pytest.mark.parametrize("case", list(BAD_CALIBRATION))
def test_prune_cli_bad_calibration_exit_2_writes_nothing(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                         case: str) -> None:
    make, needles = BAD_CALIBRATION[case]
    recipe = make(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "prune", "--calibration", str(recipe), "--ratio", "0.5", "--exporter",
                            "torchscript", "--out", str(out))
    assert code == 2, err
    assert_one_line_error(err, *needles)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_prune_cli_unknown_criterion_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "prune", "--ratio", "0.5", "--criterion", "taylor", "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(err, "unknown criterion 'taylor'", "cap, l1, l2, fpgm, random")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratio", ["1.0", "-0.5"])
def test_prune_cli_ratio_out_of_range_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path, ratio: str) -> None:
    recipe = write_recipe(tmp_path / "d.toml", kind="digits", count=120)
    code, _, err = cli(capsys, "prune", "--calibration", str(recipe), "--ratio", ratio, "--criterion", "l1",
                       "--no-compensation", "--out", str(tmp_path / "o"))
    assert code == 2
    assert_one_line_error(err, "--ratio", "must be in [0, 1)")
    assert not (tmp_path / "o").exists()


def test_prune_cli_untraceable_model_exit_2_names_it(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                     models_py: Path, random_recipe: Path) -> None:
    out = tmp_path / "out"
    code, _, err = cli(capsys, "prune", "--model", f"{models_py}:tuple_out", "--input-shape", "1,3,16,16",
                       "--calibration", str(random_recipe), "--ratio", "0.5", "--out", str(out))
    assert code == 2  # refused when loaded, before torch-pruning's tracer would fail on it
    assert_one_line_error(err, "tuple_out returns int at '1'", "tensor or a (nested) tuple, list or dict of tensors")
    assert not out.exists()


def test_prune_cli_data_dependent_control_flow_exit_2_names_module(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                  models_py: Path, random_recipe: Path) -> None:
    out = tmp_path / "out"
    try:
        code, _, err = cli(capsys, "prune", "--model", f"{models_py}:branchy", "--input-shape", "1,3,16,16",
                           "--calibration", str(random_recipe), "--ratio", "0.5", "--exporter", "torchscript",
                           "--out", str(out))
    except Exception as e:  # the CLI must never let an exception escape
        pytest.fail(f"edgeprune prune raised {type(e).__name__}: {str(e).splitlines()[0]}")
    assert code == 2
    assert_one_line_error(err, "extra")
    assert not out.exists()


def test_prune_cli_plan_for_another_model_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path, models_py: Path,
                                                 random_recipe: Path) -> None:
    other = tmp_path / "other"
    code, _, _ = cli(capsys, "prune", "--model", f"{models_py}:small", "--input-shape", "1,3,16,16",
                     "--calibration", str(random_recipe), "--ratio", "0.5", "--exporter", "torchscript",
                     "--out", str(other), "--json")
    assert code == 0 and (other / "plan.json").is_file()
    small_digits = write_recipe(tmp_path / "d.toml", kind="digits", count=120)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "prune", "--calibration", str(small_digits), "--plan", str(other / "plan.json"),
                       "--out", str(out))
    assert code == 2
    assert_one_line_error(err, "plan names group 'first.0', which this model does not have",
                          "was it made for another model?")
    assert not out.exists()


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), ("{oops", "is not valid JSON"),
                                             ('{"version": 9}', "plan version 9 is not supported")])
def test_prune_cli_bad_plan_file_exit_2(capsys: pytest.CaptureFixture, tmp_path: Path, content: str | None,
                                        needle: str) -> None:
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_text(content)
    code, _, err = cli(capsys, "prune", "--plan", str(plan), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line_error(err, needle)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- memory


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_glibc() is None, reason="keeping freed memory uses glibc's mallopt; elsewhere it is a no-op")
@pytest.mark.parametrize("enabled", [True, False])
def test_retained_memory_keeps_freed_blocks_during_a_job_and_returns_them_after(
        enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRUNE_RETAIN_MEMORY", "1" if enabled else "0")
    size = 256 * 2**20  # a block glibc would otherwise hand back to the kernel as soon as it is freed
    with retained_memory():
        block = np.ones(size // 8)
        held = _resident_bytes()
        del block
        after_free = _resident_bytes()
    after_job = _resident_bytes()
    if enabled:
        assert after_free > held - size // 4  # still resident: the next batch reuses it without page faults
        assert after_job < held - size * 3 // 4  # given back when the job ends
    else:
        assert after_free < held - size * 3 // 4


# ---------------------------------------------------------------- threads


def test_group_workers_one_per_core_with_one_blas_thread_on_large_inputs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from threadpoolctl import threadpool_info

    monkeypatch.delenv("EDGEPRUNE_THREADS", raising=False)
    small = load_data(load_recipe("digits"), INPUT_SHAPE)
    large = load_data(load_recipe("random"), (1, 3, 224, 224))
    with group_workers(small.batch_values) as workers:
        assert workers == 1
    blas_before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    with group_workers(large.batch_values) as workers:
        assert workers == _DEFAULT_TORCH_THREADS  # the machine's cores (2 on CI)
        if workers > 1:
            assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
            assert torch.get_num_threads() == 1
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas_before


# ---------------------------------------------------------------- verification of the release


def _cand(step: int, lat: float, digest: str):  # noqa: ANN202 - a search Candidate
    from edgeprune.search.strength import Candidate

    return Candidate(step=step, strength=step / 10, widths_digest=digest, latency_ms=lat, source="measured",
                     widths={"g": step})


def _result(trace: list, best):  # noqa: ANN001, ANN202
    from edgeprune.search.strength import SearchResult

    return SearchResult(best=best, fastest=min(trace, key=lambda c: c.latency_ms), trace=tuple(trace),
                        budget_ms=1.0, converged=True)


def _verifier(truth: dict[str, float], calls: list[str]):  # noqa: ANN202
    from edgeprune.jobs.oracle import Verified
    from edgeprune.runtimes.stats import stats_from_repeats

    def verify_one(c):  # noqa: ANN001, ANN202
        calls.append(c.widths_digest)
        stats = stats_from_repeats([[truth[c.widths_digest]]], target="t", runtime="r", runtime_version="1",
                                   precision="fp32")
        return Verified(c, stats, None, None, Path("x"))

    return verify_one


def test_verify_release_falls_back_to_the_nearest_feasible_candidate() -> None:
    from edgeprune.jobs.oracle import verify_release

    a, b, c = _cand(1, 0.98, "a"), _cand(2, 0.95, "b"), _cand(3, 0.5, "c")
    calls: list[str] = []
    released, _ = verify_release(_result([a, b, c], a), 1.0, _verifier({"a": 1.03, "b": 0.96, "c": 0.5}, calls),
                                 resume=lambda r, v: pytest.fail("no resume when a near fallback verifies"))
    assert released.candidate.widths_digest == "b" and calls == ["a", "b"]


def test_verify_release_resumes_instead_of_releasing_a_model_far_under_budget() -> None:
    """The audit's case: the chosen model verified over budget and the only other feasible candidate was the
    minimum-width model (0.35x of the budget): the search resumes from the verified figure and its new best ships."""
    from edgeprune.jobs.oracle import verify_release

    a, c = _cand(1, 0.97, "a"), _cand(2, 0.35, "c")
    d = _cand(3, 0.93, "d")
    seen: list[dict] = []

    def resume(res, verified):  # noqa: ANN001, ANN202
        seen.append({k: v.median for k, v in verified.items()})
        return _result(list(res.trace) + [d], d)

    calls: list[str] = []
    released, result = verify_release(_result([a, c], a), 1.0, _verifier({"a": 1.04, "c": 0.36, "d": 0.94}, calls),
                                      resume)
    assert seen == [{"a": 1.04}] and released.candidate.widths_digest == "d" and calls == ["a", "d"]
    assert [x.widths_digest for x in result.trace] == ["a", "c", "d"]


def test_verify_release_without_steps_left_takes_the_far_fallback() -> None:
    from edgeprune.jobs.oracle import verify_release

    a, c = _cand(1, 0.97, "a"), _cand(2, 0.35, "c")
    calls: list[str] = []
    released, _ = verify_release(_result([a, c], a), 1.0, _verifier({"a": 1.04, "c": 0.36}, calls),
                                 resume=lambda r, v: None)
    assert released.candidate.widths_digest == "c" and calls == ["a", "c"]
