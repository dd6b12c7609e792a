"""A model run node by node (torch.fx) on fixed inputs that resumes at the first layer whose weights changed.

    replay = Replay(model, x, starts=consumer_names)
    y = replay.run(changed=set())            # the whole network, its checkpoints kept
    y = replay.run(changed={"blocks.5.0.conv_pwl"})   # resumes at the last checkpoint before that layer

The fidelity proxy (`fidelity.MaskedProxy`) evaluates hundreds of candidates on the same samples, and the inner
level of the search (`allocate.latency_aware_widths`) varies one group at a time in forward order: every layer before
that group's first consumer computes what it computed for the last candidate. Those activations are kept at
checkpoints (the live values before a consumer's node), so a candidate costs the forward pass from its first changed
layer on. No A/B of this alone was measured: on EfficientNet-Lite0 at 224x224 (quiet machine) the proxy took 107 s of
a 220 s build, against 392 of 444 s in issue 28's build before this and the other changes of that issue.

Checkpoints are chosen by size under `CHECKPOINT_BYTES` (the smallest frontiers first: block boundaries of a residual
network hold one tensor, the middle of an inverted residual two). Saved values are cloned on the way in and out,
since in-place activations would otherwise change them. Models torch.fx cannot trace run whole every time (the same
figures, the old cost). No library does this: torch.fx interprets graphs but keeps no values between runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edgeprune.errors import first_line
from edgeprune.surgery.repair import _run, fx_graph

log = logging.getLogger(__name__)

CHECKPOINT_BYTES = 768 * 2**20  # activations kept between evaluations


class Replay:
    """`model` on `x`, resumable at the nodes of the modules in `starts` (the only layers whose weights change)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, starts: Iterable[str],
                 budget_bytes: int = CHECKPOINT_BYTES) -> None:
        self.model, self.x, self.budget = model, x, budget_bytes
        self.saved: dict[int, dict[Any, torch.Tensor]] = {}
        self.nodes: list[Any] | None = None
        try:
            graph = fx_graph(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure: whole forward passes, the same figures
            log.info("fidelity proxy without checkpoints (torch.fx: %s)", first_line(e, 160))
            return
        self.nodes = list(graph.nodes)
        self.last_use = {n: i for i, node in enumerate(self.nodes) for n in node.all_input_nodes}
        self.first: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.op == "call_module":
                self.first.setdefault(str(node.target), i)
        candidates = {self.first[s] for s in starts if s in self.first}
        self.chosen = self._choose(self._frontier_bytes(candidates))

    def run(self, changed: set[str] | None = None) -> Any:
        """The model's output with its current weights; `changed`: the modules whose weights differ from the last
        run (None, or any module not met as a node of the trace, makes the run start from the input)."""
        if self.nodes is None:
            with torch.no_grad():
                return self.model(self.x)
        k = 0 if changed is None else min((self.first.get(name, 0) for name in changed), default=len(self.nodes))
        start = max((i for i in self.saved if i <= k), default=0)
        env = {n: v.clone() for n, v in self.saved[start].items()} if start else {}
        return self._interpret(start, env, self.x, self.chosen)

    def _interpret(self, start: int, env: dict, x: torch.Tensor, keep: set[int],
                   sizes: dict[int, int] | None = None) -> Any:
        """Nodes from `start` on; the live values before each node in `keep` saved (or, with `sizes`, only sized)."""
        from torch.fx.node import map_arg

        assert self.nodes is not None
        with torch.no_grad():
            for i in range(start, len(self.nodes)):
                if i in keep:
                    live = [v for v in env.values() if isinstance(v, torch.Tensor)]
                    if sizes is not None:
                        sizes[i] = sum(v.numel() * v.element_size() for v in live) if len(live) == len(env) else -1
                    else:
                        self.saved[i] = {n: v.clone() for n, v in env.items()}
                node = self.nodes[i]
                if node.op == "output":
                    return map_arg(node.args[0], lambda n: env[n])
                env[node] = _run(self.model, node, env, x)
                for n in node.all_input_nodes:  # free what no later node reads
                    if self.last_use.get(n) == i:
                        env.pop(n, None)
        return None

    def _frontier_bytes(self, candidates: set[int]) -> dict[int, int]:
        """Bytes of the values live before each candidate node, for all of `x` (measured on its first sample; -1
        where a live value is not a tensor)."""
        sizes: dict[int, int] = {}
        self._interpret(0, {}, self.x[:1], candidates, sizes)
        return {i: s * len(self.x) if s >= 0 else -1 for i, s in sizes.items()}

    def _choose(self, sizes: dict[int, int]) -> set[int]:
        """The checkpoints with the smallest frontiers that fit in the budget together."""
        chosen, total = set(), 0
        for i in sorted((i for i in sizes if sizes[i] >= 0), key=lambda j: (sizes[j], j)):
            if total + sizes[i] > self.budget:
                break
            chosen.add(i)
            total += sizes[i]
        log.debug("fidelity proxy: %d checkpoints of %d, %.0f MB", len(chosen), len(sizes), total / 2**20)
        return chosen
