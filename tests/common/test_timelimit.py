"""The time limit on torch-pruning's grouping: it ends a block that runs past it even when the block swallows its
alarms (as a finaliser or a bare `except:` inside a library does)."""

from __future__ import annotations

import pytest

from edgeprune.errors import EdgePruneError


def _swallowing(seconds: float, swallow: int) -> int:
    """Sleep for `seconds`, swallowing the first `swallow` exceptions raised into it (as a finaliser or a bare
    `except:` inside torch-pruning would); the count it swallowed."""
    import time

    swallowed, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.005)
        except BaseException:
            if swallowed >= swallow:
                raise
            swallowed += 1
    return swallowed


def test_time_limit_fires_again_when_its_first_alarm_is_swallowed() -> None:
    from edgeprune.common.timelimit import time_limit

    with pytest.raises(EdgePruneError, match="did not finish in 0.02 s"):
        with time_limit(0.02, "Net did not finish in 0.02 s"):
            _swallowing(5.0, swallow=1)


def test_time_limit_fails_a_block_that_swallowed_every_alarm_and_ran_past_it() -> None:
    from edgeprune.common.timelimit import time_limit

    with pytest.raises(EdgePruneError, match="did not finish in 0.02 s"):
        with time_limit(0.02, "Net did not finish in 0.02 s"):
            assert _swallowing(0.3, swallow=1000) >= 1


def test_time_limit_lets_a_quick_block_through() -> None:
    from edgeprune.common.timelimit import time_limit

    with time_limit(5.0, "Net did not finish in 5 s"):
        assert _swallowing(0.05, swallow=0) == 0
