"""The input resolution as a structural dimension: the model resizes its image input before its first layer.

    model = with_input_size(copy.deepcopy(model), (192, 192))   # the model as released: input still 224 x 224

A pretrained CNN whose outputs do not depend on the input's size (global pooling before the classifier) can run at a
lower resolution with no weight changed: its cost falls with the square of the side, and on ImageNet-pretrained
mobile networks its predictions move far less than channel pruning's at the same latency (EfficientNet-Lite0 at
0.73x of its latency: 66% top-1 agreement on held-out photos by resolution, 42% by channels, issue 28). The resize is
a forward pre-hook, not a wrapper module, so the state dict keeps its names (pruned.pt loads as before), and it
exports as one ONNX Resize (bilinear, half-pixel: what `F.interpolate(..., align_corners=False)` exports), so the
released model's input shape is the one the user's pipeline feeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = "input_size"  # the plan's meta key: [height, width] the model resizes its input to


class Resize:
    """The pre-hook: the first positional input (N x C x H x W) resized to `size`, bilinear. A class, not a closure,
    so that a model holding it deep-copies (recovery's student) and pickles."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        return (F.interpolate(x, size=self.size, mode="bilinear", align_corners=False), *rest)


def with_input_size(model: nn.Module, size: tuple[int, int] | list[int]) -> nn.Module:
    """`model` (modified and returned) resizing its input to `size` first; a model already resized keeps one hook."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, Resize):
            hook.size = (int(size[0]), int(size[1]))
            return model
    model.register_forward_pre_hook(Resize((int(size[0]), int(size[1]))))
    return model


def input_size(model: nn.Module) -> tuple[int, int] | None:
    """The size `model` resizes its input to, or None."""
    return next((h.size for h in model._forward_pre_hooks.values() if isinstance(h, Resize)), None)


def size_free_outputs(model: nn.Module, example: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether `model` gives outputs of the same shapes at input `size` as at `example`'s (a classifier's logits, not a
    detector's grid or a segmenter's mask): only such a model can be resized inside without changing what it returns."""
    from edgeprune.inputs.outputs import flatten_outputs

    def shapes(x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
        with torch.no_grad():
            return [(k, tuple(v.shape)) for k, v in flatten_outputs(model.eval()(x))]

    small = F.interpolate(example, size=size, mode="bilinear", align_corners=False)
    try:
        return shapes(small) == shapes(example)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError):  # a model fixed to its input's size
        return False
