"""Latency of candidate widths, and the verification of the model to release.

    export_candidate(pruned, example, path, "torchscript")      # exported and simplified, as measured
    release, result = verify_release(result, budget_ms, verify_one, resume)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.plan import Plan

def export_candidate(model: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> Path:
    from edgeprune.export import export_onnx, simplify_onnx

    export_onnx(model, example, path, exporter=exporter)
    simplify_onnx(path)
    return path


@dataclass(frozen=True)
class Verified:
    """A candidate rebuilt as it would ship (direct solve), exported and measured over the verification's sessions."""

    candidate: Any
    stats: Any  # LatencyStats
    pruned: nn.Module
    plan: Plan
    path: Path

    def __iter__(self) -> Iterator[Any]:
        return iter((self.candidate, self.stats, self.pruned, self.plan, self.path))


FAR_UNDER = 0.9  # a release below this fraction of the budget wastes accuracy: the search resumes instead


def verify_release(result: Any, budget_ms: float, verify_one: Callable[[Any], Verified],
                   resume: Callable[[Any, dict[str, Any]], Any], max_resumes: int = 2) -> tuple[Verified, Any]:
    """The model to release: the search's best if its verification is within budget, else the nearest feasible
    candidate that verifies. When the next fallback would be far under budget (< FAR_UNDER) and the search has steps
    left, the search resumes with the verified figures in place of its own (`resume` returns None when it cannot),
    instead of releasing a model much more pruned than the budget needs. Returns the release and the (possibly
    extended) search result."""
    tried: dict[str, Verified] = {}

    def order(res: Any) -> list[Any]:
        first = [res.best] if res.best is not None else []
        rest = sorted((c for c in res.trace if c.latency_ms <= budget_ms and c not in first), key=lambda c: -c.latency_ms)
        return [c for c in first + rest if c.widths_digest not in tried] or ([] if tried else [res.fastest])

    for _ in range(max_resumes + 1):
        todo = order(result)
        for i, cand in enumerate(todo):
            v = tried[cand.widths_digest] = verify_one(cand)
            if v.stats.median <= budget_ms:
                return v, result
            nxt = todo[i + 1] if i + 1 < len(todo) else None
            if nxt is None or nxt.latency_ms < FAR_UNDER * budget_ms:
                break
        more = resume(result, {d: v.stats for d, v in tried.items()})
        if more is None:
            break
        result = more
    for cand in order(result)[:max(0, 3 - len(tried))]:  # no steps left: the nearest feasible ones, as before
        v = tried[cand.widths_digest] = verify_one(cand)
        if v.stats.median <= budget_ms:
            return v, result
    return min(tried.values(), key=lambda v: v.stats.median), result
