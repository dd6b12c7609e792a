"""Typed results of the Python API: what a build, a prune or a release returns, with the artifacts it wrote.

    result = edgeprune.build(model, calibration=loader, latency="0.5x")
    result.met, result.final.median, result.fidelity.top1_agreement, result.module, result.plan
    result.save("release/")          # model.onnx, pruned.pt, plan.json, report.json, report.md: as the CLI writes
    print(result.to_json())          # report.json

The report dict is the serialised form (the CLI prints it with --json); the typed fields are views of the same run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from edgeprune.common.atomic import OutputDir
from edgeprune.plan import Plan
from edgeprune.quality.fidelity import Fidelity
from edgeprune.report.contract import BuildReport
from edgeprune.runtimes.stats import LatencyStats
from edgeprune.search.strength import Candidate

if TYPE_CHECKING:
    from edgeprune.jobs.delivery import BuildOutcome


def _save(src: Path, dest: str | Path, force: bool) -> Path:
    """Copy the artifacts of `src` (model.onnx, pruned.pt, plan.json, report.json, report.md and the plots) into
    `dest`, written as a whole (`atomic.OutputDir` rules)."""
    with OutputDir(dest, force) as out:
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copyfile(f, out.tmp / f.name)
        return out.commit()


def _to_json(report: dict[str, Any]) -> str:
    from edgeprune.report.render import to_json

    return to_json(report)


@dataclass(frozen=True)
class BuildResult:
    """A build: `met` and `exit_code` say whether it is releasable (0), missed its budget (3) or a gate (4);
    `message` is the CLI's error line for 3 and 4."""

    met: bool
    exit_code: int
    message: str | None
    budget_ms: float
    base: LatencyStats  # the unpruned model on the target
    final: LatencyStats  # the released model on the target, verified
    module: nn.Module = field(repr=False)  # the pruned model, eval mode
    plan: Plan = field(repr=False)
    onnx_path: Path  # the released model.onnx
    fidelity: Fidelity
    metric: dict[str, float] | None  # the user's evaluate: before, after, drop
    trace: tuple[Candidate, ...] = field(repr=False)  # in order
    report: dict[str, Any] = field(repr=False)  # report.json
    out: Path  # where the artifacts are (OUT, or OUT.failed for exit codes 3 and 4)
    typed_report: BuildReport = field(repr=False)  # report.json as its type

    @classmethod
    def of(cls, outcome: BuildOutcome) -> BuildResult:
        """The result of a build or a release job (`jobs.delivery.BuildOutcome`)."""
        r, release = outcome.build_report, outcome.release
        assert release is not None and outcome.base is not None and outcome.fidelity is not None
        return cls(met=bool(r.met), exit_code=outcome.exit_code, message=outcome.message, budget_ms=r.budget_ms,
                   base=outcome.base, final=release.stats, module=release.pruned, plan=release.plan,
                   onnx_path=Path(outcome.out) / "model.onnx", fidelity=outcome.fidelity, metric=r.metric,
                   trace=outcome.trace, report=r.to_dict(), out=Path(outcome.out), typed_report=r)

    def to_json(self) -> str:
        return _to_json(self.report)

    def save(self, dest: str | Path, force: bool = False) -> Path:
        return _save(self.out, dest, force)


@dataclass(frozen=True)
class PruneResult:
    module: nn.Module = field(repr=False)
    plan: Plan = field(repr=False)
    fidelity: Fidelity
    onnx_path: Path
    report: dict[str, Any] = field(repr=False)
    out: Path  # where the artifacts are (OUT, or OUT.failed for exit code 4)
    exit_code: int = 0  # 4: the pruned model's outputs are not finite
    message: str | None = None  # the CLI's error line for exit code 4

    def to_json(self) -> str:
        return _to_json(self.report)

    def save(self, dest: str | Path, force: bool = False) -> Path:
        return _save(self.out, dest, force)
