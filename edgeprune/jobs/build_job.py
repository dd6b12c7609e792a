"""The `build` job: widths searched against a latency budget on the target, the release verified, gated, reported.

    outcome = build(BuildConfig(prune=PruneConfig(model="torchvision:resnet18"), device="cpu", latency="0.5x"), "out")

`session.prepare()` runs everything that does not depend on the widths once; `build` reuses it for every candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.common.atomic import OutputDir, scratch_dir
from edgeprune.common.parallel import compute_threads, retained_memory, timed
from edgeprune.common.progress import Stages, no_progress
from edgeprune.common.versions import versions
from edgeprune.config import BuildConfig
from edgeprune.errors import ExitCode
from edgeprune.jobs.oracle import (FAR_UNDER, LatencyOracle, MeasuredOracle, Measurer, TableOracle, Verification,
                                   Verified, verify_release)
from edgeprune.jobs.session import Inputs, Prepared, allocation_cost, fidelity_error, prepare
from edgeprune.quality.fidelity import Fidelity
from edgeprune.quality.gates import assess, check_gates_apply, failed_gates, run_metric
from edgeprune.report.artifacts import save_pruned
from edgeprune.report.render import int8_entries, latency_entry
from edgeprune.search.allocate import AllocationInputs, width_options
from edgeprune.search.evolution import Space
from edgeprune.search.registry import NEEDS_COST, SEARCHES, SearchTask, make_widths_fn
from edgeprune.search.strength import Band, Candidate, Probe, search

log = logging.getLogger(__name__)
# A release under this fraction of its budget is said on stderr (report.json's far_under_budget, under 0.9, is
# common where one group's latency step has nothing between: a warning there would be noise).
WARN_UNDER = 0.5


@dataclass
class BuildOutcome:
    report: dict[str, Any]
    exit_code: int
    message: str | None = None  # the error line for exit codes 3 and 4
    out: str = ""  # where the artifacts went: the --out folder, or OUT.failed for exit codes 3 and 4
    release: Verified | None = None  # the released candidate: its plan, pruned module, final latency, ONNX file
    trace: tuple[Any, ...] = ()  # the search's candidates, in order
    base: Any = None  # LatencyStats of the unpruned model
    fidelity: Fidelity | None = None


def build(config: BuildConfig, out: str | Path, stages: Stages = no_progress,
          on_step: Callable[[Any], None] | None = None, force: bool = False, inputs: Inputs | None = None,
          measure_fn: Callable[..., Any] | None = None, measurer: type[Measurer] = Measurer) -> BuildOutcome:
    """`edgeprune build`: search widths until the pruned model's measured latency on the target meets the budget.

    A build that misses its budget (exit 3) or a quality gate (exit 4) writes its artifacts to `OUT.failed/` and
    leaves `out` as it was: the last good release is never replaced by a failed one (`atomic.OutputDir`). `inputs`
    (the Python API) hands over a live model and calibration samples; `measure_fn` replaces `runtimes.measure`, and
    `measurer` the class that measures for the job (tests: a subclass whose figures for one stage they control)."""
    from edgeprune.runtimes import runtime_for
    from edgeprune.inputs.targets import load_target

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


def measurement_cache(config: BuildConfig) -> Any:
    """The on-disk measurement cache a build or release uses (None with --no-cache)."""
    from edgeprune.runtimes import MeasurementCache

    return MeasurementCache.under(config.cache_dir) if config.use_cache else None


def _build_into(config: BuildConfig, outdir: OutputDir, stages: Stages, on_step: Callable[[Any], None] | None,
                target: Any, table: Any, inputs: Inputs | None, measurer: Measurer) -> BuildOutcome:
    """The stages: prepare, baseline, inner level, search (and the table's device check), verification, release."""
    pc = dataclasses.replace(config.prune, channel_multiple=target.channel_multiple) \
        if config.prune.channel_multiple == 0 else config.prune
    session = prepare(pc, stages, inputs=inputs)
    check_gates_apply(config, session)
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
        inner = inner_level(config, session, table)
        result = run_search(config, session, oracle, inner, budget_ms, base, on_step, stages, target)
        verify = Verification(session, measurer, work_dir, pc.exporter, budget_ms,
                              {"budget_ms": budget_ms, "budget": config.budget.text}, target.name, table is not None)
        if table is not None and config.search == "strength":
            result = check_table(config, oracle, inner, verify, result, budget_ms)  # type: ignore[arg-type]
        release, result = verify_release(result, budget_ms, verify,
                                         functools.partial(resume_search, config, oracle, inner, budget_ms, session,
                                                           table is not None))
        return finish_build(config, outdir, session, release, result, (base, base_float), budget_ms, inner,
                            measurer, target, metric_before)


@dataclass(frozen=True)
class InnerLevel:
    """How the search turns a strength into widths, and what it scores them by."""

    proxy: str  # fidelity | loss
    allocation: str  # step | latency
    error_of: Callable[[dict[str, int]], float] | None
    widths_for: Callable[[float], dict[str, int]]
    options: dict[str, list[int]]  # each group's admissible widths, for the search's bisection of one group's width


def inner_level(config: BuildConfig, session: Prepared, table: Any) -> InnerLevel:
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
    allocation = config.allocation_for(proxy)
    cost = allocation_cost(session, table) if allocation in NEEDS_COST else None
    multiple = session.config.channel_multiple
    inputs = AllocationInputs(session.graph, session.rankings, multiple, error=error_of, cost=cost,
                              model=session.loaded.module, samples=session.data.calib_x)
    return InnerLevel(proxy, allocation, error_of, make_widths_fn(allocation, inputs),
                      width_options(session.graph, multiple))


def run_search(config: BuildConfig, session: Prepared, oracle: LatencyOracle, inner: InnerLevel, budget_ms: float,
               base: Any, on_step: Callable[[Any], None] | None, stages: Stages, target: Any) -> Any:
    """The search `config.search` names (`search.registry.SEARCHES`) against the oracle."""
    with timed(session.timings_s, "search"):
        stages(f"searching widths for {budget_ms:.3f} ms on {target.name}", None)
        task = SearchTask(inner.widths_for, inner.options, inner.error_of, oracle, oracle.remeasure,
                          Band(budget_ms, config.tolerance, config.margin_k), config.max_steps,
                          Probe(base.median, base.source, base.spread),
                          {g.name: g.channels for g in session.graph.groups},
                          functools.partial(evolution_space, config, session, inner, base), on_step)
        return SEARCHES[config.search](task)


def evolution_space(config: BuildConfig, session: Prepared, inner: InnerLevel, base: Any) -> Space:
    """The session's part of `--search evolution`: groups, the fidelity proxy, the MACs latency model (none with a
    table: the table's oracle serves), the seed."""
    error = inner.error_of or fidelity_error(session, session.timings_s, dict(config.output_weights))
    cost = allocation_cost(session, None) if base.source != "lut" else None
    return Space(session.graph, session.config.channel_multiple, error, cost, session.config.seed, session.timings_s)


def check_table(config: BuildConfig, oracle: TableOracle, inner: InnerLevel, verify: Verification, result: Any,
                budget_ms: float) -> Any:
    """One device measurement of the plan a table search chose (the model as it would ship, so that its verification
    is then served from the cache); when it misses the band, the predictions are corrected by the measured error and
    the search runs again. The trace keeps both rounds."""
    if result.best is None:
        return result
    got = verify(result.best).stats
    trace = list(result.trace) + [Candidate(step=len(result.trace) + 1, strength=result.best.strength,
                                            widths_digest=result.best.widths_digest, latency_ms=got.median,
                                            source=got.source, widths=result.best.widths)]
    if not (1 - config.tolerance) * budget_ms <= got.median <= budget_ms:
        oracle.correction = got.median / result.best.latency_ms
        with timed(verify.session.timings_s, "search"):
            result = search(inner.widths_for, oracle, budget_ms, config.tolerance, config.max_steps)
        trace += [dataclasses.replace(c, step=len(trace) + i + 1) for i, c in enumerate(result.trace)]
    return dataclasses.replace(result, trace=tuple(trace))


def resume_search(config: BuildConfig, oracle: LatencyOracle, inner: InnerLevel, budget_ms: float, session: Prepared,
                  from_table: bool, res: Any, verified: dict[str, Any]) -> Any:
    """The search again after a verification miss, the verified figures in place of its own (None when it cannot:
    a table search, or no measurements left)."""
    used = sum(1 for c in res.trace if c.source.startswith("measured"))
    if from_table or used >= config.max_steps or config.search != "strength":
        return None
    known = {c.widths_digest: Probe(c.latency_ms, c.source, c.spread) for c in res.trace}
    known.update({d: Probe(v.median, "verified", v.spread) for d, v in verified.items()})
    with timed(session.timings_s, "search"):
        more = search(inner.widths_for, oracle, budget_ms, config.tolerance, len(known) + config.max_steps - used,
                      on_step=None, known=known, remeasure=oracle.remeasure, error_of=inner.error_of,
                      margin_k=config.margin_k, options=inner.options.__getitem__)
    seen = {c.widths_digest for c in res.trace}
    new = [c for c in more.trace if c.widths_digest not in seen]
    trace = list(res.trace) + [dataclasses.replace(c, step=len(res.trace) + i + 1) for i, c in enumerate(new)]
    return dataclasses.replace(more, trace=tuple(trace))


def finish_build(config: BuildConfig, outdir: OutputDir, session: Prepared, release: Verified, result: Any,
                 bases: tuple[Any, Any], budget_ms: float, inner: InnerLevel, measurer: Measurer, target: Any,
                 metric_before: float | None) -> BuildOutcome:
    """The release: fidelity, parity of its ONNX file, the user's metric, the gates, the report, the artifacts
    (`bases`: the unpruned model's figure, and for an int8 target the unpruned float model's, else None)."""
    base, base_float = bases
    recovery = None
    if config.recover:
        release, recovery = recovered(config, session, release, measurer)
    with timed(session.timings_s, "fidelity"):
        a = assess(config, session.loaded.module, release.pruned, session.loaded.example_input, session.data,
                   session.base_outputs, metric_before, release.float_path or release.path,
                   release.path if release.float_path else None)
    fid = a.fidelity
    report = build_report(config, session, release, result, base, budget_ms, inner, measurer, target, fid, a.gates)
    report.update(parity=a.parity.to_dict(), metric=a.metric, recovery=recovery,
                  **int8_entries(target, a.quantization, base_float, release.stats, session.loaded))
    code, message = verdict(report, release, result, base, budget_ms, config.budget.text, target.name)
    report["exit_code"] = code
    if report["met"] and release.stats.median < WARN_UNDER * budget_ms:
        log.warning("released at %.3f ms, %.0f%% of the %.3f ms budget: every candidate measured nearer the budget was "
                    "over it or had a larger proxy error (report.json search.trace)%s", release.stats.median,
                    100 * release.stats.median / budget_ms, budget_ms, "" if session.config.compensation else
                    "; without compensation a sliced group's output error saturates, so the proxy cannot tell "
                    "narrow models from wide ones")
    failed = code != int(ExitCode.OK)
    report["out"] = str(outdir.failed_out if failed else outdir.out)
    write_release(outdir.tmp, release, session.loaded, session.config.ignore, report)
    dest = outdir.commit(failed=failed)
    if failed:
        message = f"{message}; this build's artifacts are in {dest}/ ({outdir.out} left as it was)"
    return BuildOutcome(report=report, exit_code=code, message=message, out=str(dest), release=release,
                        trace=tuple(result.trace), base=base, fidelity=fid)


def recovered(config: BuildConfig, session: Prepared, release: Verified, measurer: Measurer) -> tuple[Verified, dict]:
    """`--recover MINUTES`: the released model distilled from the unpruned one on augmented calibration images
    (`recovery.train`, its best epoch on held-back images kept), then exported again. Its widths, and so its latency,
    are those verified: training changes weights only."""
    import copy

    from edgeprune.jobs.oracle import export_candidate
    from edgeprune.recovery.train import FinetuneConfig, train

    student = copy.deepcopy(release.pruned)
    rc = FinetuneConfig(stage="distill", minutes=config.recover, seed=session.config.seed, augment=True,
                        freeze_bn=True)
    with timed(session.timings_s, "recover"):
        done = train(student, session.loaded.module, session.data.calib_x, None, rc, keep_best=True)
        float_path = release.path.parent / "recovered.onnx"
        path = export_candidate(student, session.loaded.example_input, float_path, session.config.exporter,
                                measurer.quantizer)
    if done.validation is not None and done.validation["best_step"] == 0:
        log.warning("--recover %g: no epoch lowered the loss on the %d held-back calibration images (%.4g untrained, "
                    "%.4g last); the untrained model is released", config.recover, done.validation["samples"],
                    done.validation["before"], done.validation["last"])
    return dataclasses.replace(release, pruned=student, path=path,
                               float_path=float_path if path != float_path else None), \
        {"minutes": config.recover, "lr": rc.learning_rate, **done.to_dict()}


def write_release(tmp: Path, release: Verified, loaded: Any, ignore: tuple[str, ...], report: dict[str, Any]) -> None:
    """model.onnx, pruned.pt, plan.json, report.json and report.md of a release into the output's temporary folder
    (int8: model.onnx is the quantised model, model.fp32.onnx its float export)."""
    from edgeprune.report.render import write_report

    shutil.copyfile(release.path, tmp / "model.onnx")
    if release.float_path is not None:
        shutil.copyfile(release.float_path, tmp / "model.fp32.onnx")
    save_pruned(tmp / "pruned.pt", release.pruned, release.plan, loaded, ignore)
    release.plan.save(tmp / "plan.json")
    write_report(tmp, report)


def build_report(config: BuildConfig, session: Prepared, release: Verified, result: Any, base: Any,
                 budget_ms: float, inner: InnerLevel, measurer: Measurer, target: Any, fid: Fidelity,
                 gates: dict[str, Any]) -> dict[str, Any]:
    pc, final, example = session.config, release.stats, session.loaded.example_input
    met = final.median <= budget_ms
    curves = session.rankings and all(r.loss is not None for r in session.rankings.values())
    return {
        "edgeprune": versions()["edgeprune"], "model": session.loaded.spec, "weights": session.loaded.weights,
        "input_shape": list(session.loaded.input_shape),
        "calibration": session.data.recipe.name or session.data.recipe.kind,
        "target": {"name": target.name, "profile": target.to_dict()},
        "budget": config.budget.text, "budget_ms": budget_ms, "met": met,
        "base": latency_entry(base, session.loaded.module, example),
        "final": latency_entry(final, release.pruned, example),
        "speedup": base.median / final.median,
        "widths": {g.name: {"before": g.channels, "after": release.candidate.widths[g.name],
                            **({"unit": g.unit} if g.units else {})} for g in session.graph.groups},
        "fidelity": fid.to_dict(), "quality_gates": gates,
        "lut": config.lut,
        "device_measurements": measurer.device_runs, "interleaved": measurer.anchor is not None,
        "search": {"criterion": pc.criterion, "compensation": pc.compensation, "repair": release.plan.repair,
                   "proxy": "fidelity" if inner.proxy == "fidelity" else "cap-loss-curve" if curves else "uniform",
                   "allocation": inner.allocation, "outer": config.search, "channel_multiple": pc.channel_multiple,
                   "tolerance": config.tolerance, "converged": result.converged,
                   "far_under_budget": met and final.median < FAR_UNDER * budget_ms,
                   "measured_candidates": sum(1 for c in result.trace if c.source.startswith("measured")),
                   "trace": [c.to_dict() for c in result.trace]},
        "excluded_groups": session.graph.excluded, "exporter": pc.exporter,
        "timings_s": session.timings_s, "versions": versions(target.runtime),
    }


def looser(budget: str) -> str:
    """A budget with more room than `budget` for the way-out line: 0.7x -> 0.8x, 10ms -> 12ms."""
    from edgeprune.config import parse_budget

    b = parse_budget(budget)
    if b.relative:
        return f"{min(0.95, b.value + 0.1):.2g}x"
    return f"{1.2 * b.value:.3g}ms"


def verdict(report: dict[str, Any], release: Verified, result: Any, base: Any, budget_ms: float, budget: str,
            target: str) -> tuple[int, str | None]:
    """The exit code of a build and its one-line message: budget missed on verification (noise), unreachable, or a
    quality gate failed."""
    final, chosen = release.stats, release.candidate
    if not report["met"] and result.best is not None:
        # the search did find models under budget, but none stayed under it when measured again: timing noise
        over = final.median / budget_ms - 1
        return int(ExitCode.BUDGET_UNREACHABLE), (
            f"budget {budget_ms:.3f} ms ({budget}) not met on verification: the search measured "
            f"{chosen.latency_ms:.3f} ms for the chosen model, {len(final.repeat_medians)} fresh repeats measured "
            f"{final.median:.3f} ms ({over:+.1%}); timing noise on {target} exceeds the margin: re-run on "
            f"a quieter machine, or raise --tolerance so that the search aims further under the budget")
    if not report["met"]:
        small = ", ".join(f"{g}={w}" for g, w in list(chosen.widths.items())[:6])
        return int(ExitCode.BUDGET_UNREACHABLE), (
            f"budget {budget_ms:.3f} ms ({budget}) is unreachable on {target}: the lowest latency reached is "
            f"{final.median:.3f} ms (unpruned {base.median:.3f} ms) at minimum widths ({small}, ...); "
            f"raise the budget, lower --channel-multiple, or allow narrower groups")
    gates = report["quality_gates"]
    if not all(g["passed"] for g in gates.values()):
        return int(ExitCode.QUALITY_GATE), (
            f"quality gate failed: {failed_gates(gates)}; budget {budget} met at {final.median:.3f} ms; recover it "
            f"with --recover MINUTES (distillation from the unpruned model), loosen the budget (e.g. --latency "
            f"{looser(budget)}), or lower the gate")
    return int(ExitCode.OK), None

