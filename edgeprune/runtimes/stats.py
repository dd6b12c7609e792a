"""`LatencyStats`: one latency figure with its spread, and the helper that makes it from raw timings."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SOURCES = ("measured", "cache", "lut")


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model on one target, in milliseconds.

    `median` is the median of the repeat medians (each repeat is a fresh session), so one slow repeat cannot move it;
    `p90`, `std`, `min`, `max` and `mean` are over all `n` timed runs.
    """

    median: float
    p90: float
    std: float
    min: float
    max: float
    mean: float
    n: int
    repeat_medians: tuple[float, ...]
    target: str
    runtime: str
    runtime_version: str
    precision: str
    source: str = "measured"  # measured | cache | lut
    timing: str = "wall"  # wall: host clock around a synchronous run; gpu_compute: device-side time (TensorRT)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["repeat_medians"] = list(self.repeat_medians)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyStats:
        """The figures `to_dict` wrote, checked: a cache file or an agent's answer that holds anything else (a string
        or list where a number belongs, a negative time) raises ValueError or TypeError naming the key."""
        if not isinstance(d, dict):
            raise TypeError(f"latency figures must be a JSON object, found {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        medians = kw.get("repeat_medians", ())
        if not isinstance(medians, (list, tuple)):
            raise TypeError(f"repeat_medians must be a list of numbers, found {type(medians).__name__}")
        kw["repeat_medians"] = tuple(medians)
        for key, value in (*((k, kw.get(k)) for k in ("median", "p90", "std", "min", "max", "mean")),
                           *(("repeat_medians", v) for v in kw["repeat_medians"])):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"{key} must be a finite number of milliseconds >= 0, found {value!r}")
        if not kw["median"] > 0:
            raise ValueError(f"median must be above 0 ms, found {kw['median']!r}")
        if isinstance(kw.get("n"), bool) or not isinstance(kw.get("n"), int) or kw["n"] < 1:
            raise ValueError(f"n must be a whole number of runs >= 1, found {kw.get('n')!r}")
        for key in ("target", "runtime", "runtime_version", "precision", "source", "timing"):
            if key in kw and not isinstance(kw[key], str):
                raise TypeError(f"{key} must be a string, found {type(kw[key]).__name__}")
        return cls(**kw)

    SPREAD_FLOOR = 0.005  # three repeat medians can agree by chance; a CPU figure is never better than this

    ROBUST_FROM = 5  # repeats from which the one farthest from their median is left out of the spread

    @property
    def spread(self) -> float:
        """Relative standard error of `median`: the spread of the repeat medians over √repeats (at least
        `SPREAD_FLOOR`; 0 for a figure of one repeat, which says nothing about its noise). From `ROBUST_FROM` repeats
        the one farthest from their median is left out of the standard deviation, as it is out of the figure (their
        median): nine interleaved pairs of which one session ran 2.2x slow had a standard deviation 13% of the figure
        where the other eight agreed exactly, and the search's noise margin (k = 2 spreads) then called a candidate
        at 0.90 of the budget infeasible. One value only, not a median absolute deviation: of five values three can
        agree by chance, and a noise margin of the three alone would be too narrow."""
        r = len(self.repeat_medians)
        if r < 2 or self.median <= 0:
            return 0.0
        values = np.asarray(self.repeat_medians, dtype=np.float64)
        if r >= self.ROBUST_FROM:
            values = np.delete(values, int(np.argmax(np.abs(values - np.median(values)))))
        sigma = float(np.std(values, ddof=1))
        return max(sigma / self.median / np.sqrt(r), self.SPREAD_FLOOR)

    def summary(self) -> dict[str, float | int]:
        """The `latency_ms` block of the JSON outputs."""
        return {"median": self.median, "p90": self.p90, "std": self.std, "min": self.min, "max": self.max,
                "mean": self.mean, "n": self.n}


def stats_from_repeats(repeats_ms: list[list[float]], **meta: Any) -> LatencyStats:
    """Latency statistics from per-repeat lists of timed runs (milliseconds)."""
    if not repeats_ms or not all(repeats_ms):
        raise ValueError("no timings")
    allt = np.concatenate([np.asarray(r, dtype=np.float64) for r in repeats_ms])
    medians = tuple(float(np.median(r)) for r in repeats_ms)
    return LatencyStats(
        median=float(np.median(medians)),
        p90=float(np.percentile(allt, 90)),
        std=float(allt.std()),
        min=float(allt.min()),
        max=float(allt.max()),
        mean=float(allt.mean()),
        n=int(allt.size),
        repeat_medians=medians,
        **meta,
    )


def agree(a: LatencyStats, b: LatencyStats, k: float = 2.0) -> bool:
    """Two figures of one model within `k` combined standard errors of each other."""
    return abs(a.median - b.median) <= k * math.hypot(a.spread * a.median, b.spread * b.median)


def consensus(figures: list[LatencyStats]) -> LatencyStats:
    """One figure from two or three of the same model taken one after the other (fresh sessions each): the two that
    agree best, pooled (`pooled`). The caller adds a third figure when the first two disagree (`agree`): a figure
    can be off either way, slower under a burst of load or faster than the steady state (a build once measured
    lraspp's unpruned model at 16.5 ms, which measures 19.4-20.5 ms every time since), so neither the lower nor the
    higher of two is to be trusted; of three, the odd one out is dropped.
    """
    if len(figures) == 1:
        return figures[0]
    pairs = [(abs(a.median - b.median), i, j) for i, a in enumerate(figures) for j, b in enumerate(figures) if i < j]
    _, i, j = min(pairs)
    return pooled(figures[i], figures[j])


def pooled(a: LatencyStats, b: LatencyStats) -> LatencyStats:
    """Two figures of one model as one: the median of every repeat median, `n`-weighted mean and exact pooled `std`,
    `min`/`max` over both; `p90` is the `n`-weighted mean of the two (the raw runs are not kept)."""
    lo, hi = sorted((a, b), key=lambda s: s.median)
    n = lo.n + hi.n
    mean = (lo.n * lo.mean + hi.n * hi.mean) / n
    second = (lo.n * (lo.std ** 2 + lo.mean ** 2) + hi.n * (hi.std ** 2 + hi.mean ** 2)) / n
    medians = lo.repeat_medians + hi.repeat_medians
    return dataclasses.replace(lo, median=float(np.median(medians)), p90=(lo.n * lo.p90 + hi.n * hi.p90) / n,
                               std=math.sqrt(max(second - mean ** 2, 0.0)), min=min(lo.min, hi.min),
                               max=max(lo.max, hi.max), mean=mean, n=n, repeat_medians=medians)


def scaled(s: LatencyStats, factor: float) -> LatencyStats:
    """`s` with every time multiplied by `factor`."""
    return dataclasses.replace(s, median=s.median * factor, p90=s.p90 * factor, std=s.std * factor,
                               min=s.min * factor, max=s.max * factor, mean=s.mean * factor,
                               repeat_medians=tuple(m * factor for m in s.repeat_medians))


def interleaved(figures: list[LatencyStats], bases: list[LatencyStats], anchor_ms: float) -> LatencyStats:
    """A model's figure taken session by session beside a reference model's (`figures[i]` right after `bases[i]`,
    one fresh session each), in the units of the reference's figure `anchor_ms`: each repeat median is
    anchor_ms * figure_i / base_i, so a slow or fast spell of the machine that lasts a pair of sessions cancels out
    of the ratio, and the spread is the spread of the ratios. The other statistics are all runs pooled, scaled by
    anchor_ms / the reference's median in this measurement. What a relative budget needs: the model's latency as a
    fraction of the unpruned model's, measured under the same conditions (a single figure of a 2 ms model moved by
    up to 30% between spells of this shared machine, for seconds at a time)."""
    if not figures or len(figures) != len(bases):
        raise ValueError("interleaved needs one reference figure per figure")
    ratios = [f.median / b.median for f, b in zip(figures, bases)]
    pool_f = functools.reduce(pooled, figures)
    pool_b = functools.reduce(pooled, bases)
    out = scaled(pool_f, anchor_ms / pool_b.median)
    return dataclasses.replace(out, median=anchor_ms * float(np.median(ratios)),
                               repeat_medians=tuple(anchor_ms * r for r in ratios))
