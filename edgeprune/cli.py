"""`edgeprune` command line: argparse subcommands, each one library call.

Every `EdgePruneError` becomes one line on stderr, `edgeprune: error: ...`, and its documented exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeprune import __version__
from edgeprune.errors import EdgePruneError, ExitCode, Terminated, first_line

Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- output helpers


def emit_json(obj: Any) -> None:
    """Strict JSON on stdout: non-finite numbers become null, listed under `non_finite` (report.clean)."""
    from edgeprune.report import clean

    sys.stdout.write(json.dumps(clean(obj) if isinstance(obj, dict) else obj, indent=2, allow_nan=False) + "\n")


class Progress:
    """A rich progress bar on stderr at a terminal; one line per stage elsewhere (CI logs); nothing for --json."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        self._task = None
        self._lines = enabled and not sys.stderr.isatty()  # a log gets a line per stage, not a redrawn bar
        self._last = ""
        if enabled and sys.stderr.isatty():  # live progress is for a person at a terminal
            try:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                    TimeElapsedColumn

                self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            except ImportError:
                self._bar = None

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def stage(self, description: str, total: int | None = None) -> Callable[[int, int], None]:
        """Start a stage; returns a `(done, total)` callback for the library."""
        if self._bar is None:
            if self._lines and description != self._last:  # a log gets each stage once, not once per candidate
                self._last = description
                sys.stderr.write(f"edgeprune: {description}\n")
                sys.stderr.flush()
            return lambda done, total: None
        if self._task is not None:
            self._bar.remove_task(self._task)
        task = self._task = self._bar.add_task(description, total=total)

        def update(done: int, tot: int) -> None:
            self._bar.update(task, completed=done, total=tot)

        return update

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self._lines:
            sys.stderr.write(f"edgeprune: {text.strip()}\n")
            sys.stderr.flush()


# ---------------------------------------------------------------- targets


def add_targets(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("targets", help="list device profiles", description="List the bundled device profiles.")
    p.add_argument("--json", action="store_true", help="print the profiles as JSON")
    return run_targets


def run_targets(args: argparse.Namespace) -> int:
    from edgeprune.targets import bundled_targets

    targets = bundled_targets()
    if args.json:
        emit_json([t.to_dict() for t in targets.values()])
        return 0
    from edgeprune.runtimes import runtime_for

    width = max(len(n) for n in targets)
    for t in targets.values():
        try:
            runtime_for(t)
            here = "measurable here" if t.remote is None else "through its [remote]"
        except EdgePruneError:
            here = "not here: measure on the device or with --lut"
        alias = f" (alias {', '.join(t.aliases)})" if t.aliases else ""
        print(f"{t.name:<{width}}  {t.runtime:<11} {t.precision:<4}  x{t.channel_multiple:<3} {here}{alias}")
        print(f"{'':<{width}}  {t.description}")
    return 0


# ---------------------------------------------------------------- export


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="example (default: the bundled digits CNN), torchvision:NAME, timm:NAME, pkg.module:factory, "
                        "or path/to/file.py:factory")
    p.add_argument("--weights", default=None, metavar="PATH", help="a state dict, loaded with weights_only=True")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="example input shape (default: the model's own, 1,3,224,224 for torchvision)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")


def add_export(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("export", help="export a model to simplified ONNX and check parity",
                       description="Export a model to ONNX, simplify it with onnxsim and compare ONNX Runtime with torch.")
    add_model_args(p)
    p.add_argument("-o", "--out", required=True, metavar="PATH", help="ONNX file to write")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter (default dynamo; torchscript is several times faster)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="overwrite -o even if it is not an .onnx file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return run_export


def run_export(args: argparse.Namespace) -> int:
    from edgeprune.atomic import check_output_file
    from edgeprune.export import export
    from edgeprune.models import load_model, parse_shape

    shape = parse_shape(args.input_shape) if args.input_shape else None
    if args.opset < 17:
        raise EdgePruneError(f"--opset must be 17 or newer, found {args.opset}")
    check_output_file(args.out, (".onnx",), force=args.force)
    with Progress(enabled=not args.json) as progress:
        progress.stage("loading model")
        loaded = load_model(args.model, args.weights, shape, seed=args.seed)
        progress.stage(f"exporting {loaded.spec} with the {args.exporter} exporter")
        result = export(loaded.module, loaded.example_input, args.out, simplify=not args.no_simplify,
                        exporter=args.exporter, opset=args.opset)
    if args.json:
        emit_json({"model": loaded.spec, "input_shape": list(loaded.input_shape), **result.to_dict()})
    else:
        par = result.parity
        print(f"wrote {result.path} ({loaded.spec}, input {list(loaded.input_shape)}, {result.exporter}, opset "
              f"{result.opset}{', simplified' if result.simplified else ''}) in {result.export_s + result.simplify_s:.1f}s; "
              f"parity vs torch: max abs {par.max_abs:.2e}, relative {par.rel_error:.2e}")
    return 0


# ---------------------------------------------------------------- profile


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cache", action="store_true", help="measure even if this model was measured on this target")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="measurement cache (default $EDGEPRUNE_CACHE_DIR or ~/.cache/edgeprune)")


def make_cache(args: argparse.Namespace):
    from edgeprune.runtimes import MeasurementCache

    if args.no_cache:
        return None
    return MeasurementCache.under(args.cache_dir)


def add_profile(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("profile", help="measure an ONNX model's latency on a target",
                       description="Measure an ONNX model on a device profile: fresh sessions, warm-up, median of repeat medians.")
    p.add_argument("onnx", metavar="MODEL.onnx")
    p.add_argument("--device", default="cpu", help="target name, alias or TOML file (default cpu); see `edgeprune targets`")
    p.add_argument("--repeats", type=int, default=None, help="fresh sessions to time (default: the target's)")
    add_cache_args(p)
    p.add_argument("--json", action="store_true", help="print the measurement as JSON")
    return run_profile


def run_profile(args: argparse.Namespace) -> int:
    from edgeprune.runtimes import measure
    from edgeprune.runtimes.cache import file_sha256
    from edgeprune.targets import load_target

    target = load_target(args.device)
    if args.repeats is not None and args.repeats < 1:
        raise EdgePruneError(f"--repeats must be at least 1, found {args.repeats}")
    with Progress(enabled=not args.json) as progress:
        stats = measure(args.onnx, target, cache=make_cache(args), repeats=args.repeats,
                        progress=progress.stage(f"measuring on {target.name}"))
    if args.json:
        emit_json({
            "model": str(args.onnx), "sha256": file_sha256(args.onnx), "target": target.to_dict(),
            "latency_ms": stats.summary(), "repeat_medians_ms": list(stats.repeat_medians), "source": stats.source,
            "timing": stats.timing, "runtime": stats.runtime, "runtime_version": stats.runtime_version,
        })
    else:
        cached = " (from cache; --no-cache to measure again)" if stats.source == "cache" else ""
        print(f"{args.onnx} on {target.name} ({stats.runtime} {stats.runtime_version}, {stats.precision}, "
              f"{target.threads} thread{'s' if target.threads > 1 else ''}): median {stats.median:.3f} ms, "
              f"p90 {stats.p90:.3f}, std {stats.std:.3f}, n {stats.n}{cached}")
    return 0


# ---------------------------------------------------------------- agent


def add_agent(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("agent", help="serve measurements on this device over HTTP (run it on the device)",
                       description="Run the profiling agent on a device: build hosts whose target has "
                                   "[remote] agent = \"http://DEVICE:PORT\" send it models and get latencies back. "
                                   "Without --token-file it only listens on loopback.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for the network, which needs --token-file)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="file holding the token clients must send as `Authorization: Bearer <token>`")
    p.add_argument("--max-request-mb", type=float, default=512, metavar="MB",
                   help="largest model accepted, in MiB (default 512)")
    p.add_argument("--max-seconds", type=float, default=600, metavar="S",
                   help="longest a request's measurement may run before it is stopped and answered 400 (default 600); "
                        "a measurement also stops when its client disconnects")
    return run_agent


def run_agent(args: argparse.Namespace) -> int:
    from edgeprune.agent import AgentConfig, read_token_file, serve

    token = read_token_file(args.token_file) if args.token_file else None
    if not 0 < args.max_request_mb <= 1024 * 1024:  # NaN fails this too
        raise EdgePruneError(f"--max-request-mb must be a size in MiB in (0, 1048576], found {args.max_request_mb}")
    config = AgentConfig(host=args.host, port=args.port, token=token,
                         max_request_bytes=int(args.max_request_mb * 1024 * 1024), max_seconds=args.max_seconds)

    def ready(server) -> None:
        host, port = server.server_address[:2]
        auth = "token required" if token else "no token: loopback only"
        print(f"edgeprune agent listening on {host}:{port} ({auth}); Ctrl-C stops it", flush=True)

    serve(config, on_ready=ready)
    return 0


# ---------------------------------------------------------------- prune


def add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace --out even if it holds files edgeprune did not write")


def add_repair_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", choices=("auto", "sequential", "independent"), default="auto",
                   help="how the released model's layers are repaired: sequential (each fitted on the pruned "
                        "network's own inputs, in forward order: 2-4x lower output error, about 1.5 calibration "
                        "passes more), independent (each on the unpruned network's inputs), or auto (default): "
                        "sequential on real calibration data, independent on random data")


def add_calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default=None, metavar="RECIPE",
                   help="calibration recipe: digits, random, imagefolder, npy or a TOML file "
                        "(default: digits for the example, random otherwise)")


def prune_config(args: argparse.Namespace):  # -> PruneConfig
    """The PruneConfig that `prune` and `build` both take from their shared flags."""
    from edgeprune.models import parse_shape
    from edgeprune.config import PruneConfig

    return PruneConfig(model=args.model, weights=args.weights,
                       input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                       calibration=args.calibration, criterion=args.criterion,
                       compensation=not args.no_compensation, channel_multiple=args.channel_multiple,
                       ignore=tuple(args.ignore), seed=args.seed, exporter=args.exporter, repair=args.repair)


def add_prune(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("prune", help="prune channels by a ratio or a plan, with compensation; no latency target",
                       description="Prune every channel group by --ratio (or exactly as --plan says), compensate the "
                                   "following layers in closed form, export, and report fidelity on held-out data.")
    add_model_args(p)
    add_calibration_arg(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, help="fraction of each group's channels to remove, e.g. 0.5")
    how.add_argument("--plan", metavar="plan.json", help="reproduce a pruning exactly from its plan")
    p.add_argument("--criterion", default="cap", help="channel ranking: cap (default), l1, l2, fpgm, random")
    p.add_argument("--no-compensation", action="store_true", help="slice channels without the least-squares repair")
    add_repair_arg(p)
    p.add_argument("--channel-multiple", type=int, default=8, help="round widths to this multiple (default 8)")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="module names (fnmatch, or re:REGEX) whose channels are left alone; repeatable")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder, written as a whole at the end; an existing folder is replaced only if it "
                        "holds a previous edgeprune output")
    add_force_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return run_prune


def run_prune(args: argparse.Namespace) -> int:
    from edgeprune.pipeline import prune_job

    config = prune_config(args)
    with Progress(enabled=not args.json) as progress:
        result = prune_job(config, args.out, ratio=args.ratio, plan_path=args.plan,
                           stages=lambda d, total=None: progress.stage(d, total), force=args.force)
    if args.json:
        emit_json(result)
        return 0
    f = result["fidelity"]
    b, p = result["base"], result["pruned"]
    print(f"pruned {result['model']} ({result['criterion']}, compensation {'on' if result['compensation'] else 'off'}) "
          f"-> {result['out']}/: model.onnx, pruned.pt, plan.json, report.json")
    print(f"  MACs {b['macs'] / 1e6:.1f}M -> {p['macs'] / 1e6:.1f}M, params {b['params'] / 1e6:.2f}M -> "
          f"{p['params'] / 1e6:.2f}M over {len(result['widths'])} groups")
    line = f"  held-out fidelity ({f['samples']} samples): top-1 agreement {100 * f['top1_agreement']:.1f}%, " \
           f"output relative error {f['output_rel_error']:.3f}"
    if f["accuracy"]:
        a = f["accuracy"]
        line += f", accuracy {100 * a['before']:.1f}% -> {100 * a['after']:.1f}%"
    print(line)
    return 0


# ---------------------------------------------------------------- build


def add_build(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("build", help="prune to a latency budget measured on the target (the main job)",
                       description="Search per-group widths until the pruned, compensated, exported model measures "
                                   "within the latency budget on the target; write model.onnx, pruned.pt, plan.json, "
                                   "report.json and report.md. Without --model it builds the bundled example on cpu.",
                       epilog="exit codes: 0 budget met and gates passed, 2 bad input, 3 budget unreachable, "
                              "4 quality gate failed, 5 device unreachable")
    add_model_args(p)
    add_calibration_arg(p)
    p.add_argument("--device", default="cpu", help="target name, alias or TOML file (default cpu)")
    p.add_argument("--latency", default="0.5x", help="budget: 10ms, 2.5ms, 800us, or 0.5x of the unpruned latency "
                                                     "(default 0.5x)")
    p.add_argument("--criterion", default="cap", help="channel ranking: cap (default), l1, l2, fpgm, random")
    p.add_argument("--no-compensation", action="store_true", help="slice channels without the least-squares repair")
    add_repair_arg(p)
    p.add_argument("--channel-multiple", type=int, default=0,
                   help="round widths to this multiple (default: the target's channel_multiple)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="accept a latency in [(1 - tol) * budget, budget] (default 0.05)")
    p.add_argument("--max-steps", type=int, default=12, help="most candidates to measure (default 12)")
    p.add_argument("--proxy", choices=("auto", "loss", "fidelity"), default="auto",
                   help="what decides per-group widths at a given strength: the masked network's output error on "
                        "calibration samples (fidelity: better models, dozens of forward passes per search step), the "
                        "CaP residual-loss curves (loss: free), or auto (default): fidelity on real calibration data, "
                        "loss on random data")
    p.add_argument("--allocation", choices=("auto", "step", "latency"), default="auto",
                   help="how the proxy is spent over groups: the step constraint (an equal share of error per group, "
                        "in forward order), latency (error + lambda * latency cost, the cost from --lut or MACs: "
                        "error goes to the groups whose channels cost most), or auto (default): latency with the "
                        "fidelity proxy and compensation, else step")
    p.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                   help="quality gate: held-out top-1 agreement with the unpruned model, e.g. 0.98 (exit 4 below)")
    p.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="quality gate: held-out accuracy drop in percentage points (labelled recipes; exit 4 above)")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="module names (fnmatch, or re:REGEX) whose channels are left alone; repeatable")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="exporter for every candidate and the result (default torchscript: several times faster)")
    add_cache_args(p)
    p.add_argument("--lut", default=None, metavar="lut.json",
                   help="search on this latency table (made by `edgeprune lut` on the device); only the final model "
                        "is measured on the target")
    p.add_argument("--out", default="out", metavar="DIR",
                   help="output folder, written as a whole at the end (default ./out); an existing folder is replaced "
                        "only if it holds a previous edgeprune output; a build that exits 3 or 4 writes to DIR.failed "
                        "and leaves DIR as it was")
    p.add_argument("--force-lut", action="store_true",
                   help="use a --lut made for another target, precision or runtime version (with a warning)")
    add_force_arg(p)
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the summary")
    return run_build


def run_build(args: argparse.Namespace) -> int:
    from edgeprune.config import BuildConfig
    from edgeprune.pipeline import build

    prune_cfg = prune_config(args)
    config = BuildConfig(prune=prune_cfg, device=args.device, latency=args.latency, tolerance=args.tolerance,
                         max_steps=args.max_steps, min_agreement=args.min_agreement,
                         max_accuracy_drop=args.max_accuracy_drop, cache_dir=args.cache_dir,
                         use_cache=not args.no_cache, lut=args.lut, force_lut=args.force_lut, proxy=args.proxy,
                         allocation=args.allocation)
    with Progress(enabled=not args.json) as progress:
        def on_step(c) -> None:
            progress.note(f"  step {c.step}: strength {c.strength:.4f} -> {c.latency_ms:.3f} ms ({c.source})")

        outcome = build(config, args.out, stages=lambda d, total=None: progress.stage(d, total),
                        on_step=None if args.json else on_step, force=args.force)
    r = outcome.report
    if args.json:
        from edgeprune.report import to_json

        sys.stdout.write(to_json(r) + "\n")
    else:
        f, b = r["final"]["latency_ms"], r["base"]["latency_ms"]
        fid = r["fidelity"]
        print(f"{r['model']} on {r['target']['name']}: {f['median']:.3f} ms against a budget of {r['budget_ms']:.3f} ms "
              f"({r['budget']}): {'met' if r['met'] else 'NOT met'}; unpruned {b['median']:.3f} ms, "
              f"{r['speedup']:.2f}x faster")
        line = f"  fidelity on {fid['samples']} held-out samples: top-1 agreement {100 * fid['top1_agreement']:.1f}%"
        if fid.get("accuracy"):
            a = fid["accuracy"]
            line += f", accuracy {100 * a['before']:.1f}% -> {100 * a['after']:.1f}%"
        print(line)
        print(f"  {r['search']['measured_candidates']} measured candidates; wrote {outcome.out}/: model.onnx, "
              f"pruned.pt, plan.json, report.json, report.md")
    if outcome.message:
        sys.stderr.write(f"edgeprune: error: {outcome.message}\n")
    return outcome.exit_code


# ---------------------------------------------------------------- lut


def add_lut(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("lut", help="measure a per-layer latency table on a target, for searches away from it",
                       description="Measure each layer of a model over a grid of input/output widths on the target "
                                   "(merging into an existing table, resuming an interrupted run), and calibrate the "
                                   "model's latency on four measured plans. `build --lut` then searches on the table.")
    add_model_args(p)
    p.add_argument("--device", default="cpu", help="target name, alias or TOML file (default cpu)")
    p.add_argument("--out", required=True, metavar="lut.json", help="table file (created or merged into)")
    p.add_argument("--fresh", action="store_true", help="start a new table instead of resuming/merging")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN")
    p.add_argument("--report", action="store_true",
                   help="also plot latency against output width per layer signature (lut.png, needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return run_lut


def run_lut(args: argparse.Namespace) -> int:
    from edgeprune.models import parse_shape
    from edgeprune.pipeline import lut_job

    with Progress(enabled=not args.json) as progress:
        summary = lut_job(args.model, args.device, args.out, args.weights,
                          parse_shape(args.input_shape) if args.input_shape else None, resume=not args.fresh,
                          stages=lambda d, total=None: progress.stage(d, total), ignore=tuple(args.ignore))
    if args.report:
        from edgeprune.lookup import load_lut
        from edgeprune.lookupbuild import plot_lut

        summary["plot"] = plot_lut(load_lut(args.out), Path(args.out).with_suffix(".png"))
    if args.json:
        emit_json(summary)
        return 0
    cal = summary["calibration"]
    best = summary["best_channel_multiple"]
    print(f"{summary['table']}: {summary['signatures']} layer signatures for {summary['model']} on {summary['target']} "
          f"({summary['layers']} layers) in {summary['build_s']:.0f}s; model latency = {cal['offset_ms']:.3f} ms + "
          f"{cal['scale']:.3f} x layers; unpruned {cal['base_ms']:.3f} ms")
    print(f"  best channel multiple the table implies: {best['best']} (share of unaligned widths no faster than the "
          f"next multiple: {', '.join(f'{m}: {v:.2f}' for m, v in best['scores'].items() if v is not None)})")
    if summary.get("plot"):
        print(f"  plot: {summary['plot']}")
    return 0


# ---------------------------------------------------------------- entry point

COMMANDS: list[Callable[[argparse._SubParsersAction], Handler]] = [add_build, add_prune, add_lut, add_targets, add_export, add_profile, add_agent]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="edgeprune",
        description="Prune a trained PyTorch CNN to an ONNX model that meets a latency budget measured on the "
                    "target device, without retraining.",
    )
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers = {}
    for add in COMMANDS:
        before = set(sub.choices)
        handler = add(sub)
        for name in set(sub.choices) - before:
            handlers[name] = handler
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return int(ExitCode.BAD_INPUT)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        with sigterm_raises():
            return handlers[args.command](args)
    except EdgePruneError as e:
        sys.stderr.write(f"edgeprune: error: {e}\n")
        return int(e.code)
    except KeyboardInterrupt:
        sys.stderr.write("edgeprune: interrupted\n")
        return int(ExitCode.INTERRUPTED)
    except Terminated:
        sys.stderr.write("edgeprune: terminated\n")
        return int(ExitCode.TERMINATED)
    except MemoryError as e:
        sys.stderr.write(f"edgeprune: error: out of memory ({str(e)[:200] or 'MemoryError'}); lower `count` or "
                         f"`batch_size` in the calibration recipe, or run on a machine with more memory\n")
        return int(ExitCode.INTERNAL)
    except Exception as e:  # a bug: one line (the traceback with -v), not a wall of text in a release log
        if args.verbose:
            import traceback

            traceback.print_exc()
        first = first_line(e, 300, default="")
        sys.stderr.write(f"edgeprune: error: internal error ({type(e).__name__}{': ' + first if first else ''}); "
                         f"this is a bug in edgeprune: rerun with -v for the traceback and report it\n")
        return int(ExitCode.INTERNAL)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread, so clean-up runs as for Ctrl-C; a second SIGTERM during the
    clean-up kills at once. Outside the main thread (an embedding application) signals are left alone."""
    def on_term(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
