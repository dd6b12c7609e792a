"""Device profiles: where and how a model is measured (DESIGN.md §3).

    from edgeprune.inputs.targets import load_target
    target = load_target("jetson")          # a name, an alias, or a path to a TOML file
    print(target.runtime, target.precision, target.channel_multiple)
    load_target("cpu-int8").quantization    # QuantizeConfig: how an int8 target's models are quantised
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.common.resources import bundled_dir
from edgeprune.common.tomlcheck import check_folder_name, check_keys, read_toml, take
from edgeprune.errors import EdgePruneError

RUNTIME_NAMES = ("onnxruntime", "tensorrt", "trtexec")
PRECISIONS = ("fp32", "fp16", "int8")
ARCHES = ("any", "x86_64", "aarch64")

_TOP_KEYS = ("name", "aliases", "description", "runtime", "precision", "channel_multiple", "threads", "arch", "measure",
             "remote", "quantization")
_MEASURE_KEYS = ("warmup", "iterations", "repeats", "final_repeats", "max_seconds", "interleave")
_REMOTE_KEYS = ("agent", "ssh", "token_env", "timeout_s")
_QUANT_KEYS = ("method", "percentile", "samples", "activations", "reduce_range", "symmetric")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")
TENSORRT_RUNTIMES = ("tensorrt", "trtexec")


@dataclass(frozen=True)
class MeasureConfig:
    """How many runs make one latency figure. `final_repeats` is used for the verification of a build's result."""

    warmup: int = 10  # untimed runs per repeat: caches, allocator and thread pool settle
    iterations: int = 50  # timed runs per repeat
    repeats: int = 3  # fresh sessions; the figure is the median of repeat medians
    final_repeats: int = 5
    # Wall-clock cap on one repeat's timed runs (0: none): a slow model stops early, after at least
    # MIN_ITERATIONS runs. Keeps a search candidate of resnet50 (~100 ms a run) to a few seconds on a CPU.
    max_seconds: float = 0.0
    # A relative budget's candidates (and the release's verification) are measured session by session beside the
    # unpruned model and taken as a fraction of it (`runtimes.stats.interleaved`): on a shared machine whose speed
    # changes for seconds at a time, a baseline measured once at the start can be 30% off the candidates' conditions.
    # Costs a second measurement per candidate and bypasses the cache for them; for the local CPU targets.
    interleave: bool = False

    # 5: the pairs of fresh sessions a relative budget is measured in scatter by their sessions' state, not by the
    # runs in each: on this CPU, pairs of 0.25 s sessions of >= 5 runs gave pair-to-pair scatter of 6.2 / 5.2 / 5.3%
    # (mobilenet_v2 / resnet18 / resnet50) where 0.5 s of >= 10 runs gave 7.6 / 6.4 / 8.7%, in 59 / 56 / 66% of the time
    # (20 pairs each, interleaved; docs/benchmarks.md)
    MIN_ITERATIONS = 5
    MIN_WARMUP = 3  # warm-up runs a slow model gets at least (the first allocates; two more settle the caches)

    def warmup_done(self, done: int, elapsed_s: float) -> bool:
        """Whether `done` warm-up runs in `elapsed_s` seconds are enough: `warmup` of them, or with `max_seconds` set
        at least MIN_WARMUP once half of it has passed (resnet50 at ~95 ms a run: 3 runs, not 10, per session)."""
        if done >= self.warmup:
            return True
        return self.max_seconds > 0 and elapsed_s >= self.max_seconds / 2 and done >= self.MIN_WARMUP

    def runs_done(self, done: int, elapsed_s: float) -> bool:
        """Whether a repeat that has `done` timed runs in `elapsed_s` seconds is complete."""
        if done >= self.iterations:
            return True
        return self.max_seconds > 0 and elapsed_s >= self.max_seconds and done >= min(self.MIN_ITERATIONS,
                                                                                     self.iterations)

    # Upper bounds: a typo (iterations = 1e9) must not hold a device, or an agent's measurement lock, for days.
    LIMITS = {"warmup": 10_000, "iterations": 100_000, "repeats": 100, "final_repeats": 100}
    MAX_SECONDS = 3600.0

    def __post_init__(self) -> None:
        for name, most in self.LIMITS.items():
            v = getattr(self, name)
            least = 0 if name == "warmup" else 1
            if not least <= v <= most:
                raise EdgePruneError(f"measure.{name} must be in {least}..{most}, found {v}")
        if not 0 <= self.max_seconds <= self.MAX_SECONDS:  # NaN fails this too
            raise EdgePruneError(f"measure.max_seconds must be a number of seconds in 0..{self.MAX_SECONDS:.0f} "
                                 f"(0: no cap), found {self.max_seconds}")


def check_agent_url(url: str) -> None:
    """An http(s) URL with a host and, if given, a numeric port in range."""
    from urllib.parse import urlsplit

    if not url.startswith(("http://", "https://")):
        raise EdgePruneError(f"[remote] agent must be an http:// or https:// URL, found {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as e:
        raise EdgePruneError(f"[remote] agent URL {url!r} is malformed ({e}); write it as http://HOST:PORT, e.g. "
                             f"http://jetson.local:8765") from None
    if not parts.hostname:
        raise EdgePruneError(f"[remote] agent URL {url!r} names no host; write it as http://HOST:PORT")
    if port == 0:
        raise EdgePruneError(f"[remote] agent URL {url!r} has port 0; the agent's port is 1..65535")


@dataclass(frozen=True)
class RemoteConfig:
    """How a build host reaches the device: an `edgeprune agent` URL, or `user@host` for SSH."""

    agent: str | None = None
    ssh: str | None = None
    token_env: str = "EDGEPRUNE_AGENT_TOKEN"  # environment variable holding the agent's token
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if (self.agent is None) == (self.ssh is None):
            raise EdgePruneError("[remote] needs exactly one of 'agent' (an http:// URL) or 'ssh' (user@host)")
        if self.agent is not None:
            check_agent_url(self.agent)
        if not 0 < self.timeout_s <= 86400:  # NaN fails this too
            raise EdgePruneError(f"[remote] timeout_s must be a number of seconds in (0, 86400], found "
                                 f"{self.timeout_s}")


@dataclass(frozen=True)
class QuantizeConfig:
    """How an int8 target's models are quantised (`export/quantize.py`: ONNX Runtime's static quantisation, Q/DQ format,
    per-channel int8 weights), the `[quantization]` table of its TOML file."""

    method: str = "minmax"  # how activation ranges are calibrated: minmax | entropy | percentile
    percentile: float = 99.999  # the percentile method's cut, in percent
    samples: int = 256  # calibration samples (the first of the recipe's calibration part) for a released model
    activations: str = "uint8"  # uint8 | int8
    # weights in 7 bits: x86 CPUs without VNNI multiply u8 x s8 pairs with a saturating instruction (VPMADDUBSW)
    reduce_range: bool = False
    symmetric: bool = False  # activations centred on zero (zero point 0): what TensorRT's Q/DQ layers need

    MAX_SAMPLES = 100_000

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise EdgePruneError(f"[quantization] method {self.method!r} unknown; allowed: "
                                 f"{', '.join(CALIBRATION_METHODS)}")
        if self.activations not in ACTIVATION_TYPES:
            raise EdgePruneError(f"[quantization] activations {self.activations!r} unknown; allowed: "
                                 f"{', '.join(ACTIVATION_TYPES)}")
        if not 50.0 < self.percentile <= 100.0:  # NaN fails this too
            raise EdgePruneError(f"[quantization] percentile must be in (50, 100], found {self.percentile}")
        if not 1 <= self.samples <= self.MAX_SAMPLES:
            raise EdgePruneError(f"[quantization] samples must be in 1..{self.MAX_SAMPLES}, found {self.samples}")

    @classmethod
    def for_runtime(cls, runtime: str) -> QuantizeConfig:
        """The defaults: TensorRT builds Q/DQ layers only from symmetric int8 (zero point 0); ONNX Runtime's x86
        kernels run u8 activations x s8 weights fastest (s8 x s8 measured 6-9x slower on this AVX2 CPU)."""
        if runtime in TENSORRT_RUNTIMES:
            return cls(activations="int8", symmetric=True)
        return cls()


@dataclass(frozen=True)
class Target:
    """A device profile: runtime, precision, channel rounding and measurement settings."""

    name: str
    runtime: str = "onnxruntime"
    precision: str = "fp32"
    channel_multiple: int = 8  # widths are rounded to this; a LUT can tell the best value
    threads: int = 1  # intra-op threads for CPU runtimes
    arch: str = "any"
    description: str = ""
    aliases: tuple[str, ...] = ()
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    remote: RemoteConfig | None = None
    quantization: QuantizeConfig | None = None  # int8 only; None there means the runtime's defaults
    source: str = ""  # the file it was read from; not part of the profile

    def __post_init__(self) -> None:
        check_folder_name(self.name, "target name", "jetson-orin-nano")  # a release's TARGET folder (matrix)
        if self.runtime not in RUNTIME_NAMES:
            raise EdgePruneError(f"target {self.name}: runtime {self.runtime!r} unknown; allowed: {', '.join(RUNTIME_NAMES)}")
        if self.precision not in PRECISIONS:
            raise EdgePruneError(f"target {self.name}: precision {self.precision!r} unknown; allowed: {', '.join(PRECISIONS)}")
        if self.precision != "int8":  # quantisation settings mean nothing at float precision (a TOML says so)
            object.__setattr__(self, "quantization", None)
        elif self.quantization is None:
            object.__setattr__(self, "quantization", QuantizeConfig.for_runtime(self.runtime))
        q = self.quantization
        if q is not None and self.runtime in TENSORRT_RUNTIMES and (q.activations != "int8" or not q.symmetric):
            raise EdgePruneError(f"target {self.name}: TensorRT runs Q/DQ layers of symmetric int8 only; set "
                                 f"activations = \"int8\" and symmetric = true in [quantization]")
        if self.channel_multiple < 1 or self.threads < 1:
            raise EdgePruneError(f"target {self.name}: channel_multiple and threads must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aliases"] = list(self.aliases)
        d.pop("source")
        for k in ("remote", "quantization"):
            if d[k] is None:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "target") -> Target:
        """Validated construction from a TOML/JSON table; every key and type is checked."""
        try:
            return cls._from_dict(d, where)
        except EdgePruneError as e:
            msg = str(e)
            raise EdgePruneError(msg if msg.startswith(where) else f"{where}: {msg}") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any], where: str) -> Target:
        check_keys(d, _TOP_KEYS, where)
        measure = take(d, "measure", dict, where, {})
        check_keys(measure, _MEASURE_KEYS, f"{where} [measure]")
        mw = f"{where} [measure]"
        mc = MeasureConfig(
            warmup=take(measure, "warmup", int, mw, 10),
            iterations=take(measure, "iterations", int, mw, 50),
            repeats=take(measure, "repeats", int, mw, 3),
            final_repeats=take(measure, "final_repeats", int, mw, 5),
            max_seconds=take(measure, "max_seconds", float, mw, 0.0),
            interleave=take(measure, "interleave", bool, mw, False),
        )
        remote = take(d, "remote", dict, where, None)
        rc = None
        if remote is not None:
            rw = f"{where} [remote]"
            check_keys(remote, _REMOTE_KEYS, rw)
            rc = RemoteConfig(
                agent=take(remote, "agent", str, rw, None),
                ssh=take(remote, "ssh", str, rw, None),
                token_env=take(remote, "token_env", str, rw, "EDGEPRUNE_AGENT_TOKEN"),
                timeout_s=take(remote, "timeout_s", float, rw, 600.0),
            )
        quant = take(d, "quantization", dict, where, None)
        qc = None
        if quant is not None:
            qw = f"{where} [quantization]"
            if take(d, "precision", str, where, "fp32", PRECISIONS) != "int8":
                raise EdgePruneError(f"{qw}: applies to precision = \"int8\" only; remove the table or set the "
                                     f"precision")
            check_keys(quant, _QUANT_KEYS, qw)
            base = QuantizeConfig.for_runtime(take(d, "runtime", str, where, "onnxruntime", RUNTIME_NAMES))
            qc = QuantizeConfig(
                method=take(quant, "method", str, qw, base.method, CALIBRATION_METHODS),
                percentile=take(quant, "percentile", float, qw, base.percentile),
                samples=take(quant, "samples", int, qw, base.samples),
                activations=take(quant, "activations", str, qw, base.activations, ACTIVATION_TYPES),
                reduce_range=take(quant, "reduce_range", bool, qw, base.reduce_range),
                symmetric=take(quant, "symmetric", bool, qw, base.symmetric),
            )
        aliases = take(d, "aliases", list, where, [])
        if not all(isinstance(a, str) for a in aliases):
            raise EdgePruneError(f"{where}: key 'aliases' must be a list of strings, found {aliases!r}")
        return cls(
            name=take(d, "name", str, where),
            runtime=take(d, "runtime", str, where, "onnxruntime", RUNTIME_NAMES),
            precision=take(d, "precision", str, where, "fp32", PRECISIONS),
            channel_multiple=take(d, "channel_multiple", int, where, 8),
            threads=take(d, "threads", int, where, 1),
            arch=take(d, "arch", str, where, "any", ARCHES),
            description=take(d, "description", str, where, ""),
            aliases=tuple(aliases),
            measure=mc,
            remote=rc,
            quantization=qc,
        )

    def fingerprint(self) -> str:
        """Digest of everything that changes a measured figure (not the description, aliases or remote address)."""
        d = self.to_dict()
        for k in ("description", "aliases", "remote"):
            d.pop(k, None)
        d["measure"].pop("final_repeats", None)
        d["measure"].pop("interleave", None)  # how figures are taken beside each other, not what one figure is
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def float_target(target: Target) -> Target:
    """The same device at the float precision an int8 target falls back to (fp16 on TensorRT, fp32 on ONNX Runtime):
    what an int8 model's speed-up is measured against."""
    if target.precision != "int8":
        return target
    precision = "fp16" if target.runtime in TENSORRT_RUNTIMES else "fp32"
    return dataclasses.replace(target, precision=precision)


def load_target_file(path: str | Path) -> Target:
    path = Path(path)
    table = read_toml(path, "target")
    return dataclasses.replace(Target.from_dict(table, where=f"target file {path}"), source=str(path))


def bundled_targets() -> dict[str, Target]:
    """The shipped profiles by name, in name order."""
    out = {}
    for p in sorted(bundled_dir("targets").glob("*.toml")):
        t = load_target_file(p)
        out[t.name] = t
    return dict(sorted(out.items()))


def load_target(spec: str | Path) -> Target:
    """A target from a profile name, an alias, or a path to a TOML file (a bare name is a bundled profile first:
    write ./cpu to mean a file named cpu)."""
    s = str(spec)
    if s.endswith(".toml") or "/" in s:
        return load_target_file(s)
    targets = bundled_targets()  # a bundled name wins over a stray file of that name in the working folder
    if s in targets:
        return targets[s]
    for t in targets.values():
        if s in t.aliases:
            return t
    if Path(s).is_file():
        return load_target_file(s)
    names = ", ".join(f"{t.name} ({'/'.join(t.aliases)})" if t.aliases else t.name for t in targets.values())
    raise EdgePruneError(f"unknown device {s!r}; known targets: {names}; or pass a path to a target TOML file")
