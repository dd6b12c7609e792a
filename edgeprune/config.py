"""What a job is asked to do: the prune and build configurations, the latency budget, the progress callback type.

    config = BuildConfig(prune=PruneConfig(model="torchvision:resnet18"), device="cpu", latency="0.5x")
    config.budget.ms(base_ms=4.2)   # 2.1
    config = BuildConfig.from_dict({"model": "torchvision:resnet18", "latency": "10ms", "noise_margin": 1.0})

Frozen and validated on construction: a bad value is an `EdgePruneError` (exit 2) before any work.
`BuildConfig.from_dict` is the one way from plain options (the CLI's flags, the API's keyword arguments, a
`build --config` file, a matrix manifest's [build] table) to a config; the defaults are the dataclasses' own, with
`BUILD_DEFAULTS` where a build's differ from a prune's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.common.tomlcheck import read_toml, take
from edgeprune.errors import EdgePruneError

# The checks' registries and helpers (plan, scoring, dependency, inputs) load torch: they are imported where a config
# is checked, so that the command line's parser (its defaults are here) and `edgeprune agent` never load it.


EXPORTERS = ("dynamo", "torchscript")  # torch.onnx's exporters (export/onnx.py's, which a test holds equal)
# The defaults where `prune` and `build` differ (PruneConfig's own are prune's; build, release, finetune and a
# manifest's entries take these through `BuildConfig.from_dict`): prune exports once, with dynamo (torch's recommended
# exporter), at widths rounded to 8; a build exports every candidate, with torchscript (several times faster), at the
# target's channel_multiple (None).
BUILD_DEFAULTS: dict[str, Any] = {"exporter": "torchscript", "channel_multiple": None}
# Old spellings a user's files may hold (a release manifest's [build] table before issue 30): read as the option named.
ALIASES = {"noise_margin": "margin_k", "cache": "use_cache"}


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; `None` means the default."""

    model: str | None = None  # default: the bundled example
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    calibration: str | None = None  # recipe name or file; default digits for the example, random otherwise
    # auto: cap; `datafree` (magnitude, its loss curve from the weights) and no repair for a model with random weights
    # on random calibration data, where neither holds anything to keep (`for_data`)
    criterion: str = "auto"
    compensation: bool = True
    channel_multiple: int | None = 8  # None: the target's (a build's default); 0, as the CLI and a manifest say it
    ignore: tuple[str, ...] = ()
    seed: int = 0
    exporter: str = "dynamo"
    # how the released model's consumers are fitted: sequential (on the pruned network's own inputs) for real
    # calibration data, independent (each on the unpruned network's inputs) on random data, where nothing is learnt
    repair: str = "auto"
    # criteria that need labels (functionality, nap): the unpruned model's predictions on the calibration data as
    # labels, for unlabelled recipes
    pseudo_labels: bool = False

    def __post_init__(self) -> None:
        from edgeprune.dependency.graph import check_patterns
        from edgeprune.inputs.models import check_seed
        from edgeprune.plan import REPAIRS
        from edgeprune.scoring.registry import CRITERIA

        if self.exporter not in EXPORTERS:
            raise EdgePruneError(f"--exporter must be {' or '.join(EXPORTERS)}, found {self.exporter!r}")
        if self.repair not in ("auto",) + REPAIRS:
            raise EdgePruneError(f"--repair must be auto, {' or '.join(REPAIRS)}, found {self.repair!r}")
        if self.criterion not in CRITERIA and self.criterion != "auto":
            raise EdgePruneError(f"unknown criterion {self.criterion!r}; available: {', '.join(CRITERIA)}")
        if self.channel_multiple == 0:  # the CLI's and a manifest's spelling of "the target's"
            object.__setattr__(self, "channel_multiple", None)
        if self.channel_multiple is not None and self.channel_multiple < 1:
            raise EdgePruneError(f"--channel-multiple must be at least 1, found {self.channel_multiple}")
        check_seed(self.seed)
        check_patterns(self.ignore)

    def for_data(self, recipe_kind: str, random_weights: bool) -> PruneConfig:
        """This config with `criterion="auto"` resolved: CaP with its repair, but for a model with random weights
        calibrated on random data (latency work: nothing anywhere to keep) the `datafree` criterion and no repair,
        which skip the statistics and CaP's ranking (38 of resnet50's 79 s build at 0.5x). A trained model on random
        data keeps CaP: its repair still fits the network's own responses (FashionNet on random calibration at
        0.5x / 0.3x: 43.3 / 25.9% test accuracy with CaP's repair, 10.3 / 14.7% by magnitude without it). An
        explicit criterion stays as it is."""
        if self.criterion != "auto":
            return self
        if recipe_kind == "random" and random_weights:
            return dataclasses.replace(self, criterion="datafree", compensation=False)
        return dataclasses.replace(self, criterion="cap")

    def repair_for(self, recipe_kind: str) -> str:
        if self.repair != "auto":
            return self.repair
        return "independent" if recipe_kind == "random" else "sequential"

    def recipe_spec(self) -> str:
        if self.calibration:
            return self.calibration
        return "digits" if (self.model or "example") == "example" else "random"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneConfig:
        """A PruneConfig from plain values (lists for tuples, "1,3,224,224" for a shape); an unknown key is an
        `EdgePruneError` naming it and the known ones."""
        return cls(**{k: _plain(k, v) for k, v in canonical(d, PRUNE_OPTIONS).items()})


PRUNE_DEFAULTS: dict[str, Any] = {k: getattr(PruneConfig, k) for k in BUILD_DEFAULTS}  # prune's: dynamo, 8


@dataclass(frozen=True)
class Budget:
    """`10ms`, `2.5ms`, `800us` (absolute) or `0.5x` (a fraction of the unpruned model's measured latency)."""

    value: float
    relative: bool
    text: str

    def ms(self, base_ms: float) -> float:
        return self.value * base_ms if self.relative else self.value


def parse_budget(text: str) -> Budget:
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|us|µs|s|x)\s*", text)
    if not m:
        raise EdgePruneError(f"--latency must look like 10ms, 2.5ms, 800us or 0.5x, found {text!r}")
    v, unit = float(m.group(1)), m.group(2)
    if v <= 0:
        raise EdgePruneError(f"--latency must be positive, found {text!r}")
    if not math.isfinite(v):
        raise EdgePruneError(f"--latency must be a finite budget, found {text!r}, which overflows to infinity; give "
                             f"one like 10ms or 0.5x")
    if unit == "x":
        if v >= 1:
            raise EdgePruneError(f"a relative --latency must be below 1x (a fraction of the unpruned latency), found {text!r}")
        return Budget(v, True, text)
    return Budget(v * {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}[unit], False, text)


@dataclass(frozen=True)
class BuildConfig:
    prune: PruneConfig
    device: str = "cpu"
    latency: str = "0.5x"
    tolerance: float = 0.05
    max_steps: int = 12
    min_agreement: float | None = None  # fraction of held-out samples where top-1 must agree
    max_accuracy_drop: float | None = None  # percentage points
    cache_dir: str | None = None
    use_cache: bool = True
    lut: str | None = None  # search on this latency table; only the final model is measured on the device
    force_lut: bool = False  # use a table made for another target/precision/runtime version (with a warning)
    # inner level: CaP loss curves (loss), the masked network's output error (fidelity), or auto: fidelity on real
    # calibration data (better at equal latency on digits, bench_build (b)), loss on `random` data, where output
    # fidelity means nothing and the curves cost nothing
    proxy: str = "auto"
    # how the inner level spends the proxy: the step constraint (an equal share per group, CAP.md §5), or latency
    # (error + λ·latency cost per group, cost from --lut or MACs); auto: see allocation_for
    allocation: str = "auto"
    # a candidate counts as within budget when latency·(1 + margin_k·its relative standard error) <= budget
    margin_k: float = 2.0
    # the user's own metric (higher is better) of a torch module, before and after; gated by max_metric_drop
    evaluate: Callable[[Any], float] | None = field(default=None, compare=False)
    max_metric_drop: float | None = None  # in the metric's own units
    evaluate_timeout: float = 300.0  # seconds one call of `evaluate` may take (exit 2 naming the function past it)
    # weight of each named output in the fidelity proxy's error (a weighted mean of per-output relative errors);
    # outputs not named weigh 1
    output_weights: tuple[tuple[str, float], ...] = ()
    # the outer level: the strength u searched against the oracle (strength.py), or MetaPruning's evolution over width
    # vectors under the latency model, its finalists measured (search/evolution.py)
    search: str = "strength"
    # minutes of distillation from the unpruned model given to the released model before its gates (augmented
    # calibration images, its best epoch on held-back ones kept); None or 0: none
    recover: float | None = None
    # Adam's learning rate of that distillation; None: the distillation's default (5e-3). An ImageNet-pretrained
    # EfficientNet-Lite0 wants about 1e-4: at 5e-3 and 1e-3 its held-back loss rose and the untrained model shipped
    recover_lr: float | None = None
    # auto: the unpruned model at a smaller input size (resized inside, jobs/rescale.py) is measured too, and released
    # when it meets the budget and keeps more on the held-out data; off: channels only
    input_scale: str = "auto"

    @property
    def budget(self) -> Budget:
        return parse_budget(self.latency)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, known: Collection[str] | None = None) -> BuildConfig:
        """The one way from plain options to a build's config: every key of `OPTION_KINDS` (PruneConfig's fields and
        BuildConfig's), or an old spelling of one (`ALIASES`); `BUILD_DEFAULTS` and the fields' own defaults for the
        rest. Lists become tuples, a "1,3,224,224" string a shape, a "pkg.module:function" string the `evaluate`
        function. A key outside `known` (default: every option) is an `EdgePruneError` naming it and the known ones.

            BuildConfig.from_dict({"model": "timm:efficientnet_lite0", "latency": "10ms", "max_steps": 8})
        """
        options = {k: _plain(k, v) for k, v in canonical(d, OPTION_KINDS if known is None else known).items()}
        prune = {k: options.pop(k) for k in PRUNE_OPTIONS if k in options}
        return cls(prune=PruneConfig(**{**BUILD_DEFAULTS, **prune}), **options)

    def __post_init__(self) -> None:
        from edgeprune.search.registry import ALLOCATIONS, METHOD_ALLOCATIONS, PROXIES, SEARCHES

        parse_budget(self.latency)  # exit 2 before any work
        if not (isinstance(self.evaluate_timeout, (int, float)) and 0 < self.evaluate_timeout <= 86400):  # NaN too
            raise EdgePruneError(f"--evaluate-timeout must be a number of seconds in (0, 86400], found "
                                 f"{self.evaluate_timeout!r}")
        if self.max_metric_drop is not None and self.evaluate is None:
            raise EdgePruneError("--max-metric-drop gates on the user's metric: give --evaluate pkg.module:function "
                                 "(or evaluate= in Python)")

        if isinstance(self.output_weights, dict):  # Python: output_weights={"boxes": 2.0}
            object.__setattr__(self, "output_weights", tuple(self.output_weights.items()))
        for name, w in self.output_weights:
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise EdgePruneError(f"--output-weight {name}={w!r}: a weight must be a finite number >= 0")
        if self.proxy not in PROXIES + ("auto",):
            raise EdgePruneError(f"--proxy must be auto, {' or '.join(PROXIES)}, found {self.proxy!r}")
        if self.allocation not in (*ALLOCATIONS, "auto"):
            raise EdgePruneError(f"--allocation must be auto, {' or '.join(ALLOCATIONS)}, found {self.allocation!r}")
        if self.allocation in METHOD_ALLOCATIONS and self.prune.criterion != self.allocation:
            raise EdgePruneError(f"--allocation {self.allocation} is {self.allocation}'s width rule and reads its "
                                 f"rankings; give --criterion {self.allocation} with it (found "
                                 f"--criterion {self.prune.criterion})")
        if self.search not in SEARCHES:
            raise EdgePruneError(f"--search must be {' or '.join(SEARCHES)}, found {self.search!r}")
        if not 0 <= self.margin_k <= 10:
            raise EdgePruneError(f"--noise-margin is a number of standard errors in [0, 10], found {self.margin_k}")
        if not 0 < self.tolerance < 1:
            raise EdgePruneError(f"--tolerance must be in (0, 1), found {self.tolerance}")
        if self.max_steps < 2:
            raise EdgePruneError(f"--max-steps must be at least 2, found {self.max_steps}")
        if self.recover is not None and not (isinstance(self.recover, (int, float)) and 0 <= self.recover <= 1440):
            raise EdgePruneError(f"--recover is minutes of distillation in [0, 1440], found {self.recover!r}")
        if self.recover_lr is not None and not (isinstance(self.recover_lr, (int, float)) and 0 < self.recover_lr < 1):
            raise EdgePruneError(f"--recover-lr is a learning rate in (0, 1), found {self.recover_lr!r}")
        if self.input_scale not in ("auto", "off"):
            raise EdgePruneError(f"--input-scale must be auto or off, found {self.input_scale!r}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise EdgePruneError(f"--min-agreement is a fraction in [0, 1], found {self.min_agreement}")

    def allocation_for(self, proxy: str, compensation: bool | None = None) -> str:
        """auto: latency (error + λ·latency cost, the cost from a --lut table or MACs) for the fidelity proxy of a
        compensated model; else step. On FashionNet the two keep the same accuracy at equal measured latency (3 seeds:
        96.9 / 93.4% of it at 0.25x / 0.20x against the step constraint's 96.8 / 92.9% at 0.28x / 0.19x); on the
        synthetic detector at 0.6x the latency allocation kept 96-98% of mAP@0.5 where the step constraint kept
        86-90% (the step constraint cut the last encoder stage and the heads, cheap at their low resolution; the
        latency allocation took channels from the high-resolution first stage). Without the repair, a sliced
        group's output error saturates near 1 at once, so error + λ·latency cuts a group to its minimum or not at
        all (the example's L1 build at 0.5x kept 6% accuracy so)."""
        if self.allocation != "auto":
            return self.allocation
        repaired = self.prune.compensation if compensation is None else compensation  # the session's, resolved
        return "latency" if proxy == "fidelity" and repaired else "step"


# Every option `BuildConfig.from_dict` takes and the TOML type a file gives it in (`load_options`, a manifest).
PRUNE_OPTIONS = tuple(f.name for f in dataclasses.fields(PruneConfig))
OPTION_KINDS: dict[str, type] = {
    "model": str, "weights": str, "input_shape": list, "calibration": str, "criterion": str, "compensation": bool,
    "channel_multiple": int, "ignore": list, "seed": int, "exporter": str, "repair": str, "pseudo_labels": bool,
    "device": str, "latency": str, "tolerance": float, "max_steps": int, "min_agreement": float,
    "max_accuracy_drop": float, "cache_dir": str, "use_cache": bool, "lut": str, "force_lut": bool, "proxy": str,
    "allocation": str, "margin_k": float, "evaluate": str, "max_metric_drop": float, "evaluate_timeout": float,
    "output_weights": dict, "search": str, "recover": float, "recover_lr": float, "input_scale": str,
}


def canonical(d: Mapping[str, Any], known: Collection[str], where: str = "") -> dict[str, Any]:
    """`d` with old spellings under the names they stand for (`ALIASES`). A key that names nothing in `known` is an
    `EdgePruneError` naming it and the known ones (`where`, if given, says where it was found)."""
    unknown = sorted(k for k in d if ALIASES.get(k, k) not in known)
    if unknown:
        olds = [f"{old} for {new}" for old, new in ALIASES.items() if new in known]
        raise EdgePruneError(f"{where + ': ' if where else ''}unknown option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; known options: {', '.join(sorted(known))}"
                             + (f" (old spellings: {', '.join(olds)})" if olds else ""))
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = ALIASES.get(key, key)
        if name in out:
            old = key if key != name else next(k for k, v in ALIASES.items() if v == name)
            raise EdgePruneError(f"{where + ': ' if where else ''}{old} and {name} are the same option ({old} is its "
                                 f"old spelling): give one")
        out[name] = value
    return out


def _plain(key: str, value: Any) -> Any:
    """A plain value (a TOML file's, a keyword argument's) as the config's field holds it."""
    from edgeprune.inputs.models import load_callable, parse_shape

    if key == "input_shape" and isinstance(value, str):
        return parse_shape(value)
    if key == "input_shape" and isinstance(value, (list, tuple)):
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value) or len(value) < 2:
            raise EdgePruneError(f"input_shape must be positive integers like [1, 3, 224, 224], found {value!r}")
        return tuple(value)
    if key == "ignore":
        return () if value is None else (value,) if isinstance(value, str) else tuple(value)
    if key == "output_weights" and isinstance(value, (list, tuple)):
        return tuple(tuple(pair) for pair in value)
    if key == "evaluate" and isinstance(value, str):
        return load_callable(value, "evaluate")
    return value


def typed_options(table: Mapping[str, Any], known: Collection[str], where: str) -> dict[str, Any]:
    """A TOML table of options (keys as given, old spellings too) with every key known and of its type
    (`OPTION_KINDS`; an integer stands for a number), or an `EdgePruneError` that says where."""
    names = canonical(table, known, where)  # unknown keys, an option given twice
    return {k: take(dict(table), k, OPTION_KINDS[name], where) for k, name in zip(table, names)}


def load_options(path: str | Path) -> dict[str, Any]:
    """The options of a build config file (`edgeprune build --config build.toml`): `BuildConfig.from_dict`'s keys,
    checked and typed, old spellings renamed (flags given override them key for key); paths in it are read as given
    on the command line (from the working directory)."""
    return canonical(typed_options(read_toml(Path(path), "build config"), OPTION_KINDS, f"build config {path}"),
                     OPTION_KINDS)
