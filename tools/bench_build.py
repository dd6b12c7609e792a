"""Benchmark `edgeprune build`.

(a) torchvision models (random weights, `random` calibration) on `cpu` at budgets 0.7x, 0.5x and 0.3x: final measured
    latency over budget (the build's own verification, and re-measured independently: the released model.onnx
    interleaved with the unpruned model, 5 passes, `remeasured_over_budget`), measured candidates, wall time per
    stage.
(b) the bundled digits example at 0.6x, 0.5x and 0.4x: `cap` with compensation, with each inner-level proxy (the CaP
    loss curves and the masked network's output error), against L1 without compensation (torch-pruning's magnitude
    criterion, same channel rounding, same latency search), held-out accuracy over 3 seeds (the seed changes the
    calibration/held-out split), no fine-tuning. All three share one measured baseline per budget and seed, so they
    are compared at equal latency.

    python -m tools.bench_build [--part a|b|both] [--models resnet18,mobilenet_v2,resnet50] [--out bench/build.json]

Uses a fresh measurement cache per run so that every candidate is measured, and the CLI's defaults (TorchScript
exporter, the target's channel multiple). Do not run it while tests run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from edgeprune.config import BuildConfig, PruneConfig
from edgeprune.jobs.build_job import build


def run(prune: PruneConfig, latency: str, cache: str, out: str, proxy: str = "loss") -> dict:
    t0 = time.perf_counter()
    outcome = build(BuildConfig(prune=prune, device="cpu", latency=latency, cache_dir=cache, proxy=proxy), out)
    r = outcome.report
    return {"latency": latency, "exit_code": outcome.exit_code, "wall_s": time.perf_counter() - t0,
            "base_ms": r["base"]["latency_ms"]["median"], "budget_ms": r["budget_ms"],
            "final_ms": r["final"]["latency_ms"]["median"],
            "final_over_budget": r["final"]["latency_ms"]["median"] / r["budget_ms"],
            "measured_candidates": r["search"]["measured_candidates"], "steps": len(r["search"]["trace"]),
            "timings_s": r["timings_s"], "fidelity": r["fidelity"], "macs": [r["base"]["macs"], r["final"]["macs"]],
            "trace": [{k: v for k, v in c.items() if k != "widths"} for c in r["search"]["trace"]]}


def remeasured(prune: PruneConfig, latency: str, out: str, passes: int = 5) -> dict:
    """The released model.onnx re-measured independently of the build: interleaved with the unpruned model (its own
    export here, TorchScript as the build's), `passes` passes of one fresh session each (`harness.interleaved`), as
    a fraction of the unpruned latency and of the relative budget."""
    from edgeprune.inputs.models import load_model
    from edgeprune.jobs.oracle import export_candidate

    from .harness import interleaved

    loaded = load_model(prune.model)
    base = export_candidate(loaded.module, loaded.example_input, Path(out).parent / "unpruned.onnx", prune.exporter,
                            None, search=True)
    released = Path(out) / "model.onnx" if (Path(out) / "model.onnx").exists() else Path(f"{out}.failed/model.onnx")
    lat = interleaved({"unpruned": base, "released": released}, passes)
    ratio = lat["released"]["median_ms"] / lat["unpruned"]["median_ms"]
    return {"remeasured_ratio": ratio, "remeasured_over_budget": ratio / float(latency.rstrip("x"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="both", choices=("a", "b", "both"))
    ap.add_argument("--models", default="resnet18,mobilenet_v2,resnet50")
    ap.add_argument("--budgets", default="0.7x,0.5x,0.3x")
    ap.add_argument("--digits-budgets", default="0.6x,0.5x,0.4x")
    ap.add_argument("--out", default="bench/build.json")
    args = ap.parse_args()
    result: dict = {"benchmark": "build"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("a", "both"):
            rows = []
            for name in args.models.split(","):
                for b in args.budgets.split(","):
                    cache = f"{tmp}/cache-{name}-{b}"
                    pc = PruneConfig(model=f"torchvision:{name}", calibration="random", channel_multiple=0,
                                     exporter="torchscript")
                    row = {"model": name, **run(pc, b, cache, f"{tmp}/out"), **remeasured(pc, b, f"{tmp}/out")}
                    print(json.dumps({k: v for k, v in row.items() if k != "fidelity"}), flush=True)
                    rows.append(row)
            result["models"] = rows
        if args.part in ("b", "both"):
            rows = []
            for b in args.digits_budgets.split(","):
                for seed in range(3):
                    recipe = Path(tmp) / f"digits-{seed}.toml"
                    recipe.write_text(f'kind = "digits"\nheldout = 0.25\nbatch_size = 32\nseed = {seed}\n')
                    cache = f"{tmp}/cache-digits-{b}-{seed}"
                    for crit, comp, proxy in (("cap", True, "loss"), ("cap", True, "fidelity"), ("l1", False, "loss")):
                        pc = PruneConfig(calibration=str(recipe), criterion=crit, compensation=comp,
                                         channel_multiple=0, seed=seed, exporter="torchscript")
                        row = {"criterion": crit, "compensation": comp, "proxy": proxy, "seed": seed,
                               **run(pc, b, cache, f"{tmp}/out", proxy)}
                        row["accuracy"] = row["fidelity"]["accuracy"]
                        print(json.dumps({k: row[k] for k in ("criterion", "compensation", "proxy", "seed", "latency",
                                                               "final_ms", "budget_ms", "accuracy", "wall_s")}),
                              flush=True)
                        rows.append(row)
            result["digits"] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
