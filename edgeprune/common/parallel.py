"""Independent per-group (per-layer) work in threads: results in input order, the first error raised at once.

    results = thread_map(lambda g: rank("cap", model, g, stats), groups, workers=2, order=costliest_first)

The work is BLAS calls that free the GIL; the caller sets BLAS to one thread per worker (`group_workers`).

And the thread and memory policy of a job: `compute_threads` for the whole job, `heavy_stage_threads` and
`group_workers` for the stages that gain from all cores, `retained_memory` against glibc returning large blocks to a
ballooned VM, `timed` for the report's stage timings.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

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


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's thread count and NumPy/SciPy's BLAS pool (threadpoolctl, which scikit-learn brings) set to `n`."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it only torch is limited
        threadpool_limits = None
    try:
        if threadpool_limits is not None:
            with threadpool_limits(limits=n):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def compute_threads(n: int | None = None) -> Iterator[None]:
    """Threads for the compute stages (statistics, ranking, compensation, export), torch and BLAS alike.

    Default 1 (`EDGEPRUNE_THREADS` overrides): on small inputs thread hand-offs between torch's OpenMP pool and
    NumPy/SciPy's OpenBLAS pool cost more than they give (the example's `prune`: 19.4 s against 22.1 s on 2 threads);
    `heavy_stage_threads` raises both for the heavy stages on large inputs. Latency measurement is not affected: it
    uses the target's thread count.
    """
    with _threads(n or int(os.environ.get("EDGEPRUNE_THREADS", "1"))):
        yield


_DEFAULT_TORCH_THREADS = torch.get_num_threads()


LARGE_BATCH = 1_000_000  # input values per calibration batch above which the heavy stages run on all threads


@contextmanager
def heavy_stage_threads(batch_values: int) -> Iterator[None]:
    """The statistics on large inputs (224x224 batches) run on all threads, torch's and BLAS's (ranking and compensation
    use `group_workers`): the calibration pass accumulates its products after each forward pass, so the two pools take
    turns instead of spinning against each other (resnet18 with 256 images: 38.9 s on 2 threads against 49.6 s on 1, measured). On
    small inputs (the 32x32 example) one thread stays faster (19.4 s against 22.1 s for `edgeprune prune`).
    `batch_values`: input values per calibration batch (`CalibrationData.batch_values`)."""
    if not _large_input(batch_values):
        yield
        return
    with _threads(_DEFAULT_TORCH_THREADS):
        yield


def _large_input(batch_values: int) -> bool:
    """Whether the heavy stages leave `compute_threads` for all cores: large batches, and no EDGEPRUNE_THREADS."""
    return batch_values >= LARGE_BATCH and "EDGEPRUNE_THREADS" not in os.environ


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


_retaining = False


@contextmanager
def retained_memory() -> Iterator[None]:
    """Keep freed memory in the process while a job runs, and give it back at the end (glibc only; elsewhere a no-op).

    glibc returns every block over 32 MB (a batch's activations, a layer's covariance) to the kernel when it is freed,
    so the next batch faults the same amount in again; on a virtual machine that hands freed pages back to its host
    (virtio-balloon free page reporting, as on our 2-core machines) that costs 5-16 µs per 4 KB page instead of 0.6.
    resnet50's calibration pass took 3.4 million page faults; kept, 0.6 million, and its 256-image forward pass
    ran in 17-18 s instead of 26-34 s (measured). Peak memory is the high-water mark of the job, not more: alone this
    raised resnet50's `tools/bench_prune.py` peak from 3.2 to 3.5 GB, and with the statistics' smaller temporaries it
    is 3.1 GB. `EDGEPRUNE_RETAIN_MEMORY=0` turns it off.
    """
    global _retaining
    libc = _glibc() if os.environ.get("EDGEPRUNE_RETAIN_MEMORY", "1") != "0" else None
    if libc is None or _retaining:  # a nested job (build runs prepare) leaves it to the outer one
        yield
        return
    _retaining = True
    libc.mallopt(_M_MMAP_MAX, 0)  # large blocks come from the heap, which...
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # ...is never trimmed while the job runs
    try:
        yield
    finally:
        _retaining = False
        libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)  # and what the job freed goes back to the system


@functools.cache
def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def group_workers(batch_values: int) -> Iterator[int]:
    """Workers for stages made of independent per-group (per-layer) work on large inputs: one per core, each with
    one BLAS thread (see `registry.rank_all`); on small inputs one worker under `compute_threads`."""
    if not _large_input(batch_values) or _DEFAULT_TORCH_THREADS < 2:
        yield 1
        return
    with _threads(1):
        yield _DEFAULT_TORCH_THREADS


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    log.info("%s: start", stage)
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
    log.info("%s: done in %.2fs", stage, timings[stage])
