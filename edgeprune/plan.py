"""`Plan`: which channels of each group survive. Decide, then do: `prune --plan plan.json` reproduces a pruning exactly.

    plan = plan_from_rankings(graph, rankings, uniform_widths(graph, ratio=0.5, multiple=8))
    plan.save("plan.json"); assert Plan.load("plan.json") == plan
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.common.atomic import atomic_write_text
from edgeprune.dependency.graph import Graph, Group
from edgeprune.errors import EdgePruneError
from edgeprune.scoring.base import Ranking

PLAN_VERSION = 1
REPAIRS = ("independent", "sequential")  # how compensated consumers are fitted: prune.compensate_consumers, repair


@dataclass(frozen=True)
class Plan:
    """Group name -> kept channel indices (ascending), with what is needed to interpret and reproduce them."""

    kept: dict[str, tuple[int, ...]]
    channels: dict[str, int]  # original width of each group: a plan only applies to the model it was made for
    criterion: str = "cap"
    compensation: bool = True
    channel_multiple: int = 1
    model: str = ""
    target: str | None = None
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    repair: str = "independent"  # see REPAIRS; plans from before it existed were independent

    def __post_init__(self) -> None:
        if self.repair not in REPAIRS:
            raise EdgePruneError(f"plan repair {self.repair!r} unknown; allowed: {', '.join(REPAIRS)}")
        for g, idx in self.kept.items():
            c = self.channels.get(g)
            if c is None:
                raise EdgePruneError(f"plan keeps channels of group {g!r} but does not give its width")
            if not idx:
                raise EdgePruneError(f"plan keeps no channel of group {g!r}; a group needs at least one")
            if list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= c:
                raise EdgePruneError(f"plan indices of group {g!r} must be ascending, unique and below {c}")

    def widths(self) -> dict[str, int]:
        return {g: len(k) for g, k in self.kept.items()}

    def pruned(self, group: str) -> list[int]:
        keep = set(self.kept.get(group, range(self.channels[group])))
        return [i for i in range(self.channels[group]) if i not in keep]

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "model": self.model, "target": self.target, "criterion": self.criterion,
                "compensation": self.compensation, "repair": self.repair, "channel_multiple": self.channel_multiple,
                "seed": self.seed,
                "channels": dict(self.channels), "kept": {g: list(k) for g, k in self.kept.items()},
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        def ints(xs: Any, what: str) -> tuple[int, ...]:
            if not isinstance(xs, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in xs):
                raise EdgePruneError(f"malformed plan: {what} must be a list of integers, found {xs!r}"[:200])
            return tuple(xs)

        def typed(key: str, kind: type) -> Any:
            v = d[key]
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise EdgePruneError(f"malformed plan: '{key}' must be {kind.__name__}, found {v!r}")
            return v

        try:
            if d.get("version") != PLAN_VERSION:
                raise EdgePruneError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
            return cls(kept={g: ints(k, f"kept[{g!r}]") for g, k in d["kept"].items()},
                       channels={g: ints([c], f"channels[{g!r}]")[0] for g, c in d["channels"].items()},
                       criterion=typed("criterion", str), compensation=typed("compensation", bool),
                       repair=str(d.get("repair", "independent")),
                       channel_multiple=typed("channel_multiple", int), model=str(d.get("model", "")),
                       target=d.get("target"), seed=int(d.get("seed", 0)), meta=dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EdgePruneError(f"malformed plan: {type(e).__name__}: {e}") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise EdgePruneError(f"plan file {path} does not exist") from None
        except (ValueError, OSError) as e:
            raise EdgePruneError(f"plan file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def round_width(width: float, channels: int, multiple: int, min_width: int | None = None) -> int:
    """The allowed width nearest `width`: a multiple of `multiple` from `min_width` (default one multiple) up, or the
    original width itself (which need not be a multiple)."""
    lo = min(channels, min_width or multiple)
    options = sorted(set(list(range(lo, channels, multiple)) + [channels]))
    return min(options, key=lambda w: (abs(w - width), -w))


def width_step(group: Group, multiple: int) -> int:
    """The step a group's width moves by: `multiple` (the channel alignment), in whole units of a group pruned in
    units (the groups of a grouped conv, see dependency/groupconv.py), times the pieces splits along channels cut
    the group into (at the narrowest, each piece keeps one aligned step; equal pieces keep equal aligned shares at
    every step, see dependency/shares.py)."""
    return math.lcm(multiple, group.unit) * max(1, len(group.pieces))


def uniform_widths(graph: Graph, ratio: float, multiple: int = 1) -> dict[str, int]:
    """Remove `ratio` of each group's channels, rounded to `multiple` (and to whole units)."""
    if not 0.0 <= ratio < 1.0:
        raise EdgePruneError(f"--ratio is the fraction of channels removed and must be in [0, 1), found {ratio}")
    return {g.name: round_width(g.channels * (1 - ratio), g.channels, width_step(g, multiple)) for g in graph.groups}


def keep_first(group: Group, order: tuple[int, ...] | range, width: int, multiple: int = 1) -> tuple[int, ...]:
    """The first `width` channels of `order`, except that every branch of a concat keeps at least one: a branch
    left empty would leave its conv with no output channel (a crash at pruning). The branch's best channel then
    replaces the worst kept one whose branch keeps another. A group pruned in units keeps whole units, in the order
    their first channel comes, enough of them for `width`. A group cut into pieces by splits shares `width` over
    them (`keep_shares`, aligned to `multiple` where it can)."""
    if group.pieces and width < group.channels:
        return keep_shares(group, order, width, multiple)
    if group.units:
        unit_of = group.unit_of()
        units = list(dict.fromkeys(unit_of[c] for c in order))[: -(-width // group.unit)]
        return tuple(sorted(ch for u in units for ch in group.units[u]))
    kept = list(order[:width])
    for branch in group.branches:
        if set(branch) & set(kept):
            continue
        best = next(c for c in order if c in set(branch))
        counts = {b: len(set(b) & set(kept)) for b in group.branches}
        for i in range(len(kept) - 1, -1, -1):
            if all(counts[b] > 1 for b in group.branches if kept[i] in b):
                kept[i] = best
                break
        else:
            kept.append(best)  # fewer channels kept than branches: one more
    return tuple(sorted(kept))


def keep_shares(group: Group, order: tuple[int, ...] | range, width: int, multiple: int = 1) -> tuple[int, ...]:
    """The first channels of `order` within each piece the splits cut the group into, as many in each as
    `Group.piece_widths` shares `width` out (in proportion to the pieces' sizes, one at least; equal shares for a
    chunk's pieces): the same counts the latency model reads, whatever the ranking (dependency/shares.py)."""
    share = group.piece_widths(width, multiple)
    piece_of = {ch: k for k, piece in enumerate(group.pieces) for ch in piece}
    counts = [0] * len(group.pieces)
    kept = []
    for ch in order:
        if counts[piece_of[ch]] < share[piece_of[ch]]:
            counts[piece_of[ch]] += 1
            kept.append(ch)
    return tuple(sorted(kept))


def plan_from_rankings(graph: Graph, rankings: dict[str, Ranking], widths: dict[str, int], **kw: Any) -> Plan:
    """Keep the first `widths[g]` channels of each group's ranking (each concat branch keeping one at least, the
    pieces of a split sharing the width at `channel_multiple`)."""
    multiple = int(kw.get("channel_multiple", 1))
    kept = {g.name: keep_first(g, rankings[g.name].order, widths[g.name], multiple) for g in graph.groups}
    return Plan(kept=kept, channels={g.name: g.channels for g in graph.groups}, **kw)
