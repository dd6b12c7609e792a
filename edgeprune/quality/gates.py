"""What a release must pass besides its budget: finite outputs, ONNX parity with torch, and the gates the user set
(top-1 agreement, accuracy drop, the drop of their own metric).

    gates = quality_gates(fidelity, config, parity, metric_report(before, after))
    all(g["passed"] for g in gates.values())
    a = assess(config, base, pruned, example, data, base_outputs, before, "final.onnx", "final.int8.onnx")

`assess` takes every figure of a release at once. For an int8 target, fidelity, accuracy and the user's `evaluate`
run on the quantised ONNX model in ONNX Runtime (`quantize.OnnxModule`), the gates judge those, and the float pruned
model's figures and what quantisation alone cost are kept beside them; ONNX parity checks the float export against
the pruned torch module (a quantised model differs from torch by design).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from edgeprune.config import BuildConfig
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.export.onnx import Parity, parity
from edgeprune.export.quantize import OnnxModule, output_template
from edgeprune.inputs.data import CalibrationData
from edgeprune.quality.fidelity import Fidelity, fidelity

log = logging.getLogger(__name__)

# ONNX Runtime against torch on the example input, relative to the largest output: float32 kernels differ by ~1e-6;
# 1e-3 is an export that computes something else (a wrong constant folded, an op lowered differently)
PARITY_LIMIT = 1e-3


# The gate a build on real calibration data passes unless told otherwise: the released model keeps the unpruned
# model's top-1 prediction on at least 90% of the held-out samples (an ImageNet-pretrained EfficientNet-Lite0 at 0.7x
# released with 35% agreement and exit 0 before it, issue 28). `--min-agreement F` sets it, 0 turns it off; on random
# calibration data (latency work) agreement means nothing and no default applies.
DEFAULT_MIN_AGREEMENT = 0.9


def agreement_gate(config: BuildConfig, recipe_kind: str) -> tuple[float | None, bool]:
    """The top-1 agreement limit of a release (None: no gate) and whether it is the default one."""
    if config.min_agreement is not None:
        return (config.min_agreement or None), False
    return (None, False) if recipe_kind == "random" else (DEFAULT_MIN_AGREEMENT, True)


def check_gates_apply(config: BuildConfig, data: CalibrationData) -> None:
    if config.max_accuracy_drop is not None and not data.labelled:
        raise EdgePruneError("--max-accuracy-drop needs a labelled calibration recipe (digits, imagefolder with class "
                             "folders, npy with labels); use --min-agreement for unlabelled data")


def run_metric(config: BuildConfig, module: nn.Module, what: str) -> float | None:
    """The user's `evaluate(module)` on a copy of `module` (eval mode, on the CPU), bounded by
    `config.evaluate_timeout`; None without one. Its failure, its running past the limit, or a value that is not a
    finite number is an error that names the function."""
    if config.evaluate is None:
        return None
    name = getattr(config.evaluate, "__qualname__", repr(config.evaluate))
    import copy

    import torch

    from edgeprune.common.timelimit import time_limit

    # a copy: an evaluate that changes what it is given (zeroed weights, train mode and a batch through the batch
    # norms) changed the model edgeprune then pruned and released; an ONNX model in ONNX Runtime cannot be changed
    given = module if isinstance(module, OnnxModule) else copy.deepcopy(module)
    given.eval()
    limit = config.evaluate_timeout
    try:
        with time_limit(limit, f"the evaluate function {name} ran past --evaluate-timeout {limit:g} s on {what}; "
                               f"make it faster (fewer samples) or raise --evaluate-timeout (evaluate_timeout= in "
                               f"Python)"), torch.no_grad():
            value = config.evaluate(given)
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
                  metric: dict[str, float] | None = None, recipe_kind: str = "random") -> dict[str, dict[str, Any]]:
    """The gates the user set, the default agreement gate on real calibration data (`agreement_gate`), and always
    `finite_outputs` (a pruned model whose outputs hold NaN or infinity on a held-out sample, where the unpruned
    model's are finite, never passes) and `onnx_parity` (the released ONNX file computes what the pruned torch module
    does, as `prune` checks)."""
    gates: dict[str, dict[str, Any]] = {"finite_outputs": {"value": fid.nonfinite, "limit": 0,
                                                           "passed": fid.nonfinite == 0}}
    if parity is not None:
        gates["onnx_parity"] = {"value": parity.rel_error, "limit": PARITY_LIMIT,
                                "passed": parity.rel_error <= PARITY_LIMIT}
    limit, default = agreement_gate(config, recipe_kind)
    if limit is not None and fid.top1_agreement is None and not default:
        gates["top1_agreement"] = {"value": None, "limit": limit, "passed": False,
                                   "why": "no output is class logits (N x C): use --max-metric-drop with --evaluate"}
    elif limit is not None and fid.top1_agreement is not None:
        gates["top1_agreement"] = {"value": fid.top1_agreement, "limit": limit, "default": default,
                                   "passed": fid.top1_agreement >= limit}
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
        if k == "top1_agreement":
            return (f"the pruned model keeps the unpruned model's top-1 prediction on {100 * v['value']:.1f}% of the "
                    f"held-out samples, under the {100 * v['limit']:.0f}%"
                    f"{' default' if v.get('default') else ''} gate (--min-agreement {v['limit']:g})")
        return f"{k} {v['value']:.4g} (limit {v['limit']:.4g})"

    return "; ".join(line(k, v) for k, v in gates.items() if not v["passed"])


@dataclass(frozen=True)
class Assessment:
    """Every quality figure of a release: what the gates judged and what the report shows."""

    fidelity: Fidelity  # the released model against the unpruned one (int8: the quantised model, in ONNX Runtime)
    parity: Parity  # the float ONNX export against the pruned torch module
    metric: dict[str, float] | None
    gates: dict[str, dict[str, Any]]
    quantization: dict[str, Any] | None = None  # int8: the float pruned model's figures, the cost of quantisation


def assess(config: BuildConfig, base: nn.Module, pruned: nn.Module, example: Any, data: CalibrationData,
           base_outputs: Any, metric_before: float | None, float_path: Path,
           quantized_path: Path | None = None) -> Assessment:
    """Fidelity (held-out), ONNX parity, the user's metric and the gates of a pruned model whose float export is
    `float_path`; with `quantized_path` (an int8 target) the figures that count are the quantised model's."""
    par = parity(pruned, example, float_path)
    fid_float = fidelity(base, pruned, data, base_outputs)
    after_float = run_metric(config, pruned, "the pruned model")
    if quantized_path is None:
        metric = metric_report(metric_before, after_float)
        return Assessment(fid_float, par, metric, quality_gates(fid_float, config, par, metric, data.recipe.kind))
    qmodel = OnnxModule(quantized_path, template=output_template(pruned, example))
    fid = fidelity(base, qmodel, data, base_outputs)
    alone = fidelity(pruned, qmodel, data)  # the quantised model against the float pruned one: quantisation's part
    metric = metric_report(metric_before, run_metric(config, qmodel, "the quantised pruned model"))
    if metric is not None and after_float is not None:
        metric.update(after_float=after_float, quantization_drop=after_float - metric["after"])
    quant = {"float": fid_float.to_dict(),
             "against_float": {"top1_agreement": alone.top1_agreement, "output_rel_error": alone.output_rel_error,
                               "accuracy_drop_pp": alone.accuracy_drop_pp, "nonfinite": alone.nonfinite}}
    return Assessment(fid, par, metric, quality_gates(fid, config, par, metric, data.recipe.kind), quant)
