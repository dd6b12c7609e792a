"""C-SGD: centripetal SGD on the unpruned model, then each cluster of filters merged into one (Ding et al.,
arXiv:1904.03837, "Centripetal SGD for Pruning Very Deep Convolutional Networks with Complicated Structure").

    clusters = cluster_filters(model, graph, plan)            # group -> clusters of channels, as many as its width
    model = centripetal_train(model, graph, clusters, data, config)   # members of a cluster become equal
    pruned, kept = merge(model, example, graph, clusters)     # one filter per cluster; the consumers' columns summed

The paper's method, as here: the filters of each layer are clustered (k-means on the filter weights) into as many
clusters as the layer is to keep; training then replaces each filter's gradient by the mean gradient of its cluster
and adds a centripetal term ε·(F - mean of the cluster), so that the filters of a cluster move together and their
differences shrink geometrically; finally each cluster keeps one filter and the next layer's input weights of the
cluster are summed into it, which removes the redundancy without changing the function.

Departures, and why:
- Clusters are per coupled channel group (graph.py), not per layer: every producer of a residual stream, and the
  per-channel parameters of the layers the channels pass through (batch norms, depthwise convs), are clustered and
  pulled together as one, which is how the paper handles residual structures ("complicated structure"). k-means runs
  on the group's producers' filters side by side (scikit-learn's KMeans, seeded).
- The centripetal term is ε·(F_j - mean_H F), the paper's ε·Σ_{k∈H}(F_j - F_k) divided by the cluster size |H|: the
  pull then does not grow with the cluster, and one ε (default 3, with SGD's learning rate 0.01 and momentum 0.9:
  differences shrink about 5% a step) is stable for clusters of any size, where the paper's form diverges with
  momentum SGD once lr·ε·|H| passes 2(1 + momentum).
- A constant learning rate (the centripetal pull is lr·ε a step: annealing lr would stall the convergence), and no
  weight decay (the paper's η): a recovery stage of minutes has no use for it, and it would not change the
  centripetal dynamics (it is linear, the same for every member).
- Before merging, each cluster is set to its mean (parameters and batch-norm running statistics): after training the
  members differ by what the centripetal term has not yet removed (`spread`, in the report), and the merge is exact
  for the averaged model. The paper trains until the differences vanish; a short run leaves a small residual.
- The loss is cross-entropy on the user's labels when the recipe has them and the model returns class logits, else
  distillation from the unpruned model (train.distill_loss): edgeprune's data may be unlabelled.
- Groups that cannot be merged channel by channel (grouped-conv units, concat branches, a consumer that is not a
  dense conv or linear, a pass-through layer with parameters of another shape) are not clustered: they are cut to
  the plan's channels as they are (sliced, without compensation), and listed in the report (`csgd.sliced`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeprune.common.progress import Stages, no_progress
from edgeprune.dependency.graph import Graph, Group
from edgeprune.plan import Plan
from edgeprune.recovery.train import FinetuneConfig, Optimisation, TrainLog, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clusters:
    """Per clustered group, its clusters (lists of channels, each ascending), and the groups sliced instead."""

    groups: dict[str, tuple[tuple[int, ...], ...]]
    sliced: dict[str, str]  # group -> why it was not clustered

    def kept(self, plan: Plan) -> dict[str, tuple[int, ...]]:
        """The channels the merged model keeps: each cluster's first channel, the plan's channels elsewhere."""
        return {g: tuple(sorted(c[0] for c in self.groups[g])) if g in self.groups else k for g, k in plan.kept.items()}


def _channel_tensors(model: nn.Module, g: Group) -> tuple[list[torch.Tensor], list[torch.Tensor]] | str:
    """The group's per-channel parameters and buffers (channel on dim 0), or why the group cannot be merged."""
    modules = dict(model.named_modules())
    if g.units or g.pieces or g.branches or any(len(p) not in (0, g.channels) or list(p) != sorted(p)
                                                for p in g.produces):
        return "grouped-conv units, split pieces or concat branches"
    if not all(c.compensable for c in g.consumers):
        return "a consumer that is not a dense conv or linear"
    params: list[torch.Tensor] = []
    buffers: list[torch.Tensor] = []
    for name in (*g.producers, *g.members):
        m = modules[name]
        for pname, p in m.named_parameters(recurse=False):
            if p.shape[0] != g.channels:
                return f"{name}.{pname} of shape {list(p.shape)} on a group of {g.channels} channels"
            params.append(p)
        for bname, b in m.named_buffers(recurse=False):
            if b.is_floating_point() and b.ndim >= 1:
                if b.shape[0] != g.channels:
                    return f"{name}.{bname} of shape {list(b.shape)} on a group of {g.channels} channels"
                buffers.append(b)
    return params, buffers


def cluster_filters(model: nn.Module, graph: Graph, plan: Plan, seed: int = 0) -> Clusters:
    """k-means on each pruned group's producer filters (side by side), into as many clusters as the plan keeps."""
    from sklearn.cluster import KMeans

    modules = dict(model.named_modules())
    groups, sliced = {}, {}
    for g in graph.groups:
        width = len(plan.kept.get(g.name, range(g.channels)))
        if width >= g.channels:
            continue
        found = _channel_tensors(model, g)
        if isinstance(found, str):
            sliced[g.name] = found
            log.warning("C-SGD: group %s is sliced to the plan's channels, not clustered: %s", g.name, found)
            continue
        feats = np.concatenate([modules[p].weight.detach().reshape(g.channels, -1).double().numpy()
                                for p in g.producers], axis=1)
        labels = KMeans(n_clusters=width, n_init=4, random_state=seed).fit(feats).labels_
        clusters = [tuple(int(i) for i in np.flatnonzero(labels == k)) for k in range(width)]
        groups[g.name] = tuple(sorted((c for c in clusters if c), key=lambda c: c[0]))
    return Clusters(groups, sliced)


def averaging(clusters: tuple[tuple[int, ...], ...], channels: int) -> torch.Tensor:
    """A: channels × channels, A[i, j] = 1/|H| when i and j are in cluster H (A @ F: each filter its cluster's mean)."""
    a = torch.eye(channels)
    for c in clusters:
        idx = torch.tensor(c)
        a[idx.unsqueeze(1), idx] = 1.0 / len(c)
    return a


@dataclass
class _Slot:
    a: torch.Tensor  # the group's averaging matrix
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    reps: list[int]


def _slots(model: nn.Module, graph: Graph, clusters: Clusters) -> dict[str, _Slot]:
    out = {}
    for g in graph.groups:
        if g.name in clusters.groups:
            params, buffers = _channel_tensors(model, g)  # type: ignore[misc]
            cl = clusters.groups[g.name]
            out[g.name] = _Slot(averaging(cl, g.channels), params, buffers, [c[0] for c in cl])
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def centripetal_train(model: nn.Module, graph: Graph, clusters: Clusters, x: np.ndarray, labels: np.ndarray | None,
                      teacher: nn.Module | None, config: FinetuneConfig, stages: Stages = no_progress) -> TrainLog:
    """Train `model` in place with the centripetal update (momentum SGD, see the module docstring); `teacher` gives
    distillation targets when `labels` is None. OrthoReg, when on, acts on the clusters' mean filters, so that it
    decorrelates clusters without pushing the members of one apart."""
    slots = _slots(model, graph, clusters)
    modules = dict(model.named_modules())
    eps = config.centripetal

    def after_backward() -> None:
        with torch.no_grad():
            for s in slots.values():
                for p in s.params:
                    if p.grad is None:
                        continue
                    f, g = _flat(p.detach()), _flat(p.grad)
                    g.copy_(s.a @ g + eps * (f - s.a @ f))

    def cluster_means() -> list[torch.Tensor]:
        means = []
        for g in graph.groups:
            for name in g.producers:
                w = _flat(modules[name].weight)
                s = slots.get(g.name)
                means.append(w if s is None else (s.a @ w)[s.reps])
        return means

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, momentum=0.9)
    return train(model, teacher, x, labels, config, stages=stages,
                 optimisation=Optimisation(opt, after_backward, cluster_means, anneal=False))


def spread(model: nn.Module, graph: Graph, clusters: Clusters) -> float:
    """The largest distance of a filter from its cluster's mean, relative to the RMS norm of the filters of that
    parameter, over every clustered group's parameters: 0 when the clusters have converged (what C-SGD drives
    towards)."""
    worst = 0.0
    with torch.no_grad():
        for s in _slots(model, graph, clusters).values():
            for p in s.params:
                f = _flat(p.detach()).double()
                scale = f.norm(dim=1).pow(2).mean().sqrt().clamp_min(1e-12)
                worst = max(worst, float((f - s.a.double() @ f).norm(dim=1).max() / scale))
    return worst


def merge(model: nn.Module, example_input: torch.Tensor, graph: Graph, clusters: Clusters, plan: Plan,
          ignore: tuple[str, ...] = ()) -> tuple[nn.Module, Plan]:
    """The pruned model: each cluster set to its mean (parameters and running statistics), the consumers' input
    weights of a cluster summed into its first channel, then the other channels removed (`surgery.apply.prune` without
    compensation). Returns it with its plan (the kept channels, `compensation` False: no least-squares repair)."""
    from edgeprune.surgery.apply import prune

    model = _averaged(model, graph, clusters)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in graph.groups:
            for cl in clusters.groups.get(g.name, ()):
                for c in g.consumers:
                    w = _flat(modules[c.module].weight)
                    cols = [list(c.coords[j]) for j in cl]
                    w[:, cols[0]] = sum(w[:, col] for col in cols)
    merged = dataclasses.replace(plan, kept=clusters.kept(plan), compensation=False)
    return prune(model, example_input, merged, None, ignore, graph=graph), merged


def _averaged(model: nn.Module, graph: Graph, clusters: Clusters) -> nn.Module:
    import copy

    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for s in _slots(model, graph, clusters).values():
            for t in (*s.params, *s.buffers):
                f = _flat(t)
                f.copy_(s.a.to(f.dtype) @ f)
    return model
