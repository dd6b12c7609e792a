"""Calibration recipes: the schema of `calibration/*.toml` (where samples come from, how many, how they are split),
read and validated into a frozen `Recipe`; `data.load_data` loads the samples a recipe names.

    from edgeprune.inputs.recipe import load_recipe
    recipe = load_recipe("digits")              # a bundled name, or a path to a TOML file
    print(recipe.kind, recipe.count, recipe.heldout, recipe.to_dict())
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.common.resources import bundled_dir
from edgeprune.common.tomlcheck import check_keys, read_toml, take
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.models import check_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Single-channel counterparts (the channel averages of ImageNet's), used when `grayscale = true` sets neither.
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)

DEFAULT_HELDOUT = 0.25
DEFAULT_BATCH_SIZE = 32
# `count = None`: how many samples a kind uses; None there means every sample the source has.
DEFAULT_COUNT: dict[str, int | None] = {"digits": None, "imagefolder": 512, "npy": None, "random": 512,
                                        "arrays": None}

_COMMON_KEYS = ("name", "description", "kind", "count", "heldout", "batch_size", "seed")
# Keys each kind reads, beyond the common ones; a key another kind reads is rejected, not silently ignored.
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "imagefolder": ("path", "resize", "crop", "mean", "std", "grayscale"),
    "npy": ("path", "labels"),
    "random": ("shape",),
    "arrays": (),  # samples handed over in memory (the Python API: a DataLoader, a tensor); never in a TOML file
}
KINDS = tuple(k for k in KIND_KEYS if k != "arrays")  # the kinds a recipe file may name
_FIELD_DEFAULTS = {"path": None, "labels": None, "resize": None, "crop": None, "mean": None, "std": None,
                   "grayscale": False, "shape": None}


@dataclass(frozen=True)
class Recipe:
    """Where calibration samples come from, how many, and how they are split. `None` means the kind's default."""

    kind: str
    name: str = ""
    description: str = ""
    count: int | None = None  # total samples used (calibration + held out); default per kind, DEFAULT_COUNT
    heldout: float | int = DEFAULT_HELDOUT  # a fraction in (0, 1), or an integer number of samples
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    path: str | None = None  # imagefolder: the folder; npy: the N×C×H×W array file
    labels: str | None = None  # npy: optional int array file of N labels
    resize: int | None = None  # imagefolder: shorter side resized to this
    crop: int | None = None  # imagefolder: center crop to crop×crop
    mean: tuple[float, ...] | None = None  # imagefolder: per channel, after scaling to [0, 1]; default ImageNet
    std: tuple[float, ...] | None = None
    grayscale: bool = False  # imagefolder: read images as one channel
    shape: tuple[int, ...] | None = None  # random: C, H, W; default the model's input shape
    source: str = field(default="", compare=False)  # the file it was read from; not part of the recipe

    def __post_init__(self) -> None:
        where = f"calibration recipe {self.name or self.kind}"
        if self.kind not in KIND_KEYS:
            raise EdgePruneError(f"{where}: kind {self.kind!r} unknown; allowed kinds are: {', '.join(KINDS)}")
        for key, default in _FIELD_DEFAULTS.items():
            if key not in KIND_KEYS[self.kind] and getattr(self, key) != default:
                raise EdgePruneError(
                    f"{where}: key '{key}' is not used by kind {self.kind!r}; its keys are: "
                    f"{', '.join(_COMMON_KEYS + KIND_KEYS[self.kind])}"
                )
        if self.count is not None and self.count < 2:
            raise EdgePruneError(f"{where}: count must be at least 2 (one calibration and one held-out sample), "
                                 f"found {self.count}")
        if isinstance(self.heldout, bool) or not isinstance(self.heldout, (int, float)):
            raise EdgePruneError(f"{where}: heldout must be a fraction in (0, 1) or an integer count, "
                                 f"found {self.heldout!r}")
        if isinstance(self.heldout, float) and not 0.0 < self.heldout < 1.0:
            raise EdgePruneError(f"{where}: heldout = {self.heldout} as a fraction must lie strictly between 0 and 1; "
                                 "write an integer (e.g. heldout = 16) for a number of samples")
        if isinstance(self.heldout, int):
            if self.heldout < 1:
                raise EdgePruneError(f"{where}: heldout = {self.heldout} leaves no held-out samples; "
                                     "set at least 1 (or a fraction such as 0.25)")
            if self.count is not None and self.heldout >= self.count:
                raise EdgePruneError(f"{where}: heldout = {self.heldout} of count = {self.count} leaves no calibration "
                                     "samples; raise count or lower heldout")
        if self.batch_size < 1:
            raise EdgePruneError(f"{where}: batch_size must be at least 1, found {self.batch_size}")
        check_seed(self.seed, f"{where}: seed")
        if self.kind in ("imagefolder", "npy") and not self.path:
            raise EdgePruneError(f"{where}: kind {self.kind!r} needs 'path' "
                                 f"({'a folder of images' if self.kind == 'imagefolder' else 'an .npy array file'})")
        for key in ("resize", "crop"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise EdgePruneError(f"{where}: {key} must be a positive number of pixels, found {v}")
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise EdgePruneError(f"{where}: crop = {self.crop} is larger than resize = {self.resize}; "
                                 "the crop must fit in the resized image (set crop <= resize)")
        channels = 1 if self.grayscale else 3
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) != channels:
                raise EdgePruneError(f"{where}: {key} needs {channels} value(s) for "
                                     f"{'grayscale' if self.grayscale else 'RGB'} images, found {list(v)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise EdgePruneError(f"{where}: std values must be positive, found {list(self.std)}")
        if self.shape is not None and (len(self.shape) < 1 or any(d < 1 for d in self.shape)):
            raise EdgePruneError(f"{where}: shape must be positive integers C, H, W, found {list(self.shape)}")

    @property
    def norm_mean(self) -> tuple[float, ...]:
        return self.mean if self.mean is not None else (GRAY_MEAN if self.grayscale else IMAGENET_MEAN)

    @property
    def norm_std(self) -> tuple[float, ...]:
        return self.std if self.std is not None else (GRAY_STD if self.grayscale else IMAGENET_STD)

    def to_dict(self) -> dict[str, Any]:
        """TOML/JSON-ready table: unset (None) keys and keys the kind does not read are left out."""
        d: dict[str, Any] = {"kind": self.kind}
        for key in _COMMON_KEYS + KIND_KEYS[self.kind]:
            v = getattr(self, key)
            if v is None or key == "kind":
                continue
            d[key] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "calibration recipe", base_dir: Path | None = None) -> Recipe:
        """Validated construction from a TOML/JSON table; relative `path`/`labels` resolve against `base_dir`."""
        if "kind" not in d:
            raise EdgePruneError(f"{where}: missing required key 'kind'; allowed kinds are: {', '.join(KINDS)}")
        kind = take(d, "kind", str, where, choices=KINDS)
        check_keys(d, _COMMON_KEYS + KIND_KEYS[kind], f"{where} (kind {kind!r})")
        heldout = d.get("heldout", DEFAULT_HELDOUT)
        if isinstance(heldout, bool) or not isinstance(heldout, (int, float)):
            raise EdgePruneError(f"{where}: key 'heldout' must be a fraction in (0, 1) or an integer count, "
                                 f"found {type(heldout).__name__} {heldout!r}")

        def resolved(key: str) -> str | None:
            v = take(d, key, str, where, None)
            if v is None or base_dir is None:
                return v
            p = Path(v).expanduser()
            return str(p if p.is_absolute() else (base_dir / p).resolve())

        def numbers(key: str, kind_: type) -> tuple | None:
            v = take(d, key, list, where, None)
            if v is None:
                return None
            ok = all(isinstance(e, kind_) and not isinstance(e, bool) for e in v)
            if kind_ is float:
                ok = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v)
            if not ok:
                what = "numbers" if kind_ is float else "integers"
                raise EdgePruneError(f"{where}: key '{key}' must be a list of {what}, found {v!r}")
            return tuple(kind_(e) for e in v)

        try:
            return cls(
                kind=kind,
                name=take(d, "name", str, where, ""),
                description=take(d, "description", str, where, ""),
                count=take(d, "count", int, where, None),
                heldout=heldout,
                batch_size=take(d, "batch_size", int, where, DEFAULT_BATCH_SIZE),
                seed=take(d, "seed", int, where, 0),
                path=resolved("path"),
                labels=resolved("labels"),
                resize=take(d, "resize", int, where, None),
                crop=take(d, "crop", int, where, None),
                mean=numbers("mean", float),
                std=numbers("std", float),
                grayscale=take(d, "grayscale", bool, where, False),
                shape=numbers("shape", int),
            )
        except EdgePruneError as e:
            msg = str(e)
            raise EdgePruneError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def load_recipe_file(path: str | Path) -> Recipe:
    path = Path(path)
    table = read_toml(path, "calibration recipe")
    where = f"calibration recipe file {path}"
    if "name" not in table:
        table = {**table, "name": path.stem}
    recipe = Recipe.from_dict(table, where=where, base_dir=path.resolve().parent)
    return dataclasses.replace(recipe, source=str(path))


def bundled_recipes() -> dict[str, Path]:
    """The shipped recipe files by name (file stem), in name order."""
    return {p.stem: p for p in sorted(bundled_dir("calibration").glob("*.toml"))}


def load_recipe(spec: str | Path) -> Recipe:
    """A recipe from a bundled name (`digits`, `random`, `imagefolder`, `npy`) or a path to a TOML file."""
    s = str(spec)
    if s.endswith(".toml") or "/" in s:
        return load_recipe_file(s)
    recipes = bundled_recipes()  # a bundled name wins over a stray file of that name in the working folder
    if s in recipes:
        return load_recipe_file(recipes[s])
    if Path(s).is_file():
        return load_recipe_file(s)
    raise EdgePruneError(f"unknown calibration recipe {s!r}; bundled recipes: {', '.join(recipes)}; "
                         "or pass a path to a recipe TOML file")
