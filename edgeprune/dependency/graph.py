"""Coupled channel groups from torch-pruning's DependencyGraph.

A group is a set of channels that must be removed together: the output channels of its producers (convs and
linears, all the producers of a residual stream at once), carried through pass-through layers (BN, depthwise convs,
activations, adds, concat), and read by its consumers (the convs and linears whose input columns are those channels).
Consumers are where compensation happens (CAP.md §3); a consumer that reads several groups (after a concat) is
compensated once for all of them.

    from edgeprune.dependency.graph import trace
    graph = trace(model, example_input)
    for g in graph.groups: print(g.name, g.channels, g.producers, [c.module for c in g.consumers])
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeprune.common.timelimit import time_limit
from edgeprune.dependency import splits
from edgeprune.dependency.groupconv import is_dense, is_depthwise, merge_grouped, reroot
from edgeprune.dependency.groups import Consumer, Group
from edgeprune.dependency.heads import head_groups
from edgeprune.dependency.reshapes import cut_unmapped, guard_mapping, unmapped_reason
from edgeprune.dependency.shares import parts
from edgeprune.errors import EdgePruneError, first_line

log = logging.getLogger(__name__)


@dataclass
class Graph:
    """The prunable groups of a model, in forward order, and the layers left out (with why)."""

    groups: list[Group]
    excluded: dict[str, str] = field(default_factory=dict)  # group root -> reason it is not prunable
    output_layers: tuple[str, ...] = ()
    traced: tuple[str, ...] = ()  # modules the dependency trace reached

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise EdgePruneError(f"the model has no prunable group {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    def consumer_modules(self) -> list[str]:
        """Compensable consumer modules (each once), the layers whose input statistics are collected."""
        seen: dict[str, None] = {}
        for g in self.groups:
            for c in g.consumers:
                if c.compensable:
                    seen.setdefault(c.module)
        return list(seen)


# Autograd ops that move values across channels but that torch-pruning treats as element-wise: a group whose channels
# pass through one of them would be pruned wrongly, so it is excluded.
CHANNEL_MIXING = ("RollBackward", "TransposeBackward", "PermuteBackward", "ChannelShuffle", "PixelShuffleBackward",
                  "PixelUnshuffleBackward", "FlipBackward", "GatherBackward", "IndexBackward", "IndexSelectBackward")


# Reductions and normalisations mix channels when they run over the channel dimension (dim 1 of NCHW, or the feature
# dimension of a Linear's input); over spatial dimensions (global pooling) they keep channels apart.
REDUCING = ("SumBackward", "MeanBackward", "AmaxBackward", "AminBackward", "MaxBackward", "MinBackward", "ProdBackward",
            "StdBackward", "VarBackward", "NormBackward", "LinalgVectorNormBackward", "LogsumexpBackward",
            "SoftmaxBackward", "LogSoftmaxBackward", "CumsumBackward", "CumprodBackward", "SortBackward",
            "TopkBackward", "NormalizeBackward")


def _mixing_op(node: Any) -> str | None:
    unmapped = unmapped_reason(node)
    if unmapped is not None:
        return unmapped
    fn = getattr(node, "grad_fn", None)
    name = type(fn).__name__ if fn is not None else ""
    if any(name.startswith(m) for m in CHANNEL_MIXING):
        return name
    split = splits.split_reason(node)  # a split along channels: pruned piece by piece where its pieces allow
    if split is not None:
        return split
    if any(name.startswith(m) for m in REDUCING) and _reduces_channels(fn):
        return f"{name} (a reduction over channels)"
    return None


def _reduces_channels(fn: Any) -> bool:
    """Whether a reduction's saved dims include dim 1; a reduction over every dim (no saved dim) does too."""
    dims = getattr(fn, "_saved_dim", None)
    sizes = getattr(fn, "_saved_self_sym_sizes", None) or getattr(fn, "_saved_self_sizes", None)
    if dims is None:
        return True  # x.sum(), x.max(): everything, channels included
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not dims:
        return True  # sum(dim=()) reduces every dim
    ndim = len(sizes) if sizes is not None else max(2, max(abs(d) for d in dims) + 1)
    return 1 in {d % ndim for d in dims}


def _norm_mixing(m: nn.Module) -> str | None:
    """A normalisation whose statistics span several channels of the group (GroupNorm with groups of more than one
    channel, LayerNorm and LocalResponseNorm over channels); per-channel norms (BatchNorm, InstanceNorm, GroupNorm with
    one channel per group) keep channels apart."""
    if isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels:
        return f"GroupNorm with {m.num_channels // max(m.num_groups, 1)} channels per group"
    if isinstance(m, nn.LayerNorm):
        return "LayerNorm over the channels (in a transformer: the residual stream, the embedding width, kept whole)"
    if isinstance(m, nn.LocalResponseNorm):
        return "LocalResponseNorm across channels"
    return None


def check_patterns(patterns: tuple[str, ...]) -> None:
    """Refuse a `re:` pattern that is not a regular expression, before any work."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise EdgePruneError(f"--ignore {p!r} is not a valid regular expression ({e}); fix it, or drop the "
                                     f"re: prefix for a shell-style pattern such as 'layer4.*'") from None


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """fnmatch patterns, or `re:<regex>` (torchao's FqnToConfig convention)."""
    for p in patterns:
        if p.startswith("re:") and re.fullmatch(p[3:], name):
            return True
        if not p.startswith("re:") and fnmatch.fnmatchcase(name, p):
            return True
    return False


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> Any:
    """torch-pruning's DependencyGraph, with a clear error when the model cannot be traced, and cut at the reshapes it
    cannot map (`reshapes.cut_unmapped`: attention's head splits, where its grouping would never end)."""
    import torch_pruning as tp

    guard_mapping()
    model.eval()
    returned: set[Any] = set()

    def note_outputs(out: Any) -> Any:  # the grad_fns of what forward() returns, read in torch-pruning's own trace
        from edgeprune.inputs.outputs import flatten_outputs

        returned.update(t.grad_fn for _, t in flatten_outputs(out) if isinstance(t, torch.Tensor) and t.grad_fn)
        return out

    try:
        with splits.SplitRecorder(model) as calls:  # how forward() splits along channels, read by fix_split_mappings
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                       output_transform=note_outputs)
    except Exception as e:  # noqa: BLE001 - torch-pruning fails with any type; one line names the step
        import traceback

        first = first_line(e, 200)
        frames = [f.name for f in traceback.extract_tb(e.__traceback__) if "torch_pruning" in f.filename]
        where = frames[-1] if frames else "?"
        hint = {"update_reshape_index_mapping": "a view/reshape that regroups channels (e.g. a channel shuffle)",
                "update_concat_index_mapping": "a concat whose inputs it cannot follow",
                "update_slice_index_mapping": "a slice over channels"}.get(where, f"the step {where}")
        raise EdgePruneError(
            f"torch-pruning cannot trace {type(model).__name__}: it fails at {hint} ({type(e).__name__}: "
            f"{first} in {where}); edgeprune cannot prune this architecture's channels safely"
        ) from None
    dg.edgeprune_returned = returned  # _output_layers: a tensor that forward() returns and also feeds on
    splits.fix_split_mappings(dg, calls)
    cut = cut_unmapped(dg)
    if cut:
        log.info("cut the dependency graph at %d reshapes torch-pruning cannot map", cut)
    return dg


def all_groups(dg: Any, ignored: list[nn.Module], names: dict[nn.Module, str], excluded: dict[str, str]) -> list[Any]:
    """torch-pruning's groups rooted at each conv and linear (as `DependencyGraph.get_all_groups`), except that a root
    whose channels torch-pruning cannot follow is excluded with its reason instead of stopping the whole trace (after
    a channel shuffle, its split mapping indexes past its offsets), and membership is tested by identity in sets, not
    by scanning lists (quadratic in the layers)."""
    skip = {id(m) for m in [*ignored, *dg.IGNORED_LAYERS_IN_TRACING]}
    visited: set[int] = set()
    out = []
    for m in list(dg.module2node):
        if id(m) in skip or id(m) in visited or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            group = splits.widen(dg, m, reroot(dg, m, group))
        except (IndexError, ValueError, KeyError, ZeroDivisionError) as e:
            visited.add(id(m))
            excluded[names.get(m, f"<{type(m).__name__}>")] = (f"torch-pruning cannot follow its channels "
                                                              f"({type(e).__name__}: {first_line(e, 80)})")
            continue
        outs = [it.dep.target.module for it in group if dg.is_out_channel_pruning_fn(it.dep.handler)]
        visited.update(id(o) for o in outs)
        held = [names.get(o, type(o).__name__) for o in outs if id(o) in skip]
        if not held:
            out.append(group)
        elif names.get(m) not in held:  # coupled with a layer left whole: say so (torch-pruning drops it silently)
            excluded[names.get(m, f"<{type(m).__name__}>")] = (f"its channels are coupled with {held[0]}, an output "
                                                              "layer or one --ignore names, which keeps its channels")
    return out


def _output_layers(dg: Any, names: dict[nn.Module, str]) -> list[nn.Module]:
    """Convs/linears whose output channels reach the model's output without another conv or linear in between: a
    node with no successor, or one whose tensor forward() returns although later layers read it too (a dict of
    logits and a feature map: the map's channels are part of what the model returns)."""
    from torch_pruning import ops

    stop = (ops.OPTYPE.CONV, ops.OPTYPE.LINEAR)
    returned = getattr(dg, "edgeprune_returned", set())
    out = []
    for module, node in dg.module2node.items():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or is_depthwise(module):
            continue
        stack, seen, reaches = list(node.outputs), set(), not node.outputs or node.grad_fn in returned
        while stack and not reaches:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.type in stop and not is_depthwise(n.module):
                continue
            if not n.outputs or n.grad_fn in returned:
                reaches = True
            stack.extend(n.outputs)
        if reaches:
            out.append(module)
    return out


def _bn_follows(dg: Any, module: nn.Module) -> bool:
    """Whether a BatchNorm reads this layer's output, directly or through functional ops (concat, add, activations)."""
    node = dg.module2node.get(module)
    stack, seen = list(node.outputs) if node else [], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, nn.modules.batchnorm._BatchNorm):
            return True
        if isinstance(n.module, nn.Module) and any(True for _ in n.module.parameters(recurse=False)):
            continue  # another weighted layer: its input statistics are not this layer's concern
        stack.extend(n.outputs)
    return False


def _consumer(name: str, module: nn.Module, idxs: list[int], root_idxs: list[int], channels: int, dg: Any) -> Consumer:
    per_channel: list[list[int]] = [[] for _ in range(channels)]
    if isinstance(module, nn.Conv2d):
        k2 = module.kernel_size[0] * module.kernel_size[1]
        for i, r in zip(idxs, root_idxs):
            per_channel[r].extend(range(i * k2, (i + 1) * k2))
    else:
        for i, r in zip(idxs, root_idxs):
            per_channel[r].append(i)
    coords = tuple(tuple(sorted(set(c))) for c in per_channel)
    return Consumer(module=name, coords=coords, compensable=is_dense(module), bn_follows=_bn_follows(dg, module))


def _reads_whole(c: Consumer, pieces: tuple[tuple[int, ...], ...]) -> bool:
    """Whether a consumer reads every channel of the group, or of the split pieces it reads. Without pieces, a channel
    it does not read is a mapping torch-pruning got wrong (levit's Subsample: a view, a strided slice and a reshape
    between the residual stream and the downsampling attention's q left half the channels with no coordinate)."""
    return all(c.coords) or bool(pieces) and all(all(c.coords[ch] for ch in p) or not any(c.coords[ch] for ch in p)
                                                 for p in pieces)


TRACE_SECONDS = 300.0  # the longest the grouping may take (EDGEPRUNE_TRACE_SECONDS): fcn_resnet50 takes 7 s


def trace(model: nn.Module, example_input: torch.Tensor, ignore: tuple[str, ...] = (), dg: Any = None) -> Graph:
    """Coupled channel groups of `model`, excluding output layers and modules matching `ignore` patterns."""
    import os

    limit = float(os.environ.get("EDGEPRUNE_TRACE_SECONDS", TRACE_SECONDS))
    with time_limit(limit, f"torch-pruning's channel grouping of {type(model).__name__} did not finish in {limit:g} s; "
                    "edgeprune cannot prune this architecture in reasonable time (raise EDGEPRUNE_TRACE_SECONDS to "
                    "wait longer, or --ignore the block it is stuck in)"):
        dg = dg if dg is not None else build_dependency_graph(model, example_input)
        names = {m: n for n, m in model.named_modules()}
        outputs = _output_layers(dg, names)
        ignored = outputs + [m for n, m in model.named_modules() if n and ignore and matches(n, ignore)]
        excluded: dict[str, str] = {}
        tp_groups = all_groups(dg, ignored, names, excluded)
    groups: list[Group] = []
    fed: dict[str, list[tuple[str, dict[int, int]]]] = {}  # group -> the grouped convs reading it
    for tp_group in tp_groups:
        root_item = tp_group[0]
        root = root_item.dep.target.module
        channels = len(root_item.idxs)
        gname = names.get(root, f"<{type(root).__name__}>")
        producers, members, consumers = [], [], []
        made: dict[str, dict[int, int]] = {}  # producer -> {its output channel: the group channel it is}
        feeds: list[tuple[str, dict[int, int]]] = []  # grouped convs reading the group: {their input: group channel}
        reason = None
        seen: dict = {}  # the split nodes the group passes through (splits.note)
        touched: dict[str, set[int]] = {}  # weighted layer -> the group channels it holds or reads (shares.parts)
        for item in tp_group:
            splits.note(seen, item)
            for node in (item.dep.source, item.dep.target):
                op = _mixing_op(node)
                if op is not None and reason is None:
                    reason = f"its channels pass through {op}" + ("" if "split" in op else ", which moves values "
                                                                  "across channels")
            module = item.dep.target.module
            mname = names.get(module)
            if mname is None or not any(True for _ in module.parameters(recurse=False)):
                continue  # functional ops (add, concat, flatten, activations) carry channels without weights
            handler = item.dep.handler.__name__
            pairs = dict(zip((int(i) for i in item.idxs), (int(i) for i in item.root_idxs)))
            touched.setdefault(mname, set()).update(pairs.values())
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not is_depthwise(module):
                if "out_channels" in handler:
                    producers.append(mname)
                    made.setdefault(mname, {}).update(pairs)
                elif "in_channels" in handler and is_dense(module):
                    consumers.append(_consumer(mname, module, list(item.idxs), list(item.root_idxs), channels, dg))
                elif "in_channels" in handler:
                    feeds.append((mname, pairs))
            elif mname not in members:
                members.append(mname)
                mixing = _norm_mixing(module)
                if mixing is not None and (reason is None or "LayerNorm" in mixing and "LayerNorm" not in reason):
                    reason = f"{mname} is a {mixing}: removing channels changes the statistics the kept ones are " \
                             f"normalised with, which neither the repair nor the search's proxy can account for"
        if reason is None and not producers:
            reason = "no conv or linear produces these channels"
        cut = splits.shares(seen, channels)
        reason = reason or cut.reason
        if reason is None and any(len(c.coords) != channels or not _reads_whole(c, cut.pieces) for c in consumers):
            reason = "a consumer's input does not map channel by channel onto the group"
        if reason is not None:
            excluded[gname] = reason
            continue
        producers = list(dict.fromkeys(producers))
        produces = tuple(tuple(made[p][o] for o in sorted(made[p])) for p in producers)
        groups.append(Group(name=gname, channels=channels, producers=tuple(producers), consumers=tuple(consumers),
                            members=tuple(members), produces=produces, pieces=cut.pieces, resizes=cut.resizes,
                            equal=cut.equal, parts=parts(cut.pieces, touched)))
        if feeds:
            fed[gname] = feeds
    groups += head_groups(model, dg, names, excluded, ignored)  # attention heads, pruned whole
    groups = merge_grouped(groups, fed, dict(model.named_modules()), excluded)
    order = execution_order(model, example_input)
    groups.sort(key=lambda g: min((order.get(p, 1 << 30) for p in g.producers), default=1 << 30))
    log.info("traced %d prunable groups (%d excluded)", len(groups), len(excluded))
    traced = tuple(names[m] for m in dg.module2node if m in names)
    return Graph(groups=groups, excluded=excluded, output_layers=tuple(names[m] for m in outputs), traced=traced)


def execution_order(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Position of each module's first call in a forward pass: the order the search walks groups in."""
    return modules_called(model, example_input, lambda name, m: bool(name))


def modules_called(model: nn.Module, x: torch.Tensor, select: Callable[[str, nn.Module], bool]) -> dict[str, int]:
    """The selected modules that one forward pass of `x` calls, each with the position of its first call."""
    recorder = CallRecorder(select)
    with recorder.watch(model), torch.no_grad():
        model(x)
    return recorder.called


def is_weight_layer(name: str, module: nn.Module) -> bool:
    """Convolutions and linear layers: the modules whose channels pruning changes."""
    return isinstance(module, (nn.Conv2d, nn.Linear))


class CallRecorder:
    """Which selected modules forward passes call, by name, in order of first call, over any number of passes and
    models (a copy of a model keeps its module names): `with recorder.watch(model): ...`."""

    def __init__(self, select: Callable[[str, nn.Module], bool] = is_weight_layer) -> None:
        self.select = select
        self.called: dict[str, int] = {}

    def _seen(self, name: str) -> None:  # a pre-hook must return None: a value would replace the module's input
        self.called.setdefault(name, len(self.called))

    @contextmanager
    def watch(self, model: nn.Module) -> Iterator[CallRecorder]:
        handles = [m.register_forward_pre_hook(lambda mod, a, n=n: self._seen(n)) for n, m in model.named_modules()
                   if self.select(n, m)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
