"""trtexec backend: run NVIDIA's `trtexec` on the target's model and read the GPU compute time it reports.

    from edgeprune.runtimes import trtexec
    cmd = trtexec.command(trtexec.TrtexecJob(onnx="m.onnx", engine="m.engine"), target, (10, 3, 0))
    report = trtexec.parse_output(trtexec.run_trtexec(cmd))
    print(report.gpu_compute["median"], report.queries)

Flags differ between TensorRT versions; `command` follows trtexec's own option parser
(samples/common/sampleOptions.cpp in NVIDIA/TensorRT at each release tag):

- `--explicitBatch`: needed by 8.0/8.1, a no-op with a deprecation warning from 8.2 to 9.x, an unknown option in 10.
- `--workspace=N` until 8.3; `--memPoolSize=workspace:N` (MiB) from 8.4, where `--workspace` is deprecated.
- `--percentile` takes one value until 8.4 and a list from 8.5.
- `--fp16`/`--int8` exist until 10.x (deprecated there with weak typing); 11 is strongly typed and rejects them as
  "Unknown option", so an fp16 model is prepared instead (`trtonnx.prepare_onnx`).
- 11 turns on what `--useSpinWait`, `--noDataTransfers` and `--separateProfileRun` asked for (they only warn now)
  and CUDA graphs, which `--noCudaGraph` turns off so figures stay comparable with 8.x/10.x and the Python API.

Timing: `--warmUp` is a time in ms (see `warmup_ms`), `--iterations=N --duration=0` runs exactly the target's timed
iterations, and `--avgRuns=1` makes trtexec print every iteration's GPU latency (all of them in 8.x, the first and
last 200 from 10 on), from which the statistics are exact; otherwise they come from the "GPU Compute Time" summary.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeprune.common.progress import Tick
from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.inputs.targets import Target
from edgeprune.runtimes.base import Calibration
from edgeprune.runtimes.cache import default_cache_dir
from edgeprune.runtimes.stats import LatencyStats, stats_from_repeats
from edgeprune.runtimes.trtonnx import TrtVersion, has_qdq, input_shapes, prepare_onnx

log = logging.getLogger(__name__)

BINARY_ENV = "EDGEPRUNE_TRTEXEC"  # path of trtexec when it is not on PATH (e.g. /usr/src/tensorrt/bin/trtexec)
TIMEOUT_S = 1800.0  # one trtexec run, engine build included; large models on a Jetson take minutes
LOG_TAIL_LINES = 20
PERCENTILES = (90, 95, 99)


# ---------------------------------------------------------------- finding trtexec and its version


def find_binary() -> str | None:
    """`$EDGEPRUNE_TRTEXEC`, else `trtexec` on PATH, else JetPack's /usr/src/tensorrt/bin/trtexec."""
    env = os.environ.get(BINARY_ENV)
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("trtexec")
    if found:
        return found
    jetpack = "/usr/src/tensorrt/bin/trtexec"
    return jetpack if os.access(jetpack, os.X_OK) else None


def banner_version(code: int) -> TrtVersion:
    """Version from the number in trtexec's banner, `[TensorRT v8601]` or `[TensorRT v100300]`.

    NV_TENSORRT_VERSION is MAJOR*1000 + MINOR*100 + PATCH up to 9.x and MAJOR*10000 + MINOR*100 + PATCH from 10."""
    if code >= 100000:
        return code // 10000, code // 100 % 100, code % 100
    return code // 1000, code // 100 % 10, code % 100


def parse_version(text: str) -> TrtVersion | None:
    """TensorRT version from trtexec output: the `TensorRT version: 10.3.0` line, else the `&&&& RUNNING` banner."""
    m = re.search(r"TensorRT version: (\d+)\.(\d+)\.(\d+)", text)
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    if m:
        return banner_version(int(m.group(1)))
    return None


@functools.lru_cache(maxsize=8)
def _detect_version(binary: str, mtime_ns: int) -> TrtVersion | None:
    # `--help` prints the banner and exits 0 in every version; 11's `--version` exits 1 after the banner.
    try:
        proc = subprocess.run([binary, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(proc.stdout)


def detect_version(binary: str) -> TrtVersion | None:
    """The TensorRT version of the trtexec at `binary` (remembered until the file changes)."""
    try:
        mtime = os.stat(binary).st_mtime_ns
    except OSError:
        return None
    return _detect_version(binary, mtime)


def version(target: Target | None = None) -> str | None:
    binary = find_binary()
    if binary is None:
        return None
    v = detect_version(binary)
    return ".".join(map(str, v)) if v is not None else "unknown"


def unavailable_reason(target: Target | None = None) -> str | None:
    return None if find_binary() else f"trtexec is not on PATH (install TensorRT, or set ${BINARY_ENV})"


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class TrtexecJob:
    """One trtexec run: build from `onnx` (saving the engine to `engine` when given) or load `engine`, then time it."""

    onnx: str | None = None
    engine: str | None = None
    timing_cache: str | None = None  # persists tactic timings across builds (--timingCacheFile)
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # inputs with symbolic dimensions, and the shape to time
    workspace_mib: int | None = None  # None: trtexec's default

    def __post_init__(self) -> None:
        if self.onnx is None and self.engine is None:
            raise EdgePruneError("a trtexec job needs an ONNX file to build or an engine to load")


def warmup_ms(target: Target) -> int:
    """trtexec warms up for a time, not a number of runs: 10 ms per warm-up run the target asks for, and never less
    than trtexec's own default of 200 ms, which lets the GPU clocks ramp up."""
    return max(200, 10 * target.measure.warmup)


def command(job: TrtexecJob, target: Target, version: TrtVersion, binary: str = "trtexec") -> list[str]:
    """The trtexec command line for `job` on `target`, with the flags TensorRT `version` understands."""
    if version < (8, 0, 0):
        raise EdgePruneError(f"trtexec from TensorRT {'.'.join(map(str, version))} is too old; edgeprune supports 8.0+")
    cmd = [binary]
    if job.onnx is not None:
        cmd.append(f"--onnx={job.onnx}")
        if job.engine is not None:
            cmd.append(f"--saveEngine={job.engine}")
        if version < (8, 2, 0):
            cmd.append("--explicitBatch")
        if version[0] < 11:
            if target.precision == "fp16":
                cmd.append("--fp16")
            elif target.precision == "int8":
                cmd += ["--int8", "--fp16"]  # layers without INT8 kernels fall back to fp16, not fp32
        if job.workspace_mib is not None:
            cmd.append(f"--workspace={job.workspace_mib}" if version < (8, 4, 0)
                       else f"--memPoolSize=workspace:{job.workspace_mib}")
        if job.timing_cache is not None:
            cmd.append(f"--timingCacheFile={job.timing_cache}")
    else:
        cmd.append(f"--loadEngine={job.engine}")
    if job.shapes:
        cmd.append("--shapes=" + ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in job.shapes))
    m = target.measure
    cmd += [f"--warmUp={warmup_ms(target)}", f"--iterations={m.iterations}", "--duration=0", "--avgRuns=1"]
    cmd.append("--percentile=" + (",".join(map(str, PERCENTILES)) if version >= (8, 5, 0) else "90"))
    if version[0] < 11:
        cmd += ["--useSpinWait", "--noDataTransfers", "--separateProfileRun"]
    else:
        cmd.append("--noCudaGraph")
    return cmd


# ---------------------------------------------------------------- running it


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_trtexec(cmd: Sequence[str], timeout_s: float | None = None) -> str:
    """trtexec's combined output; a failed, hung or missing trtexec is an error carrying the end of its log."""
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    shown = shlex.join(cmd)
    try:
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", timeout=timeout_s)
    except FileNotFoundError:
        raise DeviceUnreachable(f"trtexec not found at {cmd[0]}; install TensorRT or set ${BINARY_ENV}") from None
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        raise EdgePruneError(f"trtexec did not finish within {timeout_s:.0f} s: {shown}\n--- last lines of its log:\n"
                             f"{log_tail(out)}") from None
    out = proc.stdout or ""
    if proc.returncode != 0 or "&&&& FAILED" in out:
        hint = ""
        unknown = re.findall(r"Unknown option: (\S+)", out)
        if unknown:
            v = parse_version(out)
            hint = (f" (this trtexec{' from TensorRT ' + '.'.join(map(str, v)) if v else ''} does not know "
                    f"{', '.join(unknown)})")
        raise EdgePruneError(f"trtexec failed with exit code {proc.returncode}{hint}: {shown}\n"
                             f"--- last {LOG_TAIL_LINES} lines of its log:\n{log_tail(out)}")
    return out


# ---------------------------------------------------------------- reading its report


_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan)"
_FIELD = re.compile(rf"(min|max|mean|median|std|percentile\(([\d.]+)%\)) = ({_NUMBER}) ms")


@dataclass(frozen=True)
class TrtexecReport:
    """What one trtexec run printed about its timed inferences, in ms. Fields it did not print are None or empty."""

    version: TrtVersion | None
    gpu_compute: dict[str, float] = field(default_factory=dict)  # min, max, mean, median, p90, p95, p99 (, std)
    queries: int | None = None  # "Timing trace has N queries": the timed inferences, warm-up excluded
    throughput_qps: float | None = None
    coeff_var_pct: float | None = None  # std / mean; trtexec prints it only above its stability threshold
    trace_runs_per_average: int | None = None  # --avgRuns
    trace_gpu_ms: tuple[float, ...] = ()  # "Average on K runs - GPU latency" values, in order
    trace_omitted: int = 0  # timings left out of the trace ("... Omitting N lines", TensorRT 10+)

    def raw_gpu_ms(self) -> tuple[float, ...] | None:
        """Every timed inference's GPU compute time, when trtexec printed them all (--avgRuns=1, nothing omitted)."""
        if self.trace_runs_per_average == 1 and self.trace_omitted == 0 and self.queries is not None \
                and len(self.trace_gpu_ms) == self.queries and self.queries > 0:
            return self.trace_gpu_ms
        return None

    def std_ms(self) -> float | None:
        """The GPU compute time's std when trtexec printed it, or its coefficient of variance (times the mean)."""
        if "std" in self.gpu_compute:
            return self.gpu_compute["std"]
        if self.coeff_var_pct is not None and "mean" in self.gpu_compute:
            return self.coeff_var_pct / 100.0 * self.gpu_compute["mean"]
        return None


def _key(name: str, pct: str | None) -> str:
    if pct is None:
        return name
    value = float(pct)
    return f"p{int(value)}" if value.is_integer() else f"p{pct}"


def parse_output(text: str) -> TrtexecReport:
    """The last performance report in a trtexec log (8.x to 11)."""
    gpu: dict[str, float] = {}
    queries = throughput = cov = runs_per_avg = None
    trace: list[float] = []
    omitted = 0
    for line in text.splitlines():
        if "GPU Compute Time: min" in line:
            gpu = {_key(m.group(1), m.group(2)): float(m.group(3))
                   for m in _FIELD.finditer(line.split("GPU Compute Time:", 1)[1])}
            continue
        m = re.search(r"Timing trace has (\d+) queries", line)
        if m:
            queries = int(m.group(1))
            continue
        m = re.search(rf"Throughput: ({_NUMBER}) qps", line)
        if m:
            throughput = float(m.group(1))
            continue
        m = re.search(rf"coefficient of variance = ({_NUMBER})%", line)
        if m:
            cov = float(m.group(1))
            continue
        m = re.search(r"Trace averages of (\d+) runs", line)
        if m:  # a new trace starts: forget an earlier one
            runs_per_avg, trace, omitted = int(m.group(1)), [], 0
            continue
        m = re.search(rf"Average on \d+ runs - GPU latency: ({_NUMBER}) ms", line)
        if m:
            trace.append(float(m.group(1)))
            continue
        m = re.search(r"\.\.\. Omitting (\d+) lines", line)
        if m:
            omitted = int(m.group(1))
    return TrtexecReport(version=parse_version(text), gpu_compute=gpu, queries=queries, throughput_qps=throughput,
                         coeff_var_pct=cov, trace_runs_per_average=runs_per_avg, trace_gpu_ms=tuple(trace),
                         trace_omitted=omitted)


def stats_from_reports(reports: Sequence[TrtexecReport], target: Target, runtime_version: str) -> LatencyStats:
    """One LatencyStats (timing="gpu_compute") from the reports of `repeats` trtexec runs.

    When every run printed each inference's time (`TrtexecReport.raw_gpu_ms`), the statistics are computed from those
    times exactly as for the other backends. Otherwise from the summaries, and then:

    - `median` is the median of the runs' medians, `min`/`max` the extremes, `mean` the query-weighted mean;
    - `p90` is the run's p90 for one run; for several it is the median of the runs' p90s (the pooled p90, which
      trtexec does not print, lies between their smallest and largest);
    - `std` is pooled from each run's std, which trtexec prints only as a coefficient of variance when that is above
      its stability threshold (1% in 8.6, 2.5% in 11): when any run did not print it, `std` is NaN, not a guess;
    - `n` is the sum of the queries the runs report ("Timing trace has N queries"), 0 if one did not report it.
    """
    if not reports:
        raise EdgePruneError("no trtexec report to summarise")
    meta = dict(target=target.name, runtime="trtexec", runtime_version=runtime_version, precision=target.precision,
                timing="gpu_compute")
    raws = [r.raw_gpu_ms() for r in reports]
    if all(raw is not None for raw in raws):
        return stats_from_repeats([list(raw) for raw in raws if raw is not None], **meta)
    for r in reports:
        missing = {"min", "max", "mean", "median"} - set(r.gpu_compute)
        if missing:
            raise EdgePruneError(f"trtexec printed no GPU Compute Time {'/'.join(sorted(missing))}; is this a "
                                 f"trtexec performance log?")
    medians = tuple(r.gpu_compute["median"] for r in reports)
    means = np.array([r.gpu_compute["mean"] for r in reports])
    counts = [r.queries for r in reports]
    known = all(c is not None and c > 0 for c in counts)
    weights = np.array(counts, dtype=np.float64) if known else np.ones(len(reports))
    mean = float((weights * means).sum() / weights.sum())
    stds = [r.std_ms() for r in reports]
    if known and all(s is not None for s in stds):
        second_moment = float((weights * (np.array(stds, dtype=np.float64) ** 2 + means ** 2)).sum() / weights.sum())
        std = math.sqrt(max(second_moment - mean ** 2, 0.0))
    else:
        std = math.nan
    p90s = [r.gpu_compute.get("p90", math.nan) for r in reports]
    return LatencyStats(
        median=float(np.median(medians)),
        p90=float(p90s[0]) if len(p90s) == 1 else float(np.median(p90s)),
        std=std,
        min=min(r.gpu_compute["min"] for r in reports),
        max=max(r.gpu_compute["max"] for r in reports),
        mean=mean,
        n=int(sum(counts)) if known else 0,
        repeat_medians=medians,
        **meta,
    )


# ---------------------------------------------------------------- measure


def _dynamic_shapes(onnx_path: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return tuple((name, shape) for name, (shape, dynamic) in input_shapes(model).items() if dynamic)


def _warn_uncalibrated(model_path: Path) -> None:
    import onnx

    if not has_qdq(onnx.load(str(model_path), load_external_data=False)):
        log.warning("trtexec cannot take calibration data (only a calibration cache, --calib): the int8 engine of %s "
                    "uses dummy dynamic ranges; its latency is representative, its accuracy is not (the tensorrt "
                    "runtime calibrates on the data)", model_path.name)


def measure(
    onnx_path: str | Path,
    target: Target,
    repeats: int | None = None,
    progress: Tick | None = None,
    calibration: Calibration | None = None,
) -> LatencyStats:
    """GPU compute time of `onnx_path` at the target's precision, timed by trtexec: the first run builds the engine
    (with a persistent timing cache), each further repeat is a fresh trtexec process that loads it.

    `calibration` cannot reach trtexec: it takes INT8 scales only from a calibration cache (`--calib=FILE`, which
    TensorRT's calibrator writes), and `--loadInputs` sets the timed inputs, not calibration data. Without a cache,
    `--int8` gives every tensor a dummy dynamic range ("Int8 calibrator not provided. Generating dummy per-tensor
    dynamic range"), so the int8 engine of a model without Q/DQ nodes times like a calibrated one but its outputs are
    meaningless; a warning says so when calibration data is passed. For INT8 calibrated on the recipe's data use the
    `tensorrt` runtime, or a model quantized with Q/DQ nodes.
    """
    binary = find_binary()
    if binary is None:
        raise DeviceUnreachable(f"cannot measure with trtexec here: {unavailable_reason()}")
    ver = detect_version(binary)
    if ver is None:
        raise EdgePruneError(f"cannot tell which TensorRT {binary} belongs to: `{binary} --help` printed no "
                             f"`[TensorRT vNNNN]` banner")
    version_str = ".".join(map(str, ver))
    repeats = repeats or target.measure.repeats
    total = repeats * target.measure.iterations
    cache = default_cache_dir() / "trtexec"
    cache.mkdir(parents=True, exist_ok=True)
    timing_cache = cache / f"timing-{version_str}.cache"
    reports = []
    with tempfile.TemporaryDirectory(prefix="edgeprune-trtexec-") as tmp:
        model = prepare_onnx(onnx_path, target.precision, ver, tmp)
        if calibration is not None and target.precision == "int8":
            _warn_uncalibrated(Path(model))
        shapes = _dynamic_shapes(Path(model))
        engine = str(Path(tmp) / "model.engine")
        for r in range(repeats):
            job = TrtexecJob(onnx=str(model) if r == 0 else None, engine=engine,
                             timing_cache=str(timing_cache), shapes=shapes)
            out = run_trtexec(command(job, target, ver, binary))
            report = parse_output(out)
            if not report.gpu_compute:
                raise EdgePruneError(f"trtexec finished but printed no GPU Compute Time; last lines of its log:\n"
                                     f"{log_tail(out)}")
            reports.append(report)
            if progress is not None:
                progress((r + 1) * target.measure.iterations, total)
    return stats_from_reports(reports, target, version_str)
