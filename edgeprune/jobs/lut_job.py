"""`edgeprune lut` as a job: a model's layers measured into a latency table on a target, merged into the table at
`out`, its calibration fitted on whole pruned models measured there, its accuracy checked on random plans measured
there (the self-check), and a summary. `lut_check_job` (`lut --check-only`) checks a table made before."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.common.parallel import compute_threads, retained_memory
from edgeprune.common.progress import Stages, no_progress
from edgeprune.config import BUILD_DEFAULTS
from edgeprune.dependency.graph import Graph, check_patterns, trace
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.models import LoadedModel, load_model
from edgeprune.jobs.oracle import export_candidate
from edgeprune.latency.table import CHECK_PLANS, LatencyTable, LayerModel
from edgeprune.plan import Plan, keep_first
from edgeprune.surgery.apply import prune

if TYPE_CHECKING:
    from edgeprune.inputs.targets import Target
    from edgeprune.runtimes.stats import LatencyStats

log = logging.getLogger(__name__)

CHECK_STREAM = 33  # the self-check's random plans come from their own stream: never the calibration plans


@dataclass(frozen=True)
class TableModel:
    """The model a latency table is measured for: its spec (None: the bundled example; `--check-only`: the table's
    one model), weights, input shape (`--check-only`: None is the one the table was made with) and the modules whose
    channels are left alone."""

    spec: str | None = None
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    ignore: tuple[str, ...] = ()


def lut_job(model: TableModel | str | None, device: str, out: str | Path, resume: bool = True,
            stages: Stages = no_progress, measure_fn: Callable[..., LatencyStats] | None = None, workers: int = 1,
            check: int = CHECK_PLANS, seed: int = 0) -> dict[str, Any]:
    """`edgeprune lut`: measure a model's layer table on a target (merging into `out`), check it on `check` random
    plans seeded by `seed` (0: no check), and summarise it (`measure_fn`, `workers`: see `measure_table.build_lut`;
    `lut --devices` splits the entries over boards). `model`: a `TableModel`, or a spec alone."""
    model = model if isinstance(model, TableModel) else TableModel(model)
    with compute_threads(), retained_memory():
        return _lut_job(model, device, out, resume, stages, measure_fn, workers, (check, seed))


def lut_check_job(path: str | Path, model: TableModel, device: str, stages: Stages = no_progress,
                  measure_fn: Callable[..., LatencyStats] | None = None, check: int = CHECK_PLANS,
                  seed: int = 0) -> dict[str, Any]:
    """`edgeprune lut --check-only TABLE`: the self-check of an existing table, measured again on `check` random plans
    and stored in it."""
    with compute_threads(), retained_memory():
        return _lut_check_job(Path(path), model, device, stages, measure_fn, (check, seed))


class PlanMeasurer:
    """A model pruned to a width plan (first channels kept, no compensation: latency only), exported as a build
    exports its candidates, and measured on the target over its `final_repeats` sessions, as a verification is: the
    calibration plans and the self-check's plans alike."""

    def __init__(self, loaded: LoadedModel, graph: Graph, ignore: tuple[str, ...], target: Target,
                 measure_fn: Callable[..., LatencyStats], work: Path) -> None:
        self.loaded, self.graph, self.ignore, self.target = loaded, graph, ignore, target
        self.measure_fn, self.path = measure_fn, work / "plan.onnx"

    def __call__(self, widths: dict[str, int]) -> float:
        groups = {g.name: g for g in self.graph.groups}
        multiple = self.target.channel_multiple  # the pieces of a split share w as the layer model reads them
        plan = Plan(kept={g: keep_first(groups[g], range(groups[g].channels), w, multiple) for g, w in widths.items()},
                    channels={g.name: g.channels for g in self.graph.groups}, compensation=False)
        pruned = prune(self.loaded.module, self.loaded.example_input, plan, None, self.ignore)
        export_candidate(pruned, self.loaded.example_input, self.path, BUILD_DEFAULTS["exporter"])
        return self.measure_fn(self.path, self.target, cache=None, repeats=self.target.measure.final_repeats).median


def random_plans(graph: Graph, multiple: int, count: int, seed: int) -> list[dict[str, int]]:
    """`count` width plans, each group's width drawn uniformly from the widths a search may give it
    (`search.allocate.width_options`), the same for the same seed."""
    import numpy as np

    from edgeprune.search.allocate import width_options

    options = width_options(graph, multiple)
    rng = np.random.default_rng([CHECK_STREAM, seed])
    return [{g: int(rng.choice(ws)) for g, ws in options.items()} for _ in range(count)]


def self_check(table: LatencyTable, model: LayerModel, graph: Graph, measured: PlanMeasurer,
               count_seed: tuple[int, int], stages: Stages) -> dict[str, Any] | None:
    """The table's predictions of random plans against their measured latencies (`latency.table.check_figures`),
    stored under the model in `table` (not saved); None, and no check stored, for a count of 0."""
    from edgeprune.latency.table import calibration_key, check_figures, predict

    count, seed = count_seed
    entry = table.models[calibration_key(table, model.model)]
    entry.pop("check", None)
    if count == 0:
        return None
    tick = stages(f"checking the table on {count} random plans of {model.model}", count)
    predicted, got = [], []
    for i, widths in enumerate(random_plans(graph, measured.target.channel_multiple, count, seed)):
        predicted.append(predict(table, model, widths)[0])
        got.append(measured(widths))
        tick(i + 1, count)
    entry["check"] = check_figures(predicted, got, seed)
    return entry["check"]


def _check_count(count: int, flag: str = "--check") -> None:
    if type(count) is not int or count < 0:
        raise EdgePruneError(f"{flag} takes a number of random plans, 0 or more (0: no check); found {count!r}")


def _reported(table: LatencyTable, model: LayerModel, path: Path, check: dict[str, Any] | None) -> dict[str, Any]:
    """The check's figures for a summary, its warning logged."""
    from edgeprune.latency.table import check_line, check_warning

    warning = check_warning(check, str(path), model.model)
    if warning:
        log.warning("%s", warning)
    return {"check": check, "check_line": check_line(check), "check_warning": warning}


def _lut_job(source: TableModel, device: str, out: str | Path, resume: bool, stages: Stages,
             measure_fn: Callable[..., LatencyStats] | None, workers: int,
             count_seed: tuple[int, int]) -> dict[str, Any]:
    import tempfile

    from edgeprune.latency.measure_table import best_channel_multiple, build_lut, check_lut_out

    ignore = source.ignore
    check_patterns(ignore)
    _check_count(count_seed[0])
    check_lut_out(Path(out), resume)
    target, measure_fn = _target(device, measure_fn)
    t0 = time.perf_counter()
    loaded = load_model(source.spec, source.weights, source.input_shape)
    graph = trace(loaded.module, loaded.example_input, ignore)
    model = LayerModel.from_model(loaded.module, loaded.example_input, graph, loaded.spec, target.channel_multiple)
    with tempfile.TemporaryDirectory(prefix="edgeprune-lut-") as tmp:
        measured = PlanMeasurer(loaded, graph, ignore, target, measure_fn, Path(tmp))
        table = build_lut(model, target, out, measured, resume=resume, measure_fn=measure_fn, workers=workers,
                          progress=stages(f"measuring layers of {loaded.spec} on {target.name}", None))
        table.models[model.model]["input_shape"] = list(loaded.input_shape)  # what --check-only loads it with
        check = self_check(table, model, graph, measured, count_seed, stages)
        table.save(out)
    cal = {k: v for k, v in table.models[model.model].items() if k != "check"}
    return {"table": str(out), "model": loaded.spec, "target": target.name, "signatures": len(table.entries),
            "layers": len(model.layers), "calibration": cal, "best_channel_multiple": best_channel_multiple(table),
            "models": list(table.models), **_reported(table, model, Path(out), check),
            "build_s": time.perf_counter() - t0}


def _target(device: str, measure_fn: Callable[..., LatencyStats] | None) -> tuple[Target, Callable[..., LatencyStats]]:
    from edgeprune.inputs.targets import load_target
    from edgeprune.runtimes import measure, runtime_for

    target = load_target(device)
    if measure_fn is None:
        runtime_for(target)  # fail fast (exit 5) when the device cannot be measured
    return target, measure_fn or measure


def _lut_check_job(path: Path, source: TableModel, device: str, stages: Stages,
                   measure_fn: Callable[..., LatencyStats] | None, count_seed: tuple[int, int]) -> dict[str, Any]:
    import tempfile

    from edgeprune.latency.table import calibration_key, check_table_for, load_lut

    spec, ignore = source.spec, source.ignore
    check_patterns(ignore)
    _check_count(count_seed[0])
    if count_seed[0] == 0:
        raise EdgePruneError("--check-only measures random plans: give --check 1 or more (default "
                             f"{CHECK_PLANS}), not 0")
    table = load_lut(path)
    target, measure_fn = _target(device, measure_fn)
    check_table_for(table, target, path=str(path))
    key = calibration_key(table, spec) if spec else _only_model(table, path)
    t0 = time.perf_counter()
    loaded = load_model(spec or key, source.weights, source.input_shape or _stored_shape(table.models[key]))
    graph = trace(loaded.module, loaded.example_input, ignore)
    model = LayerModel.from_model(loaded.module, loaded.example_input, graph, loaded.spec, target.channel_multiple)
    with tempfile.TemporaryDirectory(prefix="edgeprune-lut-") as tmp:
        measured = PlanMeasurer(loaded, graph, ignore, target, measure_fn, Path(tmp))
        check = self_check(table, model, graph, measured, count_seed, stages)
    table.save(path)
    return {"table": str(path), "model": loaded.spec, "target": target.name, **_reported(table, model, path, check),
            "check_s": time.perf_counter() - t0}


def _only_model(table: LatencyTable, path: Path) -> str:
    if len(table.models) != 1:
        raise EdgePruneError(f"latency table {path} holds {len(table.models)} models "
                             f"({', '.join(table.models) or 'none'}): name the one to check with --model")
    return next(iter(table.models))


def _stored_shape(entry: dict[str, Any]) -> tuple[int, ...] | None:
    shape = entry.get("input_shape")
    ok = isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)
    return tuple(shape) if ok else None
