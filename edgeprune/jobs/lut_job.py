"""`edgeprune lut` as a job: a model's layers measured into a latency table on a target, merged into the table at
`out`, its calibration fitted on whole pruned models measured there, and a summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeprune.common.parallel import compute_threads, retained_memory
from edgeprune.common.progress import Stages, no_progress
from edgeprune.dependency.graph import check_patterns, trace
from edgeprune.inputs.models import load_model
from edgeprune.jobs.oracle import export_candidate
from edgeprune.plan import Plan, keep_first
from edgeprune.surgery.apply import prune


def lut_job(spec: str | None, device: str, out: str | Path, weights: str | None = None,
            input_shape: tuple[int, ...] | None = None, resume: bool = True, stages: Stages = no_progress,
            ignore: tuple[str, ...] = (), measure_fn: Callable[..., Any] | None = None,
            workers: int = 1) -> dict[str, Any]:
    """`edgeprune lut`: measure a model's layer table on a target (merging into `out`) and summarise it
    (`measure_fn`, `workers`: see `measure_table.build_lut`; `lut --devices` splits the entries over boards)."""
    with compute_threads(), retained_memory():
        return _lut_job(spec, device, out, weights, input_shape, resume, stages, ignore, measure_fn, workers)


def _lut_job(spec: str | None, device: str, out: str | Path, weights: str | None, input_shape: tuple[int, ...] | None,
             resume: bool, stages: Stages, ignore: tuple[str, ...], measure_fn: Callable[..., Any] | None,
             workers: int) -> dict[str, Any]:
    import tempfile

    from edgeprune.latency.table import LayerModel
    from edgeprune.latency.measure_table import best_channel_multiple, build_lut, check_lut_out
    from edgeprune.runtimes import measure, runtime_for
    from edgeprune.inputs.targets import load_target

    check_patterns(ignore)
    check_lut_out(Path(out), resume)
    target = load_target(device)
    if measure_fn is None:
        runtime_for(target)
    measure_fn = measure_fn or measure
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
            return measure_fn(path, target, cache=None, repeats=target.measure.final_repeats).median

        table = build_lut(model, target, out, measure_widths, resume=resume, measure_fn=measure_fn, workers=workers,
                          progress=stages(f"measuring layers of {loaded.spec} on {target.name}", None))
    cal = table.models[model.model]
    return {"table": str(out), "model": loaded.spec, "target": target.name, "signatures": len(table.entries),
            "layers": len(model.layers), "calibration": cal, "best_channel_multiple": best_channel_multiple(table),
            "models": list(table.models), "build_s": time.perf_counter() - t0}
