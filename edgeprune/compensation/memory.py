"""The memory a job's statistics need, estimated before they are collected and checked against what this machine has.

    need = statistics_need(model, graph, batch_size=32)   # StatisticsNeed: bytes, per consumer, the largest
    check_statistics_memory(model, graph, batch_size=32)  # exit 2 naming the need and the flags that lower it

A consumer with a D-dimensional unfolded input keeps a D x D float64 covariance for the whole job (the search's
proxy and every candidate's compensation read it) and, once the search asks for its wide prefixes, a Cholesky factor
of the same size (`solve.PrefixSolver`); while the calibration pass runs it holds a float32 running sum (and a
float64 one after `_Accumulator.FLUSH` batches), and each batch's unfolded patches. The need grows with D², not with
the calibration sample: deeplabv3_resnet50's three atrous ASPP convs read 2048 channels through 3x3 kernels, D =
18432, 2.5 GiB per covariance, and its build grew to 24 GB before the kernel killed it. No sample size lowers that;
leaving the group that feeds such a layer whole (`--ignore`), or pruning without statistics, does. The sequential
repair's activations, which do grow with the sample, are bounded where they are made (`repair._within_memory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from edgeprune.compensation.statistics import MAX_POSITIONS, _Accumulator, block_of
from edgeprune.dependency.graph import Graph
from edgeprune.errors import EdgePruneError

# Of the memory available when the job starts, the share the statistics may plan to take: the model, its copies,
# the calibration data and the activations of a pass need the rest.
MEMORY_SHARE = 0.5
GiB = 2**30


@dataclass(frozen=True)
class StatisticsNeed:
    """Bytes the statistics of `dims` (consumer -> unfolded input dimension) take at their peak."""

    dims: dict[str, int]
    batch_size: int
    batches: int

    def of(self, dims: dict[str, int]) -> int:
        if not dims:
            return 0
        kept = 8 + 8 + (8 if self.batches > _Accumulator.FLUSH else 0)  # covariance, factor, float64 running sum
        square = sum(d * d for d in dims.values())
        largest = max(dims.values())
        # finishing and shrinking one covariance makes two more of its size for a moment (`shrink_towards_diagonal`)
        patches = self.batch_size * MAX_POSITIONS * sum(dims.values()) * 4  # one batch's patches of every consumer
        return kept * square + 16 * largest * largest + patches

    @property
    def bytes(self) -> int:
        return self.of(self.dims)


def consumer_dims(model: nn.Module, graph: Graph) -> dict[str, int]:
    """The unfolded input dimension of every consumer whose statistics a job collects (`Graph.consumer_modules`)."""
    modules = dict(model.named_modules())
    out = {}
    for name in graph.consumer_modules():
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            out[name] = m.in_channels // m.groups * block_of(m)
        elif isinstance(m, nn.Linear):
            out[name] = m.in_features
    return out


def statistics_need(model: nn.Module, graph: Graph, batch_size: int, samples: int = 0) -> StatisticsNeed:
    return StatisticsNeed(consumer_dims(model, graph), batch_size, math.ceil(samples / max(batch_size, 1)))


def check_statistics_memory(model: nn.Module, graph: Graph, batch_size: int, samples: int = 0,
                            available: int | None = None) -> StatisticsNeed:
    """Refuse (exit 2), before any is allocated, statistics that need more than `MEMORY_SHARE` of the `available`
    memory (default: what this machine has now, `data.available_memory`); the message names the need, the layers
    that make it, and the `--ignore` patterns (groups left whole) that bring it within bounds."""
    from edgeprune.inputs.data import available_memory

    need = statistics_need(model, graph, batch_size, samples)
    free = available if available is not None else available_memory()
    if free is None or need.bytes <= MEMORY_SHARE * free:
        return need
    allowed = MEMORY_SHARE * free
    ignore, dims = _groups_to_leave_whole(graph, need, allowed)
    largest = sorted(need.dims.items(), key=lambda kv: -kv[1])[:3]
    layers = ", ".join(f"{n} ({d}-dimensional input, {8 * d * d / GiB:.1f} GiB per matrix)" for n, d in largest)
    fix = (f"leave the groups that feed them whole with {' '.join(f'--ignore {g}' for g in ignore)} (then about "
           f"{need.of(dims) / GiB:.1f} GiB), or prune" if ignore else "prune")
    raise EdgePruneError(f"the statistics of {len(need.dims)} layers need about {need.bytes / GiB:.1f} GiB "
                         f"(covariances and their factors; largest: {layers}), more than the {allowed / GiB:.1f} GiB a "
                         f"job may plan for here ({MEMORY_SHARE:.0%} of {free / GiB:.1f} GiB available); {fix} "
                         f"without statistics (--criterion l1 --no-compensation), or run on a machine with more memory")


def _groups_to_leave_whole(graph: Graph, need: StatisticsNeed, allowed: float) -> tuple[list[str], dict[str, int]]:
    """The fewest groups (the one feeding the largest consumer first) whose exclusion brings the need within
    `allowed`, and the dims left; an empty list when even all of them would not."""
    groups = list(graph.groups)
    left = dict(need.dims)
    chosen: list[str] = []
    while need.of(left) > allowed and left:
        widest = max(left, key=lambda n: left[n])
        feeding = [g for g in groups if any(c.module == widest for c in g.consumers)]
        if not feeding:
            return [], need.dims
        chosen += [g.name for g in feeding]
        groups = [g for g in groups if g not in feeding]
        read = {c.module for g in groups for c in g.consumers if c.compensable}
        left = {n: d for n, d in left.items() if n in read}
    return (chosen, left) if groups else ([], need.dims)  # leaving every group whole prunes nothing
