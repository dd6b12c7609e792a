"""`edgeprune` command line: argparse subcommands, each one library call.

Every `EdgePruneError` becomes one line on stderr, `edgeprune: error: ...`, and its documented exit code.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from edgeprune._version import __version__
from edgeprune.cli.common import Handler, Progress, add_cache_args, add_model_args, emit_json, make_cache
from edgeprune.cli.job_commands import add_build, add_finetune, add_lut, add_prune, add_release
from edgeprune.cli.matrix_command import add_matrix
from edgeprune.errors import EdgePruneError, ExitCode, Terminated, first_line

if TYPE_CHECKING:
    from edgeprune.fleet.agent import AgentServer
    from edgeprune.inputs.models import LoadedModel
    from edgeprune.inputs.recipe import Recipe
    from edgeprune.inputs.targets import Target


# ---------------------------------------------------------------- targets


def add_targets(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("targets", help="list device profiles", description="List the bundled device profiles.")
    p.add_argument("--json", action="store_true", help="print the profiles as JSON")
    return run_targets


def run_targets(args: argparse.Namespace) -> int:
    from edgeprune.inputs.targets import bundled_targets

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


def add_export(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("export", help="export a model to simplified ONNX and check parity",
                       description="Export a model to ONNX, simplify it with onnxsim and compare ONNX Runtime with torch.")
    add_model_args(p)
    p.add_argument("-o", "--out", required=True, metavar="PATH", help="ONNX file to write")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    from edgeprune.config import EXPORTERS, PRUNE_DEFAULTS

    p.add_argument("--exporter", choices=EXPORTERS, default=PRUNE_DEFAULTS["exporter"],
                   help="torch.onnx exporter (default dynamo, as prune's; torchscript is several times faster)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--force", action="store_true", help="overwrite -o even if it is not an .onnx file")
    p.add_argument("--int8", action="store_true",
                   help="write an INT8 model: ONNX Runtime's static quantisation (Q/DQ, per-channel weights), "
                        "activations calibrated on --calibration's calibration part, top-1 agreement and accuracy "
                        "against torch on its held-out part")
    p.add_argument("--calibration", default=None, metavar="RECIPE",
                   help="with --int8 (required there): calibration recipe, digits, random, imagefolder, npy or a TOML "
                        "file")
    p.add_argument("--device", default=None,
                   help="with --int8: the int8 target whose [quantization] settings apply (default cpu-int8)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return run_export


def check_int8_args(args: argparse.Namespace) -> Target | None:
    """`export --int8`: a calibration recipe and an int8 target, checked before the model loads."""
    from edgeprune.inputs.targets import load_target

    if not args.int8:
        if args.calibration is not None or args.device is not None:
            raise EdgePruneError("--calibration and --device of export go with --int8 (a float export calibrates "
                                 "nothing)")
        return None
    if args.calibration is None:
        raise EdgePruneError("--int8 needs --calibration RECIPE: the activation ranges are calibrated on its "
                             "calibration part (digits for the example, imagefolder or npy for your data)")
    target = load_target(args.device or "cpu-int8")
    if target.precision != "int8":
        raise EdgePruneError(f"--device {args.device} is a {target.precision} target; --int8 takes the quantisation "
                             f"settings of an int8 one (cpu-int8, rpi5-int8, jetson-orin-nano-int8)")
    return target


def run_export(args: argparse.Namespace) -> int:
    from edgeprune.common.atomic import check_output_file
    from edgeprune.export.onnx import export
    from edgeprune.inputs.models import load_model, parse_shape

    shape = parse_shape(args.input_shape) if args.input_shape else None
    if args.opset < 17:
        raise EdgePruneError(f"--opset must be 17 or newer, found {args.opset}")
    int8 = check_int8_args(args)
    check_output_file(args.out, (".onnx",), force=args.force)
    if int8 is not None:
        from edgeprune.inputs.recipe import load_recipe

        recipe = load_recipe(args.calibration)
    with Progress(enabled=not args.json) as progress:
        progress.stage("loading model")
        loaded = load_model(args.model, args.weights, shape, seed=args.seed)
        if int8 is not None:
            return run_export_int8(args, loaded, recipe, int8, progress)
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


def run_export_int8(args: argparse.Namespace, loaded: LoadedModel, recipe: Recipe, target: Target,
                    progress: Progress) -> int:
    from edgeprune.inputs.data import load_data
    from edgeprune.export.quantize import warn_random_calibration
    from edgeprune.jobs.int8_export import export_quantized

    data = load_data(recipe, loaded.input_shape)
    warn_random_calibration(recipe.kind)
    progress.stage(f"exporting {loaded.spec} and quantising it to int8 ({target.quantization.method} calibration)")
    result = export_quantized(loaded, args.out, target.quantization, data, exporter=args.exporter, opset=args.opset,
                              simplify=not args.no_simplify)
    if args.json:
        emit_json({"model": loaded.spec, "input_shape": list(loaded.input_shape), **result})
        return 0
    q, par = result["int8"], result["parity"]
    fid = q["fidelity"]
    agree = "n/a (no class logits)" if fid["top1_agreement"] is None else f"{100 * fid['top1_agreement']:.1f}%"
    acc = f", accuracy {100 * fid['accuracy']['before']:.1f}% -> {100 * fid['accuracy']['after']:.1f}%" \
        if fid.get("accuracy") else ""
    print(f"wrote {args.out} ({loaded.spec}, int8 Q/DQ for {target.name}: {q['settings']['method']} calibration on "
          f"{q['calibration_samples']} samples of {q['calibration']}); against torch on {fid['samples']} held-out "
          f"samples: top-1 agreement {agree}, output error {fid['output_rel_error']:.4f}{acc}; float export parity "
          f"{par['rel_error']:.2e}")
    return 0


# ---------------------------------------------------------------- profile


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
    from edgeprune.inputs.targets import load_target

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
    p.add_argument("--max-queue", type=int, default=8, metavar="N",
                   help="measurements that may wait behind the running one (default 8); more are answered 503 with "
                        "Retry-After, and edgeprune's clients send them again after that many seconds")
    return run_agent


def run_agent(args: argparse.Namespace) -> int:
    from edgeprune.fleet.agent import AgentConfig, read_token_file, serve

    token = read_token_file(args.token_file) if args.token_file else None
    if not 0 < args.max_request_mb <= 1024 * 1024:  # NaN fails this too
        raise EdgePruneError(f"--max-request-mb must be a size in MiB in (0, 1048576], found {args.max_request_mb}")
    config = AgentConfig(host=args.host, port=args.port, token=token,
                         max_request_bytes=int(args.max_request_mb * 1024 * 1024), max_seconds=args.max_seconds,
                         max_queue=args.max_queue)

    def ready(server: AgentServer) -> None:
        host, port = server.server_address[:2]
        auth = "token required" if token else "no token: loopback only"
        print(f"edgeprune agent listening on {host}:{port} ({auth}); Ctrl-C stops it", flush=True)

    serve(config, on_ready=ready)
    return 0


# ---------------------------------------------------------------- prune


# ---------------------------------------------------------------- entry point

COMMANDS: list[Callable[[argparse._SubParsersAction], Handler]] = [add_build, add_release, add_prune, add_lut, add_targets,
                                                                   add_export, add_profile, add_agent, add_finetune,
                                                                   add_matrix]


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


def keep_torch_caches_out_of_tmp() -> None:
    """torch 2.14 makes `$TMPDIR/torchinductor_$USER` whenever torch._dynamo is imported (torch-pruning and the ONNX
    exporter import it), and leaves it there: a job must leave nothing in the temporary folder. Unless the user chose
    a place (TORCHINDUCTOR_CACHE_DIR), torch's caches go beside edgeprune's measurement cache."""
    import os

    from edgeprune.runtimes.cache import default_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "torchinductor"))


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return int(ExitCode.BAD_INPUT)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    keep_torch_caches_out_of_tmp()
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
