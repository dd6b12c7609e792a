"""The channel groups `graph.trace` finds: `Group` (channels pruned together: producers, members, consumers) and
`Consumer` (a layer reading a group's channels, with the coordinates each occupies in its unfolded input).

Kept apart from `graph.py` so that the modules that make groups of their own kind (`heads.py`) need not import the
tracing; `graph.py` re-exports both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeprune.dependency.shares import piece_widths


@dataclass(frozen=True)
class Consumer:
    """A layer reading a group's channels, with the coordinates each channel occupies in its unfolded input.

    For a conv, the unfolded input is channel-major (C, kh, kw), so channel c occupies coordinates
    c*kh*kw .. (c+1)*kh*kw - 1 (CAP.md §1). For a linear after a flatten, a channel occupies its H*W features.
    """

    module: str
    coords: tuple[tuple[int, ...], ...]  # per group channel (in group order): coordinates in the unfolded input
    compensable: bool  # dense conv or linear: closed-form compensation applies
    bn_follows: bool  # a BatchNorm reads its output: rescale rows to keep BN's statistics valid (CAP.md §3)


@dataclass(frozen=True)
class Resize:
    """A list of sizes a module splits with (`SplitCall.attribute`: timm's `MixedConv2d.splits`) and the entries of it
    one group owns: each as (the split's piece index, the group's pieces it is made of). The split's other pieces
    belong to other groups, which rewrite their own entries."""

    owner: str
    attribute: str
    entries: tuple[tuple[int, tuple[int, ...]], ...]

    def sizes(self, old: list[int] | tuple[int, ...], kept: tuple[int, ...]) -> list[int]:
        """`old` with this group's entries set from the channels each of its pieces keeps."""
        new = list(old)
        for k, pieces in self.entries:
            new[k] = sum(kept[p] for p in pieces)
        return new


@dataclass(frozen=True)
class Group:
    """Channels that are pruned together. `name` is stable for a given model: the module that roots the group."""

    name: str
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[Consumer, ...]
    members: tuple[str, ...]  # pass-through layers whose channels follow the group (BN, depthwise convs, ...)
    # per producer (aligned with `producers`), the group channel each of its output channels is: all of them, or
    # for the branches of a concat a part; empty when unknown
    produces: tuple[tuple[int, ...], ...] = ()
    # channels removed only together: each group of a grouped conv the channels pass through (its input channels
    # and the output channels they make); empty when every channel stands alone
    units: tuple[tuple[int, ...], ...] = ()
    # the channels of each piece the splits along channels cut (dependency/splits.py, the common refinement of every
    # split's pieces), in position order: a width is shared over them (`piece_widths`); the lists of sizes the
    # splits read, rewritten after pruning; whether the pieces keep equal shares (a `chunk` cuts them); and the
    # layers that hold or read only some of the pieces, with those pieces (`shares.parts`)
    pieces: tuple[tuple[int, ...], ...] = ()
    resizes: tuple[Resize, ...] = ()
    equal: bool = False
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # the attention module whose whole heads the group's units are (dependency/heads.py): pruned by `prune_heads`,
    # its num_heads rewritten; empty for any other group
    heads: str = ""

    @property
    def unit(self) -> int:
        """Channels per unit: a width must be a whole number of units."""
        return len(self.units[0]) if self.units else 1

    def piece_widths(self, width: int, multiple: int = 1) -> tuple[int, ...]:
        """Channels each piece keeps when the group keeps `width` (see `shares.piece_widths`)."""
        return piece_widths(tuple(len(p) for p in self.pieces), width, multiple, self.equal)

    def unit_of(self) -> dict[int, int]:
        """Each channel's unit (empty when the group has no units)."""
        return {ch: u for u, chans in enumerate(self.units) for ch in chans}

    @property
    def branches(self) -> tuple[tuple[int, ...], ...]:
        """Group channels of each producer that makes only part of them (a concat's branches): a plan must keep one
        at least of each, or a conv is left with no output channel."""
        return tuple(sorted({tuple(sorted(p)) for p in self.produces if 0 < len(p) < self.channels}))

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "channels": self.channels, "producers": list(self.producers),
             "consumers": [c.module for c in self.consumers], "members": list(self.members)}
        d = {**d, "pieces": len(self.pieces)} if self.pieces else d
        d = {**d, "heads": len(self.units)} if self.heads else d
        return {**d, "unit": self.unit} if self.units else d
