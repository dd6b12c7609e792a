"""A time limit for a block that may run for minutes in a library's code (torch-pruning's grouping), ended with a
one-line error. By hand, because neither the standard library nor torch offers a limit that interrupts a Python
block in the main thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from edgeprune.errors import EdgePruneError


class _TraceTimeout(BaseException):
    """Raised by the alarm inside the block; a BaseException, so that no `except Exception` there swallows it."""


@contextmanager
def time_limit(seconds: float, message: str) -> Iterator[None]:
    """Stop the block after `seconds` with EdgePruneError(`message`) (main thread on Unix: SIGALRM; elsewhere no
    limit). A release pipeline must not hang on a model torch-pruning cannot group in reasonable time (as yolo11n
    did, for minutes, until `reshapes.cut_unmapped` cut its attention's reshapes)."""
    import signal
    import threading

    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    fired = {"expired": False, "armed": True}

    def expired(signum: int, frame: object) -> None:
        fired["expired"] = True
        if fired["armed"]:
            raise _TraceTimeout()

    previous = signal.signal(signal.SIGALRM, expired)
    # the alarm repeats: a handler that runs inside a finaliser or a bare `except:` has its exception swallowed
    # (CI saw torch-pruning's grouping finish with exit 0 under a 0.01 s limit), so it fires again until it gets
    # through
    signal.setitimer(signal.ITIMER_REAL, seconds, min(seconds, 0.5))
    try:
        yield
    except _TraceTimeout:
        raise EdgePruneError(message) from None
    finally:
        fired["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired["expired"]:  # every firing was swallowed, and the block still ran past its limit
        raise EdgePruneError(message)
