"""Independent per-group (per-layer) work in threads: results in input order, the first error raised at once.

    results = thread_map(lambda g: rank("cap", model, g, stats), groups, workers=2, order=costliest_first)

The work is BLAS calls that free the GIL; the caller sets BLAS to one thread per worker (`pipeline.group_workers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Sequence[T], workers: int = 1,
               key: Callable[[T], float] | None = None, tick: Callable[[int, int], None] | None = None) -> list[R]:
    """[fn(x) for x in items], run `workers` at a time, started in ascending `key` order (put the costliest first so
    that the workers finish together); `tick(done, total)` after each. On an error (or Ctrl-C) the items not yet
    started are dropped, so it surfaces after the running ones, not after all of them."""
    if workers <= 1 or len(items) <= 1:
        out = []
        for i, x in enumerate(items):
            out.append(fn(x))
            if tick is not None:
                tick(i + 1, len(items))
        return out
    from concurrent.futures import ThreadPoolExecutor, as_completed

    order = sorted(range(len(items)), key=lambda i: key(items[i])) if key is not None else range(len(items))
    results: dict[int, R] = {}
    pool = ThreadPoolExecutor(workers, thread_name_prefix="edgeprune")
    try:
        futures = {pool.submit(fn, items[i]): i for i in order}
        for done, f in enumerate(as_completed(futures)):
            results[futures[f]] = f.result()
            if tick is not None:
                tick(done + 1, len(items))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [results[i] for i in range(len(items))]
