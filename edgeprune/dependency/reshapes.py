"""Reshapes that torch-pruning cannot map channel by channel: guarded (`guard_mapping`) and cut out of its dependency
graph (`cut_unmapped`).

torch-pruning carries a group's channels through a view/reshape with a flatten mapping (channel c becomes features
c*s .. c*s+s-1, or the reverse) whenever the channel counts it infers on the two sides differ. The mapping is meant
for the flatten before a classifier, and torch-pruning checks for that (an N x C x H x W input with s = H*W) through
`grad_fn._saved_self_sizes`. Torch 2 saves `_saved_self_sym_sizes` instead, so the check never runs and every such
reshape gets a flatten mapping, attention's included: yolo11's C2PSA views its qkv conv's 1 x 256 x h x w output as
1 x 2 x 128 x hw (two heads) and torch-pruning maps it with s = 2. That mapping is wrong, and the attention's cycles
(q, k and v split from one tensor meet again in two matmuls) double the list of indices walked on every lap, so the
grouping of yolo11n never ends.

`cut_unmapped(dg)` removes the dependencies of every reshape whose flatten mapping is not a real flatten: a walk that
reaches one stops there, and `unmapped_reason` names it so that `graph.trace` excludes that group, with the reason. A
group that never reaches one is walked exactly as before.

    from edgeprune.dependency.reshapes import cut_unmapped, guard_mapping
    guard_mapping()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    cut_unmapped(dg)
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def guard_mapping() -> None:
    """torch-pruning maps channels through a reshape by the channel counts either side, and divides by zero when one
    side has none it can infer: a channel shuffle's 5-D view (shufflenet_v2: view(n, 2, c/2, h, w), transpose, view
    back) stops the whole trace, or maps it as a flatten whose indices multiply into millions (28 s to group
    shufflenet_v2_x0_5). Guarded here, a reshape feeding a transpose, or one that fails, keeps the default (identity)
    mapping, which is wrong for a shuffle; but a shuffle also transposes, and every group through a transpose is
    excluded (graph.CHANNEL_MIXING), so no group's channels are mapped through it. Installed once, idempotent; other
    reshapes map as before (and `cut_unmapped` then cuts those whose mapping is not a real flatten)."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    if getattr(original, "edgeprune_guarded", False):
        return

    def guarded(graph: Any, node: Any) -> None:
        if any(type(getattr(o, "grad_fn", None)).__name__.startswith(("TransposeBackward", "PermuteBackward"))
               for o in node.outputs):
            return  # a shuffle's view: any mapping is wrong, and torch-pruning's flatten mapping explodes the indices
        try:
            original(graph, node)
        except ZeroDivisionError:
            log.debug("torch-pruning cannot map channels through %s; groups through it stay identity-mapped", node)

    guarded.edgeprune_guarded = True  # type: ignore[attr-defined]
    index_mapping.update_reshape_index_mapping = guarded


def _sizes(node: Any) -> tuple[int, ...]:
    """The reshape's input shape, as its autograd node saved it (either name); empty when not saved."""
    fn = getattr(node, "grad_fn", None)
    sizes = getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None)
    return tuple(int(s) for s in sizes) if sizes is not None else ()


def _strides(node: Any) -> set[int]:
    """Strides of the flatten mappings torch-pruning set on the reshape's dependencies, both ways (only its flatten
    mapping has `_stride`); stride 1 is the identity."""
    deps = [*node.dependencies, *(d for n in (*node.inputs, *node.outputs) for d in n.dependencies if d.target is node)]
    return {int(m._stride) for d in deps for m in d.index_mapping if hasattr(m, "_stride")} - {1}


def is_mapped(sizes: tuple[int, ...], strides: set[int]) -> bool:
    """Whether torch-pruning's mapping of a reshape is right: none (channels stay where they are), a flatten of
    N x C x H x W into C*H*W features with stride H*W, or a Linear's N x F features unflattened into F/stride
    channels."""
    if not strides:
        return True
    if len(strides) > 1:
        return False
    (stride,) = strides
    if len(sizes) == 4:
        return stride == sizes[2] * sizes[3]
    return len(sizes) == 2 and sizes[1] % stride == 0


def cut_unmapped(dg: Any) -> int:
    """Remove the dependencies of the reshapes whose mapping `is_mapped` rejects; the number cut."""
    from torch_pruning import ops

    cut = [n for n in dg.module2node.values()
           if n.type == ops.OPTYPE.RESHAPE and not is_mapped(_sizes(n), _strides(n))]
    for node in cut:
        node.dependencies = []
    return len(cut)


def unmapped_reason(node: Any) -> str | None:
    """Why a group that reaches a reshape `cut_unmapped` cut is excluded; None for any other node. torch-pruning gives
    every reshape it traces a dependency on its input or output, so a reshape with none is one cut here."""
    from torch_pruning import ops

    if getattr(node, "type", None) != ops.OPTYPE.RESHAPE or node.dependencies:
        return None
    shape = "x".join(str(s) for s in _sizes(node)) or "?"
    return (f"{type(node.grad_fn).__name__} (a reshape of a {shape} tensor into another channel layout, such as "
            f"attention heads or DFL bins, that torch-pruning cannot map channel by channel)")
