"""The stages in order: model -> groups -> statistics -> rankings -> plan -> prune -> export, with timings.

    result = prune_job(PruneConfig(model="torchvision:resnet18", calibration="random", ratio=0.5), out="out/r18")

`prepare()` runs everything that does not depend on the widths once; `build` reuses it for every search candidate.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.compensate import LayerStats, collect_statistics
from edgeprune.data import CalibrationData, load_data, load_recipe
from edgeprune.errors import EdgePruneError
from edgeprune.fidelity import Fidelity, fidelity, outputs
from edgeprune.graph import Graph, trace
from edgeprune.importance import CRITERIA, NEEDS_STATS, Ranking, rank
from edgeprune.models import LoadedModel, load_model
from edgeprune.plan import Plan, plan_from_rankings, uniform_widths
from edgeprune.prune import prune, structural_copy

log = logging.getLogger(__name__)

Tick = Callable[[int, int], None]
Stages = Callable[[str, int | None], Tick]  # (stage description, total steps) -> progress callback


def no_progress(description: str, total: int | None = None) -> Tick:
    return lambda done, total: None


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; `None` means the default."""

    model: str | None = None  # default: the bundled example
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    calibration: str | None = None  # recipe name or file; default digits for the example, random otherwise
    criterion: str = "cap"
    compensation: bool = True
    channel_multiple: int = 8
    ignore: tuple[str, ...] = ()
    seed: int = 0
    exporter: str = "dynamo"

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise EdgePruneError(f"unknown criterion {self.criterion!r}; available: {', '.join(CRITERIA)}")
        if self.channel_multiple < 1:
            raise EdgePruneError(f"--channel-multiple must be at least 1, found {self.channel_multiple}")

    def recipe_spec(self) -> str:
        if self.calibration:
            return self.calibration
        return "digits" if (self.model or "example") == "example" else "random"


@dataclass
class Prepared:
    """Everything the widths do not change: loaded once per build."""

    config: PruneConfig
    loaded: LoadedModel
    data: CalibrationData
    graph: Graph
    stats: dict[str, LayerStats]
    rankings: dict[str, Ranking]
    base_outputs: tuple[torch.Tensor, torch.Tensor | None]
    timings_s: dict[str, float] = field(default_factory=dict)

    def plan(self, widths: dict[str, int], **meta: Any) -> Plan:
        c = self.config
        return plan_from_rankings(self.graph, self.rankings, widths, criterion=c.criterion,
                                  compensation=c.compensation, channel_multiple=c.channel_multiple,
                                  model=self.loaded.spec, seed=c.seed, meta=meta)

    def prune(self, plan: Plan) -> nn.Module:
        return prune(self.loaded.module, self.loaded.example_input, plan, self.stats if plan.compensation else None,
                     self.config.ignore)

    def fidelity(self, pruned: nn.Module) -> Fidelity:
        return fidelity(self.loaded.module, pruned, self.data, self.base_outputs)


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    log.info("%s: start", stage)
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
    log.info("%s: done in %.2fs", stage, timings[stage])


def prepare(config: PruneConfig, stages: Stages = no_progress, rank_groups: bool = True) -> Prepared:
    """Load the model and calibration data, trace groups, collect statistics and rank every group."""
    t: dict[str, float] = {}
    torch.manual_seed(config.seed)
    with timed(t, "load"):
        stages("loading model and calibration data", None)
        loaded = load_model(config.model, config.weights, config.input_shape, seed=config.seed)
        recipe = load_recipe(config.recipe_spec())
        data = load_data(recipe, loaded.input_shape)
    with timed(t, "trace"):
        stages("tracing channel groups", None)
        graph = trace(loaded.module, loaded.example_input, config.ignore)
        if not graph.groups:
            raise EdgePruneError(f"{loaded.spec} has no prunable channel groups"
                                 + (f" ({'; '.join(f'{k}: {v}' for k, v in list(graph.excluded.items())[:3])})"
                                    if graph.excluded else ""))
    stats: dict[str, LayerStats] = {}
    if config.compensation or config.criterion in NEEDS_STATS:
        with timed(t, "statistics"):
            n = -(-len(data.calib_x) // data.recipe.batch_size)
            stats = collect_statistics(loaded.module, graph.consumer_modules(), data.calib_batches(),
                                       progress=stages("collecting statistics", n), total_batches=n)
    rankings: dict[str, Ranking] = {}
    if rank_groups:
        with timed(t, "rank"):
            tick = stages(f"ranking channels ({config.criterion})", len(graph.groups))
            for i, g in enumerate(graph.groups):
                rankings[g.name] = rank(config.criterion, loaded.module, g, stats, config.seed, None)
                tick(i + 1, len(graph.groups))
    with timed(t, "baseline"):
        base_outputs = outputs(loaded.module, data)
    return Prepared(config, loaded, data, graph, stats, rankings, base_outputs, t)


# ---------------------------------------------------------------- artifacts

PRUNED_FORMAT = "edgeprune.pruned/1"


def save_pruned(path: Path, pruned: nn.Module, plan: Plan, loaded: LoadedModel, ignore: tuple[str, ...]) -> None:
    """pruned.pt: the pruned state dict and what is needed to rebuild its architecture (loadable weights_only)."""
    biased = [n for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    torch.save({"format": PRUNED_FORMAT, "model": loaded.spec, "weights": loaded.weights,
                "input_shape": list(loaded.input_shape), "ignore": list(ignore), "plan": plan.to_dict(),
                "biased": biased, "state_dict": pruned.state_dict()}, path)


def load_pruned(path: str | Path) -> tuple[nn.Module, Plan]:
    """Rebuild a pruned model from pruned.pt: the original model, the plan's architecture, the saved weights."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EdgePruneError(f"pruned model {path} does not exist") from None
    except Exception as e:
        raise EdgePruneError(f"cannot read pruned model {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(d, dict) or d.get("format") != PRUNED_FORMAT:
        raise EdgePruneError(f"{path} is not an edgeprune pruned.pt (format {PRUNED_FORMAT})")
    plan = Plan.from_dict(d["plan"])
    loaded = load_model(d["model"], d["weights"], tuple(d["input_shape"]))
    skeleton = structural_copy(loaded.module, loaded.example_input, plan, d["biased"], tuple(d["ignore"]))
    skeleton.load_state_dict(d["state_dict"])
    return skeleton.eval(), plan


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Write a folder under a temporary name and rename it into place: an interrupted run leaves nothing half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_size(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs and parameters (torch-pruning's counter): for the report, never as a latency proxy."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return {"macs": int(macs), "params": int(params)}


def prune_job(config: PruneConfig, out: str | Path, ratio: float | None = None, plan_path: str | None = None,
              stages: Stages = no_progress) -> dict[str, Any]:
    """`edgeprune prune`: one plan (uniform ratio or a plan file), pruned, exported, with held-out fidelity."""
    from edgeprune.export import export

    if (ratio is None) == (plan_path is None):
        raise EdgePruneError("give exactly one of --ratio (fraction of channels removed) or --plan plan.json")
    given = Plan.load(plan_path) if plan_path else None
    if given is not None:  # the plan decides criterion and compensation: reproduce it exactly
        config = dataclasses.replace(config, criterion=given.criterion, compensation=given.compensation,
                                     channel_multiple=given.channel_multiple)
    prep = prepare(config, stages, rank_groups=given is None)
    t = prep.timings_s
    plan = given if given is not None else prep.plan(uniform_widths(prep.graph, ratio, config.channel_multiple),
                                                     ratio=ratio)
    with timed(t, "prune"):
        stages("pruning and compensating", None)
        pruned = prep.prune(plan)
    with timed(t, "fidelity"):
        fid = prep.fidelity(pruned)
    with atomic_dir(out) as tmp, timed(t, "export"):
        stages("exporting to ONNX", None)
        exp = export(pruned, prep.loaded.example_input, tmp / "model.onnx", exporter=config.exporter)
        save_pruned(tmp / "pruned.pt", pruned, plan, prep.loaded, config.ignore)
        plan.save(tmp / "plan.json")
    before = {g.name: g.channels for g in prep.graph.groups}
    return {
        "model": prep.loaded.spec, "calibration": prep.data.recipe.name or prep.data.recipe.kind,
        "criterion": plan.criterion, "compensation": plan.compensation, "out": str(out),
        "widths": {g: {"before": before[g], "after": len(k)} for g, k in plan.kept.items()},
        "base": model_size(prep.loaded.module, prep.loaded.example_input),
        "pruned": model_size(pruned, prep.loaded.example_input),
        "fidelity": fid.to_dict(), "parity": exp.parity.to_dict() if exp.parity else None,
        "excluded_groups": prep.graph.excluded, "timings_s": t,
    }
