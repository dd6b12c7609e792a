"""The `build` job: widths searched against a latency budget on the target, the release verified, gated, reported.

    outcome = build(BuildConfig(prune=PruneConfig(model="torchvision:resnet18"), device="cpu", latency="0.5x"), "out")

`session.prepare()` runs everything that does not depend on the widths once; `build` reuses it for every candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.common.atomic import OutputDir, scratch_dir
from edgeprune.common.parallel import compute_threads, retained_memory, timed
from edgeprune.common.progress import Stages, no_progress
from edgeprune.config import BuildConfig
from edgeprune.inputs.targets import Target
from edgeprune.jobs.delivery import BuildOutcome, ReleaseRun, deliver, measurement_cache, release_report
from edgeprune.jobs.oracle import (
    FAR_UNDER,
    LatencyOracle,
    MeasuredOracle,
    Measurer,
    TableOracle,
    Verification,
    Verified,
    probe_of,
    verify_release,
)
from edgeprune.jobs.rescale import rescaled_release
from edgeprune.jobs.session import Inputs, Prepared, ProxyError, allocation_cost, fidelity_error, prepare
from edgeprune.quality.gates import Assessment, assess, check_gates_apply, run_metric
from edgeprune.report.contract import BuildReport, verdict
from edgeprune.runtimes.stats import LatencyStats
from edgeprune.search.allocate import AllocationInputs, width_options
from edgeprune.search.evolution import Space
from edgeprune.search.registry import NEEDS_COST, SEARCHES, SearchTask, make_widths_fn
from edgeprune.search.strength import Band, Candidate, Probe, SearchResult, search

if TYPE_CHECKING:
    from edgeprune.latency.table import LatencyTable

log = logging.getLogger(__name__)
# A release under this fraction of its budget is said on stderr (report.json's far_under_budget, under 0.9, is
# common where one group's latency step has nothing between: a warning there would be noise).
WARN_UNDER = 0.5


def build(config: BuildConfig, out: str | Path, stages: Stages = no_progress,
          on_step: Callable[[Candidate], None] | None = None, force: bool = False, inputs: Inputs | None = None,
          measure_fn: Callable[..., LatencyStats] | None = None, measurer: type[Measurer] = Measurer) -> BuildOutcome:
    """`edgeprune build`: search widths until the pruned model's measured latency on the target meets the budget.

    A build that misses its budget (exit 3) or a quality gate (exit 4) writes its artifacts to `OUT.failed/` and
    leaves `out` as it was: the last good release is never replaced by a failed one (`atomic.OutputDir`). `inputs`
    (the Python API) hands over a live model and calibration samples; `measure_fn` replaces `runtimes.measure`, and
    `measurer` the class that measures for the job (tests: a subclass whose figures for one stage they control)."""
    from edgeprune.inputs.targets import load_target
    from edgeprune.runtimes import runtime_for

    with compute_threads(), retained_memory():
        target = load_target(config.device)
        runtime_for(target)  # fail fast (exit 5) before any heavy work when the device cannot be measured
        table = None
        if config.lut:  # and fail fast (exit 2) on a bad or mismatched table
            from edgeprune.latency.table import check_table_for, load_lut

            table = load_lut(config.lut)
            check_table_for(table, target, force=config.force_lut, path=config.lut)
        with OutputDir(out, force) as outdir:
            return _build_into(config, outdir, stages, on_step, target, table, inputs,
                               measurer(target, measurement_cache(config), stages, {}, measure_fn))


def _build_into(config: BuildConfig, outdir: OutputDir, stages: Stages, on_step: Callable[[Candidate], None] | None,
                target: Target, table: LatencyTable | None, inputs: Inputs | None, measurer: Measurer) -> BuildOutcome:
    """The stages: prepare, baseline, inner level, search (and the table's device check), verification, release."""
    pc = dataclasses.replace(config.prune, channel_multiple=target.channel_multiple) \
        if config.prune.channel_multiple is None else config.prune
    session = prepare(pc, stages, inputs=inputs)
    check_gates_apply(config, session.data)
    metric_before = run_metric(config, session.loaded.module, "the unpruned model")
    measurer.start(session.timings_s, calibration=session.data.calib_x, kind=session.data.recipe.kind)
    with scratch_dir("build") as work:  # named with this PID: the next job removes it after a kill -9
        work_dir = Path(work)
        oracle: LatencyOracle = TableOracle(session, table, target, config.lut or "") if table is not None \
            else MeasuredOracle(session, measurer, work_dir, pc.exporter)
        base = oracle.baseline(config.budget.relative)
        # int8: the unpruned float model too, for the speed-up over it (the budget rests on the quantised one)
        base_float = measurer.float_figure(work_dir / "base.onnx", "measuring unpruned float model") \
            if measurer.quantizer is not None and table is None else None
        budget_ms = config.budget.ms(base.median)
        measurer.aim = Band(budget_ms, config.tolerance, config.margin_k)  # its side clear: no more pairs
        run = BuildRun(config, target, measurer, session.loaded, session.data, session.timings_s, base, base_float,
                       budget_ms, session, oracle, inner_level(config, session, table),
                       table is not None)
        result = run_search(run, on_step, stages)
        verify = Verification(session, measurer, work_dir, pc.exporter, run.budget_ms,
                              {"budget_ms": run.budget_ms, "budget": config.budget.text}, target.name, run.from_table)
        if run.from_table and config.search == "strength":
            result = check_table(run, verify, result)
        release, result = verify_release(result, run.budget_ms, verify, functools.partial(resume_search, run))
        release, sized = rescaled_release(run, session, release, work_dir)
        return finish_build(run, outdir, release, result, metric_before, sized)


@dataclass(frozen=True)
class InnerLevel:
    """How the search turns a strength into widths, and what it scores them by."""

    proxy: str  # fidelity | loss
    allocation: str  # step | latency
    error_of: Callable[[dict[str, int]], float] | None
    widths_for: Callable[[float], dict[str, int]]
    options: dict[str, list[int]]  # each group's admissible widths, for the search's bisection of one group's width
    predict: Callable[[dict[str, int]], float] | None = None  # the latency model that aims the search's steps


@dataclass(frozen=True)
class BuildRun(ReleaseRun):
    """One build's state once its baseline is measured: the settings, the session, the target and its measurer, the
    budget and the baseline (`ReleaseRun`), the latency oracle and the inner level the search runs over."""

    session: Prepared
    oracle: LatencyOracle
    inner: InnerLevel
    from_table: bool  # --lut: the oracle is the table's prediction


def inner_level(config: BuildConfig, session: Prepared, table: LatencyTable | None) -> InnerLevel:
    kind = session.data.recipe.kind
    proxy = config.proxy if config.proxy != "auto" else "loss" if kind == "random" else "fidelity"
    if proxy == "loss" and kind != "random":
        log.warning("--proxy loss on real calibration data: the CaP loss curves do not compare across layers and "
                    "allocated worse than uniform widths on the bundled example (output error 0.241 against 0.195 "
                    "at about 0.25x MACs); --proxy fidelity (the default here) measures the network's output")
    if config.output_weights and proxy != "fidelity":
        log.warning("--output-weight weighs outputs in the fidelity proxy; this build's proxy is %s, which ignores "
                    "them (--proxy fidelity uses them)", proxy)
    error_of = fidelity_error(session, session.timings_s, dict(config.output_weights)) if proxy == "fidelity" \
        else None
    allocation = config.allocation_for(proxy, session.config.compensation)
    cost = allocation_cost(session, table) if allocation in NEEDS_COST else None
    multiple = session.config.channel_multiple
    inputs = AllocationInputs(session.graph, session.rankings, multiple, error=error_of, cost=cost,
                              model=session.loaded.module, samples=session.data.calib_x)
    # the search's steps aimed by the latency model where widths_for is cheap to call again (`strength._predicted_u`)
    cheap = allocation == "latency" or (allocation == "step" and error_of is None)
    predict = (cost or allocation_cost(session, table)) if cheap else None
    return InnerLevel(proxy, allocation, error_of, make_widths_fn(allocation, inputs),
                      width_options(session.graph, multiple), predict)


def run_search(run: BuildRun, on_step: Callable[[Candidate], None] | None, stages: Stages) -> SearchResult:
    """The search `config.search` names (`search.registry.SEARCHES`) against the oracle."""
    config, session, inner, base = run.config, run.session, run.inner, run.base
    with timed(session.timings_s, "search"):
        stages(f"searching widths for {run.budget_ms:.3f} ms on {run.target.name}", None)
        task = SearchTask(inner.widths_for, inner.options, inner.error_of, run.oracle, run.oracle.remeasure,
                          Band(run.budget_ms, config.tolerance, config.margin_k), config.max_steps,
                          probe_of(base),
                          {g.name: g.channels for g in session.graph.groups},
                          functools.partial(evolution_space, run), on_step, inner.predict)
        return SEARCHES[config.search](task)


def evolution_space(run: BuildRun) -> Space:
    """The session's part of `--search evolution`: groups, the fidelity proxy, the MACs latency model (none with a
    table: the table's oracle serves), the seed."""
    session = run.session
    error = run.inner.error_of or fidelity_error(session, session.timings_s, dict(run.config.output_weights))
    cost = allocation_cost(session, None) if run.base.source != "lut" else None
    return Space(session.graph, session.config.channel_multiple, error, cost, session.config.seed, session.timings_s)


def check_table(run: BuildRun, verify: Verification, result: SearchResult) -> SearchResult:
    """One device measurement of the plan a table search chose (the model as it would ship, so that its verification
    is then served from the cache); when it misses the band, the predictions are corrected by the measured error and
    the search runs again. The trace keeps both rounds."""
    if result.best is None:
        return result
    oracle, config = run.oracle, run.config
    assert isinstance(oracle, TableOracle)
    got = verify(result.best).stats
    trace = list(result.trace) + [Candidate(step=len(result.trace) + 1, strength=result.best.strength,
                                            widths_digest=result.best.widths_digest, latency_ms=got.median,
                                            source=got.source, widths=result.best.widths)]
    if not (1 - config.tolerance) * run.budget_ms <= got.median <= run.budget_ms:
        oracle.correction = got.median / result.best.latency_ms
        with timed(run.timings_s, "search"):
            result = search(run.inner.widths_for, oracle, Band(run.budget_ms, config.tolerance),
                            max_steps=config.max_steps)
        trace += [dataclasses.replace(c, step=len(trace) + i + 1) for i, c in enumerate(result.trace)]
    return dataclasses.replace(result, trace=tuple(trace))


def resume_search(run: BuildRun, res: SearchResult, verified: dict[str, LatencyStats]) -> SearchResult | None:
    """The search again after a verification miss, the verified figures in place of its own (None when it cannot:
    a table search, or no measurements left)."""
    config, inner = run.config, run.inner
    used = sum(1 for c in res.trace if c.source.startswith("measured"))
    if run.from_table or used >= config.max_steps or config.search != "strength":
        return None
    known = {c.widths_digest: Probe(c.latency_ms, c.source, c.spread) for c in res.trace}
    known.update({d: Probe(v.median, "verified", v.spread) for d, v in verified.items()})
    with timed(run.timings_s, "search"):
        more = search(inner.widths_for, run.oracle, Band(run.budget_ms, config.tolerance, config.margin_k),
                      max_steps=len(known) + config.max_steps - used, known=known, remeasure=run.oracle.remeasure,
                      error_of=inner.error_of, options=inner.options.__getitem__)
    seen = {c.widths_digest for c in res.trace}
    new = [c for c in more.trace if c.widths_digest not in seen]
    trace = list(res.trace) + [dataclasses.replace(c, step=len(res.trace) + i + 1) for i, c in enumerate(new)]
    return dataclasses.replace(more, trace=tuple(trace))


def finish_build(run: BuildRun, outdir: OutputDir, release: Verified, result: SearchResult,
                 metric_before: float | None, sized: dict[str, Any]) -> BuildOutcome:
    """The release: fidelity, parity of its ONNX file, the user's metric, the gates, the report, the artifacts."""
    recovery = None
    if run.config.recover:
        release, recovery = recovered(run, release)
    with timed(run.timings_s, "fidelity"):
        a = assess(run.config, run.loaded.module, release.pruned, run.loaded.example_input, run.data,
                   run.session.base_outputs, metric_before, release.float_path or release.path,
                   release.path if release.float_path else None)
    report = build_report(run, release, result, a, recovery, sized)
    final, budget_ms = release.stats.median, run.budget_ms
    if report.met and final < WARN_UNDER * budget_ms:
        log.warning("released at %.3f ms, %.0f%% of the %.3f ms budget: every candidate measured nearer the budget was "
                    "over it or had a larger proxy error (report.json search.trace)%s", final,
                    100 * final / budget_ms, budget_ms, "" if run.session.config.compensation else
                    "; without compensation a sliced group's output error saturates, so the proxy cannot tell "
                    "narrow models from wide ones")
    budget = run.config.budget.text
    advice = (f"; budget {budget} met at {final:.3f} ms; recover it with --recover MINUTES (distillation from the "
              f"unpruned model), loosen the budget (e.g. --latency {looser(budget)}), or lower the gate")
    return deliver(run, outdir, report, verdict(report, missed(run, release, result), advice), release, a.fidelity,
                   tuple(result.trace), "this build's artifacts")


def recovered(run: BuildRun, release: Verified) -> tuple[Verified, dict[str, Any]]:
    """`--recover MINUTES`: the released model distilled from the unpruned one on augmented calibration images
    (`recovery.train`, its best epoch on held-back images kept), then exported again. Its widths, and so its latency,
    are those verified: training changes weights only."""
    import copy

    from edgeprune.jobs.oracle import export_candidate
    from edgeprune.recovery.train import FinetuneConfig, train

    minutes, session = run.config.recover, run.session
    student = copy.deepcopy(release.pruned)
    rc = FinetuneConfig(stage="distill", minutes=minutes, seed=session.config.seed, augment=True, freeze_bn=True,
                        lr=run.config.recover_lr)
    with timed(run.timings_s, "recover"):
        done = train(student, run.loaded.module, run.data.calib_x, None, rc, keep_best=True)
        float_path = release.path.parent / "recovered.onnx"
        path = export_candidate(student, run.loaded.example_input, float_path, session.config.exporter,
                                run.measurer.quantizer)
    if done.validation is not None and done.validation["best_step"] == 0:
        log.warning("--recover %g: no epoch lowered the loss on the %d held-back calibration images (%.4g untrained, "
                    "%.4g last); the untrained model is released", minutes, done.validation["samples"],
                    done.validation["before"], done.validation["last"])
    return dataclasses.replace(release, pruned=student, path=path,
                               float_path=float_path if path != float_path else None), \
        {"minutes": minutes, "lr": rc.learning_rate, **done.to_dict()}


def build_report(run: BuildRun, release: Verified, result: SearchResult, a: Assessment,
                 recovery: dict[str, Any] | None, sized: dict[str, Any]) -> BuildReport:
    """report.json of a build: a release's (`delivery.release_report`) with the search that chose it."""
    pc, session, final = run.session.config, run.session, release.stats.median
    met = final <= run.budget_ms
    curves = session.rankings and all(r.loss is not None for r in session.rankings.values())
    widths = {g.name: {"before": g.channels, "after": release.candidate.widths[g.name],
                       **({"unit": g.unit} if g.units else {})} for g in session.graph.groups}
    search_entry = {
        "criterion": pc.criterion, "compensation": pc.compensation, "repair": release.plan.repair,
        "proxy": "fidelity" if run.inner.proxy == "fidelity" else "cap-loss-curve" if curves else "uniform",
        "allocation": run.inner.allocation, "outer": run.config.search, "channel_multiple": pc.channel_multiple,
        "tolerance": run.config.tolerance, "converged": result.converged,
        "far_under_budget": met and final < FAR_UNDER * run.budget_ms,
        "measured_candidates": sum(1 for c in result.trace if c.source.startswith("measured")),
        **({"proxy_evaluations": run.inner.error_of.evaluations} if isinstance(run.inner.error_of, ProxyError) else {}),
        "trace": [c.to_dict() for c in result.trace], "input_size": sized}
    return release_report(run, release, a, widths, search_entry, lut=run.config.lut, lut_check=lut_check(run),
                          excluded_groups=session.graph.excluded, exporter=pc.exporter, recovery=recovery)


def lut_check(run: BuildRun) -> dict[str, Any] | None:
    """The --lut table's stored self-check for this model (`latency.table.stored_check`), for the report."""
    if not run.config.lut:
        return None
    from edgeprune.latency.table import load_lut, stored_check

    return stored_check(load_lut(run.config.lut), run.loaded.spec, run.config.lut)


def looser(budget: str) -> str:
    """A budget with more room than `budget` for the way-out line: 0.7x -> 0.8x, 10ms -> 12ms."""
    from edgeprune.config import parse_budget

    b = parse_budget(budget)
    if b.relative:
        return f"{min(0.95, b.value + 0.1):.2g}x"
    return f"{1.2 * b.value:.3g}ms"


def missed(run: BuildRun, release: Verified, result: SearchResult) -> str:
    """The line of a build that missed its budget: on verification (timing noise), or unreachable."""
    final, chosen, budget_ms, budget = release.stats, release.candidate, run.budget_ms, run.config.budget.text
    if result.best is not None:
        # the search did find models under budget, but none stayed under it when measured again: timing noise
        over = final.median / budget_ms - 1
        return (f"budget {budget_ms:.3f} ms ({budget}) not met on verification: the search measured "
                f"{chosen.latency_ms:.3f} ms for the chosen model, {len(final.repeat_medians)} fresh repeats measured "
                f"{final.median:.3f} ms ({over:+.1%}); timing noise on {run.target.name} exceeds the margin: re-run "
                f"on a quieter machine, or raise --tolerance so that the search aims further under the budget")
    small = ", ".join(f"{g}={w}" for g, w in list(chosen.widths.items())[:6])
    return (f"budget {budget_ms:.3f} ms ({budget}) is unreachable on {run.target.name}: the lowest latency reached is "
            f"{final.median:.3f} ms (unpruned {run.base.median:.3f} ms) at minimum widths ({small}, ...); "
            f"raise the budget, lower --channel-multiple, or allow narrower groups")
