"""Latency of candidate widths (an oracle: measured on the target, or predicted by a latency table), and the
verification of the model to release.

    measurer = Measurer(target, cache, stages, timings)             # runtimes.measure, counting device runs
    oracle = MeasuredOracle(session, measurer, work_dir, config.prune.exporter)   # or TableOracle(session, ...)
    base = oracle.baseline(relative=True)                           # the unpruned model, this run
    probe = oracle(widths)                                          # search.strength.Probe
    release, result = verify_release(result, budget_ms, Verification(...), resume)

Both oracles answer the same protocol (`LatencyOracle`), so the build's driver never asks which one it has, and tests
give the build a `Measurer` whose figures they control instead of patching the runtimes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from edgeprune.common.parallel import timed
from edgeprune.common.progress import Stages
from edgeprune.errors import EdgePruneError
from edgeprune.export.quantize import Quantizer, warn_random_calibration
from edgeprune.jobs.session import Prepared
from edgeprune.plan import Plan
from edgeprune.runtimes.stats import LatencyStats, agree, consensus, interleaved
from edgeprune.search.allocate import widths_digest
from edgeprune.search.strength import Band, Candidate, Probe, SearchResult

if TYPE_CHECKING:
    import numpy as np

    from edgeprune.inputs.targets import Target
    from edgeprune.latency.table import LatencyTable
    from edgeprune.runtimes.cache import MeasurementCache

log = logging.getLogger(__name__)


def export_candidate(model: nn.Module, example: torch.Tensor, path: Path, exporter: str,
                     quantizer: Quantizer | None = None, search: bool = False) -> Path:
    """The file to measure: `model` exported to `path` and simplified, then, for an int8 target (`quantizer`),
    quantised beside it (`NAME.int8.onnx`; `search`: a candidate, only timed, calibrated on a few samples)."""
    from edgeprune.export.onnx import export_onnx, simplify_onnx

    export_onnx(model, example, path, exporter=exporter)
    simplify_onnx(path)
    return quantizer(path, search=search) if quantizer is not None else path


@dataclass(frozen=True)
class Verified:
    """A candidate rebuilt as it would ship (direct solve), exported and measured over the verification's sessions."""

    candidate: Candidate
    stats: LatencyStats
    pruned: nn.Module
    plan: Plan
    path: Path  # the file measured and released (int8 targets: the quantised model)
    float_path: Path | None = None  # int8 targets: the pruned model's float export, before quantisation

    def __iter__(self) -> Iterator[Any]:
        return iter((self.candidate, self.stats, self.pruned, self.plan, self.path))


# A noisy model's pairs (MobileNetV3 segmenters here: pruned / unpruned 0.57-0.70 pair to pair) are taken until the
# ratio's relative standard error is PAIR_SPREAD, at most PAIRS_LIMIT x the target's repeats: at the default tolerance
# (5%) and noise margin (k = 2) the margin k x spread then fits in half the band, where 3 pairs at a 7% scatter kept
# the search's ceiling at 0.92 of the budget and its band down to 0.87 of it (lraspp at 0.7x released at 0.75-0.86).
PAIR_SPREAD, PAIRS_LIMIT = 0.0125, 3
FRESH_PAIRS = 2  # new pairs a figure that reuses earlier ones takes at least (`Measurer._beside_anchor`)
FAR_FROM_AIM = 0.3  # a candidate's first two pairs this far from the budget (either way) are its figure
# pairs a far figure takes: one pair alone once read resnet18 at u = 0.590 as 1.49x the budget, between a u = 0.571
# of 0.97x and the u = 1 of 0.09x, and the search spent 8 more candidates and released at 0.86x
FAR_PAIRS = 2
FAR_UNDER = 0.9  # a release below this fraction of the budget wastes accuracy: the search resumes instead


def probe_of(stats: LatencyStats) -> Probe:
    """A measured figure as the search weighs it: its median, source and relative standard error."""
    return Probe(stats.median, stats.source, stats.spread)


def verify_release(result: SearchResult, budget_ms: float, verify_one: Callable[[Candidate], Verified],
                   resume: Callable[[SearchResult, dict[str, LatencyStats]], SearchResult | None],
                   max_resumes: int = 2) -> tuple[Verified, SearchResult]:
    """The model to release: the search's best if its verification is within budget, else the nearest feasible
    candidate that verifies. When the next fallback would be far under budget (< FAR_UNDER) and the search has steps
    left, the search resumes with the verified figures in place of its own (`resume` returns None when it cannot),
    instead of releasing a model much more pruned than the budget needs. Returns the release and the (possibly
    extended) search result."""
    tried: dict[str, Verified] = {}

    def order(res: SearchResult) -> list[Candidate]:
        first = [res.best] if res.best is not None else []
        rest = sorted((c for c in res.trace if c.latency_ms <= budget_ms and c not in first),
                      key=lambda c: -c.latency_ms)
        return [c for c in first + rest if c.widths_digest not in tried] or ([] if tried else [res.fastest])

    for _ in range(max_resumes + 1):
        todo = order(result)
        for i, cand in enumerate(todo):
            v = tried[cand.widths_digest] = verify_one(cand)
            if v.stats.median <= budget_ms:
                return v, result
            nxt = todo[i + 1] if i + 1 < len(todo) else None
            if nxt is None or nxt.latency_ms < FAR_UNDER * budget_ms:
                break
        more = resume(result, {d: v.stats for d, v in tried.items()})
        if more is None:
            break
        result = more
    for cand in order(result)[:max(0, 3 - len(tried))]:  # no steps left: the nearest feasible ones, as before
        v = tried[cand.widths_digest] = verify_one(cand)
        if v.stats.median <= budget_ms:
            return v, result
    return min(tried.values(), key=lambda v: v.stats.median), result


class Measurer:
    """`runtimes.measure` on one target for one job: its cache, its progress lines, its timings, and a count of the
    figures that were real device measurements (not served from the cache). `measure_fn` replaces the runtimes'
    function (tests: figures they control). `calibration` (the recipe's calibration samples) calibrates an int8
    target's quantisation (`quantizer`: the job's models are quantised on it before they are measured) and reaches
    the runtime (TensorRT's calibrator, for a float model), so nothing int8 is calibrated on random inputs.
    `interleave`: whether a relative budget's figures are taken beside the baseline (`anchor_to`); default the
    target's `[measure] interleave`, and off with a `measure_fn` (a pool of boards would split a pair over two)."""

    def __init__(self, target: Target, cache: MeasurementCache | None, stages: Stages, timings: dict[str, float],
                 measure_fn: Callable[..., LatencyStats] | None = None, calibration: np.ndarray | None = None,
                 interleave: bool | None = None) -> None:
        self.target, self.cache, self.stages, self.timings = target, cache, stages, timings
        self.measure_fn = measure_fn
        self.interleave = target.measure.interleave and measure_fn is None if interleave is None else interleave
        self.device_runs = 0
        self.aim: Band | None = None  # a build's budget: pairs beside the anchor stop once their verdict is clear
        self.pairs: dict[Path, tuple[list[LatencyStats], list[LatencyStats]]] = {}  # by file, beside the anchor
        self.start(timings, calibration)

    def anchor_to(self, path: Path, stats: LatencyStats) -> None:
        """A relative budget rests on `stats`, the figure of `path` (the unpruned model): when interleaving (the
        target's `[measure] interleave`), every later figure of another model is taken session by session beside
        `path` and expressed in the units of `stats` (`runtimes.stats.interleaved`), never from the cache."""
        if self.interleave and stats.source == "measured":
            self.anchor = (path, stats)

    def start(self, timings: dict[str, float], calibration: np.ndarray | None = None, kind: str | None = None) -> None:
        """Time into `timings` from now on, and pass `calibration` (when the target is INT8; `kind`: its recipe's)."""
        self.timings = timings
        self.anchor: tuple[Path, LatencyStats] | None = None  # see `anchor_to`
        int8 = calibration is not None and self.target.precision == "int8"
        self.extra = {"calibration": calibration} if int8 else {}
        self.quantizer = Quantizer(self.target.quantization, calibration) if int8 else None
        if self.quantizer is not None and kind is not None:
            warn_random_calibration(kind)

    def __call__(self, path: Path, what: str, cached: bool = True, repeats: int | None = None,
                 stage: str = "measure", reuse: Path | None = None) -> LatencyStats:
        """`path`'s figure. `reuse`: a file of the same architecture measured beside the anchor before (a search
        candidate, for its release's verification), whose pairs count towards `repeats` (see `_beside_anchor`)."""
        from edgeprune import runtimes

        fn = self.measure_fn or runtimes.measure
        if self.anchor is not None and path != self.anchor[0]:
            prior = self.pairs.get(reuse) if reuse is not None else None
            return self._beside_anchor(fn, path, what, repeats or self.target.measure.repeats, stage, prior)
        with timed(self.timings, stage):
            stats = fn(path, self.target, cache=self.cache if cached else None, repeats=repeats,
                       progress=self.stages(f"{what} on {self.target.name}", None), **self.extra)
        self.device_runs += stats.source == "measured"
        return stats

    def baseline(self, path: Path, relative: bool) -> LatencyStats:
        """The unpruned model's figure (`path`). For a relative budget on an interleaving target: one fresh figure,
        the anchor of every later one (`anchor_to`): a candidate's figure is its ratio to the fresh sessions of this
        model taken beside it, so the anchor only sets the units (the budget scales with it too) and a second figure
        would decide nothing. For a relative budget elsewhere: two fresh figures, pooled when they agree, else a
        third and the odd one out dropped (`runtimes.stats.consensus`). Otherwise one figure, from the cache where
        it has one."""
        stats = self(path, "measuring unpruned model", cached=not relative)
        if relative and stats.source == "measured" and self.interleave:
            self.anchor_to(path, stats)
        elif relative and stats.source == "measured":  # the budget scales with it: a second, fresh figure
            figures = [stats, self(path, "measuring unpruned model again", cached=False)]
            if not agree(*figures):
                figures.append(self(path, "measuring unpruned model a third time", cached=False))
            stats = consensus(figures)
        return stats

    def _beside_anchor(self, fn: Callable[..., LatencyStats], path: Path, what: str, repeats: int, stage: str,
                       prior: tuple[list[LatencyStats], list[LatencyStats]] | None = None) -> LatencyStats:
        """`repeats` pairs of one fresh session of the anchor's model, then one of `path`'s (`anchor_to`); more pairs,
        up to `PAIRS_LIMIT` x repeats, while the ratio's relative standard error is above `PAIR_SPREAD` and the
        build's budget (`aim`) lies within its noise margin, `aim.k` standard errors either side of the figure: a
        figure whose side of the budget is clear needs no more pairs to decide a search step or a release (the
        search's ceiling and band take its spread into account), so only figures near the budget pay for precision
        (mobilenet_v2 at 0.5x: a verification at 0.94 of the budget took 15 pairs, 10.6 s, where 5 decided it). A
        search candidate (`stage` "measure") whose first `FAR_PAIRS` pairs put it further than `FAR_FROM_AIM` from
        the budget stops there, unless the two disagree so much that the budget lies within its noise margin: one
        spiked session made two pairs read resnet18 at u = 0.571 as 1.40 of the budget with a 30% spread (its
        neighbours measured 0.87-0.90), and mobilenet_v2 at u = 0.6253 as 0.66 with 31% (0.84-0.85): the first set
        the search's over-budget end, the second, infeasible only by its margin, did too, and both builds released
        under the band (0.87, 0.85) with the cliff they were after never tried.

        `prior`: pairs of the same architecture taken before (the search's, of the candidate a verification
        measures), counted among the `repeats` after at least `FRESH_PAIRS` new ones: they are ratios to the anchor
        taken the same way, so the machine's speed since then cancels as it does between pairs (resnet50's
        verification: 2 new pairs instead of 5, about 9 s)."""
        base_path, anchor = self.anchor  # type: ignore[misc]
        limit = PAIRS_LIMIT * repeats
        tick = self.stages(f"{what} on {self.target.name}, beside the unpruned model", repeats)
        figures: list[LatencyStats] = list(prior[0]) if prior else []
        bases: list[LatencyStats] = list(prior[1]) if prior else []
        old = len(figures)
        repeats = max(repeats, old + FRESH_PAIRS) if old else repeats
        limit = max(limit, repeats)

        def done() -> bool:
            if not figures:
                return False
            fig = interleaved(figures, bases, anchor.median)
            if (self.aim is not None and stage == "measure" and len(figures) >= FAR_PAIRS
                    and abs(fig.median / self.aim.budget_ms - 1) > FAR_FROM_AIM
                    and not self.aim.ambiguous(probe_of(fig))):
                return True
            if len(figures) < repeats:
                return False
            return len(figures) >= limit or fig.spread <= PAIR_SPREAD or self._clear(fig)

        with timed(self.timings, stage):
            while not done():
                bases.append(fn(base_path, self.target, cache=None, repeats=1, progress=None, **self.extra))
                figures.append(fn(path, self.target, cache=None, repeats=1, progress=None, **self.extra))
                tick(len(figures), max(repeats, len(figures)))
        self.device_runs += 1
        self.pairs[path] = (figures, bases)
        return interleaved(figures, bases, anchor.median)

    def _clear(self, fig: LatencyStats) -> bool:
        """Whether more pairs could not change what the build does with this figure: the budget lies outside its
        noise margin, and it is not a figure far under budget that the search's band accepts only because its spread
        is wide (the band's floor falls with the spread: at 6% it reaches 0.84 of the budget, and
        mobilenetv3_small_050, hardcorenas_a and deit_tiny were released at 0.86-0.90 after 5 pairs each)."""
        if self.aim is None:
            return False
        p = probe_of(fig)
        wide_in_band = self.aim.in_band(p) and p.latency_ms < FAR_UNDER * self.aim.budget_ms
        return not self.aim.ambiguous(p) and not wide_in_band

    def float_figure(self, path: Path, what: str) -> LatencyStats:
        """`path`, a float model, on the target's float variant (`targets.float_target`): what an int8 model's
        speed-up over the float model is taken against."""
        from edgeprune.inputs.targets import float_target

        other = Measurer(float_target(self.target), self.cache, self.stages, self.timings, self.measure_fn)
        stats = other(path, what)
        self.device_runs += other.device_runs
        return stats


class LatencyOracle(Protocol):
    """What the search and the build need of a latency source."""

    remeasure: Callable[[dict[str, int]], Probe] | None  # a fresh second figure, where the source is noisy

    def __call__(self, widths: dict[str, int]) -> Probe: ...

    def baseline(self, relative: bool) -> LatencyStats: ...


def measured_file(work_dir: Path, widths: dict[str, int], int8: bool) -> Path:
    """The file a search candidate of `widths` was measured as (`MeasuredOracle`): its export, or on an int8 target
    the export's quantised twin."""
    return work_dir / (f"cand-{widths_digest(widths)}" + (".int8.onnx" if int8 else ".onnx"))


class MeasuredOracle:
    """Candidates pruned with the fast independent repair (latency does not depend on the weights), exported,
    simplified and measured on the target."""

    def __init__(self, session: Prepared, measurer: Measurer, work_dir: Path, exporter: str) -> None:
        self.session, self.measurer, self.work_dir, self.exporter = session, measurer, work_dir, exporter

    @property
    def remeasure(self) -> Callable[[dict[str, int]], Probe] | None:
        """A second figure of a candidate its first could not place against the budget; none where candidates are
        measured beside the anchor (`Measurer._beside_anchor`), which already took pairs until the budget's side was
        clear or its pair limit was spent: a second round repeated the same pairs (mobilenet_v2: 9 more, 8 s)."""
        return None if self.measurer.anchor is not None else self._remeasure

    def _path(self, widths: dict[str, int]) -> Path:
        """The candidate's exported file; the measured one is its quantised twin on an int8 target."""
        return measured_file(self.work_dir, widths, int8=False)

    def _measured(self, widths: dict[str, int]) -> Path:
        return measured_file(self.work_dir, widths, self.measurer.quantizer is not None)

    def baseline(self, relative: bool) -> LatencyStats:
        """The unpruned model. A relative budget rests on a figure measured in this run, under this run's load: a
        cached one may come from a busier or quieter hour (0.2x once aimed at 0.22x of the unpruned latency); and on
        two fresh figures, one after the other, pooled when they agree, else a third and the odd one dropped
        (`runtimes.stats.consensus`): a single figure scattered by 15-25% either way here. On an interleaving target
        the candidates are then measured beside it (`Measurer.anchor_to`)."""
        path = self.work_dir / "base.onnx"
        t = self.session.timings_s
        with timed(t, "export"):
            path = export_candidate(self.session.loaded.module, self.session.loaded.example_input, path,
                                    self.exporter, self.measurer.quantizer, search=True)
        return self.measurer.baseline(path, relative)

    def __call__(self, widths: dict[str, int]) -> Probe:
        t = self.session.timings_s
        with timed(t, "prune"):
            pruned = self.session.prune(self.session.plan(widths), probe=True)
        with timed(t, "export"):
            path = export_candidate(pruned, self.session.loaded.example_input, self._path(widths), self.exporter,
                                    self.measurer.quantizer, search=True)
        return probe_of(self.measurer(path, "measuring candidate"))

    def _remeasure(self, widths: dict[str, int]) -> Probe:
        """A second, fresh measurement of a candidate too close to the budget to tell (the cache would only repeat
        the first figure)."""
        return probe_of(self.measurer(self._measured(widths), "measuring candidate again", cached=False))



class TableOracle:
    """Predictions of a latency table (`edgeprune lut`), scaled by `correction` once a device measurement of the
    chosen plan showed how far the table is off."""

    remeasure = None

    def __init__(self, session: Prepared, table: LatencyTable, target: Target, lut_path: str) -> None:
        from edgeprune.latency.table import LayerModel, calibration_key, stored_check

        spec = session.loaded.spec
        try:
            key = calibration_key(table, spec)
        except EdgePruneError:
            raise EdgePruneError(f"latency table {lut_path} has no calibration for {spec}; run `edgeprune lut --model "
                                 f"{spec} --device {target.source or target.name} --out {lut_path}`") from None
        self.table, self.target, self.spec = table, target, key
        self.check = stored_check(table, spec, lut_path)  # the table's self-check (`edgeprune lut --check`)
        if self.check["warning"]:
            log.warning("%s", self.check["warning"])
        self.layers = LayerModel.from_model(session.loaded.module, session.loaded.example_input, session.graph, spec,
                                            session.config.channel_multiple or target.channel_multiple)
        self.correction = 1.0

    def baseline(self, relative: bool) -> LatencyStats:
        from edgeprune.runtimes.stats import stats_from_repeats

        t = self.target
        return stats_from_repeats([[self.table.models[self.spec]["base_ms"]]], target=t.name, runtime=t.runtime,
                                  runtime_version=self.table.meta["runtime_version"], precision=t.precision,
                                  source="lut")

    def __call__(self, widths: dict[str, int]) -> Probe:
        from edgeprune.latency.table import predict

        pred, warns = predict(self.table, self.layers, widths)
        for w in warns[:3]:
            log.warning("latency table: %s", w)
        return Probe(pred * self.correction, "lut")


class Verification:
    """The released model of a candidate: rebuilt as it ships (direct solve, sequential repair where configured),
    exported, and measured again over the target's `final_repeats` sessions, fresh (a cached miss would replay on
    every later run). A figure over budget for a model the search measured within it is measured once more over
    twice the sessions: noise decides between the two, and that costs less than a more pruned fallback."""

    def __init__(self, session: Prepared, measurer: Measurer, work_dir: Path, exporter: str, budget_ms: float,
                 plan_meta: dict[str, Any], target_name: str, cached: bool) -> None:
        self.session, self.measurer, self.work_dir, self.exporter = session, measurer, work_dir, exporter
        self.budget_ms, self.plan_meta, self.target_name, self.cached = budget_ms, plan_meta, target_name, cached

    def plan(self, widths: dict[str, int]) -> Plan:
        return dataclasses.replace(self.session.plan(widths, **self.plan_meta), target=self.target_name)

    def __call__(self, cand: Candidate) -> Verified:
        plan = self.plan(cand.widths)
        t = self.session.timings_s
        with timed(t, "prune"):
            plan, pruned = self.session.prune_release(plan)
        float_path = self.work_dir / "final.onnx"
        with timed(t, "export"):
            path = export_candidate(pruned, self.session.loaded.example_input, float_path, self.exporter,
                                    self.measurer.quantizer)
        repeats = self.measurer.target.measure.final_repeats
        reuse = measured_file(self.work_dir, cand.widths, self.measurer.quantizer is not None)  # the search's pairs
        stats = self.measurer(path, "verifying the final model", cached=self.cached, repeats=repeats, stage="verify",
                              reuse=reuse)
        if stats.median > self.budget_ms and cand.source != "lut" and cand.latency_ms <= self.budget_ms:
            stats = self.measurer(path, "verifying the final model again", cached=False, repeats=2 * repeats,
                                  stage="verify")
        return Verified(cand, stats, pruned, plan, path, float_path if path != float_path else None)
