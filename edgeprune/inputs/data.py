"""The samples a calibration recipe (`recipe.Recipe`) names, loaded and split into a calibration part and a held-out
part.

    from edgeprune.inputs.data import load_data
    from edgeprune.inputs.recipe import load_recipe
    data = load_data(load_recipe("digits"), input_shape=(1, 1, 32, 32))
    for x in data.calib_batches(): ...          # statistics; data.heldout_batches() measures fidelity

The held-out part never feeds statistics: fidelity measured on samples the compensation was fitted on would flatter
the pruned model. Both parts come from one seeded permutation, so the same recipe and seed give the same split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeprune.errors import EdgePruneError
from edgeprune.inputs.recipe import DEFAULT_COUNT, Recipe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True, eq=False)
class CalibrationData:
    """Samples of one recipe, split: `calib_*` feed activation statistics, `heldout_*` only measure fidelity."""

    calib_x: np.ndarray  # float32, N×C×H×W
    calib_y: np.ndarray | None  # int64 labels, or None for unlabelled data
    heldout_x: np.ndarray
    heldout_y: np.ndarray | None
    recipe: Recipe
    held_back: int = 0  # the first calibration samples, left out of the statistics for the proxy (session.hold_back)

    def __post_init__(self) -> None:
        # Internal invariants: load_data builds these, users go through it.
        assert self.calib_x.dtype == np.float32 and self.heldout_x.dtype == np.float32
        assert self.calib_x.shape[1:] == self.heldout_x.shape[1:]
        assert (self.calib_y is None) == (self.heldout_y is None)
        assert self.calib_y is None or len(self.calib_y) == len(self.calib_x)
        assert self.heldout_y is None or len(self.heldout_y) == len(self.heldout_x)

    @property
    def labelled(self) -> bool:
        return self.calib_y is not None

    def calib_digest(self) -> str:
        """Short SHA-256 of the calibration samples: the statistics, hence the compensated weights, follow from them."""
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.calib_x).tobytes()).hexdigest()[:16]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.calib_x.shape[1:])

    @property
    def batch_values(self) -> int:
        """Input values per calibration batch: what decides a job's thread policy (`parallel.group_workers`)."""
        return self.recipe.batch_size * int(np.prod(self.sample_shape))

    def calib_batches(self, batch_size: int | None = None, start: int = 0) -> Iterator[torch.Tensor]:
        """Calibration inputs from `start` on in a fixed order, `batch_size` (default the recipe's) at a time; the last
        may be short."""
        bs = _batch_size(batch_size, self.recipe)
        for i in range(start, len(self.calib_x), bs):
            # A copy: a model whose first op works in place must not change the stored samples.
            yield torch.from_numpy(self.calib_x[i:i + bs].copy())

    def heldout_batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Held-out inputs and their labels (None when unlabelled), in a fixed order."""
        bs = _batch_size(batch_size, self.recipe)
        for i in range(0, len(self.heldout_x), bs):
            y = None if self.heldout_y is None else torch.from_numpy(self.heldout_y[i:i + bs].copy())
            yield torch.from_numpy(self.heldout_x[i:i + bs].copy()), y


def _batch_size(batch_size: int | None, recipe: Recipe) -> int:
    bs = recipe.batch_size if batch_size is None else batch_size
    if bs < 1:
        raise EdgePruneError(f"batch size must be at least 1, found {bs}")
    return bs


def min_samples_error(layer_name: str, needed: int, have: int) -> EdgePruneError:
    """The error statistics code raises when a layer needs more samples than the calibration part gives."""
    return EdgePruneError(
        f"layer {layer_name} needs at least {needed} calibration samples (patches) for its statistics, "
        f"the recipe gives {have}; raise `count` in the recipe (or lower `heldout`), use a recipe with more data, "
        "or exclude the layer from pruning"
    )


# --- sources: one per kind -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What a kind offers: `available` samples, a loader for chosen indices, and a name for one sample."""

    available: int
    load: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    describe: Callable[[int], str]
    what: str  # "folder X", "file X": for messages


def _digits_source(recipe: Recipe, input_shape: tuple[int, ...]) -> _Source:
    from edgeprune.inputs.example import TRAIN_COUNT, digits_32

    x, y, perm = digits_32()
    pool = perm[TRAIN_COUNT:]  # never seen when the example was trained

    def load(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return x[pool[idx]], y[pool[idx]]

    def describe(i: int) -> str:
        return f"index {int(pool[i])} of load_digits()"

    return _Source(len(pool), load, describe, "scikit-learn digits (not used in training)")


def _random_source(recipe: Recipe, input_shape: tuple[int, ...]) -> _Source:
    shape = recipe.shape if recipe.shape is not None else tuple(input_shape[1:])
    n = recipe.count if recipe.count is not None else DEFAULT_COUNT["random"]
    assert n is not None
    _check_memory(n, shape, recipe)
    # A stream of its own, so the values do not repeat the split's permutation.
    x = np.random.default_rng([recipe.seed, 1]).standard_normal((n, *shape), dtype=np.float32)
    return _Source(n, lambda idx: (x[idx], None), lambda i: f"sample {i}", f"random normal {list(shape)}")


def _npy_source(recipe: Recipe, input_shape: tuple[int, ...]) -> _Source:
    path = _existing(recipe, recipe.path, "array file")
    x = _read_npy(path, "samples")
    if not np.issubdtype(x.dtype, np.floating):
        raise EdgePruneError(f"calibration array {path} has dtype {x.dtype}; it must hold floats already normalised "
                             "as the model expects (convert with x.astype(np.float32) after normalising)")
    if x.ndim != len(input_shape):
        raise EdgePruneError(f"calibration array {path} has shape {list(x.shape)}; the model wants "
                             f"{len(input_shape)}-D N×C×H×W samples of {list(input_shape[1:])}; re-save the array "
                             "with one sample per row of the first axis")
    y = None
    if recipe.labels is not None:
        lpath = _existing(recipe, recipe.labels, "labels file")
        y = _read_npy(lpath, "labels")
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise EdgePruneError(f"labels file {lpath} holds {y.dtype} with shape {list(y.shape)}; it must be a 1-D "
                                 "integer array of class indices (y.astype(np.int64))")
        if len(y) != len(x):
            raise EdgePruneError(f"labels file {lpath} has {len(y)} labels but {path} has {len(x)} samples; "
                                 "the counts must match, one label per sample")
        y = np.asarray(y, dtype=np.int64)
        if (y < 0).any():
            raise EdgePruneError(f"labels file {lpath} has negative labels (first at index {int(np.argmax(y < 0))}); "
                                 "labels are class indices 0..K-1")

    def load(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # Indices sorted for the memory map's sake, then put back into the permutation's order.
        order = np.argsort(idx)
        back = np.empty_like(order)
        back[order] = np.arange(len(idx))
        xs = np.asarray(x[idx[order]], dtype=np.float32)[back]
        return xs, (None if y is None else y[idx])

    return _Source(len(x), load, lambda i: f"sample index {i} of {path}", f"file {path}")


def _arrays_source(x: np.ndarray, y: np.ndarray | None) -> _Source:
    def load(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return np.asarray(x[idx], dtype=np.float32), (None if y is None else y[idx])

    return _Source(len(x), load, lambda i: f"sample {i} of the calibration data given", "the calibration data given")


def _read_npy(path: Path, what: str) -> np.ndarray:
    if path.is_dir():
        raise EdgePruneError(f"{what} file {path} is a folder; give the .npy file saved with np.save")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise EdgePruneError(f"cannot read {what} file {path}: {e.strerror}") from None
    if magic != b"\x93NUMPY":
        raise EdgePruneError(f"{what} file {path} is not a NumPy .npy file (it lacks the .npy header); save the "
                             f"array with np.save(PATH, array)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "object" in str(e).lower() or "pickle" in str(e).lower():
            raise EdgePruneError(f"{what} file {path} holds Python objects (dtype object), which edgeprune does not "
                                 f"load; save a numeric array (x.astype(np.float32))") from None
        raise EdgePruneError(f"cannot read {what} file {path} as a NumPy .npy array (truncated?): {e}") from None
    except OSError as e:
        raise EdgePruneError(f"cannot read {what} file {path} as a NumPy .npy array: {e}") from None


def _imagefolder_source(recipe: Recipe, input_shape: tuple[int, ...]) -> _Source:
    root = _existing(recipe, recipe.path, "image folder")
    if not root.is_dir():
        raise EdgePruneError(f"calibration recipe {recipe.name}: path {root} is a file; kind 'imagefolder' wants a "
                             "folder of images (or of class subfolders of images)")
    files, labels = _list_images(root)

    def load(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        arrays = [_read_image(files[i], recipe) for i in idx]
        for i, a in zip(idx, arrays):
            if a.shape != arrays[0].shape:
                raise EdgePruneError(
                    f"images in {root} come out in different sizes: {files[idx[0]].name} gives "
                    f"{_fmt(arrays[0].shape)}, {files[i].name} gives {_fmt(a.shape)}; set resize and crop in the "
                    "recipe so every image ends at the model's size"
                )
        x = np.stack(arrays) if arrays else np.zeros((0, *input_shape[1:]), np.float32)
        return x, (None if labels is None else labels[idx])

    return _Source(len(files), load, lambda i: f"file {files[i]}", f"folder {root}")


def _list_images(root: Path) -> tuple[list[Path], np.ndarray | None]:
    """Image files and labels: class subfolders (sorted names -> 0..K-1) or, without subfolders, loose images."""
    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))

    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = images(root)
    if classes and loose:
        raise EdgePruneError(f"image folder {root} has both class subfolders ({', '.join(c.name for c in classes)}) "
                             f"and loose images ({loose[0].name}, ...); put every image in a class subfolder, or "
                             "remove the subfolders for unlabelled data")
    if not classes:
        if not loose:
            raise EdgePruneError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images "
                                 "directly or in one subfolder per class")
        return loose, None
    files: list[Path] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        found = images(c)
        if not found:
            raise EdgePruneError(f"class folder {c} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images or "
                                 "remove the folder (class indices follow the sorted folder names)")
        files += found
        labels += [k] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _read_image(path: Path, recipe: Recipe) -> np.ndarray:
    """C×H×W float32: resize the shorter side, center crop, scale to [0, 1], normalise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            img = im.convert("L" if recipe.grayscale else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise EdgePruneError(f"cannot read image {path}: {e}; remove it or convert it to PNG/JPEG") from None
    if recipe.resize is not None:
        w, h = img.size
        # Same rounding as torchvision.transforms.Resize(int): the longer side truncated.
        size = (recipe.resize, int(recipe.resize * h / w)) if w <= h else (int(recipe.resize * w / h), recipe.resize)
        img = img.resize(size, Image.Resampling.BILINEAR)
    if recipe.crop is not None:
        w, h = img.size
        c = recipe.crop
        if c > w or c > h:
            raise EdgePruneError(f"image {path} is {w}x{h} (after resize) and cannot give a {c}x{c} center crop; "
                                 f"set resize to at least {c} in the recipe")
        left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    mean = np.asarray(recipe.norm_mean, np.float32)[:, None, None]
    std = np.asarray(recipe.norm_std, np.float32)[:, None, None]
    return np.ascontiguousarray((a - mean) / std, dtype=np.float32)


def _existing(recipe: Recipe, value: str | None, what: str) -> Path:
    assert value is not None
    p = Path(value).expanduser()
    if not p.exists():
        src = f" (from {recipe.source})" if recipe.source else ""
        raise EdgePruneError(f"calibration recipe {recipe.name or recipe.kind}: {what} {p} does not exist{src}; "
                             "fix 'path' in the recipe (relative paths are relative to the recipe file's folder)")
    return p


SOURCES: dict[str, Callable[[Recipe, tuple[int, ...]], _Source]] = {
    "digits": _digits_source,
    "imagefolder": _imagefolder_source,
    "npy": _npy_source,
    "random": _random_source,
}


# --- load_data ---------------------------------------------------------------------------------------------------


def load_data(recipe: Recipe, input_shape: tuple[int, ...],
              arrays: tuple[np.ndarray, np.ndarray | None] | None = None) -> CalibrationData:
    """The recipe's samples, checked against the model's `input_shape` (N, C, H, W) and split deterministically.

    `arrays` (samples, labels or None) are the samples of a recipe of kind `arrays` (see `batches.py`): split exactly
    as the same arrays saved as an `npy` recipe would be."""
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) < 2 or any(d < 1 for d in input_shape):
        raise EdgePruneError(f"model input shape must be positive integers (N, C, H, W), found {list(input_shape)}")
    name = recipe.name or recipe.kind
    if recipe.kind == "random" and recipe.shape is not None and tuple(recipe.shape) != input_shape[1:]:
        raise _shape_error(recipe, input_shape, tuple(recipe.shape), "random normal")
    if (recipe.kind == "arrays") != (arrays is not None):
        raise EdgePruneError(f"calibration recipe {name}: samples in memory go with kind 'arrays' only")
    src = _arrays_source(*arrays) if arrays is not None else SOURCES[recipe.kind](recipe, input_shape)

    default = DEFAULT_COUNT[recipe.kind]
    if recipe.count is None:
        count = src.available if default is None else min(default, src.available)
    elif recipe.count > src.available:
        raise EdgePruneError(f"calibration recipe {name}: count = {recipe.count} but {src.what} has only "
                             f"{src.available} samples; lower count or add data")
    else:
        count = recipe.count
    n_held = recipe.heldout if isinstance(recipe.heldout, int) else math.floor(recipe.heldout * count + 0.5)
    if n_held < 1:
        raise EdgePruneError(f"calibration recipe {name}: heldout = {recipe.heldout} of {count} samples leaves the "
                             "held-out part empty; raise count (add data) or set heldout to an integer such as 1")
    if n_held >= count:
        raise EdgePruneError(f"calibration recipe {name}: heldout = {recipe.heldout} of {count} samples leaves the "
                             "calibration part empty; lower heldout or raise count (add data)")

    _check_memory(count, input_shape[1:], recipe)
    idx = np.random.default_rng(recipe.seed).permutation(src.available)[:count]
    try:
        x, y = src.load(idx)
    except MemoryError:
        raise _memory_error(count, input_shape[1:], recipe) from None
    if x.shape[1:] != input_shape[1:]:
        raise _shape_error(recipe, input_shape, tuple(x.shape[1:]), src.what)
    _check_finite(x, idx, src)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if y is not None:
        y = np.ascontiguousarray(y, dtype=np.int64)
    return CalibrationData(
        calib_x=x[n_held:], calib_y=None if y is None else y[n_held:],
        heldout_x=x[:n_held], heldout_y=None if y is None else y[:n_held],
        recipe=recipe,
    )


def available_memory() -> int | None:
    """Bytes the system can give without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_error(count: int, shape: tuple[int, ...], recipe: Recipe) -> EdgePruneError:
    need = count * int(np.prod(shape)) * 4
    return EdgePruneError(f"calibration recipe {recipe.name or recipe.kind}: count = {count} samples of "
                          f"{_fmt(shape)} need {need / 2**30:.1f} GiB as float32, more than this machine has free; "
                          f"lower count (a few hundred samples are enough for the statistics)")


def _check_memory(count: int, shape: tuple[int, ...], recipe: Recipe) -> None:
    """Refuse a count whose samples would not fit in memory (they are held twice while being split), before
    allocating them: a typo like count = 100000000 must not swap the machine to a halt."""
    free = available_memory()
    if free is not None and 2 * count * int(np.prod(shape)) * 4 > free:
        raise _memory_error(count, shape, recipe)


def _fmt(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)


def _shape_error(recipe: Recipe, input_shape: tuple[int, ...], found: tuple[int, ...], what: str) -> EdgePruneError:
    want = input_shape[1:]
    name = recipe.name or recipe.kind
    head = (f"calibration recipe {name}: the model wants samples of {_fmt(want)} (C×H×W, input "
            f"{list(input_shape)}), {what} gives {_fmt(found)}")
    same_channels = len(found) == len(want) and found[0] == want[0]
    if recipe.kind == "imagefolder":
        if not same_channels and len(want) == 3 and want[0] in (1, 3):
            fix = f"set grayscale = {'true' if want[0] == 1 else 'false'} in the recipe"
        elif len(want) == 3 and want[1] == want[2]:
            fix = (f"set resize = {want[1]} and crop = {want[1]} in the recipe "
                   f"(or resize larger, e.g. {want[1] * 8 // 7}, and crop = {want[1]})")
        elif len(want) == 3:
            fix = (f"the model wants non-square {want[1]}×{want[2]} inputs: pre-process the images and save them "
                   "for an npy recipe")
        else:
            fix = "use an npy recipe with samples of the model's shape"
    elif recipe.kind == "npy":
        fix = f"re-save the array as N×{_fmt(want)}"
    elif recipe.kind == "random":
        fix = f"remove 'shape' from the recipe to use the model's input shape, or set shape = {list(want)}"
    else:
        fix = "use a recipe whose samples match the model (imagefolder with resize/crop, npy, or random)"
    return EdgePruneError(f"{head}; {fix}")


def _check_finite(x: np.ndarray, idx: np.ndarray, src: _Source) -> None:
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    n_nan = int(np.isnan(x).sum())
    n_inf = int(bad.sum()) - n_nan
    samples = np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))
    where = ", ".join(src.describe(int(idx[s])) for s in samples[:5]) + (", ..." if len(samples) > 5 else "")
    raise EdgePruneError(f"calibration data from {src.what} has {n_nan} NaN and {n_inf} infinite values in "
                         f"{len(samples)} sample(s): {where}; clean the data (or drop those samples)")
