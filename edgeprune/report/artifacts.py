"""What a job leaves behind besides the ONNX model: pruned.pt (the pruned weights and how to rebuild them) and model
size figures for the report.

    save_pruned(out / "pruned.pt", pruned, plan, loaded, ignore)
    module, plan = load_pruned(out / "pruned.pt")

A model given to the Python API as a live `nn.Module` (spec `python:...`) has no spec to rebuild it by, so its
pruned.pt also holds the unpruned module itself (pickled, beside the list of classes a safe load must allow); it loads
wherever those classes can be imported (a class defined in a script: in that script), or with `original=`.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.errors import EdgePruneError, first_line
from edgeprune.inputs.models import LoadedModel, load_model, read_checkpoint
from edgeprune.plan import Plan
from edgeprune.surgery.apply import structural_copy

PRUNED_FORMAT = "edgeprune.pruned/1"
# Modules of classes that a pruned.pt written before the package's subpackages names by their old paths
MOVED = {"edgeprune.example": "edgeprune.inputs.example", "edgeprune.detection": "edgeprune.inputs.detection",
         "edgeprune.quantize": "edgeprune.export.quantize"}
LIVE = "python:"  # the spec prefix of a live module (models.from_module)
log = logging.getLogger(__name__)


def save_pruned(path: Path, pruned: nn.Module, plan: Plan, loaded: LoadedModel, ignore: tuple[str, ...]) -> None:
    """pruned.pt: the pruned state dict and what is needed to rebuild its architecture (loadable weights_only)."""
    biased = [n for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    live = _live_original(loaded) if loaded.spec.startswith(LIVE) else {}
    state = pruned.state_dict()
    try:
        torch.save({"format": PRUNED_FORMAT, "model": loaded.spec, "weights": loaded.weights,
                    "input_shape": list(loaded.input_shape), "ignore": list(ignore), "plan": plan.to_dict(),
                    "biased": biased, "state_dict": state, **live}, path)
    except RuntimeError as e:  # torch's zip writer says "unexpected pos" where the disk is full
        need = sum(t.numel() * t.element_size() for t in state.values()) + len(live.get("original", b"")) + (1 << 20)
        if shutil.disk_usage(Path(path).parent).free < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, values): which unpruned model a pruned.pt belongs to."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{list(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _live_original(loaded: LoadedModel) -> dict[str, Any]:
    """The unpruned module pickled, the globals its safe load must allow, its example input and weights digest."""
    buf = io.BytesIO()
    try:
        torch.save(loaded.module, buf)
    except Exception as e:  # noqa: BLE001 - a lambda, a local class: pickle refuses in many ways
        log.warning("the unpruned %s cannot be saved in pruned.pt (%s: %s): finetune and release of this folder "
                    "will need original= (the unpruned module)", loaded.spec, type(e).__name__, first_line(e))
        return {}
    buf.seek(0)
    return {"original": buf.getvalue(), "original_globals": torch.serialization.get_unsafe_globals_in_checkpoint(buf),
            "example_input": loaded.example_input, "original_digest": weights_digest(loaded.module)}


def _importable(name: str, path: Path, spec: str) -> Any:
    """`module.Qual.Name` imported (the longest importable module prefix, then attributes), or an error that says
    where the class must be importable."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    raise EdgePruneError(f"{path} holds the unpruned {spec} as a live module whose class {name} cannot be imported "
                         f"here; run this where that class is importable (a class defined in a script: in that "
                         f"script, through the Python API), or pass original= the unpruned module")


def _allowed(name: str, path: Path, spec: str) -> Any:
    """A global the safe load must allow: the object `name` imports, or, where `name` is an old path (`MOVED`), the
    object at its new path under the old name the pickle holds."""
    old = next((m for m in MOVED if name.startswith(m + ".")), None)
    if old is None:
        return _importable(name, path, spec)
    return _importable(MOVED[old] + name[len(old):], path, spec), name


def _live_loaded(d: dict[str, Any], path: Path, original: nn.Module | None) -> LoadedModel:
    from edgeprune.inputs.models import from_module

    spec = d["model"]
    if original is not None:
        given = from_module(original, d.get("example_input"), tuple(d["input_shape"]))
        if "original_digest" in d and weights_digest(given.module) != d["original_digest"]:
            raise EdgePruneError(f"original= is not the module {path} was pruned from (its weights differ from the "
                                 f"unpruned {spec} recorded there); pass the module you built it from, unchanged")
        return LoadedModel(module=given.module, example_input=given.example_input, spec=spec, weights=None)
    if "original" not in d:
        raise EdgePruneError(f"{path} was pruned from a live nn.Module ({spec}) that could not be saved with it; pass "
                             "original= the unpruned module (edgeprune.finetune / edgeprune.release)")
    allowed = [_allowed(n, path, spec) for n in d["original_globals"]]
    try:
        with torch.serialization.safe_globals(allowed):
            module = torch.load(io.BytesIO(d["original"]), map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgePruneError(f"cannot rebuild the unpruned {spec} held in {path} ({type(e).__name__}: "
                             f"{first_line(e)}); pass original= the unpruned module") from e
    return LoadedModel(module=module.eval(), example_input=d["example_input"], spec=spec, weights=None)


def load_pruned(path: str | Path) -> tuple[nn.Module, Plan]:
    """Rebuild a pruned model from pruned.pt: the original model, the plan's architecture, the saved weights."""
    skeleton, plan, _ = load_pruned_with_original(path)
    return skeleton, plan


def load_pruned_with_original(path: str | Path, input_shape: tuple[int, ...] | None = None,
                              original: nn.Module | None = None) -> tuple[nn.Module, Plan, LoadedModel]:
    """load_pruned, and the unpruned model it was pruned from (its spec and weights as pruned.pt records them; a
    live module's: the one pruned.pt holds, or `original` when given, which must have its weights)."""
    if not Path(path).is_file():
        raise EdgePruneError(f"pruned model {path} does not exist")
    d = read_checkpoint(Path(path), "pruned model")
    if not isinstance(d, dict) or d.get("format") != PRUNED_FORMAT:
        raise EdgePruneError(f"{path} is not an edgeprune pruned.pt (format {PRUNED_FORMAT})")
    plan = Plan.from_dict(d["plan"])
    if input_shape is not None and tuple(input_shape) != tuple(d["input_shape"]):
        raise EdgePruneError(f"{path} was pruned for input shape {list(d['input_shape'])}, found --input-shape "
                             f"{list(input_shape)}; pruning depends on the input size: prune again for this shape")
    loaded = _live_loaded(d, Path(path), original) if str(d["model"]).startswith(LIVE) else \
        load_model(d["model"], d["weights"], tuple(d["input_shape"]))
    skeleton = structural_copy(loaded.module, loaded.example_input, plan, d["biased"], tuple(d["ignore"]))
    skeleton.load_state_dict(d["state_dict"])
    return skeleton.eval(), plan, loaded


def model_size(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs and parameters (torch-pruning's counter): for the report, never as a latency proxy."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return {"macs": int(macs), "params": int(params)}
