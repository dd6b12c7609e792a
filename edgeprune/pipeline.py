"""The jobs: `prune_job` (one plan), `build` (search widths against a latency budget), `lut_job` (a latency table).

    result = prune_job(PruneConfig(model="torchvision:resnet18", calibration="random"), "out/r18", ratio=0.5)

`session.prepare()` runs everything that does not depend on the widths once; `build` reuses it for every candidate.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.artifacts import model_size, save_pruned
from edgeprune.atomic import OutputDir
from edgeprune.config import Budget, BuildConfig, PruneConfig, Stages, no_progress, parse_budget
from edgeprune.errors import EdgePruneError, QualityGateFailed
from edgeprune.fidelity import Fidelity
from edgeprune.graph import check_patterns, trace
from edgeprune.models import load_model
from edgeprune.oracle import FAR_UNDER, Verified, export_candidate, verify_release
from edgeprune.parallel import compute_threads, retained_memory, timed
from edgeprune.plan import Plan, keep_first, uniform_widths
from edgeprune.prune import prune
from edgeprune.session import STATISTICS_VERSION, allocation_cost, fidelity_error, prepare
from edgeprune.versions import versions

log = logging.getLogger(__name__)


def prune_job(config: PruneConfig, out: str | Path, ratio: float | None = None, plan_path: str | None = None,
              stages: Stages = no_progress, force: bool = False) -> dict[str, Any]:
    """`edgeprune prune`: one plan (uniform ratio or a plan file), pruned, exported, with held-out fidelity.

    `out` is checked before any work (see `atomic.OutputDir`: a folder holding anything but a previous edgeprune
    output is refused unless `force`) and written as a whole at the end."""
    if (ratio is None) == (plan_path is None):
        raise EdgePruneError("give exactly one of --ratio (fraction of channels removed) or --plan plan.json")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise EdgePruneError(f"--ratio is the fraction of channels removed and must be in [0, 1), found {ratio}")
    given = Plan.load(plan_path) if plan_path else None
    with OutputDir(out, force) as outdir, compute_threads(), retained_memory():
        return _prune_job(config, outdir, ratio, given, plan_path, stages)


def _prune_job(config: PruneConfig, outdir: OutputDir, ratio: float | None, given: Plan | None,
               plan_path: str | None, stages: Stages) -> dict[str, Any]:
    from edgeprune.export import export
    from edgeprune.report import to_json

    if given is not None:  # the plan decides criterion and compensation: reproduce it exactly
        config = dataclasses.replace(config, criterion=given.criterion, compensation=given.compensation,
                                     repair=given.repair,
                                     channel_multiple=given.channel_multiple, seed=given.seed)
    prep = prepare(config, stages, rank_groups=given is None)
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
        stages("pruning and compensating", None)
        pruned = prep.prune(plan)
    with timed(t, "fidelity"):
        fid = prep.fidelity(pruned)
    tmp = outdir.tmp
    with timed(t, "export"):
        stages("exporting to ONNX", None)
        exp = export(pruned, prep.loaded.example_input, tmp / "model.onnx", exporter=config.exporter)
        save_pruned(tmp / "pruned.pt", pruned, plan, prep.loaded, config.ignore)
        plan.save(tmp / "plan.json")
    before = {g.name: g.channels for g in prep.graph.groups}
    result = {
        "edgeprune": versions()["edgeprune"], "command": "prune",
        "model": prep.loaded.spec, "calibration": prep.data.recipe.name or prep.data.recipe.kind,
        "criterion": plan.criterion, "compensation": plan.compensation, "out": str(outdir.out),
        "widths": {g: {"before": before[g], "after": len(k)} for g, k in plan.kept.items()},
        "base": model_size(prep.loaded.module, prep.loaded.example_input),
        "pruned": model_size(pruned, prep.loaded.example_input),
        "fidelity": fid.to_dict(), "parity": exp.parity.to_dict() if exp.parity else None,
        "excluded_groups": prep.graph.excluded, "timings_s": t,
    }
    (tmp / "report.json").write_text(to_json(result) + "\n")
    if fid.nonfinite:  # a broken model never lands in --out
        dest = outdir.commit(failed=True)
        raise QualityGateFailed(f"the pruned model's outputs are not finite (NaN or infinity) on {fid.nonfinite} of "
                                f"{fid.samples} held-out samples; its artifacts are in {dest}/ for inspection; try "
                                f"a lower --ratio, or --no-compensation to tell whether the repair is at fault")
    outdir.commit()
    return result


# ---------------------------------------------------------------- build


@dataclass
class BuildOutcome:
    report: dict[str, Any]
    exit_code: int
    message: str | None = None  # the error line for exit codes 3 and 4
    out: str = ""  # where the artifacts went: the --out folder, or OUT.failed for exit codes 3 and 4


def build(config: BuildConfig, out: str | Path, stages: Stages = no_progress,
          on_step: Callable[[Any], None] | None = None, force: bool = False) -> BuildOutcome:
    """`edgeprune build`: search widths until the pruned model's measured latency on the target meets the budget.

    A build that misses its budget (exit 3) or a quality gate (exit 4) writes its artifacts to `OUT.failed/` and
    leaves `out` as it was: the last good release is never replaced by a failed one (`atomic.OutputDir`)."""
    with compute_threads(), retained_memory():
        return _build(config, out, stages, on_step, force)


def _build(config: BuildConfig, out: str | Path, stages: Stages, on_step: Callable[[Any], None] | None,
           force: bool) -> BuildOutcome:
    from edgeprune.runtimes import measure, runtime_for
    from edgeprune.targets import load_target

    budget = parse_budget(config.latency)
    target = load_target(config.device)
    device_runs = [0]
    _measure = measure

    def measure(*a: Any, **kw: Any):  # noqa: F811 - the runtimes' measure, counting real device measurements
        stats = _measure(*a, **kw)
        device_runs[0] += stats.source == "measured"
        return stats

    runtime_for(target)  # fail fast (exit 5) before any heavy work when the device cannot be measured
    table = None
    if config.lut:  # and fail fast (exit 2) on a bad or mismatched table
        from edgeprune.lut import check_table_for, load_lut

        table = load_lut(config.lut)
        check_table_for(table, target, force=config.force_lut, path=config.lut)
    with OutputDir(out, force) as outdir:
        return _build_into(config, outdir, stages, on_step, budget, target, table, measure, device_runs)


def _build_into(config: BuildConfig, outdir: OutputDir, stages: Stages, on_step: Callable[[Any], None] | None,
                budget: Budget, target: Any, table: Any, measure: Callable[..., Any],
                device_runs: list[int]) -> BuildOutcome:
    import tempfile

    from edgeprune.errors import ExitCode
    from edgeprune.runtimes import MeasurementCache
    from edgeprune.allocate import make_widths_fn, widths_digest
    from edgeprune.search import Probe, search

    pc = dataclasses.replace(config.prune, channel_multiple=target.channel_multiple) \
        if config.prune.channel_multiple == 0 else config.prune
    prep = prepare(pc, stages)
    if config.max_accuracy_drop is not None and not prep.data.labelled:
        raise EdgePruneError("--max-accuracy-drop needs a labelled calibration recipe (digits, imagefolder with class "
                             "folders, npy with labels); use --min-agreement for unlabelled data")
    t = prep.timings_s
    cache = MeasurementCache.under(config.cache_dir) if config.use_cache else None
    example = prep.loaded.example_input
    with tempfile.TemporaryDirectory(prefix="edgeprune-build-") as work:
        work_dir = Path(work)

        def measured(widths: dict[str, int], cached: bool = True) -> Probe:
            path = work_dir / f"cand-{widths_digest(widths)}.onnx"
            with timed(t, "measure"):
                stats = measure(path, target, cache=cache if cached else None,
                                progress=stages(f"measuring candidate on {target.name}", None))
            return Probe(stats.median, stats.source, stats.spread)

        def oracle(widths: dict[str, int]) -> Probe:
            plan = prep.plan(widths)
            with timed(t, "prune"):
                pruned = prep.prune(plan, probe=True)
            with timed(t, "export"):
                export_candidate(pruned, example, work_dir / f"cand-{widths_digest(widths)}.onnx", pc.exporter)
            return measured(widths)

        def remeasure(widths: dict[str, int]) -> Probe:
            """A second, fresh measurement of a candidate too close to the budget to tell (the cache would only
            repeat the first figure)."""
            return measured(widths, cached=False)

        layer_model = None
        if table is not None:
            from edgeprune.lut import LayerModel, predict
            from edgeprune.runtimes.stats import stats_from_repeats

            layer_model = LayerModel.from_model(prep.loaded.module, example, prep.graph, prep.loaded.spec)
            if prep.loaded.spec not in table.models:
                raise EdgePruneError(f"latency table {config.lut} has no calibration for {prep.loaded.spec}; run "
                                     f"`edgeprune lut --model {prep.loaded.spec} --device {target.source or target.name} --out "
                                     f"{config.lut}`")
            base_stats = stats_from_repeats([[table.models[prep.loaded.spec]["base_ms"]]], target=target.name,
                                            runtime=target.runtime, runtime_version=table.meta["runtime_version"],
                                            precision=target.precision, source="lut")
        else:
            base_path = work_dir / "base.onnx"
            with timed(t, "export"):
                export_candidate(prep.loaded.module, example, base_path, pc.exporter)
            with timed(t, "measure"):
                # a relative budget rests on a baseline measured in this run, under this run's load: a cached figure
                # may come from a busier or quieter hour (0.2x once aimed at 0.22x of the unpruned model's latency)
                base_stats = measure(base_path, target, cache=None if budget.relative else cache,
                                     progress=stages(f"measuring unpruned model on {target.name}", None))
        budget_ms = budget.ms(base_stats.median)
        proxy = config.proxy if config.proxy != "auto" else "loss" if prep.data.recipe.kind == "random" else "fidelity"
        if proxy == "loss" and prep.data.recipe.kind != "random":
            log.warning("--proxy loss on real calibration data: the CaP loss curves do not compare across layers and "
                        "allocated worse than uniform widths on the bundled example (output error 0.241 against 0.195 "
                        "at about 0.25x MACs); --proxy fidelity (the default here) measures the network's output")
        error_of = fidelity_error(prep, t) if proxy == "fidelity" else None
        allocation = config.allocation_for(proxy)
        widths_for = make_widths_fn(prep.graph, prep.rankings, pc.channel_multiple, error=error_of,
                                    allocation=allocation, cost=allocation_cost(prep, table) if allocation ==
                                    "latency" else None)
        correction = 1.0

        def lut_oracle(widths: dict[str, int]) -> Probe:
            pred, warns = predict(table, layer_model, widths)
            for w in warns[:3]:
                log.warning("latency table: %s", w)
            return Probe(pred * correction, "lut")

        with timed(t, "search"):
            stages(f"searching widths for {budget_ms:.3f} ms on {target.name}", None)
            # the unpruned model's widths are the u = 0 bracket: its baseline figure serves, no second measurement
            full = {g.name: g.channels for g in prep.graph.groups}
            known = {widths_digest(full): Probe(base_stats.median, "baseline", base_stats.spread)} \
                if table is None else None
            result = search(widths_for, lut_oracle if table is not None else oracle, budget_ms, config.tolerance,
                            config.max_steps, on_step=on_step, known=known,
                            remeasure=remeasure if table is None else None, error_of=error_of)
        trace_all = list(result.trace)
        if table is not None and result.best is not None:
            # one device measurement of the chosen plan; when it misses the band, correct the predictions by the
            # measured error and search again (the trace keeps both rounds)
            from edgeprune.search import Candidate

            with timed(t, "verify"):
                # exactly the model that would ship (direct solve, same plan), so that its verification below is
                # served from the measurement cache instead of a second device measurement
                check_plan = dataclasses.replace(prep.plan(result.best.widths, budget_ms=budget_ms, budget=budget.text),
                                                 target=target.name)
                path = work_dir / "lut-check.onnx"
                export_candidate(prep.prune(check_plan), example, path, pc.exporter)
                got_stats = measure(path, target, cache=cache, repeats=target.measure.final_repeats)
                got = got_stats.median
            trace_all.append(Candidate(step=len(trace_all) + 1, strength=result.best.strength,
                                       widths_digest=result.best.widths_digest, latency_ms=got, source=got_stats.source,
                                       widths=result.best.widths))
            if not (1 - config.tolerance) * budget_ms <= got <= budget_ms:
                correction = got / result.best.latency_ms
                with timed(t, "search"):
                    result = search(widths_for, lut_oracle, budget_ms, config.tolerance, config.max_steps)
                trace_all += [dataclasses.replace(c, step=len(trace_all) + i + 1) for i, c in enumerate(result.trace)]
        result = dataclasses.replace(result, trace=tuple(trace_all))

        # verify: the released model (direct compensation solve) is exported and measured again with more repeats,
        # fresh (a cached miss would replay on every later run); a miss falls back to the nearest feasible candidate
        # or, rather than a model far under budget, resumes the search from the verified figure
        def verify_one(cand: Any) -> Verified:
            plan = dataclasses.replace(prep.plan(cand.widths, budget_ms=budget_ms, budget=budget.text),
                                       target=target.name)
            with timed(t, "prune"):
                pruned = prep.prune(plan)
            final_path = work_dir / "final.onnx"
            with timed(t, "export"):
                export_candidate(pruned, example, final_path, pc.exporter)
            verify_cache = cache if table is not None else None  # the table's check figure is the first verification
            with timed(t, "verify"):
                stats = measure(final_path, target, cache=verify_cache, repeats=target.measure.final_repeats,
                                progress=stages("verifying the final model", None))
                if stats.median > budget_ms and cand.source != "lut" and cand.latency_ms <= budget_ms:
                    # the search measured this very model within budget: noise decides between the two figures, and
                    # a verification over twice the sessions settles it for less than a more pruned fallback costs
                    stats = measure(final_path, target, cache=None, repeats=2 * target.measure.final_repeats,
                                    progress=stages("verifying the final model again", None))
            return Verified(cand, stats, pruned, plan, final_path)

        def resume(res: Any, verified: dict[str, Any]) -> Any:
            used = sum(1 for c in res.trace if c.source.startswith("measured"))
            if table is not None or used >= config.max_steps:
                return None
            known = {c.widths_digest: Probe(c.latency_ms, c.source, c.spread) for c in res.trace}
            known.update({d: Probe(v.median, "verified", v.spread) for d, v in verified.items()})
            with timed(t, "search"):
                more = search(widths_for, oracle, budget_ms, config.tolerance,
                              len(known) + config.max_steps - used, on_step=None, known=known, remeasure=remeasure,
                              error_of=error_of)
            seen = {c.widths_digest for c in res.trace}
            new = [c for c in more.trace if c.widths_digest not in seen]
            trace = list(res.trace) + [dataclasses.replace(c, step=len(res.trace) + i + 1) for i, c in enumerate(new)]
            return dataclasses.replace(more, trace=tuple(trace))

        release, result = verify_release(result, budget_ms, verify_one, resume)
        chosen, final_stats, pruned, plan, final_path = release
        met = final_stats.median <= budget_ms
        with timed(t, "fidelity"):
            fid = prep.fidelity(pruned)
        gates = quality_gates(fid, config)
        base_size = model_size(prep.loaded.module, example)
        final_size = model_size(pruned, example)
        report = {
            "edgeprune": versions()["edgeprune"], "model": prep.loaded.spec, "weights": prep.loaded.weights,
            "input_shape": list(prep.loaded.input_shape),
            "calibration": prep.data.recipe.name or prep.data.recipe.kind,
            "target": {"name": target.name, "profile": target.to_dict()},
            "budget": budget.text, "budget_ms": budget_ms, "met": met,
            "base": {"latency_ms": base_stats.summary(), "latency_source": base_stats.source, **base_size},
            "final": {"latency_ms": final_stats.summary(), "latency_source": final_stats.source, **final_size},
            "speedup": base_stats.median / final_stats.median,
            "widths": {g.name: {"before": g.channels, "after": chosen.widths[g.name]} for g in prep.graph.groups},
            "fidelity": fid.to_dict(), "quality_gates": gates,
            "lut": config.lut,
            "device_measurements": device_runs[0],
            "search": {"criterion": pc.criterion, "compensation": pc.compensation, "repair": plan.repair,
                       "proxy": "fidelity" if proxy == "fidelity" else "cap-loss-curve"
                       if prep.rankings and all(r.loss is not None for r in prep.rankings.values()) else "uniform",
                       "allocation": allocation, "channel_multiple": pc.channel_multiple,
                       "tolerance": config.tolerance, "converged": result.converged,
                       "far_under_budget": met and final_stats.median < FAR_UNDER * budget_ms,
                       "measured_candidates": sum(1 for c in result.trace if c.source.startswith("measured")),
                       "trace": [c.to_dict() for c in result.trace]},
            "excluded_groups": prep.graph.excluded, "exporter": pc.exporter,
            "timings_s": t, "versions": versions(target.runtime),
        }
        code, message = int(ExitCode.OK), None
        if not met and result.best is not None:
            # the search did find models under budget, but none stayed under it when measured again: timing noise
            over = final_stats.median / budget_ms - 1
            code, message = int(ExitCode.BUDGET_UNREACHABLE), (
                f"budget {budget_ms:.3f} ms ({budget.text}) not met on verification: the search measured "
                f"{chosen.latency_ms:.3f} ms for the chosen model, {len(final_stats.repeat_medians)} fresh repeats measured "
                f"{final_stats.median:.3f} ms ({over:+.1%}); timing noise on {target.name} exceeds the margin: re-run on "
                f"a quieter machine, or raise --tolerance so that the search aims further under the budget")
        elif not met:
            w = chosen.widths
            small = ", ".join(f"{g}={w[g]}" for g in list(w)[:6])
            code, message = int(ExitCode.BUDGET_UNREACHABLE), (
                f"budget {budget_ms:.3f} ms ({budget.text}) is unreachable on {target.name}: the lowest latency reached is "
                f"{final_stats.median:.3f} ms (unpruned {base_stats.median:.3f} ms) at minimum widths ({small}, ...); "
                f"raise the budget, lower --channel-multiple, or allow narrower groups")
        elif not all(g["passed"] for g in gates.values()):
            failed = [f"{k} {v['value']:.4g} (limit {v['limit']:.4g})" if k != "finite_outputs" else
                      f"the pruned model's outputs are not finite on {v['value']} held-out samples"
                      for k, v in gates.items() if not v["passed"]]
            code, message = int(ExitCode.QUALITY_GATE), f"quality gate failed: {'; '.join(failed)}; budget met at " \
                f"{final_stats.median:.3f} ms; relax the budget or the gate"
        report["exit_code"] = code
        failed = code != int(ExitCode.OK)
        report["out"] = str(outdir.failed_out if failed else outdir.out)
        tmp = outdir.tmp
        shutil.copyfile(final_path, tmp / "model.onnx")
        save_pruned(tmp / "pruned.pt", pruned, plan, prep.loaded, pc.ignore)
        plan.save(tmp / "plan.json")
        from edgeprune.report import write_report

        write_report(tmp, report)
    dest = outdir.commit(failed=failed)
    if failed:
        message += f"; this build's artifacts are in {dest}/ ({outdir.out} left as it was)"
    return BuildOutcome(report=report, exit_code=code, message=message, out=str(dest))


def quality_gates(fid: Fidelity, config: BuildConfig) -> dict[str, dict[str, Any]]:
    """The gates the user set, and always `finite_outputs`: a pruned model whose outputs hold NaN or infinity on a
    held-out sample (where the unpruned model's are finite) never passes."""
    gates: dict[str, dict[str, Any]] = {"finite_outputs": {"value": fid.nonfinite, "limit": 0,
                                                           "passed": fid.nonfinite == 0}}
    if config.min_agreement is not None:
        gates["top1_agreement"] = {"value": fid.top1_agreement, "limit": config.min_agreement,
                                   "passed": fid.top1_agreement >= config.min_agreement}
    if config.max_accuracy_drop is not None and fid.accuracy_drop_pp is not None:
        gates["accuracy_drop_pp"] = {"value": fid.accuracy_drop_pp, "limit": config.max_accuracy_drop,
                                     "passed": fid.accuracy_drop_pp <= config.max_accuracy_drop}
    return gates


# ---------------------------------------------------------------- latency tables


def lut_job(spec: str | None, device: str, out: str | Path, weights: str | None = None,
            input_shape: tuple[int, ...] | None = None, resume: bool = True, stages: Stages = no_progress,
            ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """`edgeprune lut`: measure a model's layer table on a target (merging into `out`) and summarise it."""
    with compute_threads(), retained_memory():
        return _lut_job(spec, device, out, weights, input_shape, resume, stages, ignore)


def _lut_job(spec: str | None, device: str, out: str | Path, weights: str | None, input_shape: tuple[int, ...] | None,
             resume: bool, stages: Stages, ignore: tuple[str, ...]) -> dict[str, Any]:
    import tempfile

    from edgeprune.lut import LayerModel
    from edgeprune.lutbuild import best_channel_multiple, build_lut, check_lut_out
    from edgeprune.runtimes import measure, runtime_for
    from edgeprune.targets import load_target

    check_patterns(ignore)
    check_lut_out(Path(out), resume)
    target = load_target(device)
    runtime_for(target)
    t0 = time.perf_counter()
    loaded = load_model(spec, weights, input_shape)
    graph = trace(loaded.module, loaded.example_input, ignore)
    model = LayerModel.from_model(loaded.module, loaded.example_input, graph, loaded.spec)
    with tempfile.TemporaryDirectory(prefix="edgeprune-lut-") as tmp:
        def measure_widths(widths: dict[str, int]) -> float:
            groups = {g.name: g for g in graph.groups}
            plan = Plan(kept={g: keep_first(groups[g], range(groups[g].channels), w) for g, w in widths.items()},
                        channels=model.full(),
                        compensation=False)
            pruned = prune(loaded.module, loaded.example_input, plan, None, ignore)
            path = Path(tmp) / "calibrate.onnx"
            export_candidate(pruned, loaded.example_input, path, "torchscript")
            # a calibration plan's figure scales every prediction: time it over as many sessions as a verification
            return measure(path, target, cache=None, repeats=target.measure.final_repeats).median

        table = build_lut(model, target, out, measure_widths, resume=resume,
                          progress=stages(f"measuring layers of {loaded.spec} on {target.name}", None))
    cal = table.models[loaded.spec]
    return {"table": str(out), "model": loaded.spec, "target": target.name, "signatures": len(table.entries),
            "layers": len(model.layers), "calibration": cal, "best_channel_multiple": best_channel_multiple(table),
            "models": list(table.models), "build_s": time.perf_counter() - t0}
