"""The inner and outer levels by name: `ALLOCATIONS` (a strength u -> widths) and `SEARCHES` (the search against the
budget), and the proxies an allocation may weigh by.

    widths_for = make_widths_fn("latency", AllocationInputs(graph, rankings, 8, error=proxy_error, cost=cost))
    result = SEARCHES["strength"](task)      # task: a SearchTask, what the build gives every search

To add one, write its factory (`AllocationInputs -> widths function`) or its search (`SearchTask -> SearchResult`)
and give it a row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgeprune.errors import EdgePruneError
from edgeprune.search.allocate import (
    AllocationInputs,
    WidthsFn,
    latency_allocation,
    separable_latency_allocation,
    step_allocation,
    widths_digest,
)
from edgeprune.search.evolution import Space, evolution_search
from edgeprune.search.itpruner import itpruner_allocation
from edgeprune.search.method_widths import epruner_allocation, nap_allocation
from edgeprune.search.strength import Band, Candidate, Probe, SearchResult, search

PROXIES = ("loss", "fidelity")  # the CaP loss curves, or the masked network's output error (`session.fidelity_error`)
ALLOCATIONS: dict[str, Callable[[AllocationInputs], WidthsFn]] = {
    "step": step_allocation,
    "latency": separable_latency_allocation,  # error + λ·latency, the error separable over groups
    "latency-joint": latency_allocation,  # the same, each group judged with the earlier ones pruned
    "epruner": epruner_allocation,  # a criterion's own width rule: needs that criterion's rankings
    "nap": nap_allocation,
    "itpruner": itpruner_allocation,  # the job's feature maps
}
METHOD_ALLOCATIONS = ("epruner", "nap")  # allocations that are a criterion's own rule (--criterion must match)
NEEDS_COST = ("latency", "latency-joint", "itpruner")  # allocations that read a latency model of widths


def make_widths_fn(allocation: str, inputs: AllocationInputs) -> WidthsFn:
    """The widths function of allocation `allocation` (u = 0 the unpruned widths, u = 1 every group at its minimum)."""
    if allocation not in ALLOCATIONS:
        raise EdgePruneError(f"allocation must be {' or '.join(ALLOCATIONS)}, found {allocation!r}")
    return ALLOCATIONS[allocation](inputs)


@dataclass(frozen=True)
class SearchTask:
    """What the build gives every search: the inner level (widths by strength, each group's admissible widths, the
    proxy error), the latency oracle and its second opinion, the budget's band, the measurements allowed, the unpruned
    model's figure and widths, and the session's side of the evolution (made only when asked: its proxy and its MACs
    latency model)."""

    widths_for: WidthsFn
    options: dict[str, list[int]]
    error_of: Callable[[dict[str, int]], float] | None
    oracle: Callable[[dict[str, int]], Probe]
    remeasure: Callable[[dict[str, int]], Probe] | None
    band: Band
    max_steps: int
    base: Probe  # the unpruned model's figure (source "lut": the table's prediction)
    full: dict[str, int]  # the unpruned model's widths
    space: Callable[[], Space]
    on_step: Callable[[Candidate], None] | None = None
    predict: Callable[[dict[str, int]], float] | None = None  # a latency model of widths that aims the steps


def run_strength(task: SearchTask) -> SearchResult:
    """`strength`: u searched against the oracle; the unpruned model's figure is the u = 0 bracket (no second
    measurement), but a table's."""
    known = ({widths_digest(task.full): Probe(task.base.latency_ms, "baseline", task.base.spread)}
             if task.base.source != "lut" else None)
    return search(task.widths_for, task.oracle, task.band, max_steps=task.max_steps, on_step=task.on_step, known=known,
                  remeasure=task.remeasure, error_of=task.error_of, options=task.options.__getitem__,
                  predict=task.predict)


def run_evolution(task: SearchTask) -> SearchResult:
    """`evolution`: MetaPruning's evolution under the latency model, its finalists measured."""
    return evolution_search(task.space(), task.band, task.oracle, task.base, task.max_steps, task.on_step)


SEARCHES: dict[str, Callable[[SearchTask], SearchResult]] = {"strength": run_strength, "evolution": run_evolution}
