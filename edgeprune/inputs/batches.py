"""Calibration data handed over in Python, made into the arrays a recipe of kind `arrays` splits.

    x, y = as_arrays(loader)                 # a DataLoader of (images, labels) batches
    x, y = as_arrays(torch.randn(64, 3, 32, 32))
    data = load_data(Recipe(kind="arrays"), input_shape, arrays=(x, y))

Accepted: a tensor or an array (N×C×H×W samples), a pair (samples, labels), or any iterable (a
`torch.utils.data.DataLoader`, a list, a generator) of batches or of (input, label) pairs, batched or one sample at a
time. Labels are kept when every item has them as integer class indices, one per sample; anything else in the second
place (masks, boxes) is dropped: the held-out accuracy then is not reported, the agreement and output error are.
Written by hand because no library converts "whatever a training loop iterates" into one array; each check says
what was found and what to pass instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from edgeprune.errors import EdgePruneError

log = logging.getLogger(__name__)

MAX_SAMPLES = 10_000  # an iterable is read up to this many samples (a calibration set, not a training set)


def _array(v: Any, what: str) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor, on any device
        v = v.detach().cpu().numpy()
    if not isinstance(v, np.ndarray):
        raise EdgePruneError(f"calibration data: {what} is a {type(v).__name__}; give tensors or NumPy arrays "
                             "(a DataLoader yielding images or (images, labels))")
    return v


def _labels(v: Any, n: int) -> np.ndarray | None:
    try:
        y = _array(v, "the labels")
    except EdgePruneError:
        return None
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        return None  # masks, boxes, one-hot: not class indices
    return y.astype(np.int64)


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    if isinstance(item, dict):
        raise EdgePruneError("calibration data: a batch is a dict; give a DataLoader (or iterable) yielding the "
                             "model's input tensor, or (input, label) pairs")
    return item, None


def as_arrays(data: Any, sample_ndim: int | None = None,
              max_samples: int = MAX_SAMPLES) -> tuple[np.ndarray, np.ndarray | None]:
    """(samples float32 N×..., labels int64 or None) from `data` (see the module docstring). `sample_ndim`, when
    known (the model's input has one more axis), tells a batch from a single sample."""
    if hasattr(data, "detach") or isinstance(data, np.ndarray):
        return _checked(_array(data, "the tensor"), None)
    if isinstance(data, tuple) and len(data) == 2 and all(hasattr(v, "shape") for v in data):
        x = _array(data[0], "the samples")
        return _checked(x, _labels(data[1], len(x)))
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise EdgePruneError(f"calibration data is a {type(data).__name__}; give a recipe name or file, a DataLoader, "
                             "an iterable of batches or (input, label) pairs, a tensor or an array")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray | None] = []
    n = 0
    for i, item in enumerate(data):
        xv, yv = _split_item(item)
        x = _array(xv, f"item {i}'s input")
        if sample_ndim is not None and x.ndim == sample_ndim:
            x, yv = x[None], (None if yv is None else np.asarray(_array(yv, "a label")).reshape(1))
        xs.append(x)
        ys.append(None if yv is None else _labels(yv, len(x)))
        n += len(x)
        if n >= max_samples:
            log.warning("calibration data: read the first %d samples of %s, the most a calibration set needs here",
                        n, type(data).__name__)
            break
    if not xs:
        raise EdgePruneError(f"calibration data: the {type(data).__name__} yielded nothing; give at least a few "
                             "hundred samples")
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        raise EdgePruneError(f"calibration data: batches have different sample shapes {sorted(map(list, shapes))}; "
                             "resize or crop them to the model's input size")
    x = np.concatenate(xs)
    y = np.concatenate(ys) if all(v is not None for v in ys) else None  # type: ignore[arg-type]
    return _checked(x, y)


def _checked(x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if not np.issubdtype(x.dtype, np.floating):
        raise EdgePruneError(f"calibration data holds {x.dtype}; it must hold floats already normalised as the model "
                             "expects (convert and normalise the images first)")
    if x.ndim < 2 or len(x) < 2:
        raise EdgePruneError(f"calibration data has shape {list(x.shape)}; give N samples along the first axis "
                             "(N×C×H×W), at least a few hundred")
    return np.ascontiguousarray(x, dtype=np.float32), y
