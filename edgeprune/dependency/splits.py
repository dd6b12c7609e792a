"""Splits along channels (`torch.split`, `chunk`, `split_with_sizes` on dim 1), pruned piece by piece.

MixNet's MixConv splits a tensor into pieces that convs of different kernel sizes read; YOLO's C2f `chunk(2)`s a
conv's output and concatenates both halves with later outputs. The pieces are sized by position: after pruning,
piece k must still be the k-th run of channels of the split's input, so the forward code's split must find the
pruned pieces (`SplitCall.adapts`). `chunk(n)` does by itself, but only for n equal pieces: a group it cuts keeps as
many channels in each. A list of sizes does where the module that splits keeps that list as an attribute (timm's
`MixedConv2d.splits`), rewritten after pruning (`resize`): its pieces may keep any number of channels, one at least,
and a group may hold only some of them (timm's `conv_pwl` of two convs concatenated, split again by the next block:
each conv's group owns its piece and rewrites that entry only). A group that several splits cut differently (MixNet's
expansion, split in three for the depthwise convs and in two for the projection) is cut into their common
refinement (dependency/shares.py), and the group's width is shared over those pieces in proportion to their sizes.
A split by a fixed int size, or by sizes written in the forward code, cannot follow: its groups stay excluded, with
that reason, and so does a group that holds part of a split's piece only.

torch-pruning's own split mapping is wrong in two ways edgeprune corrects (`fix_split_mappings`): it gives the i-th
*reader* of a split the i-th piece (the readers come in the order it met them, often reversed: MixConv's 5x5 conv
got the 3x3's piece), and for `chunk` it takes one piece per reader (C2f's concat reads two pieces: the offsets run
past the input). Here each reader's piece comes from the autograd graph (which output of the split its grad_fn reads).

    with SplitRecorder(model) as calls:       # around torch-pruning's trace: how each split was called, and by whom
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    fix_split_mappings(dg, calls)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode

from edgeprune.dependency.groups import Resize
from edgeprune.dependency.shares import refine

log = logging.getLogger(__name__)

# autograd ops that split along channels: torch.split / chunk (SplitBackward), split_with_sizes; unbind and narrow
# are not pruned in shares (their groups stay excluded)
SPLITTING = ("SplitBackward", "SplitWithSizesBackward", "UnsafeSplitBackward", "UnsafeSplitWithSizesBackward",
             "ChunkBackward", "UnbindBackward", "NarrowBackward")
_CALLS = ("split", "chunk", "split_with_sizes")


@dataclass(frozen=True)
class SplitCall:
    """How forward() split a tensor along channels: `chunk` (n pieces), `sizes` (a list), `size` (an int); the module
    that called it, and its attribute holding the list of sizes (None when it holds none)."""

    kind: str
    sizes: tuple[int, ...]
    owner: str
    attribute: str | None = None

    @property
    def adapts(self) -> bool:
        """Whether the split finds the pruned pieces: chunk by itself, a list through its attribute (`resize`)."""
        return self.kind == "chunk" or (self.kind == "sizes" and self.attribute is not None)

    def why_not(self) -> str:
        what = {"size": f"a fixed size of {self.sizes[0]} channels",
                "sizes": f"sizes {list(self.sizes)} written in the forward code"}.get(self.kind, self.kind)
        return (f"a split along channels by {what} (in {self.owner or 'the model'}): the pruned pieces would not "
                f"match it (only chunk, or a list of sizes the module keeps as an attribute, follows pruning)")


class SplitRecorder(TorchFunctionMode):
    """Records every split along channels that forward passes make, keyed by the grad_fn of its pieces (the node
    torch-pruning's trace holds), with the module whose forward made it (module hooks keep the stack of modules
    running; the hooks and the mode last as long as the `with`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.calls: dict[int, tuple[Any, SplitCall]] = {}  # id(grad_fn) -> (grad_fn kept alive, the call)
        self.handles: list[Any] = []

    def __enter__(self) -> dict[int, tuple[Any, SplitCall]]:
        from torch.nn.modules import module as nn_module

        def push(m: nn.Module, args: Any) -> None:
            self.stack.append(m)

        def pop(m: nn.Module, args: Any, out: Any) -> None:
            if self.stack:
                self.stack.pop()

        self.handles = [nn_module.register_module_forward_pre_hook(push), nn_module.register_module_forward_hook(pop)]
        super().__enter__()
        return self.calls

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for h in self.handles:
            h.remove()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in _CALLS and isinstance(out, (tuple, list)) and out:
            fn = getattr(out[0], "grad_fn", None)
            call = self._call(func.__name__, args, kwargs, out)
            if fn is not None and call is not None:
                self.calls[id(fn)] = (fn, call)
        return out

    def _call(self, name: str, args: tuple, kwargs: dict, out: Any) -> SplitCall | None:
        x = args[0]
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        if not isinstance(dim, int) or x.dim() < 2 or dim % x.dim() != 1:
            return None
        arg = args[1] if len(args) > 1 else next((kwargs[k] for k in ("split_size_or_sections", "split_size",
                                                                      "split_sizes", "chunks") if k in kwargs), None)
        sizes = tuple(int(t.shape[1]) for t in out)
        kind = "chunk" if name == "chunk" else "size" if isinstance(arg, int) else "sizes"
        owner = self.stack[-1] if self.stack else None
        attribute = _attribute(owner, arg) if kind == "sizes" else None
        return SplitCall(kind, sizes, self.names.get(id(owner), "") if owner is not None else "", attribute)


def _attribute(module: nn.Module | None, value: Any) -> str | None:
    """The one attribute of `module` that is the very list (or tuple) object the split was called with: a list the
    forward code builds afresh (`(self.c, self.c)`) is not one, and stays fixed after pruning."""
    if module is None or not isinstance(value, (list, tuple)):
        return None
    found = [k for k, v in vars(module).items() if v is value]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class SplitInfo:
    """What `fix_split_mappings` found of one split node: its piece sizes, the call that made it (None when not
    recorded), and why its groups cannot be pruned in shares (None when they can)."""

    sizes: tuple[int, ...]
    call: SplitCall | None
    reason: str | None


def _piece_sizes(fn: Any) -> tuple[int, ...] | None:
    """Piece sizes of a split along dim 1 from its grad_fn; None for a split along another dimension."""
    shape = getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None)
    dim = getattr(fn, "_saved_dim", None)
    if shape is None or dim is None or len(shape) < 2 or int(dim) % len(shape) != 1:
        return None
    width = int(shape[1])
    if hasattr(fn, "_saved_split_sizes"):
        return tuple(int(s) for s in fn._saved_split_sizes)
    size = int(getattr(fn, "_saved_split_size", 0))
    if size <= 0:
        return None
    return tuple(min(size, width - o) for o in range(0, width, size))


def _pieces_read(node: Any) -> dict[int, list[int]] | None:
    """For each reader of a split node (by id), the pieces it reads, in the order its grad_fn lists them (the order
    torch-pruning added the reader to the split's outputs and the split to the reader's inputs); None when a reader's
    grad_fn does not name the split as often as torch-pruning lists it."""
    fn = node.grad_fn
    out: dict[int, list[int]] = {}
    for reader in node.outputs:
        if id(reader) not in out:
            nexts = getattr(getattr(reader, "grad_fn", None), "next_functions", ()) or ()
            out[id(reader)] = [int(k) for f, k in nexts if f is fn]
    counts: dict[int, int] = {}
    for reader in node.outputs:
        counts[id(reader)] = counts.get(id(reader), 0) + 1
    return out if all(len(out[r]) == n for r, n in counts.items()) else None


def fix_split_mappings(dg: Any, calls: dict[int, tuple[Any, SplitCall]]) -> int:
    """Give every reader of every split along channels the piece it really reads (see the module's docstring), and
    note on each split node (`edgeprune_split`, a `SplitInfo`) whether its groups can be pruned in shares; the number
    of splits fixed."""
    from torch_pruning import ops

    _guard_updates()
    dg.edgeprune_splits = []
    for node in list(dg.module2node.values()):
        sizes = _piece_sizes(node.grad_fn) if node.type == ops.OPTYPE.SPLIT else None
        if sizes is None:
            continue
        call = calls.get(id(node.grad_fn), (None, None))[1]
        read = _pieces_read(node)
        reason = _reason(sizes, call, read is not None)
        node.edgeprune_split = SplitInfo(sizes, call, reason)
        if read is not None:
            node.module.split_sizes = list(sizes)  # from here on torch-pruning's SplitPruner keeps them as it prunes
            dg.edgeprune_splits.append((node, read))
            _remap(dg, node, read)
    return len(dg.edgeprune_splits)


def _guard_updates() -> None:
    """torch-pruning recomputes every index mapping each time it makes a group (`update_index_mapping`), its wrong
    split mappings included: after it, the splits `fix_split_mappings` fixed are fixed again. Installed once."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_index_mapping
    if getattr(original, "edgeprune_splits", False):
        return

    def update(graph: Any) -> None:
        original(graph)
        for node, read in getattr(graph, "edgeprune_splits", ()):
            _remap(graph, node, read)

    update.edgeprune_splits = True  # type: ignore[attr-defined]
    index_mapping.update_index_mapping = update


def _reason(sizes: tuple[int, ...], call: SplitCall | None, mapped: bool) -> str | None:
    if not mapped:
        return "a split along channels whose readers torch-pruning's trace does not match with its pieces"
    if call is None:
        return "a split along channels made outside any call edgeprune records (torch.split, chunk, split_with_sizes)"
    if not call.adapts:
        return call.why_not()
    if call.kind == "chunk" and len(set(sizes)) > 1:
        return f"a split along channels by chunk into unequal sizes {list(sizes)}, which cannot keep equal shares"
    return None


def _remap(dg: Any, node: Any, read: dict[int, list[int]]) -> None:
    """Set the split's index mappings from the pieces each reader reads, both ways, and recompute the offsets of the
    concats that read pieces directly; from the split's sizes as they are now (a pruned group's split is smaller)."""
    from torch_pruning import ops
    from torch_pruning.dependency.index_mapping import (
        _SplitIndexMapping,
        update_concat_index_mapping,
    )

    sizes = list(node.module.split_sizes)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    node.module.offsets = offsets
    seen: dict[int, int] = {}
    for dep in node.dependencies:  # split -> reader: a piece's channels, shifted to the reader's numbering
        if id(dep.target) in read:
            k = read[id(dep.target)][seen.setdefault(id(dep.target), 0)]
            seen[id(dep.target)] += 1
            dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[k: k + 2], reverse=False)
    readers = {id(r): r for r in node.outputs}
    for rid, reader in readers.items():
        ks = iter(read[rid])
        for dep in reader.dependencies:  # reader -> split: back to the split's input numbering
            if dep.target is node:
                k = next(ks)
                dep.index_mapping[0] = _SplitIndexMapping(offset=offsets[k: k + 2], reverse=True)
        if reader.type == ops.OPTYPE.CONCAT and reader.module.concat_sizes is not None:
            ks = iter(read[rid])
            reader.module.concat_sizes = [sizes[next(ks)] if inp is node else ch
                                          for inp, ch in zip(reader.inputs, reader.module.concat_sizes)]
            update_concat_index_mapping(dg, reader)
            for dep in reader.dependencies:  # concat -> split: out of the concat first, then back through the split
                if dep.target is node:
                    dep.index_mapping[0], dep.index_mapping[1] = dep.index_mapping[1], dep.index_mapping[0]


def split_reason(node: Any) -> str | None:
    """Why the groups through split node `node` are excluded; None when they are pruned in shares (and for a node
    that is no split along channels)."""
    fn = getattr(node, "grad_fn", None)
    name = type(fn).__name__ if fn is not None else ""
    if not any(name.startswith(s) for s in SPLITTING):
        return None
    info = getattr(node, "edgeprune_split", None)
    if info is None:
        return f"{name} (a split along channels edgeprune cannot prune in equal shares)"
    return None if info.reason is None else f"{name} ({info.reason})"


Seen = dict[int, tuple[Any, dict[int, int]]]  # split node id -> (node, {its input channel: the group channel})


def note(seen: Seen, item: Any) -> None:
    """Record a torch-pruning group item that reaches a split node (its idxs are the split's input channels)."""
    node = item.dep.target
    if getattr(node, "edgeprune_split", None) is not None:
        seen.setdefault(id(node), (node, {}))[1].update(zip((int(i) for i in item.idxs),
                                                            (int(r) for r in item.root_idxs)))


Pieces = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Shares:
    """What `shares` found of a group's splits: its pieces (`shares.refine`), the lists of sizes it rewrites after
    pruning, whether its pieces keep equal shares (a `chunk` cuts them), and why it cannot be pruned (None when it
    can)."""

    pieces: Pieces = ()
    resizes: tuple[Resize, ...] = ()
    equal: bool = False
    reason: str | None = None


def _cut(node: Any, roots: dict[int, int]) -> tuple[list[tuple[int, tuple[int, ...]]], str | None]:
    """The pieces of split `node` the group reaches, each as (piece index, group channels in position order); a
    reason when a piece holds other channels besides the group's (the split's size for it would mix two groups)."""
    info = node.edgeprune_split
    offsets = [sum(info.sizes[:k]) for k in range(len(info.sizes) + 1)]
    out = []
    for k in range(len(info.sizes)):
        piece = [roots.get(i) for i in range(offsets[k], offsets[k + 1])]
        held = [r for r in piece if r is not None]
        if held and len(held) < len(piece):
            return [], (f"a split along channels (in {info.call.owner or 'the model'}) whose piece {k} holds other "
                        f"channels besides these ({len(held)} of its {len(piece)})")
        if held:
            out.append((k, tuple(held)))
    return out, None


def shares(seen: Seen, channels: int) -> Shares:
    """A group's pieces from the splits it passes through, the lists of sizes it rewrites, and why it cannot be
    pruned (see `Shares`). A split by a list of sizes the module keeps may cut the group anywhere between pieces, and
    the group may hold some of its pieces only (the others belong to other groups); the group's pieces are the common
    refinement of all its splits' pieces. A `chunk` needs equal pieces: it must cut all the group's channels, and
    all of its input, into the group's pieces."""
    cuts: list[tuple[SplitInfo, list[tuple[int, tuple[int, ...]]]]] = []
    for node, roots in seen.values():
        info = node.edgeprune_split
        if info.reason is not None:
            return Shares(reason=info.reason)
        cut, why = _cut(node, roots)
        if why is not None:
            return Shares(reason=why)
        cuts.append((info, cut))
    if not cuts:
        return Shares()
    pieces = refine([[p for _, p in cut] for _, cut in cuts], channels)
    equal = any(info.call.kind == "chunk" for info, _ in cuts)
    if equal and any(info.call.kind == "chunk" and (len(cut) != len(info.sizes) or len(pieces) != len(cut))
                     for info, cut in cuts):
        return Shares(reason="a split along channels by chunk of a tensor that holds other channels besides these, "
                             "or cut again into other pieces: chunk's pieces would not stay equal")
    return Shares(pieces, _resizes(cuts, pieces), equal)


def _resizes(cuts: list[tuple[SplitInfo, list[tuple[int, tuple[int, ...]]]]], pieces: Pieces) -> tuple[Resize, ...]:
    """Per (module, attribute) list of sizes, the split pieces the group owns and the group's pieces in each."""
    piece_of = {ch: b for b, piece in enumerate(pieces) for ch in piece}
    owned: dict[tuple[str, str], dict[int, tuple[int, ...]]] = {}
    for info, cut in cuts:
        if info.call is not None and info.call.kind == "sizes":
            entries = owned.setdefault((info.call.owner, str(info.call.attribute)), {})
            for k, chans in cut:
                entries[k] = tuple(dict.fromkeys(piece_of[ch] for ch in chans))
    return tuple(Resize(o, a, tuple(sorted(e.items()))) for (o, a), e in owned.items())


def resize(model: nn.Module, resizes: tuple[Resize, ...], kept: tuple[int, ...]) -> None:
    """Rewrite the entries a group owns of the lists of sizes modules split with (`SplitCall.attribute`), from the
    channels each of the group's pieces keeps (`kept`, aligned with `Group.pieces`)."""
    modules = dict(model.named_modules())
    for r in resizes:
        old = getattr(modules[r.owner], r.attribute)
        setattr(modules[r.owner], r.attribute, type(old)(r.sizes(old, kept)))


def widen(dg: Any, root: nn.Module, group: Any) -> Any:
    """`group` (torch-pruning's, rooted at `root`) rooted instead at the dense layer that makes the whole input of a
    split the group reaches in part: rooted at a layer inside one piece (MixConv's conv of one kernel size, C2f's
    last bottleneck conv added to a half), a group holds that piece only, and the split could not keep equal shares;
    rooted at the layer before the split, it holds every piece. `group` itself when it reaches no split in part."""
    from edgeprune.dependency.groupconv import is_dense

    partial = any(getattr(it.dep.target, "edgeprune_split", None) is not None
                  and len({int(i) for i in it.idxs}) < sum(it.dep.target.edgeprune_split.sizes) for it in group)
    if not partial:
        return group
    width = len(group[0].idxs)
    for item in group:
        m = item.dep.target.module
        pruner = dg.get_pruner_of_module(m) if m is not root else None
        out = pruner.get_out_channels(m) if pruner is not None else None
        if dg.is_out_channel_pruning_fn(item.dep.handler) and is_dense(m) and out and out > width:
            return dg.get_pruning_group(m, pruner.prune_out_channels, list(range(out)))
    return group
