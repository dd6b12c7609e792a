"""What `build` and `release` (and so `finetune`) share at the end: the release's report, its verdict, its artifacts
written and committed.

    run = ReleaseRun(config, target, measurer, loaded, data, timings, base, base_float, budget_ms)
    report = release_report(run, release, assessment, widths, search)          # a report.contract.BuildReport
    return deliver(run, outdir, report, verdict(report, missed), release, assessment.fidelity)  # a BuildOutcome

A failed release (exit 3 or 4) goes to `OUT.failed/` and leaves `OUT` as it was (`atomic.OutputDir`).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.common.atomic import OutputDir
from edgeprune.common.versions import versions
from edgeprune.config import BuildConfig
from edgeprune.errors import ExitCode
from edgeprune.inputs.data import CalibrationData
from edgeprune.inputs.models import LoadedModel
from edgeprune.inputs.targets import Target
from edgeprune.jobs.oracle import Measurer, Verified
from edgeprune.quality.fidelity import Fidelity
from edgeprune.quality.gates import Assessment
from edgeprune.report.artifacts import save_pruned
from edgeprune.report.contract import BuildReport
from edgeprune.report.render import int8_entries, latency_entry
from edgeprune.runtimes.stats import LatencyStats
from edgeprune.search.strength import Candidate

if TYPE_CHECKING:
    from edgeprune.runtimes.cache import MeasurementCache


@dataclass
class BuildOutcome:
    build_report: BuildReport
    exit_code: int
    message: str | None = None  # the error line for exit codes 3 and 4
    out: str = ""  # where the artifacts went: the --out folder, or OUT.failed for exit codes 3 and 4
    release: Verified | None = None  # the released candidate: its plan, pruned module, final latency, ONNX file
    trace: tuple[Candidate, ...] = ()  # the search's candidates, in order
    base: LatencyStats | None = None  # the unpruned model
    fidelity: Fidelity | None = None

    @property
    def report(self) -> dict[str, Any]:
        """report.json."""
        return self.build_report.to_dict()


@dataclass(frozen=True)
class ReleaseRun:
    """A release's settings and its measured baseline: what the report of a build or a release is made from."""

    config: BuildConfig
    target: Target
    measurer: Measurer
    loaded: LoadedModel  # the unpruned model
    data: CalibrationData
    timings_s: dict[str, float]
    base: LatencyStats  # the unpruned model on the target (int8: quantised)
    base_float: LatencyStats | None  # int8: the unpruned float model on the target's float variant (None: not measured)
    budget_ms: float


def measurement_cache(config: BuildConfig) -> MeasurementCache | None:
    """The on-disk measurement cache a build or release uses (None with --no-cache)."""
    from edgeprune.runtimes import MeasurementCache

    return MeasurementCache.under(config.cache_dir) if config.use_cache else None


def release_report(run: ReleaseRun, release: Verified, a: Assessment, widths: dict[str, dict[str, Any]],
                   search: dict[str, Any], **only: Any) -> BuildReport:
    """The report of a release: its figures against the baseline's, its assessment (`gates.assess`), the widths and
    the search that chose them; `only` holds the fields of one kind of job (a build's `lut`, a release's `command`)."""
    loaded, final, example = run.loaded, release.stats, run.loaded.example_input
    int8 = int8_entries(run.target, a.quantization, run.base_float, final, loaded)
    return BuildReport(
        edgeprune=versions()["edgeprune"], model=loaded.spec, weights=loaded.weights,
        input_shape=list(loaded.input_shape), calibration=run.data.recipe.name or run.data.recipe.kind,
        target=run.target.name, profile=run.target.to_dict(), budget=run.config.budget.text,
        budget_ms=run.budget_ms, met=final.median <= run.budget_ms,
        base=latency_entry(run.base, loaded.module, example), final=latency_entry(final, release.pruned, example),
        speedup=run.base.median / final.median, widths=widths, fidelity=a.fidelity.to_dict(),
        quality_gates=a.gates, parity=a.parity.to_dict(), metric=a.metric,
        device_measurements=run.measurer.device_runs, interleaved=run.measurer.anchor is not None, search=search,
        timings_s=run.timings_s, versions=versions(run.target.runtime), **int8, **only)


def write_release(tmp: Path, release: Verified, loaded: LoadedModel, ignore: tuple[str, ...],
                  report: BuildReport) -> None:
    """model.onnx, pruned.pt, plan.json, report.json and report.md of a release into the output's temporary folder
    (int8: model.onnx is the quantised model, model.fp32.onnx its float export)."""
    from edgeprune.report.render import write_report

    shutil.copyfile(release.path, tmp / "model.onnx")
    if release.float_path is not None:
        shutil.copyfile(release.float_path, tmp / "model.fp32.onnx")
    save_pruned(tmp / "pruned.pt", release.pruned, release.plan, loaded, ignore)
    release.plan.save(tmp / "plan.json")
    write_report(tmp, report)


def deliver(run: ReleaseRun, outdir: OutputDir, report: BuildReport, judged: tuple[int, str | None],
            release: Verified, fidelity: Fidelity, trace: tuple[Candidate, ...] = (),
            whose: str = "the artifacts") -> BuildOutcome:
    """The release's artifacts and report (with its exit code from `judged`, a `contract.verdict`) written and
    committed: to `OUT`, or to `OUT.failed/` when the code is not 0, its message then saying where (`whose`: "this
    build's artifacts")."""
    code, message = judged
    failed = code != int(ExitCode.OK)
    report = dataclasses.replace(report, exit_code=code, out=str(outdir.failed_out if failed else outdir.out))
    write_release(outdir.tmp, release, run.loaded, run.config.prune.ignore, report)
    dest = outdir.commit(failed=failed)
    if failed:
        message = f"{message}; {whose} are in {dest}/ ({outdir.out} left as it was)"
    return BuildOutcome(build_report=report, exit_code=code, message=message, out=str(dest), release=release,
                        trace=trace, base=run.base, fidelity=fidelity)
