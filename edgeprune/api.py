"""The Python API: the CLI's jobs on live models, data loaders and your own metric.

    import edgeprune
    result = edgeprune.build(model, calibration=loader, device="cpu", latency="0.5x", evaluate=top1)
    result.met, result.final.median, result.metric, result.module
    stats = edgeprune.profile("model.onnx", "rpi5")
    again = edgeprune.release(finetuned, original=model, plan=result.plan, calibration=loader, latency="0.5x")
    tuned = edgeprune.finetune(result.out, calibration=loader, stage="distill", minutes=1, out="tuned/")

`model` is an `nn.Module` (deep-copied: yours is never changed) or a spec string as on the command line;
`calibration` a recipe name or file, a `DataLoader`, any iterable of batches or (input, label) pairs, a tensor or an
array (see `inputs/batches.py`). Other options are the CLI's flags in Python spelling (`criterion="l1"`,
`max_accuracy_drop=1.0`, `heldout=0.25` for data in memory); an unknown one is an error naming the known ones.
Errors are `edgeprune.errors.EdgePruneError` with the CLI's one-line message; a build, release or prune that misses
its budget or a gate returns (`result.exit_code` 3 or 4), it does not raise.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from edgeprune.config import BUILD_DEFAULTS, OPTION_KINDS, PRUNE_OPTIONS, BuildConfig, PruneConfig, canonical
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.targets import Target
from edgeprune.jobs.session import Inputs
from edgeprune.results import BuildResult, PruneResult
from edgeprune.runtimes.stats import LatencyStats

if TYPE_CHECKING:
    from edgeprune.jobs.delivery import BuildOutcome
    from edgeprune.plan import Plan
    from edgeprune.search.strength import Candidate

# The options each call takes (`BuildConfig.from_dict`'s keys; model and calibration are arguments of their own)
_PRUNE_OPTIONS = set(PRUNE_OPTIONS) - {"model", "calibration"}
_BUILD_OPTIONS = set(OPTION_KINDS) - {"model", "calibration"}
# release and finetune prune nothing: the build's options without the pruning ones (`weights`: fine-tuned weights)
_RELEASE_OPTIONS = (_BUILD_OPTIONS - _PRUNE_OPTIONS) | {"seed", "exporter", "input_shape", "weights"}
_FINETUNE_OPTIONS = (_BUILD_OPTIONS - _PRUNE_OPTIONS) | {"seed", "exporter"} | {
    "stage", "steps", "minutes", "epochs", "orthoreg", "lr", "batch", "temperature", "centripetal", "validation"}
_DATA_OPTIONS = {"heldout", "batch_size", "count"}  # how calibration data in memory is split (recipe keys)


@contextmanager
def _own_random_state() -> Iterator[None]:
    """The caller's random state (torch's CPU and initialised CUDA generators, numpy's and Python's global ones) as it
    was before the job: a job seeds them for reproducible results, and a training loop after `build` must go on from
    where it was, not from seed 0."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _keeps_random_state(job: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(job)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _own_random_state():
            return job(*args, **kwargs)

    return wrapped


def load_target(spec: str | Path) -> Target:
    """A device profile: a bundled name (`cpu`, `rpi5`, `jetson-orin-nano`, ...) or a TOML file."""
    from edgeprune.inputs.targets import load_target as load

    return load(spec)


def _options(options: dict[str, Any], known: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The call's options (old spellings renamed; an unknown one an error naming the known ones) and, apart, those
    that split calibration data given in memory."""
    options = canonical(options, known | _DATA_OPTIONS)
    return {k: v for k, v in options.items() if k not in _DATA_OPTIONS}, \
        {k: v for k, v in options.items() if k in _DATA_OPTIONS}


def _inputs(model: nn.Module | str | None, example_input: Any, input_shape: tuple[int, ...] | None,
            calibration: Any, data_options: dict[str, Any], seed: int) -> tuple[dict[str, Any], Inputs]:
    """PruneConfig fields and the Inputs for a model and calibration given either way."""
    from edgeprune.inputs.batches import as_arrays
    from edgeprune.inputs.models import from_module
    from edgeprune.inputs.recipe import Recipe

    fields: dict[str, Any] = {"input_shape": tuple(input_shape) if input_shape else None}
    arrays = None
    if calibration is None or isinstance(calibration, (str, Path)):
        if data_options:
            raise EdgePruneError(f"{', '.join(data_options)} split calibration data given in memory; a recipe file "
                                 "sets them itself")
        fields["calibration"] = str(calibration) if calibration is not None else None
    else:
        ndim = None if example_input is None and input_shape is None else \
            len(example_input.shape if example_input is not None else input_shape) - 1
        arrays = as_arrays(calibration, ndim)
        fields["calibration"] = "python"
    recipe = Recipe(kind="arrays", name="python", seed=seed, **data_options) if arrays is not None else None
    if isinstance(model, nn.Module):
        shape = input_shape if input_shape or example_input is not None or arrays is None \
            else (1, *arrays[0].shape[1:])
        loaded = from_module(model, example_input, shape, seed=seed)
        fields["model"] = loaded.spec
        return fields, Inputs(loaded=loaded, recipe=recipe, arrays=arrays)
    if example_input is not None:
        raise EdgePruneError("example_input goes with an nn.Module; for a spec string give input_shape=")
    fields["model"] = model
    return fields, Inputs(recipe=recipe, arrays=arrays)


def _out(out: str | Path | None, kind: str) -> Path:
    return Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"edgeprune-{kind}-")) / "release"


@_keeps_random_state
def build(model: nn.Module | str, *, example_input: Any = None, calibration: Any = None, device: str = "cpu",
          latency: str = "0.5x", evaluate: Callable[[nn.Module], float] | None = None, out: str | Path | None = None,
          force: bool = False, on_step: Callable[[Candidate], None] | None = None, **options: Any) -> BuildResult:
    """Prune `model` until its latency measured on `device` meets `latency` ("10ms", "800us", "0.5x").

    `evaluate(module) -> float` (higher is better) is your metric, run on the unpruned and the pruned torch module
    (eval mode, CPU; on an int8 target the pruned model is the quantised ONNX file run in ONNX Runtime, a
    `quantize.OnnxModule`); it is in the report and gated by `max_metric_drop=`. Artifacts go to `out` (default: a new
    temporary folder, `result.out`). `options`: `BuildConfig.from_dict`'s keys (`input_shape=`, `criterion=`,
    `max_steps=`, ...). `on_step(candidate)` is called for every measured candidate. Returns a `BuildResult`;
    `result.exit_code` 3 or 4 when the budget or a gate was missed."""
    from edgeprune.jobs.build_job import build as run

    opts, data = _options({"device": device, "latency": latency, "evaluate": evaluate, **options}, _BUILD_OPTIONS)
    fields, inputs = _inputs(model, example_input, opts.get("input_shape"), calibration, data, opts.get("seed", 0))
    config = BuildConfig.from_dict({**opts, **fields})
    return run_build(config, _out(out, "build"), force=force, on_step=on_step, inputs=inputs, run=run)


def run_build(config: BuildConfig, out: str | Path, run: Callable[..., BuildOutcome], **kw: Any) -> BuildResult:
    """A `BuildConfig` through the pipeline, as a typed result (the CLI comes in here too)."""
    return BuildResult.of(run(config, out, **kw))


@_keeps_random_state
def prune(model: nn.Module | str, *, ratio: float | None = None, plan: str | Path | None = None,
          example_input: Any = None, input_shape: tuple[int, ...] | None = None, calibration: Any = None,
          out: str | Path | None = None, force: bool = False, **options: Any) -> PruneResult:
    """Remove the fraction `ratio` of every channel group (or exactly what `plan` says), with compensation; no
    latency target. Returns a `PruneResult` (module, plan, fidelity, the exported model.onnx; `exit_code` 4 when the
    pruned model's outputs are not finite, its artifacts then in `result.out`, OUT.failed: it does not raise)."""
    from edgeprune.jobs.prune_job import prune_job

    opts, data = _options({"input_shape": input_shape, **options}, _PRUNE_OPTIONS)
    fields, inputs = _inputs(model, example_input, opts.get("input_shape"), calibration, data, opts.get("seed", 0))
    dest = _out(out, "prune")
    outcome = prune_job(PruneConfig.from_dict({**opts, **fields}), dest, ratio=ratio,
                        plan_path=str(plan) if plan is not None else None, force=force, inputs=inputs)
    out_dir = Path(outcome.out) if outcome.exit_code else dest
    return PruneResult(module=outcome.module, plan=outcome.plan, fidelity=outcome.fidelity,
                       onnx_path=out_dir / "model.onnx", report=outcome.report, out=out_dir,
                       exit_code=outcome.exit_code, message=outcome.message)


@_keeps_random_state
def profile(model: nn.Module | str | Path, device: str = "cpu", *, example_input: Any = None,
            input_shape: tuple[int, ...] | None = None, repeats: int | None = None,
            cache: bool = True) -> LatencyStats:
    """Latency of an ONNX file, or of a module exported as edgeprune exports candidates, on `device`."""
    from edgeprune.runtimes import MeasurementCache, measure

    target = load_target(device)
    store = MeasurementCache.under(None) if cache else None
    if isinstance(model, nn.Module):
        from edgeprune.inputs.models import from_module
        from edgeprune.jobs.oracle import export_candidate

        loaded = from_module(model, example_input, input_shape)
        with tempfile.TemporaryDirectory(prefix="edgeprune-profile-") as tmp:
            path = export_candidate(loaded.module, loaded.example_input, Path(tmp) / "model.onnx",
                                     BUILD_DEFAULTS["exporter"])
            return measure(path, target, cache=store, repeats=repeats)
    return measure(model, target, cache=store, repeats=repeats)


@_keeps_random_state
def lut(model: str, device: str, out: str | Path, *, weights: str | None = None,
        input_shape: tuple[int, ...] | None = None, resume: bool = True, check: int = 10,
        seed: int = 0) -> dict[str, Any]:
    """Measure a model's per-layer latency table on `device` (merged into `out`), for `build(..., lut=out)`, then
    its self-check: `check` random plans (seeded by `seed`; 0: none) measured whole against the table's predictions,
    stored in the table and returned under "check" (`plans`, `within_5`, `within_10`, `worst_error`, ...) with
    "check_warning" (None when at least 90% are within ±10%)."""
    from edgeprune.jobs.lut_job import TableModel, lut_job

    if not isinstance(model, str):
        raise EdgePruneError("lut() takes a model spec string: the table is keyed by it, and a build reads it back "
                             "by the same spec")
    return lut_job(TableModel(model, weights, input_shape), device, out, resume, check=check, seed=seed)


@_keeps_random_state
def release(model: nn.Module | str | Path, *, original: nn.Module | str | None = None,
            plan: Plan | str | Path | None = None, example_input: Any = None, calibration: Any = None,
            out: str | Path | None = None, force: bool = False, on_step: Callable[[Candidate], None] | None = None,
            **options: Any) -> BuildResult:
    """The way back in: a pruned model you changed (fine-tuned) exported, simplified, parity-checked, measured on
    `device` against `latency` (options, default "cpu" and "0.5x"), its fidelity to `original` taken, the gates run
    (`evaluate=`, `min_agreement=`, ...), and the same artifacts and report written, without pruning. `model` is a
    pruned module (with `original=` the unpruned one or its spec, and `plan=` the Plan or plan.json it was pruned by)
    or a `pruned.pt` (which names both; `weights=` its fine-tuned state dict). `on_step(candidate)` is called once,
    for the measured model."""
    from edgeprune.jobs.release_job import release_job, release_inputs

    opts, data = _options(options, _RELEASE_OPTIONS)
    weights, seed = opts.pop("weights", None), opts.get("seed", 0)
    module_given = isinstance(model, nn.Module)
    fields, inputs = _inputs(original if module_given else None, example_input if module_given else None,
                             opts.get("input_shape"), calibration, data, seed)
    config = BuildConfig.from_dict({**opts, **fields})
    pruned = release_inputs(model, original, plan, example_input, inputs, weights, seed)
    return run_build(config, _out(out, "release"), force=force, inputs=inputs, run=release_job, pruned=pruned,
                     on_step=on_step)


@_keeps_random_state
def matrix(manifest: str | Path, devices: str | Path | None, out: str | Path, *, ray: str | None = None,
           cache_dir: str | None = None) -> dict[str, Any]:
    """A release matrix (`edgeprune matrix`): every entry of `manifest` (models x targets x budgets) built into
    `out/MODEL/TARGET/BUDGET/`, measured on the boards of `devices` (None: ./devices.toml if there is one; a target
    no board runs that this machine can, such as cpu, is measured here); `ray`: None (embedded), "auto" or a cluster's
    address. Returns the index (also out/index.json); its `exit_code` is 0 only when every entry met its budget and
    gates."""
    from edgeprune.fleet.matrix_job import load_manifest, run_matrix
    from edgeprune.fleet.pool import default_pool

    return run_matrix(load_manifest(manifest), default_pool(devices), out, ray=ray, cache_dir=cache_dir)


@_keeps_random_state
def finetune(source: str | Path, *, original: nn.Module | None = None, calibration: Any = None,
             out: str | Path | None = None, force: bool = False, on_step: Callable[[Candidate], None] | None = None,
             **options: Any) -> BuildResult:
    """A recovery stage on the output folder of a build or prune (`stage` "distill", the default: distillation from
    the unpruned model; "csgd": C-SGD on the unpruned model, merged to the same widths; `orthoreg` > 0 adds
    OrthoReg), trained for `steps`, `minutes` or 3 epochs (`lr`) on `calibration` (a recipe, a DataLoader, batches: as
    for `build`; default the recipe the source was made with), then released as `release` does into `out` (never
    `source`), against the source build's `device` and `latency` unless given. Distillation holds back `validation`
    (default 0.2) of the calibration samples and keeps the epoch with their lowest loss (the untrained model when none
    beat it; `report["finetune"]["validation"]`). Other options: `epochs`, `batch`, `temperature`, `centripetal`
    (`recovery.train.FinetuneConfig`), and release's (`evaluate`, gates, `exporter`, ...). Returns a `BuildResult`
    (`report["finetune"]`: the training); raises `EdgePruneError` (exit 4) when the training diverges. A source built
    from a live module holds that module in its pruned.pt; `original=` gives it instead (where its class cannot be
    imported, or pickle could not save it)."""
    from edgeprune.jobs.finetune_job import finetune_job, read_source
    from edgeprune.recovery.train import FinetuneConfig

    opts, data = _options(options, _FINETUNE_OPTIONS)
    seed = opts.get("seed", 0)
    recovery = FinetuneConfig(seed=seed, **{k: opts.pop(k) for k in _FINETUNE_OPTIONS - _BUILD_OPTIONS if k in opts})
    src = read_source(source, original=original)
    fields, inputs = _inputs(None, None, src.original.input_shape, calibration, data, seed)
    device, latency = src.release_settings(opts.pop("device", None), opts.pop("latency", None))
    config = BuildConfig.from_dict({**opts, "calibration": fields["calibration"], "device": device,
                                    "latency": latency})
    return run_build(config, _out(out, "finetune"), force=force, inputs=inputs, run=finetune_job, source=src,
                     recovery=recovery, on_step=on_step)
