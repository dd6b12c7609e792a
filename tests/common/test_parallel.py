from __future__ import annotations

import threading
import time

import pytest

from edgeprune.common.parallel import thread_map


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_thread_map_returns_results_in_input_order_whatever_the_start_order(workers: int) -> None:
    items = [0.03, 0.0, 0.02, 0.01, 0.0]

    def slow(x: float) -> float:
        time.sleep(x)
        return x * 10

    ticks: list[tuple[int, int]] = []
    out = thread_map(slow, items, workers, key=lambda x: -x, tick=lambda d, t: ticks.append((d, t)))
    assert out == [x * 10 for x in items]
    assert ticks == [(i + 1, len(items)) for i in range(len(items))]


def test_thread_map_runs_on_that_many_threads_at_once() -> None:
    active, peak, lock = [0], [0], threading.Lock()

    def work(_: int) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1

    thread_map(work, list(range(8)), workers=2)
    assert peak[0] == 2


def test_thread_map_raises_the_first_error_without_running_the_rest() -> None:
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        if i == 1:
            raise ValueError("item 1 is bad")
        time.sleep(0.05)
        return i

    with pytest.raises(ValueError, match="item 1 is bad"):
        thread_map(work, list(range(40)), workers=2)
    time.sleep(0.1)
    assert len(started) < 10  # the queued items were dropped, not run to the end
