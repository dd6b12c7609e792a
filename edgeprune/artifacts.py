"""What a job leaves behind besides the ONNX model: pruned.pt (the pruned weights and how to rebuild them) and model
size figures for the report.

    save_pruned(out / "pruned.pt", pruned, plan, loaded, ignore)
    module, plan = load_pruned(out / "pruned.pt")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import EdgePruneError
from edgeprune.models import LoadedModel, load_model, read_checkpoint
from edgeprune.plan import Plan
from edgeprune.surgery import structural_copy

PRUNED_FORMAT = "edgeprune.pruned/1"


def save_pruned(path: Path, pruned: nn.Module, plan: Plan, loaded: LoadedModel, ignore: tuple[str, ...]) -> None:
    """pruned.pt: the pruned state dict and what is needed to rebuild its architecture (loadable weights_only)."""
    biased = [n for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    torch.save({"format": PRUNED_FORMAT, "model": loaded.spec, "weights": loaded.weights,
                "input_shape": list(loaded.input_shape), "ignore": list(ignore), "plan": plan.to_dict(),
                "biased": biased, "state_dict": pruned.state_dict()}, path)


def load_pruned(path: str | Path) -> tuple[nn.Module, Plan]:
    """Rebuild a pruned model from pruned.pt: the original model, the plan's architecture, the saved weights."""
    skeleton, plan, _ = load_pruned_with_original(path)
    return skeleton, plan


def load_pruned_with_original(path: str | Path,
                              input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, Plan, LoadedModel]:
    """load_pruned, and the unpruned model it was pruned from (its spec and weights as pruned.pt records them)."""
    if not Path(path).is_file():
        raise EdgePruneError(f"pruned model {path} does not exist")
    d = read_checkpoint(Path(path), "pruned model")
    if not isinstance(d, dict) or d.get("format") != PRUNED_FORMAT:
        raise EdgePruneError(f"{path} is not an edgeprune pruned.pt (format {PRUNED_FORMAT})")
    plan = Plan.from_dict(d["plan"])
    if input_shape is not None and tuple(input_shape) != tuple(d["input_shape"]):
        raise EdgePruneError(f"{path} was pruned for input shape {list(d['input_shape'])}, found --input-shape "
                             f"{list(input_shape)}; pruning depends on the input size: prune again for this shape")
    loaded = load_model(d["model"], d["weights"], tuple(d["input_shape"]))
    skeleton = structural_copy(loaded.module, loaded.example_input, plan, d["biased"], tuple(d["ignore"]))
    skeleton.load_state_dict(d["state_dict"])
    return skeleton.eval(), plan, loaded


def model_size(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs and parameters (torch-pruning's counter): for the report, never as a latency proxy."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return {"macs": int(macs), "params": int(params)}
