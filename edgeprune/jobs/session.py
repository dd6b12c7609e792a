"""The width-independent part of a job, done once: model and data loaded, groups traced, statistics collected,
channels ranked; then any widths become a plan, a pruned model, a fidelity figure.

    session = prepare(PruneConfig(model="example"))
    pruned = session.prune(session.plan({"stem.0": 16, ...}))
    error = fidelity_error(session, timings)        # the search's proxy, memoised by widths
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgeprune.common.parallel import compute_threads, group_workers, heavy_stage_threads, retained_memory, timed
from edgeprune.common.progress import Stages, no_progress
from edgeprune.compensation.memory import check_statistics_memory
from edgeprune.compensation.statistics import LayerStats, collect_statistics
from edgeprune.config import PruneConfig
from edgeprune.dependency.graph import CallRecorder, Graph, trace
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.inputs.data import CalibrationData, load_data
from edgeprune.inputs.models import LoadedModel, load_model
from edgeprune.inputs.outputs import check_label_range
from edgeprune.inputs.recipe import Recipe, load_recipe
from edgeprune.plan import Plan, plan_from_rankings
from edgeprune.quality.fidelity import Fidelity, check_finite_baseline, fidelity, outputs
from edgeprune.scoring.base import Ranking
from edgeprune.scoring.papers import with_merges
from edgeprune.scoring.registry import NEEDS_STATS, check_labels, criterion_signals, rank_all
from edgeprune.surgery.apply import prune

if TYPE_CHECKING:
    from edgeprune.latency.table import LatencyTable

log = logging.getLogger(__name__)

# How statistics are sampled: a plan replayed by another version reproduces its widths but not its weights.
# 2: random subsampling offsets per batch and layer, seeded by the plan's seed; shrinkage always (2026-12).
# 3: on real data, without the fidelity proxy's samples (`proxy_samples`, issue 28).
# 4: the held-back samples are whole scenes (`hold_back`, `scenes.scenes_first`).
STATISTICS_VERSION = 4


@dataclass
class Prepared:
    """Everything the widths do not change: loaded once per build."""

    config: PruneConfig
    loaded: LoadedModel
    data: CalibrationData
    graph: Graph
    stats: dict[str, LayerStats]
    rankings: dict[str, Ranking]
    base_outputs: tuple[dict[str, torch.Tensor], torch.Tensor | None]
    timings_s: dict[str, float] = field(default_factory=dict)
    solvers: dict = field(default_factory=dict)  # per-consumer PrefixSolver, shared by every candidate

    def plan(self, widths: dict[str, int], **meta: Any) -> Plan:
        c = self.config
        if c.compensation:  # compensated weights follow from the calibration data: `prune --plan` checks it
            meta = {"calibration": c.recipe_spec(), "calibration_digest": self.calib_digest,
                    "statistics": STATISTICS_VERSION, **meta}
        plan = plan_from_rankings(self.graph, self.rankings, widths, criterion=c.criterion,
                                  compensation=c.compensation, channel_multiple=c.channel_multiple,
                                  model=self.loaded.spec, seed=c.seed, meta=meta,
                                  repair=c.repair_for(self.data.recipe.kind))
        return with_merges(plan, self.graph, self.rankings)  # similarity: merged channels, replayed by the plan

    @functools.cached_property
    def calib_digest(self) -> str:
        """Digest of the calibration samples, hashed once: every candidate plan records it."""
        return self.data.calib_digest()

    def prune(self, plan: Plan, probe: bool = False) -> nn.Module:
        """Pruned copy. `probe=True` (a search candidate, measured for its latency only): the channels sliced, no
        repair, for a candidate's latency does not depend on its weights (the repair was 5 of every 7 s a candidate
        of EfficientNet-Lite0 spent being pruned); consumers without a bias get a zero one, as the repair gives them,
        so the measured graph is the released one's. A released model always takes the direct solve, which
        `prune --plan` reproduces bit for bit."""
        orders = self.orders() if probe and self.rankings else None
        biased = probe and plan.compensation  # the release's consumers get the repair's biases
        if probe:
            plan = dataclasses.replace(plan, compensation=False)
        if plan.compensation and plan.repair == "sequential":  # forward passes, like the statistics: all threads
            with heavy_stage_threads(self.data.batch_values):  # fitted without the held-back scenes, as the stats
                return prune(self.loaded.module, self.loaded.example_input, plan, self.stats, self.config.ignore,
                             graph=self.graph, batches=sequential_batches(self.data))
        with group_workers(self.data.batch_values) as workers:
            model = prune(self.loaded.module, self.loaded.example_input, plan,
                          self.stats if plan.compensation else None, self.config.ignore, orders,
                          graph=self.graph, workers=workers)
        return _zero_biases(model, self.graph, plan.widths()) if biased else model

    def prune_release(self, plan: Plan) -> tuple[Plan, nn.Module]:
        """The released model of `plan`, and the plan it follows. With `--repair auto` on real data the sequential
        repair ships only where it generalises: both repairs are graded on the held-back scenes (`hold_back`), which
        neither was fitted on, and the one with the lower output error ships; the plan records the repair chosen and
        both errors (meta `repair_check`), so `prune --plan` replays it. Fitted on the pruned network's own inputs,
        the sequential repair can follow the calibration scenes too closely: on EfficientNet-Lite0 calibrated on
        crops of 16 photos it kept the unpruned top-1 on 16% of other photos' crops where the independent repair of
        the same widths kept 39% (issue 28)."""
        model = self.prune(plan)
        if not (self.config.repair == "auto" and plan.compensation and plan.repair == "sequential"
                and self.data.held_back):
            return plan, model
        alt_plan = dataclasses.replace(plan, repair="independent")
        alt = self.prune(alt_plan)
        x = torch.from_numpy(self.data.calib_x[:proxy_samples(self.data)].copy())
        seq, ind = held_back_error(self.loaded.module, model, x), held_back_error(self.loaded.module, alt, x)
        check = {"sequential": round(seq, 6), "independent": round(ind, 6)}
        log.info("repair on the held-back scenes: sequential %.4f, independent %.4f (relative output error)", seq, ind)
        if seq <= ind:
            return dataclasses.replace(plan, meta={**plan.meta, "repair_check": check}), model
        return dataclasses.replace(alt_plan, meta={**plan.meta, "repair_check": check}), alt

    def orders(self) -> dict[str, tuple[int, ...]]:
        """Channel order per group: what lets `solvers` serve every width of a consumer."""
        return {g: r.order for g, r in self.rankings.items()}

    def fidelity(self, pruned: nn.Module) -> Fidelity:
        return fidelity(self.loaded.module, pruned, self.data, self.base_outputs)


def check_traced(graph: Graph, recorder: CallRecorder, where: str) -> None:
    """Refuse a model whose calibration or held-out batches run layers the trace (one example input) never saw:
    data-dependent control flow would make the pruning silently wrong for those layers. Every batch the job forwards
    anyway is recorded (`CallRecorder`), so the check costs no extra forward pass."""
    missed = sorted(set(recorder.called) - set(graph.traced))
    if missed:
        raise EdgePruneError(
            f"layer {missed[0]}{f' (and {len(missed) - 1} more)' if len(missed) > 1 else ''} runs on {where} but not "
            f"on the example input the dependency trace used (data-dependent control flow); edgeprune cannot prune "
            f"such a model safely: make forward() take the same path for every input")


@contextmanager
def model_runs(loaded: LoadedModel, what: str, batch_size: int) -> Iterator[None]:
    """A forward pass of the user's model that fails is their model's problem, said in one line."""
    try:
        yield
    except EdgePruneError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as e:
        first = first_line(e)
        raise EdgePruneError(
            f"model {loaded.spec} fails on {what} (batches of {batch_size}) although it ran on the example input "
            f"{list(loaded.input_shape)}: {first}; if forward() handles one sample at a time, set batch_size = 1 in "
            f"the calibration recipe") from None


@dataclass(frozen=True)
class Inputs:
    """What the Python API hands over instead of a model spec and a recipe: a loaded model (`models.from_module`)
    and calibration samples in memory with the recipe that splits them (kind `arrays`)."""

    loaded: LoadedModel | None = None
    recipe: Recipe | None = None
    arrays: tuple[np.ndarray, np.ndarray | None] | None = None


def prepare(config: PruneConfig, stages: Stages = no_progress, rank_groups: bool = True,
            inputs: Inputs | None = None) -> Prepared:
    """Load the model and calibration data (or take them from `inputs`), trace groups, collect statistics and rank
    every group."""
    with compute_threads(), retained_memory():
        return _prepare(config, stages, rank_groups, inputs or Inputs())


def _prepare(config: PruneConfig, stages: Stages, rank_groups: bool, inputs: Inputs) -> Prepared:
    t: dict[str, float] = {}
    torch.manual_seed(config.seed)
    with timed(t, "load"):
        stages("loading model and calibration data", None)
        loaded = inputs.loaded or load_model(config.model, config.weights, config.input_shape, seed=config.seed)
        recipe = inputs.recipe or load_recipe(config.recipe_spec())
        data = hold_back(load_data(recipe, loaded.input_shape, arrays=inputs.arrays), config.seed)
        config = config.for_data(data.recipe.kind, loaded.random_weights)  # criterion auto: datafree or cap
        if rank_groups:  # before any work: a criterion that needs labels on unlabelled data
            check_labels(config.criterion, data.labelled, config.pseudo_labels, recipe.name or recipe.kind)
    with timed(t, "trace"):
        stages("tracing channel groups", None)
        graph = trace(loaded.module, loaded.example_input, config.ignore)
        recorder = CallRecorder()
        bs = data.recipe.batch_size
        with model_runs(loaded, "the first calibration batch", bs), recorder.watch(loaded.module), torch.no_grad():
            loaded.module(next(iter(data.calib_batches())))
        check_traced(graph, recorder, "the first calibration batch")  # before the statistics: fail fast
        if not graph.groups:
            raise EdgePruneError(f"{loaded.spec} has no prunable channel groups"
                                 + (f" ({'; '.join(f'{k}: {v}' for k, v in list(graph.excluded.items())[:3])})"
                                    if graph.excluded else ""))
        if config.compensation or config.criterion in NEEDS_STATS:  # exit 2 before the statistics are allocated
            check_statistics_memory(loaded.module, graph, data.recipe.batch_size, len(data.calib_x))
    with timed(t, "baseline"), model_runs(loaded, "the held-out data", bs), recorder.watch(loaded.module):
        base_outputs = outputs(loaded.module, data)  # before the statistics: a broken model fails in seconds
    check_traced(graph, recorder, "the held-out data")
    check_finite_baseline(loaded.module, data, base_outputs[0], loaded.spec)
    check_label_range(base_outputs[0], data, loaded.spec)
    stats: dict[str, LayerStats] = {}
    if config.compensation or config.criterion in NEEDS_STATS:
        with timed(t, "statistics"), heavy_stage_threads(data.batch_values):
            skip = data.held_back  # the proxy's samples
            n = -(-(len(data.calib_x) - skip) // data.recipe.batch_size)
            stats = collect_statistics(loaded.module, graph.consumer_modules(), data.calib_batches(start=skip),
                                       progress=stages("collecting statistics", n), total_batches=n,
                                       strict=data.recipe.kind != "random", observe=recorder.watch)
            with model_runs(loaded, "the calibration data", bs), recorder.watch(loaded.module), torch.no_grad():
                for i in range(0, skip, bs):  # the proxy's samples run too: every layer they reach must be traced
                    loaded.module(torch.from_numpy(data.calib_x[i:min(i + bs, skip)].copy()))
        check_traced(graph, recorder, "the calibration data")
    rankings: dict[str, Ranking] = {}
    if rank_groups:
        with timed(t, "signals"), model_runs(loaded, "the calibration data", bs):
            signals = criterion_signals(config.criterion, loaded.module, graph, data, config.seed,
                                        config.pseudo_labels)
        with timed(t, "rank"), group_workers(data.batch_values) as workers:
            rankings = rank_all(config.criterion, loaded.module, graph.groups, stats, signals, config.seed, workers,
                                stages(f"ranking channels ({config.criterion})", len(graph.groups)))
    return Prepared(config, loaded, data, graph, stats, rankings, base_outputs, t)


def _zero_biases(model: nn.Module, graph: Graph, widths: dict[str, int]) -> nn.Module:
    """A zero bias for every consumer of a narrowed group that has none (the repair gives them one)."""
    modules = dict(model.named_modules())
    for g in graph.groups:
        if widths.get(g.name, g.channels) >= g.channels:
            continue
        for c in g.consumers:
            m = modules.get(c.module)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype))
    return model


SEQUENTIAL_VALUES = 24_000_000  # input values the sequential repair runs on: 159 images at 224x224, 30k at 28x28


def sequential_batches(data: CalibrationData) -> list[torch.Tensor]:
    """The calibration batches the sequential repair is fitted on: those after the held-back samples, at most
    `SEQUENTIAL_VALUES` input values (the first ones). Its two networks' passes cost like two forward passes over
    them, memory-bound at high resolution (EfficientNet-Lite0 on 512 images at 224x224: 40 s, half of it BatchNorm),
    while each layer's statistics keep only `MAX_POSITIONS` patches per image."""
    from edgeprune.surgery.repair import first_samples

    per_sample = int(np.prod(data.calib_x.shape[1:]))
    return first_samples(data.calib_batches(start=data.held_back), max(1, SEQUENTIAL_VALUES // max(per_sample, 1)))


PROXY_VALUES = 4_000_000  # input values per evaluation of the fidelity proxy: 256 digits, 26 images at 224x224


def proxy_samples(data: CalibrationData) -> int:
    """How many calibration samples (the first ones) the fidelity proxy runs on: about PROXY_VALUES input values, at
    least 8, at most 256 and a quarter of the calibration part. On real data the statistics, and so the independent
    repair the proxy applies, are collected without them: graded on the samples it was fitted to, the repair looked
    2x better than on others where it overfits (EfficientNet-Lite0's head at 0.29 of its width: output error 0.11
    on the fitted samples, 0.22 on others, issue 28), and the search cut exactly those groups."""
    n = max(8, min(256, PROXY_VALUES // int(np.prod(data.sample_shape))))
    return max(1, min(n, len(data.calib_x) // 4))


def hold_back(data: CalibrationData, seed: int) -> CalibrationData:
    """The calibration part with the samples the statistics leave out for the proxy first (`held_back` of them): on
    real data with at least 32 calibration samples, whole scenes of at least `proxy_samples` samples
    (`scenes.scenes_first`), else none (random data: nothing to generalise; a handful of samples: all are needed)."""
    if data.recipe.kind == "random" or len(data.calib_x) < 32:
        return data
    from edgeprune.inputs.scenes import scenes_first

    order, held = scenes_first(data.calib_x, proxy_samples(data), seed)
    return dataclasses.replace(data, calib_x=np.ascontiguousarray(data.calib_x[order]), held_back=held,
                               calib_y=None if data.calib_y is None else data.calib_y[order])


def held_back_error(base: nn.Module, pruned: nn.Module, x: torch.Tensor) -> float:
    """||y_pruned - y|| / ||y|| on `x`, every output flattened and joined (`quality.fidelity.joined`; unweighted)."""
    from edgeprune.inputs.outputs import flatten_outputs
    from edgeprune.quality.fidelity import joined

    def outputs(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return joined(dict(flatten_outputs(model.eval()(x)))).float()

    yb = outputs(base)
    return float(torch.linalg.norm(outputs(pruned) - yb) / torch.linalg.norm(yb).clamp_min(1e-30))


class ProxyError:
    """The `fidelity` proxy as a function of widths: output error of the masked, compensated network on calibration
    samples (a weighted mean over outputs, `weights` by output name), memoised by widths (the inner level and the
    search's choice among feasible candidates ask for the same widths); `evaluations` counts the distinct widths
    evaluated (report.json search.proxy_evaluations), the time goes to `timings["proxy"]`."""

    def __init__(self, prep: Prepared, timings: dict[str, float], weights: dict[str, float] | None = None) -> None:
        from edgeprune.quality.fidelity import MaskedProxy

        x = torch.from_numpy(prep.data.calib_x[:proxy_samples(prep.data)].copy())
        self.proxy = MaskedProxy(prep.loaded.module, prep.graph, prep.stats, x, repair=prep.config.compensation,
                                 orders=prep.orders(), solvers=prep.solvers, weights=weights)
        self.prep, self.timings, self.memo = prep, timings, {}

    @property
    def evaluations(self) -> int:
        return len(self.memo)

    def __call__(self, widths: dict[str, int]) -> float:
        from edgeprune.search.allocate import widths_digest

        key = widths_digest(widths)
        if key not in self.memo:
            with timed(self.timings, "proxy"):
                self.memo[key] = self.proxy.error(self.prep.plan(widths))
        return self.memo[key]


def fidelity_error(prep: Prepared, timings: dict[str, float],
                   weights: dict[str, float] | None = None) -> ProxyError:
    """The `fidelity` proxy of `prep` (see `ProxyError`)."""
    return ProxyError(prep, timings, weights)


def allocation_cost(prep: Prepared, table: LatencyTable | None) -> Callable[[dict[str, int]], float]:
    """The latency model of the latency-aware allocation: the table's prediction with --lut, else MACs."""
    from edgeprune.latency.cost import macs_cost, relative_cost, table_cost
    from edgeprune.latency.table import LayerModel

    layers = LayerModel.from_model(prep.loaded.module, prep.loaded.example_input, prep.graph, prep.loaded.spec,
                                   prep.config.channel_multiple or 1)
    cost = table_cost(table, layers) if table is not None else macs_cost(layers)
    return relative_cost(cost, layers.full())
