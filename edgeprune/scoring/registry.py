"""The criteria by name: one registry (`CRITERIA`), the statistics pass each needs, and `rank_all`.

    signals = criterion_signals("similarity", model, graph, data)    # None for the criteria that read no activations
    rankings = rank_all("similarity", model, graph.groups, stats, signals)

A criterion ranks one group's channels, most important first: `rank(modules, group, stats, signals, seed) ->
Ranking`. To add one, write that function and give it a row here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from edgeprune.common.parallel import thread_map
from edgeprune.compensation.statistics import LayerStats
from edgeprune.dependency.graph import Graph, Group
from edgeprune.dependency.shares import piece_sequence
from edgeprune.errors import EdgePruneError
from edgeprune.scoring.base import Ranking, rank_datafree, rank_fpgm, rank_l1, rank_l2, rank_random
from edgeprune.scoring.cap import rank_cap
from edgeprune.scoring.kfac import output_factors
from edgeprune.scoring.papers import rank_epruner, rank_functionality, rank_nap, rank_similarity
from edgeprune.scoring.signals import Signals, collect_signals

if TYPE_CHECKING:
    from edgeprune.inputs.data import CalibrationData


@dataclass(frozen=True)
class Criterion:
    """A ranking function and what it reads besides the weights."""

    rank: Callable[..., Ranking]  # (modules, group, stats, signals, seed) -> Ranking
    signals: frozenset[str] = frozenset()  # the statistics pass it needs (`signals.collect_signals`)
    stats: bool = False  # the consumers' input statistics, collected even without compensation
    units: bool = True  # a grouped conv's group ranked in whole units (`rank_units`); the papers' rank channels


CRITERIA: dict[str, Criterion] = {
    "cap": Criterion(rank_cap, stats=True),
    "l1": Criterion(rank_l1),
    "l2": Criterion(rank_l2),
    "fpgm": Criterion(rank_fpgm),
    "random": Criterion(rank_random),
    "datafree": Criterion(rank_datafree),  # random calibration data's default (`PruneConfig.for_data`)
    "epruner": Criterion(rank_epruner, units=False),
    "similarity": Criterion(rank_similarity, frozenset({"features"}), units=False),
    "functionality": Criterion(rank_functionality, frozenset({"means", "labels"}), units=False),
    "nap": Criterion(rank_nap, frozenset({"grads", "labels"}), stats=True, units=False),
}
NEEDS_STATS = tuple(name for name, c in CRITERIA.items() if c.stats)
NEEDS_LABELS = tuple(name for name, c in CRITERIA.items() if "labels" in c.signals)


def criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise EdgePruneError(f"unknown criterion {name!r}; available: {', '.join(CRITERIA)}")
    return CRITERIA[name]


def check_labels(name: str, labelled: bool, pseudo_labels: bool, recipe: str) -> None:
    """Refuse, before any work, a criterion that needs labels on unlabelled data without --pseudo-labels."""
    if name in NEEDS_LABELS and not labelled and not pseudo_labels:
        raise EdgePruneError(f"criterion {name} needs labelled calibration data, and recipe {recipe} has no "
                             f"labels; use a labelled recipe, or --pseudo-labels to take the unpruned model's "
                             f"predictions as labels")


def criterion_signals(name: str, model: nn.Module, graph: Graph, data: CalibrationData, seed: int = 0,
                      pseudo_labels: bool = False) -> Signals | None:
    """The statistics pass criterion `name` needs over the calibration part of `data`, or None."""
    needs = CRITERIA[name].signals if name in CRITERIA else frozenset()
    if not needs:
        return None
    y = data.calib_y
    bs = data.recipe.batch_size
    batches = [(x, None if y is None else y[i * bs: i * bs + len(x)]) for i, x in enumerate(data.calib_batches())]
    return collect_signals(model, graph, batches, needs, seed, pseudo_labels, kfac=output_factors)


def rank(name: str, model: nn.Module, group: Group, stats: dict[str, LayerStats], seed: int = 0,
         block: int | None = None, signals: Signals | None = None) -> Ranking:
    """One group's ranking by criterion `name` (`block`: CaP's channels per step, see `cap.rank_cap`)."""
    return _rank(criterion(name), dict(model.named_modules()), group, stats, signals, seed, block)


def _rank(entry: Criterion, modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
          signals: Signals | None, seed: int, block: int | None = None) -> Ranking:
    fn = entry.rank if block is None else functools.partial(entry.rank, block=block)
    if group.pieces:
        return rank_pieces(fn, modules, group, stats, signals, seed, reads=entry.stats or bool(entry.signals))
    if entry.units and group.units:
        return rank_units(fn, modules, group, stats, signals, seed)
    return fn(modules, group, stats, signals, seed)


def rank_units(fn: Callable[..., Ranking], modules: dict[str, nn.Module], group: Group, stats: dict[str, LayerStats],
               signals: Signals | None, seed: int) -> Ranking:
    """A group pruned in units (dependency/groupconv.py), ranked as a group whose channels are its units: a unit's
    coordinates in each consumer are its channels' together, its filters its channels' (scores summed); the order
    comes back in channels, unit after unit, and the loss curve exact at whole units (interpolated between)."""
    unit_of = group.unit_of()
    consumers = tuple(dataclasses.replace(c, coords=tuple(tuple(sorted(x for ch in chans for x in c.coords[ch]))
                                                          for chans in group.units)) for c in group.consumers)
    made = group.produces or (tuple(range(group.channels)),) * len(group.producers)
    view = dataclasses.replace(group, channels=len(group.units), consumers=consumers, units=(),
                               produces=tuple(tuple(unit_of[ch] for ch in p) for p in made))
    r = fn(modules, view, stats, signals, seed)
    order = tuple(ch for u in r.order for ch in group.units[u])
    if r.loss is None:
        return Ranking(order=order)
    at = np.arange(len(r.loss)) * group.unit
    return Ranking(order=order, loss=tuple(float(v) for v in np.interp(np.arange(group.channels + 1), at, r.loss)))


def rank_pieces(fn: Callable[..., Ranking], modules: dict[str, nn.Module], group: Group,
                stats: dict[str, LayerStats], signals: Signals | None, seed: int, reads: bool) -> Ranking:
    """A group the splits along channels cut into pieces (dependency/splits.py), ranked so that every prefix of its
    order holds of each piece what `Group.piece_widths` shares out (at multiple 1: a plan aligned to a larger
    multiple keeps other counts, and its repair solves directly instead of by prefix): the order interleaves the
    pieces' own orders, and a plan's kept channels are a prefix (the compensation's prefix solver applies). A
    criterion that reads the consumers' inputs ranks each piece apart when a consumer reads the pieces unevenly
    (C2f's last conv reads one half twice, its bottleneck the other half only; timm's MixNet projects each piece by a
    conv of its own: CaP needs every channel of a consumer to fill as many coordinates), and the loss curve adds the
    pieces' curves at their shares; otherwise the whole group is ranked and its loss curve (of its own order) kept,
    an approximation."""
    sequence = piece_sequence(tuple(len(p) for p in group.pieces))
    uneven = reads and any(len({len(x) for x in c.coords}) > 1 for c in group.consumers if c.compensable)
    if not uneven:
        r = fn(modules, group, stats, signals, seed)
        piece_of = {ch: k for k, piece in enumerate(group.pieces) for ch in piece}
        orders: list[list[int]] = [[] for _ in group.pieces]
        for ch in r.order:  # each piece's channels in the whole group's order
            orders[piece_of[ch]].append(ch)
        return Ranking(order=_interleave(orders, sequence), loss=r.loss)
    orders, losses = [], []
    for piece in group.pieces:
        consumers = tuple(dataclasses.replace(c, coords=tuple(c.coords[ch] for ch in piece))
                          for c in group.consumers if any(c.coords[ch] for ch in piece))
        view = dataclasses.replace(group, channels=len(piece), consumers=consumers, producers=(), produces=(),
                                   pieces=(), resizes=(), units=(), parts=(), equal=False)
        r = fn(modules, view, stats, signals, seed)
        orders.append([piece[j] for j in r.order])
        losses.append(r.loss)
    order = _interleave(orders, sequence)
    if any(loss is None for loss in losses):
        return Ranking(order=order)
    counts = np.zeros((group.channels + 1, len(group.pieces)), dtype=np.int64)  # each piece's share at each width
    for w, k in enumerate(sequence):
        counts[w + 1] = counts[w]
        counts[w + 1, k] += 1
    return Ranking(order=order, loss=tuple(float(v) for v in sum(np.asarray(loss, dtype=np.float64)[counts[:, k]]
                                                                 for k, loss in enumerate(losses))))


def _interleave(orders: list[list[int]], sequence: tuple[int, ...]) -> tuple[int, ...]:
    """The next channel of the piece `sequence` names, in turn (equal pieces: the first of each, then the second of
    each, and so on)."""
    heads = [iter(o) for o in orders]
    return tuple(next(heads[k]) for k in sequence)


def rank_all(name: str, model: nn.Module, groups: list[Group], stats: dict[str, LayerStats],
             signals: Signals | None = None, seed: int = 0, workers: int = 1,
             tick: Callable[[int, int], None] | None = None) -> dict[str, Ranking]:
    """Every group's ranking, in `groups` order; `workers` > 1 ranks that many groups at once, in threads.

    Groups are independent, and a ranking is thousands of BLAS calls, which release the GIL: with BLAS on
    one thread per worker, two groups at once beat one group on two BLAS threads, whose per-call thread hand-offs cost
    about what the second core gives (resnet50: 10.4 s against 12-14.5 s, measured). The results do not depend on
    `workers`. The caller sets BLAS to one thread when it asks for more than one worker. `signals`: what
    `criterion_signals` collected for the criterion (None for those that read no activations).
    """
    entry = criterion(name)
    modules = dict(model.named_modules())

    def cost(g: Group) -> float:  # a CaP ranking costs about dim³ per consumer: the costliest first balances workers
        return -sum(float(stats[c.module].dim) ** 3 for c in g.consumers if c.module in stats)

    rankings = thread_map(lambda g: _rank(entry, modules, g, stats, signals, seed), groups, workers, key=cost,
                          tick=tick)
    return {g.name: r for g, r in zip(groups, rankings)}
