"""Apply a Plan: compensate consumers in closed form (CAP.md §3), then remove channels physically (torch-pruning).

    pruned = prune(model, example_input, plan, stats)

The input model is never modified: pruning works on a copy.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from edgeprune.common.parallel import thread_map
from edgeprune.compensation.solve import PrefixSolver, compensate_layer
from edgeprune.compensation.statistics import LayerStats
from edgeprune.dependency.graph import Graph, Group, build_dependency_graph, trace
from edgeprune.dependency.groupconv import is_grouped
from edgeprune.dependency.heads import prune_heads
from edgeprune.dependency.splits import resize
from edgeprune.errors import EdgePruneError
from edgeprune.plan import Plan
from edgeprune.surgery.merge import fold
from edgeprune.surgery.resize import INPUT_SIZE, with_input_size
from edgeprune.surgery.weights import set_weights

log = logging.getLogger(__name__)


def check_plan(graph: Graph, plan: Plan) -> None:
    names = {g.name: g for g in graph.groups}
    for g, c in plan.channels.items():
        if g not in names:
            raise EdgePruneError(f"plan names group {g!r}, which this model does not have; was it made for another "
                                 f"model? groups here: {', '.join(list(names)[:8])}...")
        if names[g].channels != c:
            raise EdgePruneError(f"plan says group {g!r} has {c} channels, the model has {names[g].channels}")
        kept = set(plan.kept.get(g, ()))
        for unit in names[g].units:
            if g in plan.kept and 0 < len(kept & set(unit)) < len(unit):
                raise EdgePruneError(f"plan keeps part of a unit of group {g!r} (channels {unit[0]}..{unit[-1]}): the "
                                     f"channels of one group of a grouped conv go together; keep all {len(unit)} or none")
        if g in plan.kept and names[g].pieces:
            _check_pieces(names[g], kept)
        for branch in names[g].branches:
            if g in plan.kept and not set(branch) & set(plan.kept[g]):
                raise EdgePruneError(f"plan keeps no channel of group {g!r}'s concat branch {branch[0]}..{branch[-1]}: "
                                     f"its conv would have no output channel; keep at least one of them")


def _check_pieces(group: Group, kept: set[int]) -> None:
    """Every piece the splits along channels cut a group into keeps one channel at least (a split cannot make an
    empty piece: its reader would have no input channel), and a chunk's pieces keep as many as each other (chunk
    cuts equal pieces of whatever width comes in); a list of sizes the module keeps follows any other share."""
    shares = [len(kept & set(piece)) for piece in group.pieces]
    if 0 in shares:
        k = shares.index(0)
        piece = group.pieces[k]
        raise EdgePruneError(f"plan keeps no channel of piece {k} (channels {min(piece)}..{max(piece)}) of group "
                             f"{group.name!r}, which a split along channels cuts into pieces of {shares} kept channels: "
                             f"every piece must keep one at least")
    if group.equal and len(set(shares)) > 1:
        raise EdgePruneError(f"plan keeps {shares} channels in the pieces of group {group.name!r}'s chunk along "
                             f"channels: every piece must keep as many as the others")


def removed_coords(graph: Graph, plan: Plan) -> dict[str, set[int]]:
    """Per compensable consumer, the input coordinates the plan removes (from every group it reads)."""
    out: dict[str, set[int]] = defaultdict(set)
    for g in graph.groups:
        if g.name not in plan.kept:
            continue
        pruned = plan.pruned(g.name)
        for c in g.consumers:
            if c.compensable:
                for j in pruned:
                    out[c.module].update(c.coords[j])
    return out


def compensate_consumers(model: nn.Module, graph: Graph, plan: Plan, stats: dict[str, LayerStats] | None,
                         orders: dict[str, tuple[int, ...]] | None = None,
                         solvers: dict[str, PrefixSolver | None] | None = None,
                         memo: dict[tuple, tuple] | None = None, repair: bool = True, workers: int = 1,
                         priors: dict[str, np.ndarray] | None = None) -> None:
    """Replace each affected consumer's weight (removed columns zeroed) and bias by the least-squares repair.

    Args:
        orders: channel order per group (the ranking); when a consumer reads one group and the plan keeps a prefix
            of its order, a `PrefixSolver` kept in `solvers` (a dict owned by the caller) serves every width.
        memo: caller-owned cache of repairs keyed by consumer and removed coordinates (the search's inner level
            re-evaluates many plans that differ in one group).
        repair: False only zeroes the removed columns (pruning without compensation, as masking).
        workers: consumers repaired at once, in threads (independent solves; the caller sets BLAS to one thread per
            worker, see `registry.rank_all`). The weights do not depend on it.
        priors: merged 2-D weights of consumers (`merge.fold`): the repair's ridge pulls towards them.
    """
    modules = dict(model.named_modules())
    bn_follows = {c.module: c.bn_follows for g in graph.groups for c in g.consumers}
    single = {}  # consumer -> (group, its Consumer entry) when it reads exactly one group
    reads: dict[str, int] = defaultdict(int)
    for g in graph.groups:
        for c in g.consumers:
            reads[c.module] += 1
            single[c.module] = (g, c)

    def solve(name: str, removed: set[int]) -> tuple:
        m = modules[name]
        w2 = m.weight.detach().double().cpu().numpy().reshape(m.weight.shape[0], -1)
        keep = np.setdiff1d(np.arange(w2.shape[1]), np.fromiter(removed, dtype=np.int64))
        if not repair:
            return keep, w2[:, keep], None  # slicing: the bias stays as it is
        if stats is None or name not in stats:
            raise EdgePruneError(f"no calibration statistics for layer {name}; collect statistics before pruning")
        bias = None if m.bias is None else m.bias.detach().double().cpu().numpy()
        rescale = bn_follows.get(name, False)
        if priors and name in priors:
            w_new, b_new = compensate_layer(w2, bias, stats[name], keep, rescale=rescale, prior=priors[name][:, keep])
            return keep, w_new, b_new
        if orders is not None and solvers is not None and reads[name] == 1:
            g, c = single[name]
            order = orders.get(g.name)
            kept = plan.kept.get(g.name, ())
            if order is not None and set(order[: len(kept)]) == set(kept) and \
                    sum(len(x) for x in c.coords) == w2.shape[1]:
                if name not in solvers:
                    coord_order = np.asarray([i for j in order for i in c.coords[j]], dtype=np.int64)
                    solvers[name] = PrefixSolver(w2, stats[name], coord_order)
                solver = solvers[name]
                if solver is not None:
                    n_keep = sum(len(c.coords[j]) for j in kept)
                    try:
                        w_new, b_new = solver.solve(n_keep, bias, rescale)
                        return solver.order[:n_keep], w_new, b_new
                    except np.linalg.LinAlgError:
                        solvers[name] = None  # not positive definite: the direct solve has a ridge fallback
        w_new, b_new = compensate_layer(w2, bias, stats[name], keep, rescale=rescale)
        return keep, w_new, b_new

    todo = {}
    for name, removed in removed_coords(graph, plan).items():
        if not removed:
            continue
        key = (name, tuple(sorted(removed)))
        if memo is not None and key in memo:
            set_weights(modules[name], *memo[key])
        else:
            todo[key] = removed
    keys = list(todo)
    results = dict(zip(keys, thread_map(lambda k: solve(k[0], todo[k]), keys, workers,
                                        key=lambda k: -modules[k[0]].weight[0].numel())))  # widest first
    for key in todo:  # weights are set in the plan's order, on this thread
        if memo is not None:
            memo[key] = results[key]
        set_weights(modules[key[0]], *results[key])


def prune(
    model: nn.Module,
    example_input: torch.Tensor,
    plan: Plan,
    stats: dict[str, LayerStats] | None = None,
    ignore: tuple[str, ...] = (),
    orders: dict[str, tuple[int, ...]] | None = None,
    solvers: dict | None = None,
    graph: Graph | None = None,
    workers: int = 1,
    batches: list[torch.Tensor] | None = None,
) -> nn.Module:
    """A pruned copy of `model`: compensated when `plan.compensation`, channels removed per `plan.kept`.

    `orders` and `solvers` (see `compensate_consumers`) make repeated pruning of one model at many widths cheap, and so
    does `graph` (the groups of `model` traced with the same `ignore`): one dependency trace per candidate, not two.
    `workers` repairs that many consumers at once (see `compensate_consumers`). A plan whose `repair` is
    "sequential" is repaired on the calibration `batches` instead (`repair.sequential_repair`, seeded by the plan).
    """
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    graph = graph if graph is not None else trace(model, example_input, ignore)
    check_plan(graph, plan)
    merged = fold(model, graph, plan.meta["merge"]) if plan.meta.get("merge") else {}
    if merged and not plan.compensation:  # similarity: merged channels' weights in their representatives
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, w in merged.items():
                modules[name].weight.copy_(torch.from_numpy(w).reshape(modules[name].weight.shape))
    if plan.compensation and plan.repair == "sequential":
        from edgeprune.surgery.repair import sequential_repair

        if not batches:
            raise EdgePruneError("the sequential repair needs the calibration batches; pass a calibration recipe")
        modules = dict(model.named_modules())
        for name, (keep, w_new, b_new) in sequential_repair(model, graph, plan, batches,
                                                            removed_coords(graph, plan), seed=plan.seed,
                                                            priors=merged).items():
            set_weights(modules[name], keep, w_new, b_new)
    elif plan.compensation:
        if stats is None:
            raise EdgePruneError("compensation needs calibration statistics; pass a calibration recipe")
        compensate_consumers(model, graph, plan, stats, orders, solvers, workers=workers, priors=merged)
    # Rebuild the dependency graph: compensation may have added biases, which torch-pruning must see to slice them.
    dg = build_dependency_graph(model, example_input)
    modules = dict(model.named_modules())
    for g in graph.groups:
        idxs = plan.pruned(g.name) if g.name in plan.kept else []
        if not idxs:
            continue
        if g.heads:  # whole attention heads: q, k, v and proj sliced, num_heads rewritten (dependency/heads.py)
            prune_heads(model, g, plan.kept[g.name])
            continue
        root = modules[g.name]
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        group = dg.get_pruning_group(root, fn, idxs=idxs)
        grouped = [it for it in group if is_grouped(it.dep.target.module) and "in_channels" in it.dep.handler.__name__]
        group._group = [it for it in group.items if all(it is not g for g in grouped)]  # see _remove_conv_groups
        group.prune()
        for it in grouped:
            _remove_conv_groups(dg, it.dep.target.module, sorted(int(i) for i in it.idxs))
        if g.resizes:  # the entries this group owns of the lists of sizes modules split by, to the pruned pieces
            kept = set(plan.kept[g.name])
            resize(model, g.resizes, tuple(len(kept & set(piece)) for piece in g.pieces))
    if plan.meta.get(INPUT_SIZE):  # the input resolution the plan chose (surgery/resize.py)
        with_input_size(model, plan.meta[INPUT_SIZE])
    return model


def _remove_conv_groups(dg: object, conv: nn.Conv2d, removed: list[int]) -> None:
    """Remove whole groups of a grouped conv whose input channels `removed` the group before it just lost: its
    kernels for them, its output channels for them and what follows those (torch-pruning, rooted at the conv), and
    `groups` itself. torch-pruning would slice a grouped conv's input within every group instead (keeping `groups`,
    and failing on whole groups), so the caller takes the conv's input side out of torch-pruning's group."""
    import torch_pruning as tp

    per = conv.out_channels // conv.groups
    weight, bias = conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
    keep = [o for o in range(conv.out_channels) if o not in set(removed)]
    dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=removed).prune()
    with torch.no_grad():
        conv.weight = nn.Parameter(weight[keep])  # (out, in/groups, kh, kw): the kept groups' kernels, unsliced
        if bias is not None:
            conv.bias = nn.Parameter(bias[keep])
    conv.in_channels = conv.out_channels = len(keep)
    conv.groups = len(keep) // per


def structural_copy(model: nn.Module, example_input: torch.Tensor, plan: Plan, biased: list[str],
                    ignore: tuple[str, ...] = ()) -> nn.Module:
    """The pruned architecture of `plan` without compensation: a skeleton to load a pruned state dict into."""
    import dataclasses

    skeleton = prune(model, example_input, dataclasses.replace(plan, compensation=False), None, ignore)
    modules = dict(skeleton.named_modules())
    for name in biased:  # compensation adds biases: give the skeleton the same parameters
        m = modules[name]
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
    return skeleton
