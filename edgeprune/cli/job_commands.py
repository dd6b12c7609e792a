"""The commands that run a job: `build`, `release`, `prune`, `lut`. Each parses its flags into the configs of
`config.py` and renders the typed result of the job (the Python API's `BuildResult` for build and release).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.cli.common import (Handler, Progress, add_cache_args, add_calibration_arg, add_force_arg,
                                  add_model_args, emit_json)
from edgeprune.cli.options import (add_config_arg, add_exporter_arg, add_gate_args, add_pruning_args,
                                   add_search_args, given_options)
from edgeprune.errors import EdgePruneError
from edgeprune.report.contract import BuildReport

if TYPE_CHECKING:
    from edgeprune.results import BuildResult
    from edgeprune.search.strength import Candidate

def add_prune(sub: argparse._SubParsersAction) -> Handler:
    from edgeprune.config import PRUNE_DEFAULTS

    p = sub.add_parser("prune", help="prune channels by a ratio or a plan, with compensation; no latency target",
                       description="Prune every channel group by --ratio (or exactly as --plan says), compensate the "
                                   "following layers in closed form, export, and report fidelity on held-out data.")
    add_model_args(p, seed=None)
    add_calibration_arg(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, help="fraction of each group's channels to remove, e.g. 0.5")
    how.add_argument("--plan", metavar="plan.json", help="reproduce a pruning exactly from its plan")
    add_pruning_args(p, PRUNE_DEFAULTS)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder, written as a whole at the end; an existing folder is replaced only if it "
                        "holds a previous edgeprune output")
    add_force_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return run_prune


def run_prune(args: argparse.Namespace) -> int:
    from edgeprune.config import PruneConfig
    from edgeprune.jobs.prune_job import prune_job

    config = PruneConfig.from_dict(given_options(args))
    with Progress(enabled=not args.json) as progress:
        outcome = prune_job(config, args.out, ratio=args.ratio, plan_path=args.plan,
                            stages=lambda d, total=None: progress.stage(d, total), force=args.force)
    if outcome.message:  # exit code 4: the pruned model's outputs are not finite
        sys.stderr.write(f"edgeprune: error: {outcome.message}\n")
        return outcome.exit_code
    result = outcome.report
    if args.json:
        emit_json(result)
        return 0
    f = result["fidelity"]
    b, p = result["base"], result["pruned"]
    print(f"pruned {result['model']} ({result['criterion']}, compensation {'on' if result['compensation'] else 'off'}) "
          f"-> {result['out']}/: model.onnx, pruned.pt, plan.json, report.json")
    print(f"  MACs {b['macs'] / 1e6:.1f}M -> {p['macs'] / 1e6:.1f}M, params {b['params'] / 1e6:.2f}M -> "
          f"{p['params'] / 1e6:.2f}M over {len(result['widths'])} groups")
    agree = f"{100 * f['top1_agreement']:.1f}%" if f["top1_agreement"] is not None else "n/a (no class logits)"
    line = f"  held-out fidelity ({f['samples']} samples): top-1 agreement {agree}, " \
           f"output relative error {f['output_rel_error']:.3f}"
    if f["accuracy"]:
        a = f["accuracy"]
        line += f", accuracy {100 * a['before']:.1f}% -> {100 * a['after']:.1f}%"
    print(line)
    return 0


def add_build(sub: argparse._SubParsersAction) -> Handler:
    from edgeprune.config import BUILD_DEFAULTS

    p = sub.add_parser("build", help="prune to a latency budget measured on the target (the main job)",
                       description="Search per-group widths until the pruned, compensated, exported model measures "
                                   "within the latency budget on the target; write model.onnx, pruned.pt, plan.json, "
                                   "report.json and report.md. Without --model it builds the bundled example on cpu.",
                       epilog="exit codes: 0 budget met and gates passed, 2 bad input, 3 budget unreachable, "
                              "4 quality gate failed, 5 device unreachable")
    add_config_arg(p)
    add_model_args(p, seed=None)
    add_calibration_arg(p)
    p.add_argument("--device", default=None, help="target name, alias or TOML file (default cpu)")
    p.add_argument("--latency", default=None, help="budget: 10ms, 2.5ms, 800us, or 0.5x of the unpruned latency "
                                                   "(default 0.5x)")
    add_pruning_args(p, BUILD_DEFAULTS)
    add_search_args(p)
    add_gate_args(p)
    add_cache_args(p)
    p.add_argument("--lut", default=None, metavar="lut.json",
                   help="search on this latency table (made by `edgeprune lut` on the device); only the final model "
                        "is measured on the target")
    p.add_argument("--out", default="out", metavar="DIR",
                   help="output folder, written as a whole at the end (default ./out); an existing folder is replaced "
                        "only if it holds a previous edgeprune output; a build that exits 3 or 4 writes to DIR.failed "
                        "and leaves DIR as it was")
    p.add_argument("--force-lut", action="store_true", default=None,
                   help="use a --lut made for another target, precision or runtime version (with a warning)")
    add_force_arg(p)
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the summary")
    return run_build


def run_build(args: argparse.Namespace) -> int:
    from edgeprune.api import run_build as typed
    from edgeprune.config import BuildConfig, load_options
    from edgeprune.jobs.build_job import build

    config = BuildConfig.from_dict({**(load_options(args.config) if args.config else {}), **given_options(args)})
    with Progress(enabled=not args.json) as progress:
        result = typed(config, args.out, run=build, force=args.force, **progress_callbacks(progress, args.json))
    return render_release(result, args.json)


def progress_callbacks(progress: Progress, as_json: bool) -> dict[str, Any]:
    """`stages` and `on_step` for a job that builds or releases: each measured candidate a line (none with --json)."""
    def on_step(c: Candidate) -> None:
        progress.note(f"  step {c.step}: strength {c.strength:.4f} -> {c.latency_ms:.3f} ms ({c.source})")

    return {"stages": lambda d, total=None: progress.stage(d, total), "on_step": None if as_json else on_step}


def render_release(result: BuildResult, as_json: bool) -> int:
    """The summary of a build or a release (or its report.json with --json), the error line, the exit code."""
    r = BuildReport.from_dict(result.report)
    if as_json:
        from edgeprune.report.render import to_json

        sys.stdout.write(to_json(result.report) + "\n")
    else:
        fid = r.fidelity
        print(f"{r.model} on {r.target}: {r.final_ms:.3f} ms against a budget of {r.budget_ms:.3f} ms "
              f"({r.budget}): {'met' if r.met else 'NOT met'}; unpruned {r.base_ms:.3f} ms, {r.speedup:.2f}x faster")
        agree = "n/a (no class logits)" if fid["top1_agreement"] is None else f"{100 * fid['top1_agreement']:.1f}%"
        line = f"  fidelity on {fid['samples']} held-out samples: top-1 agreement {agree}, output error " \
               f"{fid['output_rel_error']:.3f}"
        if fid.get("accuracy"):
            a = fid["accuracy"]
            line += f", accuracy {100 * a['before']:.1f}% -> {100 * a['after']:.1f}%"
        if r.calibration == "random":
            line += " (random calibration data: figures for latency work, no default gate judges them)"
        print(line)
        if r.recovery:
            rc = r.recovery
            kept = (rc.get("validation") or {}).get("best_step", 1) != 0
            print(f"  recovered: {rc['steps']} steps of distillation in {rc['seconds']:.0f} s"
                  f"{'' if kept else ' (no epoch beat the untrained model on held-back images: untrained released)'}")
        if r.quantization:
            print(int8_summary(r))
        if r.metric:
            m = r.metric
            print(f"  your metric: {m['before']:.4g} -> {m['after']:.4g} (drop {m['drop']:.4g})")
        if r.lut:  # its stored self-check (`latency.table.stored_check`)
            from edgeprune.latency.table import load_lut, stored_check

            check = r.lut_check or stored_check(load_lut(r.lut), r.model, r.lut)
            print(f"  latency table {r.lut}: {check['line']}")
        fp32 = " (int8), model.fp32.onnx" if r.quantization else ""
        print(f"  {r.search['measured_candidates']} measured candidates; wrote {result.out}/: model.onnx{fp32}, "
              f"pruned.pt, plan.json, report.json, report.md")
    if result.message:
        sys.stderr.write(f"edgeprune: error: {result.message}\n")
    return result.exit_code


def int8_summary(r: BuildReport) -> str:
    """The summary's int8 line: the figures above are the quantised model's; the float pruned model's, the cost of
    quantisation alone and the speed-up over the unpruned float model."""
    fl, qa = r.quantization["float"], r.quantization["against_float"]  # type: ignore[index]
    line = "  int8 (fidelity above: the quantised model in ONNX Runtime); float pruned model"
    if fl.get("accuracy"):
        line += f" {100 * fl['accuracy']['after']:.1f}%, quantisation alone costs {qa['accuracy_drop_pp']:.2f} points"
    if qa["top1_agreement"] is not None:
        line += f", agrees on {100 * qa['top1_agreement']:.1f}% of samples"
    if r.speedup_over_float is not None:
        line += f"; {r.speedup_over_float:.2f}x faster than the unpruned float model"
    return line


def add_release(sub: argparse._SubParsersAction) -> Handler:
    from edgeprune.config import BUILD_DEFAULTS

    p = sub.add_parser("release", help="release a pruned (fine-tuned) model: export, parity, measure, gates",
                       description="The way back in after fine-tuning: take a pruned.pt from build or prune (with "
                                   "--weights, the fine-tuned state dict), export and simplify it, check ONNX parity, "
                                   "measure it on the target against --latency, take its held-out fidelity to the "
                                   "unpruned model, run the gates, and write the artifacts and report a build writes. "
                                   "Nothing is pruned.",
                       epilog="exit codes: 0 budget met and gates passed, 2 bad input, 3 over budget, "
                              "4 quality gate failed, 5 device unreachable")
    p.add_argument("--model", required=True, metavar="pruned.pt", help="the pruned.pt of a build or prune")
    p.add_argument("--weights", default=None, metavar="state.pt",
                   help="fine-tuned weights: torch.save(model.state_dict(), PATH) of the module load_pruned gave")
    p.add_argument("--input-shape", default=None, help="N,C,H,W (must be the shape the model was pruned for)")
    add_calibration_arg(p)
    p.add_argument("--device", default=None, help="target name, alias or TOML file (default cpu)")
    p.add_argument("--latency", default=None, help="budget: 10ms, 800us, or 0.5x of the unpruned latency "
                                                   "(default 0.5x)")
    add_gate_args(p)
    add_exporter_arg(p, BUILD_DEFAULTS)
    add_cache_args(p)
    p.add_argument("--out", default="out", metavar="DIR", help="output folder, as for build (default ./out)")
    add_force_arg(p)
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the summary")
    return run_release


def run_release(args: argparse.Namespace) -> int:
    from edgeprune.api import run_build as typed
    from edgeprune.config import BuildConfig
    from edgeprune.jobs.release_job import release_inputs, release_job
    from edgeprune.inputs.models import parse_shape
    from edgeprune.jobs.session import Inputs

    shape = parse_shape(args.input_shape) if args.input_shape else None
    config = BuildConfig.from_dict(given_options(args, skip=("model", "weights", "input_shape")))
    pruned = release_inputs(args.model, None, None, None, Inputs(), args.weights, 0, input_shape=shape)
    with Progress(enabled=not args.json) as progress:
        result = typed(config, args.out, run=release_job, pruned=pruned, force=args.force,
                       **progress_callbacks(progress, args.json))
    return render_release(result, args.json)


def add_lut(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("lut", help="measure a per-layer latency table on a target, for searches away from it",
                       description="Measure each layer of a model over a grid of input/output widths on the target "
                                   "(merging into an existing table, resuming an interrupted run), calibrate the "
                                   "model's latency on eight measured plans, then check the table on --check random "
                                   "plans measured whole (stored in it). `build --lut` then searches on the table.")
    add_model_args(p)
    p.add_argument("--device", default="cpu", help="target name, alias or TOML file (default cpu)")
    table = p.add_mutually_exclusive_group(required=True)
    table.add_argument("--out", metavar="lut.json", help="table file (created or merged into)")
    table.add_argument("--check-only", metavar="lut.json",
                       help="measure nothing but the self-check of this existing table (stored in it): its model is "
                            "--model, or the table's one model")
    p.add_argument("--check", type=int, default=10, metavar="N",
                   help="self-check: N random width plans (seeded by --seed) measured whole and compared with the "
                        "table's predictions; the shares within ±5%%/±10%% and the worst error are stored in the "
                        "table (default 10; 0 skips it, and `build --lut` then warns)")
    p.add_argument("--fresh", action="store_true", help="start a new table instead of resuming/merging")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN")
    p.add_argument("--report", action="store_true",
                   help="also plot latency against output width per layer signature (lut.png, needs matplotlib)")
    p.add_argument("--devices", default=None, metavar="devices.toml",
                   help="measure on the boards of the target's kind in this device pool, the table's entries split "
                        "across them (one layer signature per board at a time; see `edgeprune matrix`)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return run_lut


def run_lut(args: argparse.Namespace) -> int:
    from edgeprune.inputs.models import parse_shape
    from edgeprune.jobs.lut_job import TableModel, lut_check_job, lut_job

    if args.check_only and args.fresh:
        raise EdgePruneError("--fresh starts a table anew; --check-only checks one that exists: give one of them")
    pooled: dict[str, Any] = {}
    if args.devices:
        from edgeprune.fleet.pool import BoardState, load_pool, pooled_measure
        from edgeprune.inputs.targets import load_target

        pool = load_pool(args.devices)
        kind = pool.kind_for(load_target(args.device))
        boards = BoardState(pool)
        pooled = {"measure_fn": pooled_measure(boards, kind, []), "workers": len(pool.of_kind(kind))}
    shape = parse_shape(args.input_shape) if args.input_shape else None
    model = TableModel(args.model, args.weights, shape, tuple(args.ignore))
    with Progress(enabled=not args.json) as progress:
        stages = progress.stage
        if args.check_only:
            pooled.pop("workers", None)
            summary = lut_check_job(args.check_only, model, args.device, stages=stages, check=args.check,
                                    seed=args.seed, **pooled)
        else:
            summary = lut_job(model, args.device, args.out, resume=not args.fresh, stages=stages, check=args.check,
                              seed=args.seed, **pooled)
    if args.devices:
        summary["boards"] = boards.summary()
    if args.report:
        from edgeprune.latency.table import load_lut
        from edgeprune.latency.measure_table import plot_lut

        summary["plot"] = plot_lut(load_lut(summary["table"]), Path(summary["table"]).with_suffix(".png"))
    if args.json:
        emit_json(summary)
    else:
        print_lut(summary)
    return 0


def print_lut(summary: dict[str, Any]) -> None:
    if "calibration" in summary:
        cal, best = summary["calibration"], summary["best_channel_multiple"]
        print(f"{summary['table']}: {summary['signatures']} layer signatures for {summary['model']} on "
              f"{summary['target']} ({summary['layers']} layers) in {summary['build_s']:.0f}s; model latency = "
              f"{cal['offset_ms']:.3f} ms + {cal['scale']:.3f} x layers; unpruned {cal['base_ms']:.3f} ms")
        print(f"  best channel multiple the table implies: {best['best']} (share of unaligned widths no faster than "
              f"the next multiple: {', '.join(f'{m}: {v:.2f}' for m, v in best['scores'].items() if v is not None)})")
    else:
        print(f"{summary['table']}: {summary['model']} on {summary['target']} checked in {summary['check_s']:.0f}s")
    print(f"  {summary['check_line']}")
    if summary.get("plot"):
        print(f"  plot: {summary['plot']}")


def add_finetune(sub: argparse._SubParsersAction) -> Handler:
    from edgeprune.config import BUILD_DEFAULTS

    p = sub.add_parser("finetune", help="a recovery stage (distillation or C-SGD) on a build or prune output, "
                                        "released again",
                       description="Train the model of a build or prune output folder for a few epochs, --steps or "
                                   "--minutes on the calibration part of the recipe (distill: the pruned model to the "
                                   "unpruned model's outputs, labels unused; csgd: centripetal SGD on the unpruned "
                                   "model, then each cluster of filters merged to the same widths), then release it "
                                   "as `edgeprune release` does: budget and gates re-checked, artifacts in --out.",
                       epilog="exit codes: 0 budget met and gates passed, 2 bad input (not a build or prune output), "
                              "3 over budget, 4 quality gate failed or the training diverged, 5 device unreachable")
    p.add_argument("source", metavar="OUTDIR", help="the --out folder of edgeprune build or prune")
    add_calibration_arg(p)
    p.add_argument("--stage", choices=("distill", "csgd"), default="distill",
                   help="distill (default): distillation from the unpruned model; csgd: C-SGD (arXiv:1904.03837)")
    p.add_argument("--orthoreg", type=float, default=0.0, metavar="WEIGHT",
                   help="weight of the OrthoReg filter-orthogonality penalty (arXiv:2009.05014); default 0: off")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="training steps (default: 3 epochs)")
    length.add_argument("--minutes", type=float, default=None, help="train for this long instead")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 5e-3 Adam, cosine-annealed, for "
                                                          "distill; 1e-2 momentum SGD, constant, for csgd)")
    p.add_argument("--validation", type=float, default=0.2, metavar="FRACTION",
                   help="distill: share of the calibration samples held back; the model is kept at the epoch with "
                        "their lowest loss, untrained if none beat it (default 0.2; 0: train on all, keep the last)")
    p.add_argument("--device", default=None, help="target (default: the source build's, else cpu)")
    p.add_argument("--latency", default=None, help="budget (default: the source build's, else 0.5x)")
    add_gate_args(p)
    add_exporter_arg(p, BUILD_DEFAULTS)
    add_cache_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and the clustering (default 0)")
    p.add_argument("--out", required=True, metavar="NEWDIR", help="output folder, as for build; never OUTDIR")
    add_force_arg(p)
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the summary")
    return run_finetune


def run_finetune(args: argparse.Namespace) -> int:
    from edgeprune.api import run_build as typed
    from edgeprune.config import BuildConfig
    from edgeprune.jobs.finetune_job import finetune_job, read_source
    from edgeprune.recovery.train import FinetuneConfig

    recovery = FinetuneConfig(stage=args.stage, steps=args.steps, minutes=args.minutes, orthoreg=args.orthoreg,
                              lr=args.lr, validation=args.validation, seed=args.seed)
    source = read_source(args.source)
    device, latency = source.release_settings(args.device, args.latency)
    config = BuildConfig.from_dict({**given_options(args), "device": device, "latency": latency})
    with Progress(enabled=not args.json) as progress:
        result = typed(config, args.out, run=finetune_job, source=source, recovery=recovery, force=args.force,
                       **progress_callbacks(progress, args.json))
    ft = result.report["finetune"]
    if not args.json:
        print(f"finetune {ft['stage']} of {ft['from']}: {ft['steps']} steps in {ft['seconds']:.0f} s, {ft['loss']} "
              f"loss {ft['first_loss']:.4g} -> {ft['last_loss']:.4g}")
    return render_release(result, args.json)
