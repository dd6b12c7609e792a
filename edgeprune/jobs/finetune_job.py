"""`edgeprune finetune` (`edgeprune.finetune` in Python): a recovery stage on a build or prune output, released again (budget and gates re-checked).

    source = read_source("out/")                       # pruned.pt, plan.json, report.json of a build or prune
    outcome = finetune_job(config, "tuned/", source=source, recovery=FinetuneConfig(stage="distill", minutes=1))

Stages (recovery.train.STAGES):
- `distill` (default): the pruned model of `source` trained to match the unpruned model's outputs on the
  calibration part of the recipe (labels unused): recovery.train.train, a few epochs or `--steps` / `--minutes`.
- `csgd`: C-SGD (recovery/csgd.py) on the unpruned model, clustered into the plan's widths, then merged: the widths of
  `source`, other channels (the merged ones) and weights.
`--orthoreg W` adds OrthoReg (train.py) to either. The trained model goes to `release_job.release_job`: exported,
parity-checked, measured against the budget (the source build's target and budget unless given), its fidelity to the
unpruned model taken on the held-out part, the gates run, the usual artifacts written to a new folder (never the
source folder). A stage whose loss stops being finite exits 4 before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from edgeprune.common.atomic import OutputDir
from edgeprune.common.progress import Stages, no_progress
from edgeprune.config import BuildConfig
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.models import LoadedModel, read_checkpoint
from edgeprune.inputs.outputs import flatten_outputs, is_class_logits
from edgeprune.jobs.delivery import BuildOutcome
from edgeprune.jobs.release_job import Pruned, check_labels_fit, release_job, saved_recipe
from edgeprune.jobs.session import Inputs
from edgeprune.plan import Plan
from edgeprune.recovery.train import FinetuneConfig, gram_offdiag, producers, train
from edgeprune.search.strength import Candidate

if TYPE_CHECKING:
    from edgeprune.inputs.data import CalibrationData

NEEDED = ("pruned.pt", "plan.json", "report.json")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A build or prune output folder, read: the pruned model, its plan, the unpruned model, the report."""

    folder: Path
    module: nn.Module
    plan: Plan
    original: LoadedModel
    report: dict[str, Any]
    ignore: tuple[str, ...]

    def release_settings(self, device: str | None, latency: str | None) -> tuple[str, str]:
        """The target and budget to release against: those given, else the ones the source was built for (a prune
        output has neither: cpu and 0.5x)."""
        from edgeprune.inputs.targets import load_target

        target = self.report.get("target")
        name = target.get("name") if isinstance(target, dict) else None
        if device is None and name is not None:
            try:
                load_target(name)
            except EdgePruneError:
                raise EdgePruneError(f"{self.folder} was built for target {name!r}, which is not a bundled profile; "
                                     "pass --device with the profile file it was built with") from None
        return device or name or "cpu", latency or self.report.get("budget") or "0.5x"


def read_source(folder: str | Path, input_shape: tuple[int, ...] | None = None,
                original: nn.Module | None = None) -> Source:
    """The folder a build or prune wrote, or an error (exit 2) saying what is missing or what does not belong; a build
    from a live module takes its unpruned model from pruned.pt, or `original` (that module) when given."""
    from edgeprune.report.artifacts import load_pruned_with_original

    path = Path(folder)
    if not path.is_dir():
        raise EdgePruneError(f"finetune takes the output folder of edgeprune build or prune; {folder} is not a folder")
    missing = [f for f in NEEDED if not (path / f).is_file()]
    if missing:
        raise EdgePruneError(f"{folder} is not a build or prune output: it lacks {', '.join(missing)}; give the --out "
                             "folder of edgeprune build or prune")
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgePruneError(f"{path / 'report.json'} is not readable JSON ({type(e).__name__}); give an unchanged "
                             "build or prune output") from None
    if not isinstance(report, dict) or "widths" not in report or "fidelity" not in report:
        raise EdgePruneError(f"{path / 'report.json'} is not the report of a build or prune (no widths, no fidelity)")
    saved = read_checkpoint(path / "pruned.pt", "pruned model")
    check_one_output(path, saved, report)
    module, plan, loaded = load_pruned_with_original(path / "pruned.pt", input_shape, original)
    return Source(path, module, plan, loaded, report, tuple(saved.get("ignore", ())))  # type: ignore[union-attr]


def check_one_output(path: Path, saved: Any, report: dict[str, Any]) -> None:
    """pruned.pt, plan.json and report.json must come from one job: a pruned.pt of another model beside them made a
    report mixing the two (the other model's fidelity as the input's)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("plan"), dict):
        return  # not a pruned.pt at all: load_pruned_with_original says so
    try:
        listed = json.loads((path / "plan.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgePruneError(f"{path / 'plan.json'} is not readable JSON ({type(e).__name__}); give an unchanged "
                             "build or prune output") from None

    def digest(plan: Any) -> str:
        keys = {k: plan.get(k) for k in ("kept", "channels")} if isinstance(plan, dict) else plan
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]

    if digest(saved["plan"]) != digest(listed) or saved.get("model") != report.get("model"):
        raise EdgePruneError(f"{path} mixes two outputs: pruned.pt holds {saved.get('model')} pruned by plan "
                             f"{digest(saved['plan'])}, plan.json is plan {digest(listed)} and report.json is of "
                             f"{report.get('model')}; give a build or prune output folder as that job wrote it")


def check_out(source: Source, out: str | Path, force: bool) -> None:
    """NEWDIR may be neither the source folder nor inside it, and must be writable (atomic.OutputDir's rules)."""
    src, dest = source.folder.resolve(), Path(out).resolve()
    if dest == src or src in dest.parents:
        raise EdgePruneError(f"--out {out} is the source folder {source.folder} or inside it; finetune never writes "
                             "over its input: give a new folder")
    OutputDir(out, force).discard()


def finetune_job(config: BuildConfig, out: str | Path, *, source: Source, recovery: FinetuneConfig,
                 stages: Stages = no_progress, force: bool = False, inputs: Inputs | None = None,
                 on_step: Callable[[Candidate], None] | None = None) -> BuildOutcome:
    """Train `source` by `recovery`, then release it into `out` (a `delivery.BuildOutcome`, exit codes as build's)."""
    from edgeprune.inputs.data import load_data
    from edgeprune.common.parallel import compute_threads

    check_out(source, out, force)
    inputs = inputs or Inputs()
    original = source.original
    spec = config.prune.calibration if config.prune.calibration not in (None, "python") else \
        source.plan.meta.get("calibration") or dataclasses.replace(config.prune, model=original.spec).recipe_spec()
    recipe = inputs.recipe or saved_recipe(spec, str(source.folder))
    data = load_data(recipe, original.input_shape, arrays=inputs.arrays)
    check_labels_fit(original, data)
    with compute_threads():
        stage = _csgd if recovery.stage == "csgd" else _distill
        module, plan, notes = stage(source, data, recovery, stages)
    notes = {"command": "finetune", "finetune": {
        "from": str(source.folder), "stage": recovery.stage, "lr": recovery.learning_rate,
        "orthoreg": recovery.orthoreg, "input_fidelity": source.report.get("fidelity"), **notes}}
    pruned = Pruned(module, plan, original, f"finetune {recovery.stage} of {source.folder}", notes)
    config = dataclasses.replace(config, prune=dataclasses.replace(config.prune, calibration=spec))
    return release_job(config, out, stages, force, Inputs(loaded=original, recipe=recipe, arrays=inputs.arrays),
                       pruned, on_step)


def _distill(source: Source, data: CalibrationData, recovery: FinetuneConfig,
             stages: Stages) -> tuple[nn.Module, Plan, dict]:
    from edgeprune.dependency.graph import trace

    student = copy.deepcopy(source.module)
    layers = producers(trace(student, source.original.example_input, source.ignore)) if recovery.orthoreg else []
    before = gram_offdiag(student, layers) if layers else None
    log = train(student, source.original.module, data.calib_x, None, recovery, layers, stages=stages, keep_best=True)
    notes: dict[str, Any] = log.to_dict()
    if log.validation is not None and log.validation["best_step"] == 0:
        logger.warning("distillation did not lower the loss on the %d calibration samples held back (%.4g untrained, "
                       "%.4g after %d steps): the model is released untrained; more calibration data or a lower "
                       "--lr may help", log.validation["samples"], log.validation["before"], log.validation["last"],
                       log.steps)
    if layers:
        notes["gram_offdiag"] = {"before": before, "after": gram_offdiag(student, layers)}
    plan = dataclasses.replace(source.plan, meta={**source.plan.meta, "recovery": recovery.stage})
    return student, plan, notes


def _csgd(source: Source, data: CalibrationData, recovery: FinetuneConfig,
          stages: Stages) -> tuple[nn.Module, Plan, dict]:
    from edgeprune.recovery.csgd import centripetal_train, cluster_filters, merge, spread
    from edgeprune.dependency.graph import trace

    original = source.original
    model = copy.deepcopy(original.module)
    graph = trace(model, original.example_input, source.ignore)
    stages("C-SGD: clustering filters (k-means)", None)
    clusters = cluster_filters(model, graph, source.plan, recovery.seed)
    labels = data.calib_y if data.labelled and _class_logits(model, original) else None
    log = centripetal_train(model, graph, clusters, data.calib_x, labels, original.module if labels is None else None,
                            recovery, stages)
    notes: dict[str, Any] = log.to_dict()
    notes["csgd"] = {"spread": spread(model, graph, clusters), "sliced": clusters.sliced,
                     "clusters": {g: len(c) for g, c in clusters.groups.items()}}
    stages("C-SGD: merging clusters", None)
    pruned, plan = merge(model, original.example_input, graph, clusters, source.plan, source.ignore)
    plan = dataclasses.replace(plan, meta={**plan.meta, "recovery": recovery.stage})
    return pruned, plan, notes


def _class_logits(model: nn.Module, original: LoadedModel) -> bool:
    import torch

    with torch.no_grad():
        outs = flatten_outputs(model.eval()(original.example_input))
    return len(outs) == 1 and is_class_logits(outs[0][1])

