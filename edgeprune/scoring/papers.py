"""The selection criteria from the papers edgeprune grew from, beside the baselines (`base.py`) and CaP (`cap.py`);
`registry.CRITERIA` holds them all.

    signals = criterion_signals("similarity", model, graph, data)    # the statistics pass the criterion needs
    rankings = rank_all("similarity", model, graph.groups, stats, signals)

- `epruner` (arXiv:2101.07985): exemplar filters by affinity propagation on each group's filter weights, exemplars
  first; with `--allocation epruner` a group's width is its number of exemplars (`search.method_widths`).
- `similarity` (arXiv:1908.02620): hierarchical clustering of channels by their feature maps; a removed channel's
  outgoing weights are folded into its kept representative in the consumers (`merges`, recorded in the plan).
- `functionality` (arXiv:1810.07322): channels judged by their class-wise activation pattern (labelled data).
- `nap` (arXiv:2101.06608): the K-FAC optimal-brain-surgeon loss increase (`kfac.py`), one scale across layers; with
  `--allocation nap` one global threshold sets every group's width.

None of them retrains (the papers fine-tune after pruning): edgeprune's closed-form repair follows the selection
unless --no-compensation. Each function's docstring says where it departs from its paper.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from edgeprune.compensation.statistics import LayerStats
from edgeprune.dependency.graph import Graph, Group
from edgeprune.scoring.base import Ranking, consumer_weight, descending, producer_filters, rank_l2
from edgeprune.scoring.kfac import obs_scores
from edgeprune.scoring.signals import Signals, signal_consumer

log = logging.getLogger(__name__)

# affinity propagation's preference = β · the median similarity, β on this ladder, quarter octaves from 1/8 to 32
# (β → 0: every filter its own exemplar; the paper's default is β = 1)
BETAS = tuple(2.0 ** (k / 4) for k in range(-12, 21))


@dataclass(frozen=True)
class ExemplarRanking(Ranking):
    """`epruner`'s order, with the number of exemplars at each preference scale of `BETAS`."""

    exemplars: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClusterRanking(Ranking):
    """`similarity`'s order, with the dendrogram (SciPy linkage) it came from."""

    linkage: Any = field(default=None, compare=False)
    _cophenetic: dict = field(default_factory=dict, compare=False, repr=False)

    def cophenetic(self) -> np.ndarray:
        if "d" not in self._cophenetic:
            from scipy.cluster.hierarchy import cophenet
            from scipy.spatial.distance import squareform

            self._cophenetic["d"] = squareform(cophenet(self.linkage))
        return self._cophenetic["d"]


def _filters(modules: dict[str, nn.Module], group: Group) -> np.ndarray:
    """(channels, d): each channel's filters of every producer, side by side (zeros where a concat's branch does not
    make the channel)."""
    parts = []
    for f, where in producer_filters(modules, group):
        block = np.zeros((group.channels, f.shape[1]))
        block[where] = f
        parts.append(block)
    return np.concatenate(parts, axis=1)


# ---------------------------------------------------------------- EPruner


def similarities(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Affinity propagation's similarities of rows `x` (negative squared distances) and their off-diagonal median."""
    sq = np.square(x).sum(1)
    sim = -np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    off = sim[~np.eye(len(x), dtype=bool)]
    return sim, float(np.median(off)) if off.size else 0.0


def affinity_exemplars(x: np.ndarray, beta: float, seed: int = 0,
                       sim: tuple[np.ndarray, float] | None = None) -> np.ndarray | None:
    """Exemplar rows of `x` by scikit-learn's affinity propagation (similarity: negative squared distance) with
    preference β · median similarity; None when it does not converge. `sim`: `similarities(x)`, if known."""
    s, median = sim if sim is not None else similarities(x)
    return _propagate(s, beta * median, seed) if median != 0.0 else np.zeros(1, dtype=np.int64)


def _propagate(s: np.ndarray, preference: float, seed: int) -> np.ndarray | None:
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    if len(s) == 1:
        return np.zeros(1, dtype=np.int64)
    ap = AffinityPropagation(affinity="precomputed", preference=preference, damping=0.7, max_iter=500,
                             random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", "All samples have mutually equal similarities")
        ap.fit(s)
    centers = np.asarray(ap.cluster_centers_indices_, dtype=np.int64)
    return centers if centers.size and (ap.labels_ >= 0).all() else None


def exemplar_ladder(x: np.ndarray, seed: int = 0) -> list[np.ndarray | None]:
    """The exemplars of rows `x` at each β of `BETAS`, nested: the loosest β runs affinity propagation on every row,
    each stricter β on the exemplars of the one before (None: no convergence there, the set carries on)."""
    s, median = similarities(x)
    if median == 0.0:  # identical filters: one exemplar stands for all
        return [np.zeros(1, dtype=np.int64)] * len(BETAS)
    alive = np.arange(len(x))
    out: list[np.ndarray | None] = []
    for beta in BETAS:
        centers = _propagate(s[np.ix_(alive, alive)], beta * median, seed)
        if centers is not None:
            alive = alive[centers]
        out.append(None if centers is None else alive.copy())
    return out


def rank_epruner(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats], signals: Signals | None,
                 seed: int = 0) -> Ranking:
    """EPruner: affinity propagation on the group's filters, exemplars first.

    The paper runs affinity propagation once per layer, at a preference β times the median similarity, keeps the
    exemplars and fine-tunes. Here it runs at every β of `BETAS` (`exemplar_ladder`), each stricter β among the
    exemplars of the looser one before it, so that the exemplar sets are nested: a channel ranks by the largest β at
    which it is still an exemplar (then by filter norm), and the first n channels of the order are exactly the
    exemplars of the β that gives n of them, which lets the search move β (`--allocation epruner`). Departures: above
    the loosest β the exemplars are those of the exemplars (flat affinity propagation at each β need not nest, and a
    prefix order could not follow it); a group coupled by a residual add clusters the filters of all its producers
    side by side (the paper's layers have one); no fine-tuning (edgeprune compensates instead); a β at which affinity
    propagation does not converge is skipped, and widths between two β of the ladder interpolate their counts.
    """
    x = _filters(modules, group)
    level = np.full(group.channels, -1)
    counts = []
    for i, centers in enumerate(exemplar_ladder(x, seed)):
        counts.append(-1 if centers is None else int(centers.size))
        if centers is not None:
            level[centers] = i
    norm = np.sqrt(np.square(x).sum(1))
    order = tuple(int(i) for i in np.lexsort((np.arange(group.channels), -norm, -level)))
    return ExemplarRanking(order=order, exemplars=tuple(counts))


# ---------------------------------------------------------------- channel similarity


def split_order(linkage: np.ndarray, score: np.ndarray) -> tuple[int, ...]:
    """The dendrogram cut top-down: each split adds the strongest (`score`) channel of the part that lost its
    representative, so that the first k channels are one representative of each of the k clusters of its k-cut."""
    c = score.size
    best = list(range(c)) + [0] * (c - 1)
    for i, (a, b, _, _) in enumerate(linkage):
        a, b = int(a), int(b)
        best[c + i] = best[a] if score[best[a]] >= score[best[b]] else best[b]
    order = [best[2 * c - 2]] if c > 1 else [0]
    for i in range(c - 2, -1, -1):
        a, b = int(linkage[i, 0]), int(linkage[i, 1])
        order.append(best[b] if best[c + i] == best[a] else best[a])
    return tuple(order)


def rank_similarity(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
                    signals: Signals | None, seed: int = 0) -> Ranking:
    """Channel similarity: average-linkage hierarchical clustering (SciPy) of the channels' feature maps (Euclidean
    distance, as the next layer reads them), one representative per cluster kept, the others merged into it.

    The representative is the cluster's strongest channel (largest feature-map norm): with exact duplicates any
    member reproduces the others; otherwise the strongest carries most of the signal. Merging adds a removed channel's
    weights in every dense consumer to its representative's (`merges`, `fold`), which is exact for duplicate feature
    maps. Departures: the paper merges and then fine-tunes; here the merged weights are the compensation's starting
    point (its ridge prior, see `fold`): the least-squares repair, which targets the unpruned network's output, would
    give a removed channel's weight to the kept ones that predict it anyway. Feature maps are sampled (256 images,
    16 positions each); a group no dense layer reads falls back to `l2`.
    """
    from scipy.cluster.hierarchy import linkage

    name = signal_consumer(group, modules)
    if signals is None or name not in signals.features or group.channels < 2:
        return rank_l2(modules, group, stats, signals, seed)
    consumer = next(c for c in group.consumers if c.module == name)
    x = signals.rows("features", name, consumer.coords).astype(np.float64)
    z = linkage(x, method="average", metric="euclidean")
    order = split_order(z, np.sqrt(np.square(x).sum(1)))
    return ClusterRanking(order=order, linkage=z)


def merges(graph: Graph, rankings: dict[str, Ranking], kept: dict[str, tuple[int, ...]]) -> dict[str, list[list[int]]]:
    """Per clustered group, [removed, kept] pairs: each removed channel with the kept one nearest in the dendrogram
    (for a prefix of the order: its cluster's representative)."""
    out = {}
    for g in graph.groups:
        r = rankings.get(g.name)
        if not isinstance(r, ClusterRanking) or g.name not in kept or len(kept[g.name]) == g.channels:
            continue
        keep = np.asarray(kept[g.name])
        d = r.cophenetic()[:, keep]
        rank_of = {ch: i for i, ch in enumerate(r.order)}
        pairs = []
        for ch in sorted(set(range(g.channels)) - set(kept[g.name])):
            near = np.flatnonzero(d[ch] == d[ch].min())
            pairs.append([ch, int(min(keep[near], key=lambda k: rank_of[int(k)]))])
        out[g.name] = pairs
    return out


def with_merges(plan: Any, graph: Graph, rankings: dict[str, Ranking]) -> Any:
    """`plan` with its merges in `meta["merge"]` (a `similarity` plan), as `prune --plan` replays them."""
    found = merges(graph, rankings, plan.kept)
    return dataclasses.replace(plan, meta={**plan.meta, "merge": found}) if found else plan


# ---------------------------------------------------------------- functionality


def rank_functionality(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
                       signals: Signals | None, seed: int = 0) -> Ranking:
    """Functionality-oriented pruning: a channel's function is its class-wise activation pattern (its mean
    activation on each class's calibration samples, as the next layer reads it). A channel whose pattern varies
    across classes (between-class standard deviation) does something for the decision; a constant one does not.
    Channels are picked greedily by that strength discounted by their pattern's largest correlation with a channel
    already picked, so repeated functions go last.

    Departures: the paper tells functions apart by visualising filters and their class-wise activations and fine-tunes
    after pruning; here the pattern vector is the function and correlation between patterns the repetition, without
    visualisation or training. A group no dense layer reads falls back to `l2`.
    """
    name = signal_consumer(group, modules)
    if signals is None or signals.labels is None or name not in signals.means:
        return rank_l2(modules, group, stats, signals, seed)
    consumer = next(c for c in group.consumers if c.module == name)
    act = signals.rows("means", name, consumer.coords)  # (channels, samples)
    labels = signals.labels[: act.shape[1]]
    pattern = np.stack([act[:, labels == k].mean(1) for k in np.unique(labels)], axis=1)
    return Ranking(order=functionality_order(pattern))


def functionality_order(pattern: np.ndarray) -> tuple[int, ...]:
    """Greedy order of channels by class-wise pattern (channels, classes): strength times (1 - redundancy)."""
    strength = pattern.std(1)
    centred = pattern - pattern.mean(1, keepdims=True)
    unit = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    corr = unit @ unit.T
    redundancy = np.zeros(len(pattern))
    left = list(range(len(pattern)))
    order = []
    while left:
        value = strength[left] * (1.0 - redundancy[left])
        # ties (a function repeated exactly, or no function at all): the stronger first
        pick = left[int(np.lexsort((np.asarray(left), -strength[left], -value))[0])]
        order.append(pick)
        left.remove(pick)
        redundancy = np.maximum(redundancy, np.clip(corr[pick], 0.0, 1.0))
    return tuple(order)


# ---------------------------------------------------------------- NAP


def rank_nap(modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats], signals: Signals | None,
             seed: int = 0) -> Ranking:
    """NAP: each channel's K-FAC loss increase summed over its consumers (`kfac.obs_scores`), most important first;
    `loss[k]` is the summed increase of the channels after the first k, in the loss's units, the same scale in every
    group (what `--allocation nap` thresholds). See `kfac.py` for the departures from the paper."""
    score = np.zeros(group.channels)
    used = False
    for c in group.consumers:
        if c.compensable and c.module in stats and signals is not None and c.module in signals.grads:
            score += obs_scores(consumer_weight(modules[c.module]), stats[c.module].cov, signals.grads[c.module],
                                c.coords)
            used = True
    if not used:
        return rank_l2(modules, group, stats, signals, seed)
    order = descending(score)
    tail = np.concatenate([np.cumsum(score[list(order)][::-1])[::-1], [0.0]])
    return Ranking(order=order, loss=tuple(float(v) for v in tail))
