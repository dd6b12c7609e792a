"""Benchmark a release matrix: wall time of a 4-entry manifest on 1 and on 2 boards, embedded and on Ray.

    python -m tools.bench_matrix [--model example] [--budgets 0.5x,0.6x,0.7x,0.8x] [--modes embedded,ray]
                                 [--boards 1,2] [--max-steps 6] [--proxy auto] [--out bench/matrix.json]

Each board is a real `edgeprune agent` process on loopback measuring with ONNX Runtime (the `cpu` profile), started
fresh for each run; the manifest builds `--model` at each budget on `cpu` without the measurement cache, so every
figure is a board's. Embedded runs entries one after another (one measurement at a time, so a second board cannot
shorten it); Ray runs the entries' builds as tasks on `--cpus` workers and each measurement as a task holding one
unit of `kind:cpu`.

What the figures mean here: both boards and every build share this machine's CPUs, so a second board adds no
measuring capacity, only concurrency; a build's CPU stages and the two boards' measurements then compete for the same
cores (and the measured latencies are noisier for it). The figures bound the scheduler's overhead (Ray's start, a
worker per build loading torch, the HTTP round trips) rather than the speed-up of real boards: on a lab of real
devices the measuring time divides by the number of boards of a kind (README, "Release matrices", works it out from
report.json's stage timings).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_agents(n: int) -> list[tuple[subprocess.Popen, str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "edgeprune", "agent", "--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env) for _ in range(n)]
    out = []
    for p in procs:
        m = re.search(r"listening on ([\d.]+):(\d+)", p.stdout.readline())
        if m is None:
            raise SystemExit("an agent did not start")
        out.append((p, f"http://{m.group(1)}:{m.group(2)}"))
    return out


def manifest(path: Path, model: str, budgets: list[str], max_steps: int, proxy: str) -> Path:
    path.write_text(f'targets = ["cpu"]\nbudgets = {json.dumps(budgets)}\n[build]\nmax_steps = {max_steps}\n'
                    f'proxy = "{proxy}"\ncache = false\n[[models]]\nname = "m"\nmodel = "{model}"\n')
    return path


def run_once(mode: str, boards: int, args: argparse.Namespace, work: Path) -> dict:
    import edgeprune

    agents = start_agents(boards)
    try:
        devices = work / f"devices-{mode}-{boards}.toml"
        rows = ",\n".join(f'  {{ name = "board-{i}", agent = "{url}" }}' for i, (_, url) in enumerate(agents))
        devices.write_text(f"[cpu]\nboards = [\n{rows},\n]\n")
        started = False
        if mode == "ray":
            import ray

            from edgeprune.fleet.pool import load_pool

            t0 = time.perf_counter()
            ray.init(num_cpus=args.cpus, resources=load_pool(devices).ray_resources(), include_dashboard=False,
                     logging_level="ERROR")
            ray_start_s = time.perf_counter() - t0
            started = True
        t0 = time.perf_counter()
        entries = manifest(work / "m.toml", args.model, args.budgets, args.max_steps, args.proxy)
        index = edgeprune.matrix(entries, devices, work / f"release-{mode}-{boards}",
                                 ray="auto" if mode == "ray" else None)
        wall = time.perf_counter() - t0
    finally:
        if started:
            import ray

            ray.shutdown()
        for p, _ in agents:
            p.terminate()
            p.wait()
    entries = index["entries"]
    return {"mode": mode, "boards": boards, "wall_s": round(wall, 2),
            "ray_start_s": round(ray_start_s, 2) if mode == "ray" else None,
            "exit_code": index["exit_code"], "met": index["met"],
            "entry_wall_s": [e.get("wall_s") for e in entries],
            "measurements_per_board": {n: b["measurements"] for n, b in index["boards"].items()},
            "measurements": sum(len(e.get("measurements", [])) for e in entries)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="example")
    p.add_argument("--budgets", default="0.5x,0.6x,0.7x,0.8x", help="one entry per budget (default: 4)")
    p.add_argument("--modes", default="embedded,ray")
    p.add_argument("--boards", default="1,2")
    p.add_argument("--cpus", type=int, default=2, help="Ray workers for the builds (default 2)")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--proxy", default="auto", help="the builds' --proxy (loss: cheap, for a smoke run)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args()
    args.budgets = args.budgets.split(",")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-matrix-") as tmp:
        for mode in args.modes.split(","):
            for boards in (int(b) for b in args.boards.split(",")):
                runs.append(run_once(mode, boards, args, Path(tmp)))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {"model": args.model, "budgets": args.budgets, "max_steps": args.max_steps, "proxy": args.proxy,
              "cpus": os.cpu_count(),
              "affinity": len(os.sched_getaffinity(0)), "runs": runs,
              "note": "both boards share this machine's CPUs with the builds: a second board adds concurrency, not "
                      "measuring capacity"}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
