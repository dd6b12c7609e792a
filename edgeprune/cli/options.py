"""The flags that become a config's options: declared once (`prune` and `build` share theirs), read back as the plain
dict `BuildConfig.from_dict` takes, holding only the flags given, so that a `build --config` file's values stand
where no flag overrides them. No flag has a default of its own: `None` is "not given", and the defaults are
`config.py`'s (`PruneConfig`'s for prune, `BUILD_DEFAULTS` and `BuildConfig`'s for build, release and finetune).

    add_pruning_args(p, BUILD_DEFAULTS)
    config = BuildConfig.from_dict({**load_options(args.config), **given_options(args)})
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any

from edgeprune.errors import EdgePruneError

CRITERION_HELP = ("channel ranking: auto (default: cap with its repair; datafree, filter magnitude without a "
                  "repair, for a zoo model with random weights on random calibration data), cap, datafree, l1, l2, "
                  "fpgm, random, or a method from its paper: epruner "
                  "(affinity-propagation exemplars), similarity (feature-map clustering, channels merged), "
                  "functionality (class-wise activations; labels), nap (K-FAC Hessian; labels)")


def add_pruning_args(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The flags `prune` and `build` share: --criterion, --pseudo-labels, --no-compensation, --repair,
    --channel-multiple, --ignore, --exporter; `defaults` (config.PRUNE_DEFAULTS or BUILD_DEFAULTS) for their help."""
    p.add_argument("--criterion", default=None, help=CRITERION_HELP)
    p.add_argument("--pseudo-labels", action="store_true", default=None,
                   help="criteria that need labels (functionality, nap): take the unpruned model's predictions on "
                        "the calibration data as labels (for unlabelled recipes)")
    p.add_argument("--no-compensation", dest="compensation", action="store_false", default=None,
                   help="slice channels without the least-squares repair")
    p.add_argument("--repair", choices=("auto", "sequential", "independent"), default=None,
                   help="how the released model's layers are repaired: sequential (each fitted on the pruned "
                        "network's own inputs, in forward order: 2-4x lower output error, about 1.5 calibration "
                        "passes more), independent (each on the unpruned network's inputs), or auto (default): "
                        "sequential on real calibration data, independent on random data")
    multiple = defaults["channel_multiple"]
    p.add_argument("--channel-multiple", type=int, default=None,
                   help=f"round widths to this multiple (default {multiple or 'the target profile channel_multiple'})")
    p.add_argument("--ignore", action="append", default=None, metavar="PATTERN",
                   help="module names (fnmatch, or re:REGEX) whose channels are left alone; repeatable")
    add_exporter_arg(p, defaults)


def add_exporter_arg(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    from edgeprune.config import EXPORTERS

    why = ": several times faster, for every candidate" if defaults["exporter"] == "torchscript" else ""
    p.add_argument("--exporter", choices=EXPORTERS, default=None,
                   help=f"torch.onnx exporter (default {defaults['exporter']}{why})")


def add_search_args(p: argparse.ArgumentParser) -> None:
    """`build`'s search settings."""
    p.add_argument("--tolerance", type=float, default=None,
                   help="accept a latency in [(1 - tol) * budget, budget] (default 0.05)")
    p.add_argument("--max-steps", type=int, default=None, help="most candidates to measure (default 12)")
    p.add_argument("--recover", type=float, default=None, metavar="MINUTES",
                   help="distil the released model from the unpruned one for MINUTES on the calibration images "
                        "(random flips and shifts; the best epoch on a held-back fifth kept, the untrained model if "
                        "none beats it) before its gates: for pretrained models that pruning alone moves too far")
    p.add_argument("--recover-lr", type=float, default=None, metavar="LR",
                   help="Adam's learning rate for --recover (default 5e-3; ImageNet-pretrained models want ~1e-4)")
    p.add_argument("--input-scale", choices=("auto", "off"), default=None,
                   help="auto (default): on real calibration data, also measure the unpruned model resized inside to "
                        "a smaller input (the input shape stays) and release it where it meets the budget and keeps "
                        "more of the predictions than the pruned channels (pretrained classifiers); off: channels only")
    p.add_argument("--noise-margin", dest="margin_k", type=float, default=None, metavar="K",
                   help="a candidate counts as within budget when latency x (1 + K x its relative standard error) "
                        "<= budget (default 2; lower on a quiet device: releases land nearer the budget, the "
                        "verification catches a miss)")
    p.add_argument("--proxy", choices=("auto", "loss", "fidelity"), default=None,
                   help="what decides per-group widths at a given strength: the masked network's output error on "
                        "calibration samples (fidelity: better models, dozens of forward passes per search step), the "
                        "CaP residual-loss curves (loss: free), or auto (default): fidelity on real calibration data, "
                        "loss on random data")
    p.add_argument("--allocation", default=None,
                   choices=("auto", "step", "latency", "latency-joint", "epruner", "nap", "itpruner"),
                   help="how the proxy is spent over groups: the step constraint (an equal share of error per group, "
                        "in forward order), latency (error + lambda * latency cost, the cost from --lut or MACs: "
                        "error goes to the groups whose channels cost most; each group's error judged alone, once per width, so the proxy's cost does not grow with the strengths tried; latency-joint: judged with the earlier groups pruned, a proxy run per width and strength), itpruner (ITPruner: nHSIC layer "
                        "importance, widths by a linear program under the latency model), or auto (default): latency "
                        "for the fidelity proxy with compensation, else step; epruner and nap: that method's "
                        "own width rule (exemplar counts, one global importance threshold), with its --criterion")
    p.add_argument("--search", choices=("strength", "evolution"), default=None,
                   help="the outer level: strength (default: one strength searched against measured latency) or "
                        "evolution (MetaPruning: an evolution over width vectors scored by the fidelity proxy under "
                        "the latency model of --lut or MACs; only its finalists are measured)")
    p.add_argument("--output-weight", dest="output_weights", action="append", default=None, metavar="NAME=W",
                   help="weight of the named output in the fidelity proxy's error, a weighted mean of per-output "
                        "relative errors (default 1 each; names as in report.json's parity, e.g. boxes=2); repeatable")


def add_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                   help="quality gate: held-out top-1 agreement with the unpruned model (exit 4 below); default "
                        "0.9 on real calibration data for models with class logits, none on random data; 0 turns it "
                        "off")
    p.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="quality gate: held-out accuracy drop in percentage points (labelled recipes; exit 4 above)")
    p.add_argument("--evaluate", default=None, metavar="pkg.module:function",
                   help="your metric: a function (also path/to/file.py:function) taking the torch module (eval mode, "
                        "CPU) and returning a number, higher is better; run on the unpruned and the pruned model, in "
                        "the report")
    p.add_argument("--max-metric-drop", type=float, default=None, metavar="DROP",
                   help="quality gate: the drop of --evaluate's metric, in its own units (exit 4 above)")
    p.add_argument("--evaluate-timeout", type=float, default=None, metavar="SECONDS",
                   help="longest one call of --evaluate may take (default 300); past it the job stops with exit 2")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="build.toml",
                   help="a TOML file of build options, a key per flag in Python spelling (max_steps = 8, "
                        "margin_k = 1.0 for --noise-margin, use_cache = false for --no-cache, compensation = false "
                        "for --no-compensation, ignore = [...], an [output_weights] table; noise_margin and cache "
                        "as in old manifests); flags given on the command line override its values; paths in it "
                        "are read from the working directory")


def parse_output_weights(items: list[str]) -> tuple[tuple[str, float], ...]:
    """`--output-weight NAME=W` flags as (name, weight) pairs; a malformed one is refused."""
    out = []
    for item in items:
        name, eq, value = item.rpartition("=")
        try:
            out.append((name, float(value)))
        except ValueError:
            name = ""
        if not eq or not name:
            raise EdgePruneError(f"--output-weight must be NAME=WEIGHT (e.g. boxes=2), found {item!r}")
    return tuple(out)


def given_options(args: argparse.Namespace, skip: Collection[str] = ()) -> dict[str, Any]:
    """The options the flags in `args` gave (those left at None were not given), in `BuildConfig.from_dict`'s keys;
    `skip`: flags of the same name that mean something else to the command (release's --model, a pruned.pt)."""
    from edgeprune.config import OPTION_KINDS
    from edgeprune.inputs.models import load_callable

    given = {k: getattr(args, k) for k in OPTION_KINDS if k not in skip and getattr(args, k, None) is not None}
    if "output_weights" in given:
        given["output_weights"] = parse_output_weights(given["output_weights"])
    if "evaluate" in given:
        given["evaluate"] = load_callable(given["evaluate"], "--evaluate")
    return given
