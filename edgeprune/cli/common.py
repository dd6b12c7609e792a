"""What the command-line commands share: the progress display, JSON output, and the flags several commands take.

    with Progress(enabled=not args.json) as progress:
        result = job(..., stages=lambda d, total=None: progress.stage(d, total))
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def emit_json(obj: Any) -> None:
    """Strict JSON on stdout: non-finite numbers become null, listed under `non_finite` (report.clean)."""
    from edgeprune.report.render import clean

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


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="example (default: the bundled digits CNN), torchvision:NAME, timm:NAME, pkg.module:factory, "
                        "or path/to/file.py:factory")
    p.add_argument("--weights", default=None, metavar="PATH", help="a state dict, loaded with weights_only=True")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="example input shape (default: the model's own, 1,3,224,224 for torchvision)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cache", action="store_true", help="measure even if this model was measured on this target")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="measurement cache (default $EDGEPRUNE_CACHE_DIR or ~/.cache/edgeprune)")


def make_cache(args: argparse.Namespace):
    from edgeprune.runtimes import MeasurementCache

    if args.no_cache:
        return None
    return MeasurementCache.under(args.cache_dir)


def add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace --out even if it holds files edgeprune did not write")


def add_repair_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", choices=("auto", "sequential", "independent"), default="auto",
                   help="how the released model's layers are repaired: sequential (each fitted on the pruned "
                        "network's own inputs, in forward order: 2-4x lower output error, about 1.5 calibration "
                        "passes more), independent (each on the unpruned network's inputs), or auto (default): "
                        "sequential on real calibration data, independent on random data")


def add_pruning_args(p: argparse.ArgumentParser, criterion_help: str, build: bool) -> None:
    """How `prune` and `build` prune: --criterion, --pseudo-labels, --no-compensation, --repair, --channel-multiple."""
    p.add_argument("--criterion", default="cap", help=criterion_help)
    p.add_argument("--pseudo-labels", action="store_true",
                   help="criteria that need labels (functionality, nap): take the unpruned model's predictions on "
                        "the calibration data as labels (for unlabelled recipes)")
    p.add_argument("--no-compensation", action="store_true", help="slice channels without the least-squares repair")
    add_repair_arg(p)
    from edgeprune.config import BUILD_DEFAULTS, PRUNE_DEFAULTS

    p.add_argument("--channel-multiple", type=int,
                   default=(BUILD_DEFAULTS if build else PRUNE_DEFAULTS)["channel_multiple"],
                   help="round widths to this multiple (default: the target's channel_multiple)" if build else
                   "round widths to this multiple (default 8)")


def add_export_args(p: argparse.ArgumentParser, build: bool) -> None:
    """--ignore and --exporter, as `prune` and `build` share them (the exporter: `config.BUILD_DEFAULTS`)."""
    from edgeprune.config import BUILD_DEFAULTS, PRUNE_DEFAULTS

    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="module names (fnmatch, or re:REGEX) whose channels are left alone; repeatable")
    exporter = (BUILD_DEFAULTS if build else PRUNE_DEFAULTS)["exporter"]
    p.add_argument("--exporter", choices=(exporter, "dynamo" if exporter == "torchscript" else "torchscript"),
                   default=exporter, help="exporter for every candidate and the result (default torchscript: several "
                   "times faster)" if build else "torch.onnx exporter (default dynamo)")


def add_calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default=None, metavar="RECIPE",
                   help="calibration recipe: digits, random, imagefolder, npy or a TOML file "
                        "(default: digits for the example, random otherwise)")


def prune_config(args: argparse.Namespace):  # -> PruneConfig
    """The PruneConfig that `prune` and `build` both take from their shared flags."""
    from edgeprune.inputs.models import parse_shape
    from edgeprune.config import PruneConfig

    return PruneConfig(model=args.model, weights=args.weights,
                       input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                       calibration=args.calibration, criterion=args.criterion,
                       compensation=not args.no_compensation, channel_multiple=args.channel_multiple,
                       ignore=tuple(args.ignore), seed=args.seed, exporter=args.exporter, repair=args.repair,
                       pseudo_labels=getattr(args, "pseudo_labels", False))
