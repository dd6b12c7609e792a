"""Drift-aware sequential repair: consumers refitted in forward order on the partly pruned network's own inputs.

    repairs = sequential_repair(model, graph, plan, batches)      # consumer -> (kept coordinates, W', b')

The independent repair (`solve.compensate_layer`) fits every consumer on the *unpruned* network's inputs, so the
drift that pruning upstream layers causes is never corrected. Here consumers are taken in forward order; each is
fitted on the inputs x~ the partly pruned and already repaired network actually produces, against the outputs W x of
the original network on the same calibration images and the same patches (He et al. 2017, ThiNet, GPTQ-style):

    W' = W C(x, x~_S) C(x~_S)⁻¹,   b' = b + W μ - W' μ~_S

It must be sequential: refitting every consumer in one pass from the independently repaired network made the
example's error far worse (0.67 at 50% removed, audit exp7b), because each fit then targets inputs its upstream refit
has since changed. On the bundled example the audit measured held-out output error 0.195 -> 0.051 at 50% removed,
0.407 -> 0.113 at 70%, 0.448 -> 0.162 at 80%; latency does not change (widths do not depend on weights).

Cost: two passes over the calibration data (the original and the repaired network), not one per layer. The model is
traced once with torch.fx and interpreted node by node over every calibration batch at once, keeping only the live
activations of both networks (the frontier); a consumer's fit happens when the interpretation reaches it. Models fx
cannot trace fall back to one truncated pass per consumer (slower, same result). No library does this: torch-pruning
and ONNX tools have no closed-form repair, GPTQ-style code is written for transformer blocks.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.compensation.solve import _cholesky_solve
from edgeprune.compensation.statistics import (MAX_POSITIONS, _Accumulator, layer_rng, shrink_towards_diagonal,
                                               unfold_input)
from edgeprune.dependency.graph import Graph, execution_order
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.plan import Plan
from edgeprune.surgery.weights import set_weights as _set_weights

log = logging.getLogger(__name__)

Repair = tuple[np.ndarray, np.ndarray, np.ndarray]  # kept coordinates, W' (N, |S|), b' (N,)


class _Paired:
    """Running statistics of one consumer's kept inputs x~_S (covariance, through `_Accumulator`) and of their cross
    products with the original outputs y = W x on the same patches."""

    def __init__(self, weight: np.ndarray, keep: np.ndarray, prior: np.ndarray | None = None) -> None:
        self.weight, self.keep, self.prior = weight, keep, prior
        self.acc = _Accumulator(keep.size)
        self.cross = np.zeros((keep.size, weight.shape[0]))  # Σ (x~ - shift)ᵀ y, float64
        self.y_sum = np.zeros(weight.shape[0])
        self.w32 = weight.T.astype(np.float32)

    def add(self, x: torch.Tensor, x_tilde: torch.Tensor) -> None:
        t = np.ascontiguousarray(x_tilde.to(torch.float32).numpy()[:, self.keep])
        y = x.to(torch.float32).numpy() @ self.w32  # the original layer's output (bias aside) on these patches
        self.acc.add(torch.from_numpy(t))
        self.cross += (t - self.acc.shift).T.astype(np.float32) @ y  # float32 products of one batch, float64 total
        self.y_sum += y.sum(0, dtype=np.float64)

    def solve(self, bias: np.ndarray | None, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        stats = shrink_towards_diagonal(self.acc.finish(block=1))
        n = stats.count
        mu_y = self.y_sum / n
        # (x~ - shift)ᵀ y / n - (μ~ - shift) μ_yᵀ = C(x~, y)
        c_ty = self.cross / n - np.outer(stats.mean - self.acc.shift, mu_y)
        # the ridge pulls towards the original kept weights (or the merged ones, `merge.fold`), not towards zero
        prior = (self.weight[:, self.keep] if self.prior is None else self.prior[:, self.keep]).T
        w_new = _cholesky_solve(stats.cov, c_ty, ridge, float(np.mean(np.diag(stats.cov))), prior).T
        b = np.zeros(self.weight.shape[0]) if bias is None else bias
        return w_new, b + mu_y - w_new @ stats.mean


def _weight2d(m: nn.Module) -> np.ndarray:
    return m.weight.detach().double().cpu().numpy().reshape(m.weight.shape[0], -1)


def sequential_repair(model: nn.Module, graph: Graph, plan: Plan, batches: list[torch.Tensor],
                      removed: dict[str, set[int]], max_positions: int = MAX_POSITIONS, seed: int = 0,
                      ridge: float = 1e-6, priors: dict[str, np.ndarray] | None = None) -> dict[str, Repair]:
    """The repair of every consumer in `removed` (name -> removed input coordinates), fitted in forward order on the
    pruned network's own inputs (see the module docstring). `model` is not modified."""
    todo = {name: r for name, r in removed.items() if r}
    if not todo:
        return {}
    orig = copy.deepcopy(model).eval()
    try:  # traced before `work` is copied from it: the trace keeps tensors forward() makes on it (timm's Swin)
        graph_fx = fx_graph(orig)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the slower per-consumer passes give the same result
        log.info("sequential repair without torch.fx (%s): one truncated pass per consumer",
                 first_line(e, 160))
        graph_fx = None
    work = copy.deepcopy(orig).eval()
    fits = _Fits(orig, work, todo, max_positions, seed, ridge)
    fits.priors = priors or {}
    if graph_fx is None:
        return _by_passes(fits, orig, work, batches)
    return _by_interpretation(fits, graph_fx, orig, work, _within_memory(graph_fx, orig, batches))


MEMORY_SHARE = 0.5  # of the memory available when the repair starts, for both networks' live activations


def _within_memory(graph_fx: Any, model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The calibration batches whose live activations fit in memory, both networks at once: the interpretation holds
    every image's frontier: for resnet50 at 224x224, 9.2 MB per image and network (256 images: both networks
    4.7 GB; the process peaked at 8.5 GB, measured).
    Beyond `MEMORY_SHARE` of the available memory only the first images are used (logged)."""
    from edgeprune.inputs.data import available_memory

    free = available_memory()
    total = sum(len(b) for b in batches)
    if free is None or not batches:
        return batches
    per_image = 2 * _peak_live_bytes(graph_fx, model, batches[0][:1])
    keep = max(1, int(MEMORY_SHARE * free // max(per_image, 1)))
    if keep >= total:
        return batches
    log.warning("sequential repair on the first %d of %d calibration images: their activations in both networks "
                "need %.1f GB, %.0f%% of the %.1f GB available", keep, total, per_image * keep / 2**30,
                100 * MEMORY_SHARE, free / 2**30)
    return first_samples(batches, keep)


def first_samples(batches: Iterable[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """The first `keep` samples of `batches` (the last batch cut short), reading no batch after them."""
    out, n = [], 0
    for b in batches:
        out.append(b[: keep - n])
        n += len(out[-1])
        if n >= keep:
            break
    return out


def _peak_live_bytes(graph_fx: Any, model: nn.Module, x: torch.Tensor) -> int:
    """The largest total size of the values alive at once when `model` runs on `x` node by node."""
    nodes = list(graph_fx.nodes)
    last_use = {n: i for i, node in enumerate(nodes) for n in node.all_input_nodes}
    env: dict = {}
    peak = 0
    with torch.no_grad():
        for i, node in enumerate(nodes):
            if node.op == "output":
                break
            env[node] = _run(model, node, env, x)
            peak = max(peak, sum(v.numel() * v.element_size() for v in env.values() if isinstance(v, torch.Tensor)))
            for n in node.all_input_nodes:
                if last_use.get(n) == i:
                    env.pop(n, None)
    return peak


class _Fits:
    """The consumers to refit, their paired statistics, and the repairs made so far (set on `work` as they come)."""

    def __init__(self, orig: nn.Module, work: nn.Module, todo: dict[str, set[int]], max_positions: int, seed: int,
                 ridge: float) -> None:
        self.om, self.wm = dict(orig.named_modules()), dict(work.named_modules())
        self.todo, self.max_positions, self.seed, self.ridge = todo, max_positions, seed, ridge
        self.repairs: dict[str, Repair] = {}
        self.priors: dict[str, np.ndarray] = {}  # merged weights the ridge pulls towards (2-D, unfold order)

    def fit(self, name: str, pairs: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fit `name` on (original input, work input) pairs of every batch, and set the repair on `work`."""
        m = self.om[name]
        w = _weight2d(m)
        keep = np.setdiff1d(np.arange(w.shape[1]), np.fromiter(self.todo[name], dtype=np.int64))
        paired = _Paired(w, keep, self.priors.get(name))
        rng_x, rng_t = layer_rng(self.seed, name), layer_rng(self.seed, name)  # the same patches in both networks
        with torch.no_grad():
            for x, x_tilde in pairs:
                paired.add(unfold_input(m, x, self.max_positions, rng_x),
                           unfold_input(m, x_tilde, self.max_positions, rng_t))
        bias = None if m.bias is None else m.bias.detach().double().cpu().numpy()
        w_new, b_new = paired.solve(bias, self.ridge)
        self.repairs[name] = (keep, w_new, b_new)
        _set_weights(self.wm[name], keep, w_new, b_new)  # the work network runs on with this layer repaired


def _by_interpretation(fits: _Fits, graph_fx: Any, orig: nn.Module, work: nn.Module,
                       batches: list[torch.Tensor]) -> dict[str, Repair]:
    """Both networks run node by node through the one traced graph (`orig`'s and `work`'s modules by the same
    names) over all batches; a consumer is fitted when reached, then runs with its repair."""
    nodes = list(graph_fx.nodes)
    last_use = {n: i for i, node in enumerate(nodes) for n in node.all_input_nodes}
    envs = {root: [{} for _ in batches] for root in (orig, work)}
    with torch.no_grad():
        for i, node in enumerate(nodes):
            if node.op == "output":
                break
            if node.op == "call_module" and node.target in fits.todo:
                arg = node.args[0]
                fits.fit(node.target, ((eo[arg], ew[arg]) for eo, ew in zip(envs[orig], envs[work])))
            for root, per_batch in envs.items():
                for env, x in zip(per_batch, batches):
                    env[node] = _run(root, node, env, x)
            for n in node.all_input_nodes:  # free what no later node reads
                if last_use.get(n) == i:
                    for per_batch in envs.values():
                        for env in per_batch:
                            env.pop(n, None)
    return fits.repairs


# Layers run as one node whatever their class: subclasses of these (timm's Conv2dSame computes its "same" padding from
# the input's shape in Python, which symbolic tracing cannot follow) are called as modules, never traced into.
LEAVES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.modules.batchnorm._BatchNorm,
          nn.LayerNorm, nn.GroupNorm)


def fx_graph(model: nn.Module) -> Any:
    """`model`'s torch.fx graph, with every layer of a `LEAVES` class (subclasses too) as one call_module node.
    Raises whatever torch.fx raises for a model it cannot trace."""
    import torch.fx

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)

    return Tracer().trace(model)


def _run(root: nn.Module, node: Any, env: dict, x: torch.Tensor) -> Any:
    """One fx node on one batch, with `root`'s modules and attributes; inputs are read from `env`."""
    from torch.fx.node import map_arg

    if node.op == "placeholder":  # the input; a later argument of forward() keeps its default (timm's is_causal)
        return node.args[0] if node.args else x
    args = map_arg(node.args, lambda n: env[n])
    kwargs = map_arg(node.kwargs, lambda n: env[n])
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(root)
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise EdgePruneError(f"sequential repair: unexpected torch.fx node {node.op}")


class _Stop(Exception):
    """Ends a forward pass at the consumer being fitted: the rest of the network is not needed."""


def _by_passes(fits: _Fits, orig: nn.Module, work: nn.Module, batches: list[torch.Tensor]) -> dict[str, Repair]:
    """For models torch.fx cannot trace: per consumer in forward order, both networks run up to it on every batch."""
    order = execution_order(orig, batches[0][:1])
    for name in sorted(fits.todo, key=lambda n: order.get(n, 1 << 30)):
        fits.fit(name, _inputs_at(fits.om[name], fits.wm[name], orig, work, batches))
    return fits.repairs


def _inputs_at(m_orig: nn.Module, m_work: nn.Module, orig: nn.Module, work: nn.Module,
               batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x in batches:
        got = [_input_of(m_orig, orig, x), _input_of(m_work, work, x)]
        yield got[0], got[1]


def _input_of(module: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def hook(m: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise EdgePruneError("sequential repair: a consumer did not run on a calibration batch")
    return seen[0]

