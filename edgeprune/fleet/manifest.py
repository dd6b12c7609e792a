"""The release manifest (models x targets x budgets, `edgeprune matrix`): its entries, every key checked, and the
digest of what each entry's release depends on (`fleet/matrix_job.py` resumes by it).

    manifest = load_manifest("release.toml")       # entries expanded from lists, every key checked
    e = manifest.entries[0]                         # Entry: model, target, budget, gates, build settings
    e.folder(Path("release"))                       # release/<model>/<target>/<budget>
    digest(entry_inputs(e))                         # changes when the model file, weights, recipe, profile... change

The manifest:

    targets = ["jetson-orin-nano", "rpi5"]       # every model on every target at every budget ...
    budgets = ["0.5x", "10ms"]
    [build]                                      # build options for every entry (`BuildConfig.from_dict`'s keys;
    max_steps = 8                                # noise_margin and cache: the old spellings of margin_k, use_cache)
    [gates]                                      # quality gates for every entry
    min_agreement = 0.98
    [[models]]
    name = "det"                                 # its folder under the release
    model = "my_pkg.nets:make_detector"          # a spec as for --model; paths are relative to the manifest
    weights = "det.pth"
    calibration = "calib/det.toml"
    budgets = ["12ms"]                           # ... unless a model lists its own targets, budgets or gates

Every string that becomes a folder of the release (a model's name, a target profile's name, a budget) is one plain
folder name: a manifest cannot write outside its release, and two entries cannot share a folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.common.tomlcheck import check_folder_name, check_keys, read_toml, take
from edgeprune.config import OPTION_KINDS, BuildConfig, parse_budget, typed_options
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.targets import load_target

_TOP_KEYS = ("targets", "budgets", "build", "gates", "models")
_MODEL_KEYS = ("name", "model", "weights", "calibration", "input_shape", "targets", "budgets", "gates")
_GATE_KEYS = ("min_agreement", "max_accuracy_drop", "max_metric_drop", "evaluate")
# [build] keys: `BuildConfig.from_dict`'s (and ALIASES), but those the manifest sets elsewhere (a model's table, its
# targets, budgets and gates; the command's --cache-dir) and paths (read from the working directory, not the manifest's)
_BUILD_KEYS = tuple(k for k in OPTION_KINDS if k not in (
    "model", "weights", "calibration", "input_shape", "device", "latency", *_GATE_KEYS, "cache_dir", "lut",
    "force_lut"))
# The exit code that speaks for a matrix with failed entries: the most urgent first (a bug, an unreachable device


@dataclass(frozen=True)
class Entry:
    """One build of the matrix: a model on a target at a budget, with its gates and build settings."""

    name: str  # the model's folder
    model: str
    weights: str | None
    calibration: str | None
    input_shape: tuple[int, ...] | None
    target: str  # as given (a name or a file)
    target_name: str  # the profile's name: the target's folder and its pool kind
    budget: str
    gates: tuple[tuple[str, Any], ...] = ()
    build: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}/{self.target_name}/{self.budget}"

    def folder(self, out: Path) -> Path:
        return out / self.name / self.target_name / self.budget

    def config(self, cache_dir: str | None = None) -> BuildConfig:
        return BuildConfig.from_dict({
            **dict(self.build), **dict(self.gates), "model": self.model, "weights": self.weights,
            "input_shape": self.input_shape, "calibration": self.calibration, "device": self.target,
            "latency": self.budget, "cache_dir": cache_dir})


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    source: str = ""


def _strings(table: dict[str, Any], key: str, where: str, default: Any = ...) -> list[str]:
    value = take(table, key, list, where, default)
    if value is default and default is not ...:
        return value
    if not value or not all(isinstance(v, str) for v in value):
        raise EdgePruneError(f"{where}: {key} must be a non-empty list of strings, found {value!r}")
    return value


def _relative(spec: str | None, base: Path, file_like: bool) -> str | None:
    """A path in the manifest, relative to the manifest's folder (a bundled name such as `digits` stays a name)."""
    if spec is None:
        return None
    if file_like or spec.endswith((".toml", ".pt", ".pth")) or "/" in spec:
        p = Path(spec)
        return str(p if p.is_absolute() else base / p)
    return spec


def _model_spec(spec: str, base: Path) -> str:
    mod, colon, fn = spec.rpartition(":")
    if colon and mod.endswith(".py"):
        return f"{_relative(mod, base, True)}:{fn}"
    return spec


def _frozen(value: Any) -> Any:
    """A [build] value as an Entry holds it: lists as tuples, tables as sorted pairs."""
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return tuple(value) if isinstance(value, list) else value


def _gates(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise EdgePruneError(f"{where}: gates must be a table, found {table!r}")
    check_keys(table, _GATE_KEYS, where)
    out: dict[str, Any] = {k: take(table, k, float, where) for k in _GATE_KEYS[:3] if k in table}
    if "evaluate" in table:
        out["evaluate"] = take(table, "evaluate", str, where)
    if "max_metric_drop" in out and "evaluate" not in out:
        raise EdgePruneError(f"{where}: max_metric_drop gates on your metric: add evaluate = \"pkg.module:function\"")
    return out


def load_manifest(path: str | Path) -> Manifest:
    """The manifest's entries (models x their targets x their budgets), every key, target and budget checked."""
    path = Path(path)
    table = read_toml(path, "manifest")
    where = f"manifest {path}"
    check_keys(table, _TOP_KEYS, where)
    base = path.parent
    targets = _strings(table, "targets", where, None)
    budgets = _strings(table, "budgets", where, None)
    build = typed_options(take(table, "build", dict, where, {}), _BUILD_KEYS, f"{where} [build]")
    settings = tuple(sorted((k, _frozen(v)) for k, v in build.items()))
    gates = _gates(take(table, "gates", dict, where, {}), f"{where} [gates]")
    models = take(table, "models", list, where)
    if not models:
        raise EdgePruneError(f"{where}: models is empty; add a [[models]] table with name and model")
    entries: list[Entry] = []
    for i, m in enumerate(models):
        mw = f"{where} [[models]] #{i + 1}"
        if not isinstance(m, dict):
            raise EdgePruneError(f"{mw}: must be a table, found {m!r}")
        check_keys(m, _MODEL_KEYS, mw)
        name = take(m, "name", str, mw)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise EdgePruneError(f"{mw}: name {name!r} names a folder: letters, digits, '.', '_' or '-' only")
        shape = take(m, "input_shape", list, mw, None)
        if shape is not None and not all(isinstance(v, int) and v > 0 for v in shape):
            raise EdgePruneError(f"{mw}: input_shape must be a list of positive integers (N, C, H, W), found {shape}")
        m_targets = _strings(m, "targets", mw, None) or targets
        m_budgets = _strings(m, "budgets", mw, None) or budgets
        if not m_targets or not m_budgets:
            raise EdgePruneError(f"{mw}: no targets or budgets: give targets = [...] and budgets = [...] at the top of "
                                 f"the manifest or in the model's table")
        m_gates = {**gates, **_gates(m.get("gates", {}), f"{mw} gates")}
        for t in m_targets:
            target = load_target(_relative(t, base, False) or t)
            for b in m_budgets:
                parse_budget(b)
                check_folder_name(b, f"{mw}: budget", "10ms or 0.5x")
                entries.append(Entry(name=name, model=_model_spec(take(m, "model", str, mw), base),
                                     weights=_relative(take(m, "weights", str, mw, None), base, True),
                                     calibration=_relative(take(m, "calibration", str, mw, None), base, False),
                                     input_shape=tuple(shape) if shape else None, target=_relative(t, base, False) or t,
                                     target_name=target.name, budget=b, gates=tuple(sorted(m_gates.items())),
                                     build=settings))
    keys = [e.key for e in entries]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise EdgePruneError(f"{where}: entries {', '.join(dup)} appear twice; give the models distinct names")
    return Manifest(tuple(entries), str(path))


def _file_digest(path: str | Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    from edgeprune.runtimes.cache import file_sha256

    return file_sha256(path)[:16]


def _model_file(spec: str) -> str | None:
    """The source file a `pkg.module:factory` or `file.py:factory` spec builds from (found without importing it)."""
    import importlib.util

    mod, colon, _ = spec.rpartition(":")
    if not colon or spec.startswith(("torchvision:", "timm:", "ultralytics:")):
        return None
    if mod.endswith(".py"):
        return mod
    try:
        found = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        return None
    return found.origin if found is not None else None


def entry_inputs(entry: Entry) -> dict[str, Any]:
    """What an entry's release depends on, digested: a changed one makes the entry run again."""
    from edgeprune._version import __version__
    from edgeprune.inputs.recipe import load_recipe

    recipe = load_recipe(entry.calibration or ("digits" if entry.model == "example" else "random"))
    return {"model": entry.model, "model_file": _file_digest(_model_file(entry.model)),
            "weights": _file_digest(entry.weights), "calibration": _file_digest(recipe.source) or recipe.name,
            "input_shape": list(entry.input_shape) if entry.input_shape else None,
            "target": load_target(entry.target).fingerprint(), "budget": entry.budget,
            "gates": dict(entry.gates), "build": dict(entry.build), "edgeprune": __version__}


def digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


