"""The way back in: release a model that was pruned (and since fine-tuned) without pruning it again.

    pruned = release_inputs("out/pruned.pt", None, None, None, Inputs(), "finetuned_state.pt", seed=0)
    outcome = release_job(config, "release/", pruned=pruned)     # a delivery.BuildOutcome, exit codes as build's

Export, simplification, ONNX parity, the measured latency on the target against the budget (a relative one against
the unpruned model measured in the same run), held-out fidelity to the unpruned model, the user's metric and every
gate, then the artifacts and report a build writes. The plan records where the widths came from (`meta.widths_from`).
On an int8 target both models are measured quantised and the figures that count are the quantised model's, as in a
build (`gates.assess`).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgeprune.common.atomic import OutputDir
from edgeprune.common.parallel import compute_threads, retained_memory, timed
from edgeprune.common.progress import Stages, no_progress
from edgeprune.config import BuildConfig
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.data import CalibrationData, load_data
from edgeprune.inputs.models import LoadedModel, load_model, load_weights
from edgeprune.inputs.outputs import check_label_range
from edgeprune.inputs.recipe import Recipe, load_recipe
from edgeprune.inputs.targets import Target
from edgeprune.jobs.delivery import BuildOutcome, ReleaseRun, deliver, measurement_cache, release_report
from edgeprune.jobs.oracle import Measurer, Verified, export_candidate
from edgeprune.jobs.session import Inputs
from edgeprune.plan import Plan
from edgeprune.quality.gates import assess, run_metric
from edgeprune.report.artifacts import load_pruned_with_original
from edgeprune.report.contract import verdict
from edgeprune.runtimes.stats import LatencyStats
from edgeprune.search.allocate import widths_digest
from edgeprune.search.strength import Candidate


@dataclass(frozen=True)
class Pruned:
    module: nn.Module
    plan: Plan
    original: LoadedModel | None  # known when the model came as a pruned.pt
    source: str  # where the widths came from, for the plan
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)  # added to report.json (finetune: its stage)


def release_inputs(model: nn.Module | str | Path, original: nn.Module | str | None, plan: Plan | str | Path | None,
                   example_input: Any, inputs: Inputs, weights: str | None, seed: int,
                   input_shape: tuple[int, ...] | None = None) -> Pruned:
    """The pruned model and its plan: a module with `plan` (a Plan or plan.json), or a pruned.pt with optional
    fine-tuned `weights` (a state dict saved with torch.save(model.state_dict(), PATH))."""
    if isinstance(model, nn.Module):
        if original is None or plan is None:
            raise EdgePruneError("releasing a module needs original= (the unpruned nn.Module or its spec) and plan= "
                                 "(the Plan or plan.json it was pruned by)")
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        return Pruned(copy.deepcopy(model).cpu().eval(), plan, None, f"module {type(model).__qualname__}")
    module, plan, loaded = load_pruned_with_original(Path(model), input_shape,
                                                     original if isinstance(original, nn.Module) else None)
    if weights is not None:
        load_weights(module, weights)
    return Pruned(module.eval(), plan, loaded, f"{model}" + (f" with weights {weights}" if weights else ""))


def saved_recipe(spec: str, source: str) -> Recipe:
    """The recipe a pruned model was made with, to release or fine-tune it again; data given in Python is not saved."""
    if spec == "python":
        raise EdgePruneError(f"{source} was made on calibration data given in Python, which is not saved with it; "
                             "pass --calibration RECIPE (calibration= in Python: a recipe or the data)")
    return load_recipe(spec)


def check_labels_fit(original: LoadedModel, data: CalibrationData) -> None:
    """Labels past the unpruned model's classes: exit 2 before any work (finetune: before training, where C-SGD's
    cross-entropy exited 1 on them; release: an accuracy gate that always passed)."""
    import torch

    if data.labelled:
        with torch.no_grad():
            check_label_range(original.module.eval()(original.example_input), data, original.spec)


def measured_step(plan: Plan, final: LatencyStats, base: LatencyStats) -> Candidate:
    """The released model as a search's step: its strength the latency it saves (as evolution's candidates)."""
    widths = {g: len(k) for g, k in plan.kept.items()}
    return Candidate(step=1, strength=round(1 - final.median / base.median, 6), widths_digest=widths_digest(widths),
                     latency_ms=final.median, source=final.source, widths=widths, spread=final.spread)


def release_job(config: BuildConfig, out: str | Path, stages: Stages = no_progress, force: bool = False,
                inputs: Inputs | None = None, pruned: Pruned | None = None,
                on_step: Callable[[Candidate], None] | None = None) -> BuildOutcome:
    from edgeprune.runtimes import runtime_for
    from edgeprune.inputs.targets import load_target

    assert pruned is not None
    inputs = inputs or Inputs()
    with compute_threads(), retained_memory():
        target = load_target(config.device)
        runtime_for(target)
        original = inputs.loaded or pruned.original or load_model(config.prune.model, config.prune.weights,
                                                                  config.prune.input_shape, config.prune.seed)
        spec = config.prune.calibration or pruned.plan.meta.get("calibration") or config.prune.recipe_spec()
        recipe = inputs.recipe or saved_recipe(spec, pruned.source)
        data = load_data(recipe, original.input_shape, arrays=inputs.arrays)
        check_labels_fit(original, data)
        with OutputDir(out, force) as outdir:
            return _release_into(config, outdir, stages, target, original, data, pruned, on_step)


def _release_into(config: BuildConfig, outdir: OutputDir, stages: Stages, target: Target, original: LoadedModel,
                  data: CalibrationData, pruned: Pruned, on_step: Callable[[Candidate], None] | None) -> BuildOutcome:
    t: dict[str, float] = {}
    example = original.example_input
    measurer = Measurer(target, measurement_cache(config), stages, t)
    measurer.start(t, data.calib_x, data.recipe.kind)
    plan = dataclasses.replace(pruned.plan, target=target.name,
                               meta={**pruned.plan.meta, "widths_from": pruned.source, "budget": config.budget.text})
    with tempfile.TemporaryDirectory(prefix="edgeprune-release-") as work:
        base_path, float_path = Path(work) / "base.onnx", Path(work) / "final.onnx"
        q = measurer.quantizer  # int8: both measured quantised, the release calibrated on all its samples
        with timed(t, "export"):
            base_measured = export_candidate(original.module, example, base_path, config.prune.exporter, q, True)
            path = export_candidate(pruned.module, example, float_path, config.prune.exporter, q)
        base = measurer.baseline(base_measured, config.budget.relative)
        base_float = measurer.float_figure(base_path, "measuring unpruned float model") if q is not None else None
        final = measurer(path, "measuring the released model", cached=False,
                         repeats=target.measure.final_repeats, stage="verify")
        if on_step is not None:  # the one measured candidate, as a build reports each of its own
            on_step(measured_step(plan, final, base))
        run = ReleaseRun(config, target, measurer, original, data, t, base, base_float, config.budget.ms(base.median))
        with timed(t, "fidelity"):
            a = assess(config, original.module, pruned.module, example, data, None,
                       run_metric(config, original.module, "the unpruned model"), float_path,
                       path if q is not None else None)
        release = Verified(None, final, pruned.module, plan, path, float_path if q is not None else None)
        notes = dict(pruned.notes)
        search = {"criterion": plan.criterion, "compensation": plan.compensation, "repair": plan.repair,
                  "proxy": "none (released as given)", "channel_multiple": plan.channel_multiple,
                  "tolerance": config.tolerance, "converged": True, "measured_candidates": 0, "trace": []}
        widths = {g: {"before": plan.channels.get(g, len(k)), "after": len(k)} for g, k in plan.kept.items()}
        report = release_report(run, release, a, widths, search, command=notes.pop("command", "release"),
                                widths_from=pruned.source, notes=notes)
        missed = (f"the released model measures {final.median:.3f} ms on {target.name}, over the budget of "
                  f"{run.budget_ms:.3f} ms ({config.budget.text}); prune it further (edgeprune build) or raise the "
                  f"budget")
        return deliver(run, outdir, report, verdict(report, missed), release, a.fidelity)
