"""The stages in order: model -> groups -> statistics -> rankings -> plan -> prune -> export, with timings.

    result = prune_job(PruneConfig(model="torchvision:resnet18", calibration="random", ratio=0.5), out="out/r18")

`prepare()` runs everything that does not depend on the widths once; `build` reuses it for every search candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.atomic import OutputDir
from edgeprune.statistics import LayerStats, collect_statistics
from edgeprune.data import CalibrationData, load_data
from edgeprune.errors import EdgePruneError, QualityGateFailed, first_line
from edgeprune.fidelity import Fidelity, check_finite_baseline, fidelity, outputs
from edgeprune.graph import CallRecorder, Graph, check_patterns, trace
from edgeprune.importance import CRITERIA, NEEDS_STATS, Ranking, rank_all
from edgeprune.models import LoadedModel, check_seed, load_model, read_checkpoint
from edgeprune.plan import REPAIRS, Plan, keep_first, plan_from_rankings, uniform_widths
from edgeprune.prune import prune, structural_copy
from edgeprune.recipe import load_recipe
from edgeprune.versions import versions

log = logging.getLogger(__name__)

Tick = Callable[[int, int], None]
Stages = Callable[[str, int | None], Tick]  # (stage description, total steps) -> progress callback


def no_progress(description: str, total: int | None = None) -> Tick:
    return lambda done, total: None


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; `None` means the default."""

    model: str | None = None  # default: the bundled example
    weights: str | None = None
    input_shape: tuple[int, ...] | None = None
    calibration: str | None = None  # recipe name or file; default digits for the example, random otherwise
    criterion: str = "cap"
    compensation: bool = True
    channel_multiple: int = 8  # 0 in a build: the target's
    ignore: tuple[str, ...] = ()
    seed: int = 0
    exporter: str = "dynamo"
    # how the released model's consumers are fitted: sequential (on the pruned network's own inputs) for real
    # calibration data, independent (each on the unpruned network's inputs) on random data, where nothing is learnt
    repair: str = "auto"

    def __post_init__(self) -> None:
        if self.repair not in ("auto",) + REPAIRS:
            raise EdgePruneError(f"--repair must be auto, {' or '.join(REPAIRS)}, found {self.repair!r}")
        if self.criterion not in CRITERIA:
            raise EdgePruneError(f"unknown criterion {self.criterion!r}; available: {', '.join(CRITERIA)}")
        if self.channel_multiple < 0:  # 0: the target's channel_multiple (build)
            raise EdgePruneError(f"--channel-multiple must be at least 1, found {self.channel_multiple}")
        check_seed(self.seed)
        check_patterns(self.ignore)

    def repair_for(self, recipe_kind: str) -> str:
        if self.repair != "auto":
            return self.repair
        return "independent" if recipe_kind == "random" else "sequential"

    def recipe_spec(self) -> str:
        if self.calibration:
            return self.calibration
        return "digits" if (self.model or "example") == "example" else "random"


# How statistics are sampled: a plan replayed by another version reproduces its widths but not its weights.
# 2: random subsampling offsets per batch and layer, seeded by the plan's seed; shrinkage always (2026-12).
STATISTICS_VERSION = 2


@dataclass
class Prepared:
    """Everything the widths do not change: loaded once per build."""

    config: PruneConfig
    loaded: LoadedModel
    data: CalibrationData
    graph: Graph
    stats: dict[str, LayerStats]
    rankings: dict[str, Ranking]
    base_outputs: tuple[torch.Tensor, torch.Tensor | None]
    timings_s: dict[str, float] = field(default_factory=dict)
    solvers: dict = field(default_factory=dict)  # per-consumer PrefixSolver, shared by every candidate

    def plan(self, widths: dict[str, int], **meta: Any) -> Plan:
        c = self.config
        if c.compensation:  # compensated weights follow from the calibration data: `prune --plan` checks it
            meta = {"calibration": c.recipe_spec(), "calibration_digest": self.calib_digest,
                    "statistics": STATISTICS_VERSION, **meta}
        return plan_from_rankings(self.graph, self.rankings, widths, criterion=c.criterion,
                                  compensation=c.compensation, channel_multiple=c.channel_multiple,
                                  model=self.loaded.spec, seed=c.seed, meta=meta,
                                  repair=c.repair_for(self.data.recipe.kind))

    @functools.cached_property
    def calib_digest(self) -> str:
        """Digest of the calibration samples, hashed once: every candidate plan records it."""
        return self.data.calib_digest()

    def prune(self, plan: Plan, probe: bool = False) -> nn.Module:
        """Pruned copy. `probe=True` (search candidates) reuses one Cholesky factor per consumer across widths;
        a released model always takes the direct solve, which `prune --plan` reproduces bit for bit."""
        orders = self.orders() if probe and self.rankings else None
        if probe:  # a search candidate's latency does not depend on its weights: the fast independent repair
            plan = dataclasses.replace(plan, repair="independent")
        if plan.compensation and plan.repair == "sequential":  # forward passes, like the statistics: all threads
            with heavy_stage_threads(self.data):
                return prune(self.loaded.module, self.loaded.example_input, plan, self.stats, self.config.ignore,
                             graph=self.graph, batches=list(self.data.calib_batches()))
        with group_workers(self.data) as workers:
            return prune(self.loaded.module, self.loaded.example_input, plan,
                         self.stats if plan.compensation else None, self.config.ignore, orders,
                         self.solvers if probe else None, graph=self.graph, workers=workers)

    def orders(self) -> dict[str, tuple[int, ...]]:
        """Channel order per group: what lets `solvers` serve every width of a consumer."""
        return {g: r.order for g, r in self.rankings.items()}

    def fidelity(self, pruned: nn.Module) -> Fidelity:
        return fidelity(self.loaded.module, pruned, self.data, self.base_outputs)


def check_traced(graph: Graph, recorder: CallRecorder, where: str) -> None:
    """Refuse a model whose calibration or held-out batches run layers the trace (one example input) never saw:
    data-dependent control flow would make the pruning silently wrong for those layers. Every batch the job forwards
    anyway is recorded (`CallRecorder`), so the check costs no extra forward pass."""
    missed = sorted(set(recorder.called) - set(graph.traced))
    if missed:
        raise EdgePruneError(
            f"layer {missed[0]}{f' (and {len(missed) - 1} more)' if len(missed) > 1 else ''} runs on {where} but not "
            f"on the example input the dependency trace used (data-dependent control flow); edgeprune cannot prune "
            f"such a model safely: make forward() take the same path for every input")


@contextmanager
def model_runs(loaded: LoadedModel, what: str, batch_size: int) -> Iterator[None]:
    """A forward pass of the user's model that fails is their model's problem, said in one line."""
    try:
        yield
    except EdgePruneError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as e:
        first = first_line(e)
        raise EdgePruneError(
            f"model {loaded.spec} fails on {what} (batches of {batch_size}) although it ran on the example input "
            f"{list(loaded.input_shape)}: {first}; if forward() handles one sample at a time, set batch_size = 1 in "
            f"the calibration recipe") from None


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's thread count and NumPy/SciPy's BLAS pool (threadpoolctl, which scikit-learn brings) set to `n`."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it only torch is limited
        threadpool_limits = None
    try:
        if threadpool_limits is not None:
            with threadpool_limits(limits=n):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def compute_threads(n: int | None = None) -> Iterator[None]:
    """Threads for the compute stages (statistics, ranking, compensation, export), torch and BLAS alike.

    Default 1 (`EDGEPRUNE_THREADS` overrides): on small inputs thread hand-offs between torch's OpenMP pool and
    NumPy/SciPy's OpenBLAS pool cost more than they give (the example's `prune`: 19.4 s against 22.1 s on 2 threads);
    `heavy_stage_threads` raises both for the heavy stages on large inputs. Latency measurement is not affected: it
    uses the target's thread count.
    """
    with _threads(n or int(os.environ.get("EDGEPRUNE_THREADS", "1"))):
        yield


_DEFAULT_TORCH_THREADS = torch.get_num_threads()
LARGE_BATCH = 1_000_000  # input values per calibration batch above which the heavy stages run on all threads


@contextmanager
def heavy_stage_threads(data: CalibrationData) -> Iterator[None]:
    """The statistics on large inputs (224x224 batches) run on all threads, torch's and BLAS's (ranking and compensation
    use `group_workers`): the calibration pass accumulates its products after each forward pass, so the two pools take
    turns instead of spinning against each other (resnet18 with 256 images: 38.9 s on 2 threads against 49.6 s on 1, measured). On
    small inputs (the 32x32 example) one thread stays faster (19.4 s against 22.1 s for `edgeprune prune`)."""
    if not _large_input(data):
        yield
        return
    with _threads(_DEFAULT_TORCH_THREADS):
        yield


def _large_input(data: CalibrationData) -> bool:
    """Whether the heavy stages leave `compute_threads` for all cores: large batches, and no EDGEPRUNE_THREADS."""
    batch_values = data.recipe.batch_size * int(np.prod(data.sample_shape))
    return batch_values >= LARGE_BATCH and "EDGEPRUNE_THREADS" not in os.environ


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_retaining = False


@contextmanager
def retained_memory() -> Iterator[None]:
    """Keep freed memory in the process while a job runs, and give it back at the end (glibc only; elsewhere a no-op).

    glibc returns every block over 32 MB (a batch's activations, a layer's covariance) to the kernel when it is freed,
    so the next batch faults the same amount in again; on a virtual machine that hands freed pages back to its host
    (virtio-balloon free page reporting, as on our 2-core machines) that costs 5-16 µs per 4 KB page instead of 0.6.
    resnet50's calibration pass took 3.4 million page faults; kept, 0.6 million, and its 256-image forward pass
    ran in 17-18 s instead of 26-34 s (measured). Peak memory is the high-water mark of the job, not more: alone this
    raised resnet50's `tools/bench_prune.py` peak from 3.2 to 3.5 GB, and with the statistics' smaller temporaries it
    is 3.1 GB. `EDGEPRUNE_RETAIN_MEMORY=0` turns it off.
    """
    global _retaining
    libc = _glibc() if os.environ.get("EDGEPRUNE_RETAIN_MEMORY", "1") != "0" else None
    if libc is None or _retaining:  # a nested job (build runs prepare) leaves it to the outer one
        yield
        return
    _retaining = True
    libc.mallopt(_M_MMAP_MAX, 0)  # large blocks come from the heap, which...
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # ...is never trimmed while the job runs
    try:
        yield
    finally:
        _retaining = False
        libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)  # and what the job freed goes back to the system


@functools.cache
def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def group_workers(data: CalibrationData) -> Iterator[int]:
    """Workers for stages made of independent per-group (per-layer) work on large inputs: one per core, each with
    one BLAS thread (see `importance.rank_all`); on small inputs one worker under `compute_threads`."""
    if not _large_input(data) or _DEFAULT_TORCH_THREADS < 2:
        yield 1
        return
    with _threads(1):
        yield _DEFAULT_TORCH_THREADS


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    log.info("%s: start", stage)
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
    log.info("%s: done in %.2fs", stage, timings[stage])


def prepare(config: PruneConfig, stages: Stages = no_progress, rank_groups: bool = True) -> Prepared:
    """Load the model and calibration data, trace groups, collect statistics and rank every group."""
    with compute_threads(), retained_memory():
        return _prepare(config, stages, rank_groups)


def _prepare(config: PruneConfig, stages: Stages, rank_groups: bool) -> Prepared:
    t: dict[str, float] = {}
    torch.manual_seed(config.seed)
    with timed(t, "load"):
        stages("loading model and calibration data", None)
        loaded = load_model(config.model, config.weights, config.input_shape, seed=config.seed)
        recipe = load_recipe(config.recipe_spec())
        data = load_data(recipe, loaded.input_shape)
    with timed(t, "trace"):
        stages("tracing channel groups", None)
        graph = trace(loaded.module, loaded.example_input, config.ignore)
        recorder = CallRecorder()
        bs = data.recipe.batch_size
        with model_runs(loaded, "the first calibration batch", bs), recorder.watch(loaded.module), torch.no_grad():
            loaded.module(next(iter(data.calib_batches())))
        check_traced(graph, recorder, "the first calibration batch")  # before the statistics: fail fast
        if not graph.groups:
            raise EdgePruneError(f"{loaded.spec} has no prunable channel groups"
                                 + (f" ({'; '.join(f'{k}: {v}' for k, v in list(graph.excluded.items())[:3])})"
                                    if graph.excluded else ""))
    with timed(t, "baseline"), model_runs(loaded, "the held-out data", bs), recorder.watch(loaded.module):
        base_outputs = outputs(loaded.module, data)  # before the statistics: a broken model fails in seconds
    check_traced(graph, recorder, "the held-out data")
    check_finite_baseline(loaded.module, data, base_outputs[0], loaded.spec)
    stats: dict[str, LayerStats] = {}
    if config.compensation or config.criterion in NEEDS_STATS:
        with timed(t, "statistics"), heavy_stage_threads(data):
            n = -(-len(data.calib_x) // data.recipe.batch_size)
            stats = collect_statistics(loaded.module, graph.consumer_modules(), data.calib_batches(),
                                       progress=stages("collecting statistics", n), total_batches=n,
                                       strict=data.recipe.kind != "random", observe=recorder.watch)
        check_traced(graph, recorder, "the calibration data")
    rankings: dict[str, Ranking] = {}
    if rank_groups:
        with timed(t, "rank"), group_workers(data) as workers:
            rankings = rank_all(config.criterion, loaded.module, graph.groups, stats, config.seed, workers,
                                stages(f"ranking channels ({config.criterion})", len(graph.groups)))
    return Prepared(config, loaded, data, graph, stats, rankings, base_outputs, t)


# ---------------------------------------------------------------- artifacts

PRUNED_FORMAT = "edgeprune.pruned/1"


def save_pruned(path: Path, pruned: nn.Module, plan: Plan, loaded: LoadedModel, ignore: tuple[str, ...]) -> None:
    """pruned.pt: the pruned state dict and what is needed to rebuild its architecture (loadable weights_only)."""
    biased = [n for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    torch.save({"format": PRUNED_FORMAT, "model": loaded.spec, "weights": loaded.weights,
                "input_shape": list(loaded.input_shape), "ignore": list(ignore), "plan": plan.to_dict(),
                "biased": biased, "state_dict": pruned.state_dict()}, path)


def load_pruned(path: str | Path) -> tuple[nn.Module, Plan]:
    """Rebuild a pruned model from pruned.pt: the original model, the plan's architecture, the saved weights."""
    if not Path(path).is_file():
        raise EdgePruneError(f"pruned model {path} does not exist")
    d = read_checkpoint(Path(path), "pruned model")
    if not isinstance(d, dict) or d.get("format") != PRUNED_FORMAT:
        raise EdgePruneError(f"{path} is not an edgeprune pruned.pt (format {PRUNED_FORMAT})")
    plan = Plan.from_dict(d["plan"])
    loaded = load_model(d["model"], d["weights"], tuple(d["input_shape"]))
    skeleton = structural_copy(loaded.module, loaded.example_input, plan, d["biased"], tuple(d["ignore"]))
    skeleton.load_state_dict(d["state_dict"])
    return skeleton.eval(), plan


def model_size(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs and parameters (torch-pruning's counter): for the report, never as a latency proxy."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return {"macs": int(macs), "params": int(params)}


def prune_job(config: PruneConfig, out: str | Path, ratio: float | None = None, plan_path: str | None = None,
              stages: Stages = no_progress, force: bool = False) -> dict[str, Any]:
    """`edgeprune prune`: one plan (uniform ratio or a plan file), pruned, exported, with held-out fidelity.

    `out` is checked before any work (see `atomic.OutputDir`: a folder holding anything but a previous edgeprune
    output is refused unless `force`) and written as a whole at the end."""
    if (ratio is None) == (plan_path is None):
        raise EdgePruneError("give exactly one of --ratio (fraction of channels removed) or --plan plan.json")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise EdgePruneError(f"--ratio is the fraction of channels removed and must be in [0, 1), found {ratio}")
    given = Plan.load(plan_path) if plan_path else None
    with OutputDir(out, force) as outdir, compute_threads(), retained_memory():
        return _prune_job(config, outdir, ratio, given, plan_path, stages)


def _prune_job(config: PruneConfig, outdir: OutputDir, ratio: float | None, given: Plan | None,
               plan_path: str | None, stages: Stages) -> dict[str, Any]:
    from edgeprune.export import export
    from edgeprune.report import to_json

    if given is not None:  # the plan decides criterion and compensation: reproduce it exactly
        config = dataclasses.replace(config, criterion=given.criterion, compensation=given.compensation,
                                     repair=given.repair,
                                     channel_multiple=given.channel_multiple, seed=given.seed)
    prep = prepare(config, stages, rank_groups=given is None)
    t = prep.timings_s
    if given is not None and given.compensation and given.meta.get("statistics", 1) != STATISTICS_VERSION:
        log.warning("plan %s was made by an edgeprune that sampled calibration statistics differently (version %s, "
                    "here %s): widths are reproduced, compensated weights will differ slightly", plan_path,
                    given.meta.get("statistics", 1), STATISTICS_VERSION)
    made_with = given.meta.get("calibration_digest") if given is not None and given.compensation else None
    if made_with is not None and made_with != prep.calib_digest:
        log.warning("plan %s was made with other calibration data (%s, digest %s; here %s, digest %s): the compensated "
                    "weights will differ from the ones it was made with; pass the same --calibration and --seed to "
                    "reproduce them", plan_path, given.meta.get("calibration"), made_with, config.recipe_spec(),
                    prep.calib_digest)
    plan = given if given is not None else prep.plan(uniform_widths(prep.graph, ratio, config.channel_multiple),
                                                     ratio=ratio)
    with timed(t, "prune"):
        stages("pruning and compensating", None)
        pruned = prep.prune(plan)
    with timed(t, "fidelity"):
        fid = prep.fidelity(pruned)
    tmp = outdir.tmp
    with timed(t, "export"):
        stages("exporting to ONNX", None)
        exp = export(pruned, prep.loaded.example_input, tmp / "model.onnx", exporter=config.exporter)
        save_pruned(tmp / "pruned.pt", pruned, plan, prep.loaded, config.ignore)
        plan.save(tmp / "plan.json")
    before = {g.name: g.channels for g in prep.graph.groups}
    result = {
        "edgeprune": versions()["edgeprune"], "command": "prune",
        "model": prep.loaded.spec, "calibration": prep.data.recipe.name or prep.data.recipe.kind,
        "criterion": plan.criterion, "compensation": plan.compensation, "out": str(outdir.out),
        "widths": {g: {"before": before[g], "after": len(k)} for g, k in plan.kept.items()},
        "base": model_size(prep.loaded.module, prep.loaded.example_input),
        "pruned": model_size(pruned, prep.loaded.example_input),
        "fidelity": fid.to_dict(), "parity": exp.parity.to_dict() if exp.parity else None,
        "excluded_groups": prep.graph.excluded, "timings_s": t,
    }
    (tmp / "report.json").write_text(to_json(result) + "\n")
    if fid.nonfinite:  # a broken model never lands in --out
        dest = outdir.commit(failed=True)
        raise QualityGateFailed(f"the pruned model's outputs are not finite (NaN or infinity) on {fid.nonfinite} of "
                                f"{fid.samples} held-out samples; its artifacts are in {dest}/ for inspection; try "
                                f"a lower --ratio, or --no-compensation to tell whether the repair is at fault")
    outdir.commit()
    return result


# ---------------------------------------------------------------- build


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

    def __post_init__(self) -> None:
        from edgeprune.search import PROXIES

        if self.proxy not in PROXIES + ("auto",):
            raise EdgePruneError(f"--proxy must be auto, {' or '.join(PROXIES)}, found {self.proxy!r}")
        if not 0 < self.tolerance < 1:
            raise EdgePruneError(f"--tolerance must be in (0, 1), found {self.tolerance}")
        if self.max_steps < 2:
            raise EdgePruneError(f"--max-steps must be at least 2, found {self.max_steps}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise EdgePruneError(f"--min-agreement is a fraction in [0, 1], found {self.min_agreement}")


@dataclass
class BuildOutcome:
    report: dict[str, Any]
    exit_code: int
    message: str | None = None  # the error line for exit codes 3 and 4
    out: str = ""  # where the artifacts went: the --out folder, or OUT.failed for exit codes 3 and 4


def export_candidate(model: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> Path:
    from edgeprune.export import export_onnx, simplify_onnx

    export_onnx(model, example, path, exporter=exporter)
    simplify_onnx(path)
    return path


def build(config: BuildConfig, out: str | Path, stages: Stages = no_progress,
          on_step: Callable[[Any], None] | None = None, force: bool = False) -> BuildOutcome:
    """`edgeprune build`: search widths until the pruned model's measured latency on the target meets the budget.

    A build that misses its budget (exit 3) or a quality gate (exit 4) writes its artifacts to `OUT.failed/` and
    leaves `out` as it was: the last good release is never replaced by a failed one (`atomic.OutputDir`)."""
    with compute_threads(), retained_memory():
        return _build(config, out, stages, on_step, force)


def _build(config: BuildConfig, out: str | Path, stages: Stages, on_step: Callable[[Any], None] | None,
           force: bool) -> BuildOutcome:
    from edgeprune.runtimes import measure, runtime_for
    from edgeprune.targets import load_target

    budget = parse_budget(config.latency)
    target = load_target(config.device)
    device_runs = [0]
    _measure = measure

    def measure(*a: Any, **kw: Any):  # noqa: F811 - the runtimes' measure, counting real device measurements
        stats = _measure(*a, **kw)
        device_runs[0] += stats.source == "measured"
        return stats

    runtime_for(target)  # fail fast (exit 5) before any heavy work when the device cannot be measured
    table = None
    if config.lut:  # and fail fast (exit 2) on a bad or mismatched table
        from edgeprune.lut import check_table_for, load_lut

        table = load_lut(config.lut)
        check_table_for(table, target, force=config.force_lut, path=config.lut)
    with OutputDir(out, force) as outdir:
        return _build_into(config, outdir, stages, on_step, budget, target, table, measure, device_runs)


def _build_into(config: BuildConfig, outdir: OutputDir, stages: Stages, on_step: Callable[[Any], None] | None,
                budget: Budget, target: Any, table: Any, measure: Callable[..., Any],
                device_runs: list[int]) -> BuildOutcome:
    import tempfile

    from edgeprune.errors import ExitCode
    from edgeprune.runtimes import MeasurementCache
    from edgeprune.search import Probe, make_widths_fn, search, widths_digest

    pc = dataclasses.replace(config.prune, channel_multiple=target.channel_multiple) \
        if config.prune.channel_multiple == 0 else config.prune
    prep = prepare(pc, stages)
    if config.max_accuracy_drop is not None and not prep.data.labelled:
        raise EdgePruneError("--max-accuracy-drop needs a labelled calibration recipe (digits, imagefolder with class "
                             "folders, npy with labels); use --min-agreement for unlabelled data")
    t = prep.timings_s
    cache = MeasurementCache.under(config.cache_dir) if config.use_cache else None
    example = prep.loaded.example_input
    with tempfile.TemporaryDirectory(prefix="edgeprune-build-") as work:
        work_dir = Path(work)

        def measured(widths: dict[str, int], cached: bool = True) -> Probe:
            path = work_dir / f"cand-{widths_digest(widths)}.onnx"
            with timed(t, "measure"):
                stats = measure(path, target, cache=cache if cached else None,
                                progress=stages(f"measuring candidate on {target.name}", None))
            return Probe(stats.median, stats.source, stats.spread)

        def oracle(widths: dict[str, int]) -> Probe:
            plan = prep.plan(widths)
            with timed(t, "prune"):
                pruned = prep.prune(plan, probe=True)
            with timed(t, "export"):
                export_candidate(pruned, example, work_dir / f"cand-{widths_digest(widths)}.onnx", pc.exporter)
            return measured(widths)

        def remeasure(widths: dict[str, int]) -> Probe:
            """A second, fresh measurement of a candidate too close to the budget to tell (the cache would only
            repeat the first figure)."""
            return measured(widths, cached=False)

        layer_model = None
        if table is not None:
            from edgeprune.lut import LayerModel, predict
            from edgeprune.runtimes.stats import stats_from_repeats

            layer_model = LayerModel.from_model(prep.loaded.module, example, prep.graph, prep.loaded.spec)
            if prep.loaded.spec not in table.models:
                raise EdgePruneError(f"latency table {config.lut} has no calibration for {prep.loaded.spec}; run "
                                     f"`edgeprune lut --model {prep.loaded.spec} --device {target.source or target.name} --out "
                                     f"{config.lut}`")
            base_stats = stats_from_repeats([[table.models[prep.loaded.spec]["base_ms"]]], target=target.name,
                                            runtime=target.runtime, runtime_version=table.meta["runtime_version"],
                                            precision=target.precision, source="lut")
        else:
            base_path = work_dir / "base.onnx"
            with timed(t, "export"):
                export_candidate(prep.loaded.module, example, base_path, pc.exporter)
            with timed(t, "measure"):
                # a relative budget rests on a baseline measured in this run, under this run's load: a cached figure
                # may come from a busier or quieter hour (0.2x once aimed at 0.22x of the unpruned model's latency)
                base_stats = measure(base_path, target, cache=None if budget.relative else cache,
                                     progress=stages(f"measuring unpruned model on {target.name}", None))
        budget_ms = budget.ms(base_stats.median)
        proxy = config.proxy if config.proxy != "auto" else "loss" if prep.data.recipe.kind == "random" else "fidelity"
        if proxy == "loss" and prep.data.recipe.kind != "random":
            log.warning("--proxy loss on real calibration data: the CaP loss curves do not compare across layers and "
                        "allocated worse than uniform widths on the bundled example (output error 0.241 against 0.195 "
                        "at about 0.25x MACs); --proxy fidelity (the default here) measures the network's output")
        error_of = fidelity_error(prep, t) if proxy == "fidelity" else None
        widths_for = make_widths_fn(prep.graph, prep.rankings, pc.channel_multiple, error=error_of)
        correction = 1.0

        def lut_oracle(widths: dict[str, int]) -> Probe:
            pred, warns = predict(table, layer_model, widths)
            for w in warns[:3]:
                log.warning("latency table: %s", w)
            return Probe(pred * correction, "lut")

        with timed(t, "search"):
            stages(f"searching widths for {budget_ms:.3f} ms on {target.name}", None)
            # the unpruned model's widths are the u = 0 bracket: its baseline figure serves, no second measurement
            full = {g.name: g.channels for g in prep.graph.groups}
            known = {widths_digest(full): Probe(base_stats.median, "baseline", base_stats.spread)} \
                if table is None else None
            result = search(widths_for, lut_oracle if table is not None else oracle, budget_ms, config.tolerance,
                            config.max_steps, on_step=on_step, known=known,
                            remeasure=remeasure if table is None else None, error_of=error_of)
        trace_all = list(result.trace)
        if table is not None and result.best is not None:
            # one device measurement of the chosen plan; when it misses the band, correct the predictions by the
            # measured error and search again (the trace keeps both rounds)
            from edgeprune.search import Candidate

            with timed(t, "verify"):
                # exactly the model that would ship (direct solve, same plan), so that its verification below is
                # served from the measurement cache instead of a second device measurement
                check_plan = dataclasses.replace(prep.plan(result.best.widths, budget_ms=budget_ms, budget=budget.text),
                                                 target=target.name)
                path = work_dir / "lut-check.onnx"
                export_candidate(prep.prune(check_plan), example, path, pc.exporter)
                got_stats = measure(path, target, cache=cache, repeats=target.measure.final_repeats)
                got = got_stats.median
            trace_all.append(Candidate(step=len(trace_all) + 1, strength=result.best.strength,
                                       widths_digest=result.best.widths_digest, latency_ms=got, source=got_stats.source,
                                       widths=result.best.widths))
            if not (1 - config.tolerance) * budget_ms <= got <= budget_ms:
                correction = got / result.best.latency_ms
                with timed(t, "search"):
                    result = search(widths_for, lut_oracle, budget_ms, config.tolerance, config.max_steps)
                trace_all += [dataclasses.replace(c, step=len(trace_all) + i + 1) for i, c in enumerate(result.trace)]
        result = dataclasses.replace(result, trace=tuple(trace_all))

        # verify: the released model (direct compensation solve) is exported and measured again with more repeats,
        # fresh (a cached miss would replay on every later run); a miss falls back to the nearest feasible candidate
        # or, rather than a model far under budget, resumes the search from the verified figure
        def verify_one(cand: Any) -> Verified:
            plan = dataclasses.replace(prep.plan(cand.widths, budget_ms=budget_ms, budget=budget.text),
                                       target=target.name)
            with timed(t, "prune"):
                pruned = prep.prune(plan)
            final_path = work_dir / "final.onnx"
            with timed(t, "export"):
                export_candidate(pruned, example, final_path, pc.exporter)
            verify_cache = cache if table is not None else None  # the table's check figure is the first verification
            with timed(t, "verify"):
                stats = measure(final_path, target, cache=verify_cache, repeats=target.measure.final_repeats,
                                progress=stages("verifying the final model", None))
                if stats.median > budget_ms and cand.source != "lut" and cand.latency_ms <= budget_ms:
                    # the search measured this very model within budget: noise decides between the two figures, and
                    # a verification over twice the sessions settles it for less than a more pruned fallback costs
                    stats = measure(final_path, target, cache=None, repeats=2 * target.measure.final_repeats,
                                    progress=stages("verifying the final model again", None))
            return Verified(cand, stats, pruned, plan, final_path)

        def resume(res: Any, verified: dict[str, Any]) -> Any:
            used = sum(1 for c in res.trace if c.source.startswith("measured"))
            if table is not None or used >= config.max_steps:
                return None
            known = {c.widths_digest: Probe(c.latency_ms, c.source, c.spread) for c in res.trace}
            known.update({d: Probe(v.median, "verified", v.spread) for d, v in verified.items()})
            with timed(t, "search"):
                more = search(widths_for, oracle, budget_ms, config.tolerance,
                              len(known) + config.max_steps - used, on_step=None, known=known, remeasure=remeasure,
                              error_of=error_of)
            seen = {c.widths_digest for c in res.trace}
            new = [c for c in more.trace if c.widths_digest not in seen]
            trace = list(res.trace) + [dataclasses.replace(c, step=len(res.trace) + i + 1) for i, c in enumerate(new)]
            return dataclasses.replace(more, trace=tuple(trace))

        release, result = verify_release(result, budget_ms, verify_one, resume)
        chosen, final_stats, pruned, plan, final_path = release
        met = final_stats.median <= budget_ms
        with timed(t, "fidelity"):
            fid = prep.fidelity(pruned)
        gates = quality_gates(fid, config)
        base_size = model_size(prep.loaded.module, example)
        final_size = model_size(pruned, example)
        report = {
            "edgeprune": versions()["edgeprune"], "model": prep.loaded.spec, "weights": prep.loaded.weights,
            "input_shape": list(prep.loaded.input_shape),
            "calibration": prep.data.recipe.name or prep.data.recipe.kind,
            "target": {"name": target.name, "profile": target.to_dict()},
            "budget": budget.text, "budget_ms": budget_ms, "met": met,
            "base": {"latency_ms": base_stats.summary(), "latency_source": base_stats.source, **base_size},
            "final": {"latency_ms": final_stats.summary(), "latency_source": final_stats.source, **final_size},
            "speedup": base_stats.median / final_stats.median,
            "widths": {g.name: {"before": g.channels, "after": chosen.widths[g.name]} for g in prep.graph.groups},
            "fidelity": fid.to_dict(), "quality_gates": gates,
            "lut": config.lut,
            "device_measurements": device_runs[0],
            "search": {"criterion": pc.criterion, "compensation": pc.compensation, "repair": plan.repair,
                       "proxy": "fidelity" if proxy == "fidelity" else "cap-loss-curve"
                       if prep.rankings and all(r.loss is not None for r in prep.rankings.values()) else "uniform",
                       "channel_multiple": pc.channel_multiple,
                       "tolerance": config.tolerance, "converged": result.converged,
                       "far_under_budget": met and final_stats.median < FAR_UNDER * budget_ms,
                       "measured_candidates": sum(1 for c in result.trace if c.source.startswith("measured")),
                       "trace": [c.to_dict() for c in result.trace]},
            "excluded_groups": prep.graph.excluded, "exporter": pc.exporter,
            "timings_s": t, "versions": versions(target.runtime),
        }
        code, message = int(ExitCode.OK), None
        if not met and result.best is not None:
            # the search did find models under budget, but none stayed under it when measured again: timing noise
            over = final_stats.median / budget_ms - 1
            code, message = int(ExitCode.BUDGET_UNREACHABLE), (
                f"budget {budget_ms:.3f} ms ({budget.text}) not met on verification: the search measured "
                f"{chosen.latency_ms:.3f} ms for the chosen model, {len(final_stats.repeat_medians)} fresh repeats measured "
                f"{final_stats.median:.3f} ms ({over:+.1%}); timing noise on {target.name} exceeds the margin: re-run on "
                f"a quieter machine, or raise --tolerance so that the search aims further under the budget")
        elif not met:
            w = chosen.widths
            small = ", ".join(f"{g}={w[g]}" for g in list(w)[:6])
            code, message = int(ExitCode.BUDGET_UNREACHABLE), (
                f"budget {budget_ms:.3f} ms ({budget.text}) is unreachable on {target.name}: the lowest latency reached is "
                f"{final_stats.median:.3f} ms (unpruned {base_stats.median:.3f} ms) at minimum widths ({small}, ...); "
                f"raise the budget, lower --channel-multiple, or allow narrower groups")
        elif not all(g["passed"] for g in gates.values()):
            failed = [f"{k} {v['value']:.4g} (limit {v['limit']:.4g})" if k != "finite_outputs" else
                      f"the pruned model's outputs are not finite on {v['value']} held-out samples"
                      for k, v in gates.items() if not v["passed"]]
            code, message = int(ExitCode.QUALITY_GATE), f"quality gate failed: {'; '.join(failed)}; budget met at " \
                f"{final_stats.median:.3f} ms; relax the budget or the gate"
        report["exit_code"] = code
        failed = code != int(ExitCode.OK)
        report["out"] = str(outdir.failed_out if failed else outdir.out)
        tmp = outdir.tmp
        shutil.copyfile(final_path, tmp / "model.onnx")
        save_pruned(tmp / "pruned.pt", pruned, plan, prep.loaded, pc.ignore)
        plan.save(tmp / "plan.json")
        from edgeprune.report import write_report

        write_report(tmp, report)
    dest = outdir.commit(failed=failed)
    if failed:
        message += f"; this build's artifacts are in {dest}/ ({outdir.out} left as it was)"
    return BuildOutcome(report=report, exit_code=code, message=message, out=str(dest))


@dataclass(frozen=True)
class Verified:
    """A candidate rebuilt as it would ship (direct solve), exported and measured over the verification's sessions."""

    candidate: Any
    stats: Any  # LatencyStats
    pruned: nn.Module
    plan: Plan
    path: Path

    def __iter__(self) -> Iterator[Any]:
        return iter((self.candidate, self.stats, self.pruned, self.plan, self.path))


FAR_UNDER = 0.9  # a release below this fraction of the budget wastes accuracy: the search resumes instead


def verify_release(result: Any, budget_ms: float, verify_one: Callable[[Any], Verified],
                   resume: Callable[[Any, dict[str, Any]], Any], max_resumes: int = 2) -> tuple[Verified, Any]:
    """The model to release: the search's best if its verification is within budget, else the nearest feasible
    candidate that verifies. When the next fallback would be far under budget (< FAR_UNDER) and the search has steps
    left, the search resumes with the verified figures in place of its own (`resume` returns None when it cannot),
    instead of releasing a model much more pruned than the budget needs. Returns the release and the (possibly
    extended) search result."""
    tried: dict[str, Verified] = {}

    def order(res: Any) -> list[Any]:
        first = [res.best] if res.best is not None else []
        rest = sorted((c for c in res.trace if c.latency_ms <= budget_ms and c not in first), key=lambda c: -c.latency_ms)
        return [c for c in first + rest if c.widths_digest not in tried] or ([] if tried else [res.fastest])

    for _ in range(max_resumes + 1):
        todo = order(result)
        for i, cand in enumerate(todo):
            v = tried[cand.widths_digest] = verify_one(cand)
            if v.stats.median <= budget_ms:
                return v, result
            nxt = todo[i + 1] if i + 1 < len(todo) else None
            if nxt is None or nxt.latency_ms < FAR_UNDER * budget_ms:
                break
        more = resume(result, {d: v.stats for d, v in tried.items()})
        if more is None:
            break
        result = more
    for cand in order(result)[:max(0, 3 - len(tried))]:  # no steps left: the nearest feasible ones, as before
        v = tried[cand.widths_digest] = verify_one(cand)
        if v.stats.median <= budget_ms:
            return v, result
    return min(tried.values(), key=lambda v: v.stats.median), result


PROXY_VALUES = 4_000_000  # input values per evaluation of the fidelity proxy: 256 digits, 26 images at 224x224


def fidelity_error(prep: Prepared, timings: dict[str, float]) -> Callable[[dict[str, int]], float]:
    """The `fidelity` proxy: output error of the masked, compensated network on calibration samples, memoised by
    widths (the inner level and the search's choice among feasible candidates ask for the same widths)."""
    from edgeprune.fidelity import MaskedProxy
    from edgeprune.search import widths_digest

    n = max(8, min(256, PROXY_VALUES // int(np.prod(prep.data.sample_shape))))
    x = torch.from_numpy(prep.data.calib_x[:n].copy())
    proxy = MaskedProxy(prep.loaded.module, prep.graph, prep.stats, x, repair=prep.config.compensation,
                        orders=prep.orders(), solvers=prep.solvers)
    memo: dict[str, float] = {}

    def error(widths: dict[str, int]) -> float:
        key = widths_digest(widths)
        if key not in memo:
            with timed(timings, "proxy"):
                memo[key] = proxy.error(prep.plan(widths))
        return memo[key]

    return error


def quality_gates(fid: Fidelity, config: BuildConfig) -> dict[str, dict[str, Any]]:
    """The gates the user set, and always `finite_outputs`: a pruned model whose outputs hold NaN or infinity on a
    held-out sample (where the unpruned model's are finite) never passes."""
    gates: dict[str, dict[str, Any]] = {"finite_outputs": {"value": fid.nonfinite, "limit": 0,
                                                           "passed": fid.nonfinite == 0}}
    if config.min_agreement is not None:
        gates["top1_agreement"] = {"value": fid.top1_agreement, "limit": config.min_agreement,
                                   "passed": fid.top1_agreement >= config.min_agreement}
    if config.max_accuracy_drop is not None and fid.accuracy_drop_pp is not None:
        gates["accuracy_drop_pp"] = {"value": fid.accuracy_drop_pp, "limit": config.max_accuracy_drop,
                                     "passed": fid.accuracy_drop_pp <= config.max_accuracy_drop}
    return gates


# ---------------------------------------------------------------- latency tables


def lut_job(spec: str | None, device: str, out: str | Path, weights: str | None = None,
            input_shape: tuple[int, ...] | None = None, resume: bool = True, stages: Stages = no_progress,
            ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """`edgeprune lut`: measure a model's layer table on a target (merging into `out`) and summarise it."""
    with compute_threads(), retained_memory():
        return _lut_job(spec, device, out, weights, input_shape, resume, stages, ignore)


def _lut_job(spec: str | None, device: str, out: str | Path, weights: str | None, input_shape: tuple[int, ...] | None,
             resume: bool, stages: Stages, ignore: tuple[str, ...]) -> dict[str, Any]:
    import tempfile

    from edgeprune.lut import LayerModel
    from edgeprune.lutbuild import best_channel_multiple, build_lut, check_lut_out
    from edgeprune.runtimes import measure, runtime_for
    from edgeprune.targets import load_target

    check_patterns(ignore)
    check_lut_out(Path(out), resume)
    target = load_target(device)
    runtime_for(target)
    t0 = time.perf_counter()
    loaded = load_model(spec, weights, input_shape)
    graph = trace(loaded.module, loaded.example_input, ignore)
    model = LayerModel.from_model(loaded.module, loaded.example_input, graph, loaded.spec)
    with tempfile.TemporaryDirectory(prefix="edgeprune-lut-") as tmp:
        def measure_widths(widths: dict[str, int]) -> float:
            groups = {g.name: g for g in graph.groups}
            plan = Plan(kept={g: keep_first(groups[g], range(groups[g].channels), w) for g, w in widths.items()},
                        channels=model.full(),
                        compensation=False)
            pruned = prune(loaded.module, loaded.example_input, plan, None, ignore)
            path = Path(tmp) / "calibrate.onnx"
            export_candidate(pruned, loaded.example_input, path, "torchscript")
            # a calibration plan's figure scales every prediction: time it over as many sessions as a verification
            return measure(path, target, cache=None, repeats=target.measure.final_repeats).median

        table = build_lut(model, target, out, measure_widths, resume=resume,
                          progress=stages(f"measuring layers of {loaded.spec} on {target.name}", None))
    cal = table.models[loaded.spec]
    return {"table": str(out), "model": loaded.spec, "target": target.name, "signatures": len(table.entries),
            "layers": len(model.layers), "calibration": cal, "best_channel_multiple": best_channel_multiple(table),
            "models": list(table.models), "build_s": time.perf_counter() - t0}
