"""A model's outputs as named tensors: one tensor, or a (nested) tuple, list or dict of them (detectors and
segmenters return several: torchvision's segmentation models a dict with `out` and `aux`).

    named = flatten_outputs(model(x))      # [("output", t)] or [("out", t), ("aux", t)] or [("0", t), ("1.boxes", t)]
    same = unflatten_outputs(model(x), [t for _, t in named])   # the structure back, from the leaves in order
    check_outputs(out, spec)               # every leaf a tensor, or a one-line error naming what was found

Names are what the ONNX export names its outputs, what parity and fidelity report per output. A single tensor is
"output"; elements of a tuple or list are numbered from 0, dict entries keep their keys, nested levels join with ".".
"""

from __future__ import annotations

from typing import Any

import torch

from edgeprune.errors import EdgePruneError

SINGLE = "output"


def flatten_outputs(out: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(name, leaf) pairs in forward order (the order torch.onnx.export flattens them in)."""
    if isinstance(out, dict):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    else:
        return [(prefix or SINGLE, out)]
    flat: list[tuple[str, Any]] = []
    for k, v in items:
        flat += flatten_outputs(v, f"{prefix}.{k}" if prefix else k)
    return flat


def unflatten_outputs(template: Any, leaves: list[Any]) -> Any:
    """`template`'s structure (tuples, lists, dicts, nested) with its leaves replaced by `leaves`, in
    `flatten_outputs` order: a model run elsewhere (ONNX Runtime) returns what the torch model returns."""
    it = iter(leaves)

    def rebuild(out: Any) -> Any:
        if isinstance(out, dict):
            return {k: rebuild(v) for k, v in out.items()}
        if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple
            return type(out)(*(rebuild(v) for v in out))
        if isinstance(out, (tuple, list)):
            return type(out)(rebuild(v) for v in out)
        return next(it)

    result = rebuild(template)
    if next(it, None) is not None:
        raise EdgePruneError(f"{len(leaves)} outputs given for a model that returns {len(flatten_outputs(template))}")
    return result


def check_outputs(out: Any, spec: str) -> list[tuple[str, torch.Tensor]]:
    """The named output tensors of `out`, or an error naming the first leaf that is not a tensor."""
    flat = flatten_outputs(out)
    if not flat:
        raise EdgePruneError(f"model {spec} returns an empty {type(out).__name__}; its forward() must return a tensor "
                             "or a (nested) tuple, list or dict of tensors")
    for name, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            where = "" if name == SINGLE else f" at {name!r}"
            raise EdgePruneError(f"model {spec} returns {type(leaf).__name__}{where}; edgeprune prunes models whose "
                                 "forward() returns a tensor or a (nested) tuple, list or dict of tensors: wrap the "
                                 "model so that it returns those (post-processing stays outside)")
    return flat  # type: ignore[return-value]


def is_class_logits(t: torch.Tensor) -> bool:
    """N x C scores with several classes: where top-1 agreement and accuracy mean something."""
    return t.ndim == 2 and t.shape[1] > 1


def check_label_range(out: Any, data: Any, spec: str) -> None:
    """Refuse the labels of `data` (a `data.CalibrationData`) where they reach past the classes of `out`'s first
    class-logits output, the one accuracy and C-SGD read: labels >= C made the accuracy 0% before and after (a gate
    that always passed) and C-SGD's cross-entropy fail."""
    logits = next(((n, t) for n, t in flatten_outputs(out) if isinstance(t, torch.Tensor) and is_class_logits(t)), None)
    tops = [int(y.max()) for y in (data.calib_y, data.heldout_y) if y is not None and len(y)]
    if logits is None or not tops or max(tops) < logits[1].shape[1]:
        return
    (name, t), top = logits, max(tops)
    shown = "its output" if name == SINGLE else f"its output {name!r}"
    where = "the calibration data given in Python" if data.recipe.kind == "arrays" else \
        f"calibration recipe {data.recipe.name or data.recipe.kind}"
    raise EdgePruneError(f"the labels of {where} go up to {top}, but model {spec} has {t.shape[1]} classes ({shown} is "
                         f"N x {t.shape[1]}); labels must be class indices 0..{t.shape[1] - 1}: fix the labels, or give "
                         f"a model with {top + 1} or more classes")
