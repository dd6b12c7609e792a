"""Benchmark the pruning core: time and peak memory of statistics, ranking and compensation.

    python -m tools.bench_prune [--models resnet18,resnet50] [--images 256] [--out bench/prune.json]

Calibration: `--images` random 224x224 images (the `random` recipe; statistics cost depends on shapes, not values),
batch 32, on however many cores torch uses (2 here). Peak memory is the process's max RSS after each stage.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgeprune.common.parallel import (
    compute_threads,
    group_workers,
    heavy_stage_threads,
    retained_memory,
)
from edgeprune.compensation.statistics import collect_statistics
from edgeprune.dependency.graph import trace
from edgeprune.inputs.data import load_data
from edgeprune.inputs.models import load_model
from edgeprune.inputs.recipe import load_recipe_file
from edgeprune.plan import plan_from_rankings, uniform_widths
from edgeprune.scoring.registry import rank_all
from edgeprune.surgery.apply import compensate_consumers


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--out", default="bench/prune.json")
    ap.add_argument("--sequential", action="store_true",
                    help="also time the sequential repair of the same plan (build's default on real data)")
    args = ap.parse_args()
    rows = []
    with compute_threads(), retained_memory():  # the pipeline's settings (EDGEPRUNE_THREADS, default 1)
        for name in args.models.split(","):
            rows.append(bench(name, args.images, args.sequential))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "prune", "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


def bench(name: str, images: int, sequential: bool = False) -> dict:
    if True:
        m = load_model(f"torchvision:{name}")
        with tempfile.TemporaryDirectory() as tmp:
            recipe_path = Path(tmp) / "r.toml"
            recipe_path.write_text(f'kind = "random"\ncount = {images + 16}\nheldout = 16\nbatch_size = 32\n')
            data = load_data(load_recipe_file(recipe_path), m.input_shape)
        row: dict = {"model": name, "images": len(data.calib_x), "threads": torch.get_num_threads()}
        with heavy_stage_threads(data.batch_values):
            row["heavy_stage_threads"] = torch.get_num_threads()  # statistics: torch and BLAS on these
        with group_workers(data.batch_values) as workers:
            row["group_workers"] = workers  # ranking and compensation: this many groups at once, one BLAS thread each
        t0 = time.perf_counter()
        graph = trace(m.module, m.example_input)
        row["trace_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with heavy_stage_threads(data.batch_values):  # as the pipeline does
            stats = collect_statistics(m.module, graph.consumer_modules(), data.calib_batches())
        row["statistics_s"], row["statistics_peak_rss_mb"] = time.perf_counter() - t0, rss_mb()
        t0 = time.perf_counter()
        with group_workers(data.batch_values) as workers:  # as the pipeline does
            rankings = rank_all("cap", m.module, graph.groups, stats, workers=workers)
        row["ranking_s"], row["ranking_peak_rss_mb"] = time.perf_counter() - t0, rss_mb()
        plan = plan_from_rankings(graph, rankings, uniform_widths(graph, 0.5, 8))
        import copy

        model = copy.deepcopy(m.module)
        t0 = time.perf_counter()
        with group_workers(data.batch_values) as workers:
            compensate_consumers(model, graph, plan, stats, workers=workers)
        row["compensation_s"], row["compensation_peak_rss_mb"] = time.perf_counter() - t0, rss_mb()
        row["total_s"] = row["statistics_s"] + row["ranking_s"] + row["compensation_s"]
        if sequential:
            from edgeprune.surgery.apply import removed_coords
            from edgeprune.surgery.repair import sequential_repair

            t0 = time.perf_counter()
            with heavy_stage_threads(data.batch_values):  # as Prepared.prune does
                sequential_repair(m.module, graph, plan, list(data.calib_batches()), removed_coords(graph, plan))
            row["sequential_repair_s"], row["sequential_peak_rss_mb"] = time.perf_counter() - t0, rss_mb()
        row["groups"], row["consumers"] = len(graph.groups), len(stats)
        print(json.dumps(row), flush=True)
        return row


if __name__ == "__main__":
    main()
