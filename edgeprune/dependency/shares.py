"""How a group cut into pieces by splits along channels keeps its channels: one width, shared over the pieces.

A group that passes through splits (dependency/splits.py) is cut into pieces: the common refinement of every split's
pieces, so that each piece lies inside one piece of every split. The search gives the group one width; the pieces
share it in proportion to their original sizes, each keeping one channel at least and, where it can, a multiple of
the target's channel multiple. The shares come from one sequence of piece indices per (sizes, multiple): the kept
channels at width w are its first w entries, so a wider plan keeps what a narrower one keeps (a ranking's prefix
stays a prefix) and the latency model computes the very counts the plan keeps.

    piece_widths((80, 40, 40, 80), 120, multiple=1)   # (40, 20, 20, 40)
    refine([[(0, 1), (2, 3)], [(0,), (1, 2, 3)]])     # ((0,), (1,), (2, 3))
"""

from __future__ import annotations

import functools

Pieces = tuple[tuple[int, ...], ...]


@functools.lru_cache(maxsize=512)
def piece_sequence(sizes: tuple[int, ...], multiple: int = 1) -> tuple[int, ...]:
    """The piece each channel kept in turn goes to: one channel for every piece first (no piece may be left empty),
    then runs that bring a piece to the next multiple of `multiple`, each to the piece whose share would stay the
    furthest below its size's proportion (the mid-run share, as Sainte-Laguë apportions seats), lowest index on ties.
    Equal sizes at multiple 1 give the round robin 0, 1, ..., k-1, 0, 1, ..."""
    counts = [min(1, s) for s in sizes]
    seq = [k for k, s in enumerate(sizes) if s > 0]

    def run(k: int) -> int:
        to_multiple = multiple - counts[k] % multiple if counts[k] % multiple else multiple
        return min(to_multiple, sizes[k] - counts[k])

    while True:
        room = [k for k in range(len(sizes)) if counts[k] < sizes[k]]
        if not room:
            return tuple(seq)
        k = min(room, key=lambda k: ((counts[k] + run(k) / 2) / sizes[k], k))
        n = run(k)
        seq.extend([k] * n)
        counts[k] += n


def piece_widths(sizes: tuple[int, ...], width: int, multiple: int = 1, equal: bool = False) -> tuple[int, ...]:
    """Channels each piece keeps when the group keeps `width` (see `piece_sequence`); one at least in each. `equal`
    pieces (a `chunk` cuts them: its pieces stay equal by construction) keep width // pieces each."""
    if width >= sum(sizes):
        return tuple(sizes)
    if equal:
        share = max(1, width // len(sizes))
        return tuple(min(share, s) for s in sizes)
    counts = [0] * len(sizes)
    for k in piece_sequence(tuple(sizes), multiple)[: max(width, len(sizes))]:
        counts[k] += 1
    return tuple(counts)


def refine(cuts: list[list[tuple[int, ...]]], channels: int = 0) -> Pieces:
    """The common refinement of several cuts of a group's channels: each cut is the list of pieces (group channels in
    position order) one split makes of the channels it reaches; channels a cut does not reach are one more piece of
    it. Pieces come in the order their first channel comes in the first cut (then the next), channels likewise, so
    the k-th run of channels of a split stays before the (k+1)-th; group channels no cut reaches come last."""
    where: dict[int, list[int]] = {}  # group channel -> its piece in each cut (-1: not reached)
    walk: list[int] = []
    for i, cut in enumerate(cuts):
        for k, piece in enumerate(cut):
            for ch in piece:
                where.setdefault(ch, [-1] * len(cuts))[i] = k
                walk.append(ch)
    walk += range(channels)
    blocks: dict[tuple[int, ...], list[int]] = {}
    for ch in dict.fromkeys(walk):
        blocks.setdefault(tuple(where.get(ch, [-1] * len(cuts))), []).append(ch)
    return tuple(tuple(b) for b in blocks.values())


def parts(pieces: Pieces, touched: dict[str, set[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The layers that hold or read only some of the pieces (a depthwise conv of one piece, a conv reading one piece,
    the producer of one piece), each with the pieces it does: the latency model's per-layer widths follow them."""
    out = []
    for name, chans in touched.items():
        ks = tuple(k for k, p in enumerate(pieces) if chans & set(p))
        if 0 < len(ks) < len(pieces):
            out.append((name, ks))
    return tuple(out)
