"""The `evolution` search (MetaPruning, Liu et al., arXiv:1903.10258): an evolutionary search over per-group width
vectors under a hard latency constraint, in place of the strength search (`search/strength.py`).

    evo = evolve(options, error, latency, bound=2.0, settings=EvolutionSettings(), seed=0)
    evo.top[0].widths          # the lowest proxy error found within the bound
    result = evolution_search(space, band, oracle, base, max_steps=12)   # a strength.SearchResult

MetaPruning trains a PruningNet that generates weights for any width vector, then runs an evolution over width
vectors (a random initial population within the constraint; each generation the top-k of everything seen so far
breeds half a population by crossover and half by mutation, children outside the constraint are rejected) and scores
each by the accuracy of its generated weights. Here:
  - the weights of a width vector are the compensated CaP weights (closed-form repair of the next layer, the plan's
    channel order), so there is no PruningNet and no training; without compensation, the criterion's slice;
  - the score is the fidelity proxy (`session.fidelity_error`: output error of the masked network on calibration
    samples), lower is better, in place of validation accuracy;
  - the constraint is latency from the latency table with `--lut` (its prediction, in ms), else the MACs latency
    model of the `latency` allocation (`latency/cost.py`) scaled to the measured unpruned latency;
  - only the final candidates (`finalists`, the top of the last generation's top-k) are measured on the target. MACs
    are no latency, so when no finalist measures within the budget's band, the constraint is corrected by the ratio
    of measured to predicted latency and the evolution runs again (at most `rounds`, within `--max-steps`); then the
    build verifies the release as after any search;
  - the initial population is drawn uniformly over each group's allowed widths and then narrowed one random step at
    a time until it meets the constraint (uniform draws alone almost never meet a tight one, 0.3x); children that do
    not meet it, or that were seen before, are rejected as in the paper's code (its `is_legal`), `max_tries` draws
    per child;
  - smaller defaults than the paper's (population 50, 20 generations, top-k 10; here 16, 6 and 6): each score is a masked forward
    pass, not an inference of a generated network.
Everything is drawn from one `numpy` generator seeded by the job's seed: a seed gives the same search.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeprune.common.parallel import timed
from edgeprune.dependency.graph import Graph
from edgeprune.plan import width_step
from edgeprune.search.allocate import allowed_widths, min_widths, widths_digest
from edgeprune.search.strength import Band, Candidate, Probe, SearchResult, pick_best

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvolutionSettings:
    population: int = 16
    generations: int = 6
    topk: int = 6
    mutation_prob: float = 0.1
    max_tries: int = 50  # draws per child before giving up on it
    finalists: int = 3  # candidates of each round measured on the target
    rounds: int = 3  # evolutions at a corrected constraint, when no finalist measures within the band


DEFAULT_SETTINGS = EvolutionSettings()


@dataclass(frozen=True)
class Space:
    """What the build's prepared session gives the evolution: the groups (and the channel multiple their widths keep),
    the fidelity proxy by widths, the latency model relative to the unpruned model (None with `--lut`: the table's
    oracle serves), the job's seed and its stage timings."""

    graph: Graph
    channel_multiple: int
    error: Callable[[dict[str, int]], float]
    cost: Callable[[dict[str, int]], float] | None
    seed: int
    timings: dict[str, float]


@dataclass(frozen=True)
class Individual:
    widths: dict[str, int]
    error: float
    latency: float  # the constraint's latency model (ms, or any unit `bound` is in)
    generation: int  # 0: the initial population


@dataclass(frozen=True)
class Evolution:
    initial: tuple[Individual, ...]
    evaluated: tuple[Individual, ...]  # every distinct width vector scored, in order
    top: tuple[Individual, ...]  # the final top-k, lowest error first


def evolve(options: dict[str, list[int]], error: Callable[[dict[str, int]], float],
           latency: Callable[[dict[str, int]], float], bound: float, settings: EvolutionSettings = EvolutionSettings(),
           seed: int = 0) -> Evolution:
    """MetaPruning's evolution over width vectors (`options`: each group's allowed widths, ascending), minimising
    `error` subject to latency(widths) <= bound."""
    rng = np.random.default_rng(seed)
    names = list(options)
    seen: dict[str, Individual] = {}
    order: list[Individual] = []

    def widths_of(genes: list[int]) -> dict[str, int]:
        return {n: options[n][i] for n, i in zip(names, genes)}

    def score(genes: list[int], generation: int) -> Individual:
        w = widths_of(genes)
        key = widths_digest(w)
        if key not in seen:
            seen[key] = Individual(w, float(error(w)), float(latency(w)), generation)
            order.append(seen[key])
        return seen[key]

    def initial() -> list[int]:
        genes = [int(rng.integers(len(options[n]))) for n in names]
        while latency(widths_of(genes)) > bound:
            above = [j for j, i in enumerate(genes) if i > 0]
            if not above:
                break
            genes[above[int(rng.integers(len(above)))]] -= 1
        return genes

    pop = [score(initial(), 0) for _ in range(settings.population)]
    first = tuple({widths_digest(p.widths): p for p in pop}.values())  # distinct, in order
    top = _top(pop, settings.topk, bound)
    for gen in range(1, settings.generations + 1 if top else 1):  # none within the bound: nothing to breed
        children: list[Individual] = []
        for make in (_crossover, _mutation):
            for _ in range(settings.population // 2):
                for _ in range(settings.max_tries):
                    genes = make(rng, [_genes(t.widths, options) for t in top], options, names, settings)
                    w = widths_of(genes)
                    if widths_digest(w) not in seen and latency(w) <= bound:
                        children.append(score(genes, gen))
                        break
        top = _top(top + children, settings.topk, bound)
        log.info("evolution generation %d: best proxy error %.5f", gen, top[0].error if top else float("nan"))
    return Evolution(first, tuple(order), tuple(top))


def _genes(widths: dict[str, int], options: dict[str, list[int]]) -> list[int]:
    return [options[n].index(w) for n, w in widths.items()]


def _top(pop: list[Individual], k: int, bound: float) -> list[Individual]:
    """The k distinct individuals within the bound with the lowest error (ties: the wider, by latency)."""
    distinct = {widths_digest(p.widths): p for p in pop if p.latency <= bound}
    return sorted(distinct.values(), key=lambda p: (p.error, -p.latency, widths_digest(p.widths)))[:k]


def _crossover(rng: np.random.Generator, parents: list[list[int]], options: dict[str, list[int]], names: list[str],
               settings: EvolutionSettings) -> list[int]:
    a, b = (parents[int(i)] for i in rng.integers(len(parents), size=2))
    return [x if rng.random() < 0.5 else y for x, y in zip(a, b)]


def _mutation(rng: np.random.Generator, parents: list[list[int]], options: dict[str, list[int]], names: list[str],
              settings: EvolutionSettings) -> list[int]:
    parent = parents[int(rng.integers(len(parents)))]
    return [int(rng.integers(len(options[n]))) if rng.random() < settings.mutation_prob else i
            for n, i in zip(names, parent)]


def evolution_search(space: Space, band: Band, oracle: Callable[[dict[str, int]], Probe], base: Probe,
                     max_steps: int, on_step: Callable[[Candidate], None] | None = None,
                     settings: EvolutionSettings | None = None) -> SearchResult:
    """The build's search with `--search evolution`: evolve under the latency model, measure the finalists with the
    oracle (the target, or the table with `--lut`), correct the constraint and evolve again while none lands in the
    band (see the module). `base` is the unpruned model's figure (source "lut": the table's)."""
    settings = settings or DEFAULT_SETTINGS
    timings, error, cost = space.timings, space.error, space.cost
    lows = min_widths(space.graph, space.channel_multiple)
    options = {g.name: allowed_widths(g.channels, width_step(g, space.channel_multiple), lows[g.name])
               for g in space.graph.groups}
    if cost is None:
        def latency(w: dict[str, int]) -> float:
            return oracle(w).latency_ms
    else:
        def latency(w: dict[str, int]) -> float:
            return cost(w) * base.latency_ms
    # aim at the middle of the band under the noise-margined ceiling, as the strength search does: a finalist at the
    # budget itself is infeasible once its spread is counted (the baseline's spread stands in for the candidates')
    aim = band.ceiling(base.spread if base.source != "lut" else 0.0) * (1 - band.tolerance / 2)
    bound = aim
    trace: list[Candidate] = []
    measured: dict[str, Candidate] = {}
    for r in range(settings.rounds):
        with timed(timings, "evolution"):
            evo = evolve(options, error, latency, bound, settings, seed=space.seed + r)
        fresh = [t for t in evo.top if widths_digest(t.widths) not in measured][:settings.finalists]
        if not evo.top and not trace:  # the bound is out of the latency model's reach: the minimum widths
            fresh = [Individual(dict(lows), error(lows), latency(lows), 0)]
        if not fresh or len(measured) + len(fresh) > max_steps:
            break
        for ind in fresh:
            p = oracle(ind.widths)
            c = Candidate(step=len(trace) + 1, strength=round(1 - ind.latency / base.latency_ms, 6),
                          widths_digest=widths_digest(ind.widths), latency_ms=p.latency_ms, source=p.source,
                          widths=ind.widths, spread=p.spread, error=ind.error)
            trace.append(c)
            measured[c.widths_digest] = c
            if on_step is not None:
                on_step(c)
        if any(band.in_band(c) for c in trace):
            break
        best = min(trace[-len(fresh):], key=lambda c: c.error if c.error is not None else 0.0)
        # aim the constraint so that the best finalist's latency model would have read its measured figure
        bound = aim * latency(best.widths) / max(best.latency_ms, 1e-9)
    fastest = min(trace, key=lambda c: c.latency_ms)
    return SearchResult(best=pick_best([c for c in trace if band.feasible(c)]), fastest=fastest, trace=tuple(trace),
                        budget_ms=band.budget_ms, converged=any(band.in_band(c) for c in trace))
