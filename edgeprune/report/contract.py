"""The report of a build or a release as a type: `BuildReport`, whose `to_dict()` is report.json (DESIGN.md §4), and
the verdict both jobs give from it: exit code 0, 3 (budget missed) or 4 (a quality gate failed) and the error line.

    report = BuildReport.from_dict(json.loads(Path("out/report.json").read_text()))
    report.met, report.final_ms, report.speedup, report.gates_passed
    code, message = verdict(report, missed="budget 1.2 ms not met ...")

Nested rows (a model's latency entry, the fidelity, the gates, the search) stay the dicts report.json holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgeprune.errors import ExitCode


@dataclass(frozen=True)
class BuildReport:
    """report.json of `build`, `release` and `finetune` (`command`: None for a build, whose report has no such key)."""

    edgeprune: str  # the version that wrote it
    model: str
    weights: str | None
    input_shape: list[int]
    calibration: str  # the recipe's name, or its kind
    target: str
    profile: dict[str, Any]  # the target's settings (report.json: target.profile)
    budget: str  # as given: "0.5x", "10ms"
    budget_ms: float
    met: bool
    base: dict[str, Any]  # the unpruned model: latency_ms (summary), latency_source, macs, params
    final: dict[str, Any]  # the released model, the same figures
    speedup: float
    widths: dict[str, dict[str, Any]]  # group -> before, after (and unit)
    fidelity: dict[str, Any]
    quality_gates: dict[str, dict[str, Any]]
    device_measurements: int
    interleaved: bool
    search: dict[str, Any]
    timings_s: dict[str, float]
    versions: dict[str, Any]
    parity: dict[str, Any] | None = None
    metric: dict[str, float] | None = None
    command: str | None = None  # release, finetune; None: a build
    widths_from: str | None = None  # a release: where its widths came from
    lut: str | None = None  # a build: the latency table it searched with
    lut_check: dict[str, Any] | None = None  # that table's stored self-check, when the build records it
    excluded_groups: list[Any] = field(default_factory=list)  # a build
    exporter: str | None = None  # a build
    recovery: dict[str, Any] | None = None  # a build's --recover
    quantization: dict[str, Any] | None = None  # an int8 target's settings and figures
    base_float: dict[str, Any] | None = None  # int8: the unpruned float model
    speedup_over_float: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # other keys (finetune: its training)
    exit_code: int = 0
    out: str = ""  # where the artifacts went
    non_finite: dict[str, str] | None = None  # report.render.clean: the values written as null, and what they were

    @property
    def is_build(self) -> bool:
        return self.command is None

    @property
    def final_ms(self) -> float:
        return self.final["latency_ms"]["median"]

    @property
    def base_ms(self) -> float:
        return self.base["latency_ms"]["median"]

    @property
    def gates_passed(self) -> bool:
        return all(g["passed"] for g in self.quality_gates.values())

    def to_dict(self) -> dict[str, Any]:
        """report.json, its keys in the order a build has always written them."""
        release = {} if self.is_build else {"command": self.command}
        d: dict[str, Any] = {"edgeprune": self.edgeprune, **release, "model": self.model, "weights": self.weights,
                             "input_shape": list(self.input_shape), "calibration": self.calibration}
        if not self.is_build:
            d["widths_from"] = self.widths_from
        d.update(target={"name": self.target, "profile": self.profile}, budget=self.budget, budget_ms=self.budget_ms,
                 met=self.met, base=self.base, final=self.final, speedup=self.speedup, widths=self.widths,
                 fidelity=self.fidelity, quality_gates=self.quality_gates)
        if self.is_build:
            d["lut"] = self.lut
            if self.lut_check is not None:
                d["lut_check"] = self.lut_check
        d.update(device_measurements=self.device_measurements, interleaved=self.interleaved, search=self.search)
        if self.is_build:
            d.update(excluded_groups=self.excluded_groups, exporter=self.exporter)
        d.update(timings_s=self.timings_s, versions=self.versions, parity=self.parity, metric=self.metric)
        if self.is_build:
            d["recovery"] = self.recovery
        if self.quantization is not None:
            d["quantization"] = self.quantization
            if self.base_float is not None:
                d.update(base_float=self.base_float, speedup_over_float=self.speedup_over_float)
        d.update(self.notes)
        d.update(exit_code=self.exit_code, out=self.out)
        if self.non_finite:
            d["non_finite"] = self.non_finite
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildReport:
        """A report.json read back (keys no field names go to `notes`)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"target", "profile", "notes"}
        target = d.get("target") or {}
        known = {k: v for k, v in d.items() if k in names}
        notes = {k: v for k, v in d.items() if k not in names and k != "target"}
        return cls(target=target.get("name", ""), profile=target.get("profile", {}), notes=notes, **known)


def verdict(report: BuildReport, missed: str, gate_advice: str = "") -> tuple[int, str | None]:
    """The exit code of a build or a release and its one-line message: `missed` when the budget was not met (3), the
    failed gates and `gate_advice` when a quality gate failed (4), else 0 and no message."""
    from edgeprune.quality.gates import failed_gates  # imports torch: not at module level

    if not report.met:
        return int(ExitCode.BUDGET_UNREACHABLE), missed
    if not report.gates_passed:
        return int(ExitCode.QUALITY_GATE), f"quality gate failed: {failed_gates(report.quality_gates)}{gate_advice}"
    return int(ExitCode.OK), None
