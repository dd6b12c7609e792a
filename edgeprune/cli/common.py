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


def add_model_args(p: argparse.ArgumentParser, seed: int | None = 0) -> None:
    """--model, --weights, --input-shape, --seed (default `seed`: None where a config's default stands)."""
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="example (default: the bundled digits CNN), torchvision:NAME, timm:NAME, pkg.module:factory, "
                        "or path/to/file.py:factory")
    p.add_argument("--weights", default=None, metavar="PATH", help="a state dict, loaded with weights_only=True")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="example input shape (default: the model's own, 1,3,224,224 for torchvision)")
    p.add_argument("--seed", type=int, default=seed, help="seed for random weights and inputs (default 0)")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cache", dest="use_cache", action="store_false", default=None,
                   help="measure even if this model was measured on this target")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="measurement cache (default $EDGEPRUNE_CACHE_DIR or ~/.cache/edgeprune)")


def make_cache(args: argparse.Namespace):
    from edgeprune.runtimes import MeasurementCache

    if args.use_cache is False:
        return None
    return MeasurementCache.under(args.cache_dir)


def add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace --out even if it holds files edgeprune did not write")


def add_calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default=None, metavar="RECIPE",
                   help="calibration recipe: digits, random, imagefolder, npy or a TOML file "
                        "(default: digits for the example, random otherwise)")
