"""The `prune` job: one plan (a uniform ratio, or a plan file replayed bit for bit), pruned, exported, with held-out
fidelity; no latency budget, no search.

    result = prune_job(PruneConfig(model="torchvision:resnet18", calibration="random"), "out/r18", ratio=0.5)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgeprune.common.atomic import OutputDir
from edgeprune.common.parallel import compute_threads, retained_memory, timed
from edgeprune.common.progress import Stages, no_progress
from edgeprune.common.versions import versions
from edgeprune.config import PruneConfig
from edgeprune.errors import EdgePruneError, ExitCode
from edgeprune.jobs.session import STATISTICS_VERSION, Inputs, prepare
from edgeprune.plan import Plan, uniform_widths
from edgeprune.quality.fidelity import Fidelity
from edgeprune.report.artifacts import model_size, save_pruned

log = logging.getLogger(__name__)


@dataclass
class PruneOutcome:
    report: dict[str, Any]
    module: nn.Module  # the pruned model
    plan: Plan
    fidelity: Fidelity
    exit_code: int = 0  # 4: the pruned model's outputs are not finite (its artifacts in OUT.failed)
    message: str | None = None  # the error line for exit code 4
    out: str = ""  # where the artifacts went


def prune_job(config: PruneConfig, out: str | Path, ratio: float | None = None, plan_path: str | None = None,
              stages: Stages = no_progress, force: bool = False, inputs: Inputs | None = None) -> PruneOutcome:
    """`edgeprune prune`: one plan (uniform ratio or a plan file), pruned, exported, with held-out fidelity.

    `out` is checked before any work (see `atomic.OutputDir`: a folder holding anything but a previous edgeprune
    output is refused unless `force`) and written as a whole at the end."""
    if (ratio is None) == (plan_path is None):
        raise EdgePruneError("give exactly one of --ratio (fraction of channels removed) or --plan plan.json")
    if config.channel_multiple is None and plan_path is None:  # a plan brings its own
        raise EdgePruneError("--channel-multiple must be at least 1 for prune, which has no target to take it from")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise EdgePruneError(f"--ratio is the fraction of channels removed and must be in [0, 1), found {ratio}")
    given = Plan.load(plan_path) if plan_path else None
    with OutputDir(out, force) as outdir, compute_threads(), retained_memory():
        return _prune_job(config, outdir, ratio, given, plan_path, stages, inputs)


def _prune_job(config: PruneConfig, outdir: OutputDir, ratio: float | None, given: Plan | None,
               plan_path: str | None, stages: Stages, inputs: Inputs | None) -> PruneOutcome:
    from edgeprune.export.onnx import export
    from edgeprune.report.render import to_json

    if given is not None:  # the plan decides criterion and compensation: reproduce it exactly
        config = dataclasses.replace(config, criterion=given.criterion, compensation=given.compensation,
                                     repair=given.repair,
                                     channel_multiple=given.channel_multiple, seed=given.seed)
    prep = prepare(config, stages, rank_groups=given is None, inputs=inputs)
    t = prep.timings_s
    if given is not None and given.compensation and given.meta.get("statistics", 1) != STATISTICS_VERSION:
        log.warning("plan %s was made by an edgeprune that sampled calibration statistics differently (version %s, "
                    "here %s): widths are reproduced, compensated weights will differ slightly", plan_path,
                    given.meta.get("statistics", 1), STATISTICS_VERSION)
    made_with = given.meta.get("calibration_digest") if given is not None and given.compensation else None
    if made_with is not None and made_with != prep.calib_digest:
        log.warning("plan %s was made with other calibration data (%s, digest %s; here %s, digest %s): the compensated "
                    "weights will differ from the ones it was made with; pass the same --calibration and --seed to "
                    "reproduce them", plan_path, given.meta.get("calibration"), made_with, config.recipe_spec(),
                    prep.calib_digest)
    plan = given if given is not None else prep.plan(uniform_widths(prep.graph, ratio, config.channel_multiple),
                                                     ratio=ratio)
    with timed(t, "prune"):
        stages("pruning and compensating" if plan.compensation else "pruning", None)
        plan, pruned = (plan, prep.prune(plan)) if given is not None else prep.prune_release(plan)
    with timed(t, "fidelity"):
        fid = prep.fidelity(pruned)
    tmp = outdir.tmp
    with timed(t, "export"):
        stages("exporting to ONNX", None)
        exp = export(pruned, prep.loaded.example_input, tmp / "model.onnx", exporter=config.exporter)
        save_pruned(tmp / "pruned.pt", pruned, plan, prep.loaded, config.ignore)
        plan.save(tmp / "plan.json")
    before = {g.name: g.channels for g in prep.graph.groups}
    units = {g.name: {"unit": g.unit} for g in prep.graph.groups if g.units}  # heads, groups of a grouped conv
    result = {
        "edgeprune": versions()["edgeprune"], "command": "prune",
        "model": prep.loaded.spec, "calibration": prep.data.recipe.name or prep.data.recipe.kind,
        "criterion": plan.criterion, "compensation": plan.compensation, "out": str(outdir.out),
        "widths": {g: {"before": before[g], "after": len(k), **units.get(g, {})} for g, k in plan.kept.items()},
        "base": model_size(prep.loaded.module, prep.loaded.example_input),
        "pruned": model_size(pruned, prep.loaded.example_input),
        "fidelity": fid.to_dict(), "parity": exp.parity.to_dict() if exp.parity else None,
        "excluded_groups": prep.graph.excluded, "timings_s": t,
    }
    (tmp / "report.json").write_text(to_json(result) + "\n")
    if fid.nonfinite:  # a broken model never lands in --out
        dest = outdir.commit(failed=True)
        return PruneOutcome(result, pruned, plan, fid, int(ExitCode.QUALITY_GATE), (
            f"the pruned model's outputs are not finite (NaN or infinity) on {fid.nonfinite} of {fid.samples} "
            f"held-out samples; its artifacts are in {dest}/ for inspection; try a lower --ratio, or "
            f"--no-compensation to tell whether the repair is at fault"), str(dest))
    return PruneOutcome(result, pruned, plan, fid, out=str(outdir.commit()))
