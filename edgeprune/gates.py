"""What a release must pass besides its budget: finite outputs, ONNX parity with torch, and the gates the user set
(top-1 agreement, accuracy drop, the drop of their own metric).

    gates = quality_gates(fidelity, config, parity, metric_report(before, after))
    all(g["passed"] for g in gates.values())
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn

from edgeprune.config import BuildConfig
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.export import Parity
from edgeprune.fidelity import Fidelity

log = logging.getLogger(__name__)

# ONNX Runtime against torch on the example input, relative to the largest output: float32 kernels differ by ~1e-6;
# 1e-3 is an export that computes something else (a wrong constant folded, an op lowered differently)
PARITY_LIMIT = 1e-3


def check_gates_apply(config: BuildConfig, session: Any) -> None:
    if config.max_accuracy_drop is not None and not session.data.labelled:
        raise EdgePruneError("--max-accuracy-drop needs a labelled calibration recipe (digits, imagefolder with class "
                             "folders, npy with labels); use --min-agreement for unlabelled data")


def run_metric(config: BuildConfig, module: nn.Module, what: str) -> float | None:
    """The user's `evaluate(module)` (a torch module in eval mode, on the CPU); None without one. Its failure or a
    value that is not a finite number is an error that names the function."""
    if config.evaluate is None:
        return None
    name = getattr(config.evaluate, "__qualname__", repr(config.evaluate))
    import torch

    module.eval()
    try:
        with torch.no_grad():
            value = config.evaluate(module)
    except EdgePruneError:
        raise
    except Exception as e:  # the user's code: any failure is theirs to see in one line
        raise EdgePruneError(f"the evaluate function {name} failed on {what}: {type(e).__name__}: "
                             f"{first_line(e)}") from None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v):
        raise EdgePruneError(f"the evaluate function {name} returned {value!r} for {what}; it must return a finite "
                             "number, higher is better")
    log.info("metric of %s: %.6g", what, v)
    return v


def metric_report(before: float | None, after: float | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {"before": before, "after": after, "drop": before - after}


def quality_gates(fid: Fidelity, config: BuildConfig, parity: Parity | None = None,
                  metric: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """The gates the user set, and always `finite_outputs` (a pruned model whose outputs hold NaN or infinity on a
    held-out sample, where the unpruned model's are finite, never passes) and `onnx_parity` (the released ONNX file
    computes what the pruned torch module does, as `prune` checks)."""
    gates: dict[str, dict[str, Any]] = {"finite_outputs": {"value": fid.nonfinite, "limit": 0,
                                                           "passed": fid.nonfinite == 0}}
    if parity is not None:
        gates["onnx_parity"] = {"value": parity.rel_error, "limit": PARITY_LIMIT,
                                "passed": parity.rel_error <= PARITY_LIMIT}
    if config.min_agreement is not None and fid.top1_agreement is None:
        gates["top1_agreement"] = {"value": None, "limit": config.min_agreement, "passed": False,
                                   "why": "no output is class logits (N x C): use --max-metric-drop with --evaluate"}
    elif config.min_agreement is not None:
        gates["top1_agreement"] = {"value": fid.top1_agreement, "limit": config.min_agreement,
                                   "passed": fid.top1_agreement >= config.min_agreement}
    if config.max_accuracy_drop is not None and fid.accuracy_drop_pp is not None:
        gates["accuracy_drop_pp"] = {"value": fid.accuracy_drop_pp, "limit": config.max_accuracy_drop,
                                     "passed": fid.accuracy_drop_pp <= config.max_accuracy_drop}
    if config.max_metric_drop is not None and metric is not None:
        gates["metric_drop"] = {"value": metric["drop"], "limit": config.max_metric_drop,
                                "passed": metric["drop"] <= config.max_metric_drop}
    return gates


def failed_gates(gates: dict[str, dict[str, Any]]) -> str:
    """The failed gates in words, for the one-line error of exit code 4."""
    def line(k: str, v: dict[str, Any]) -> str:
        if k == "finite_outputs":
            return f"the pruned model's outputs are not finite on {v['value']} held-out samples"
        if v["value"] is None:
            return f"{k}: {v.get('why', 'no value')}"
        return f"{k} {v['value']:.4g} (limit {v['limit']:.4g})"

    return "; ".join(line(k, v) for k, v in gates.items() if not v["passed"])
