"""Progress callbacks: what a job reports while it runs (the CLI draws them; the API passes its own or none).

    def stages(description: str, total: int | None) -> Tick: ...   # one per stage ("collecting statistics", 12)
    tick = stages("measuring", 30); tick(1, 30)                    # then (done, total) as the stage advances
"""

from __future__ import annotations

from collections.abc import Callable

Tick = Callable[[int, int], None]  # (done, total) steps; an exception it raises stops the work (a measurement's runs)
Stages = Callable[[str, int | None], Tick]  # (stage description, total steps) -> the stage's Tick


def no_progress(description: str, total: int | None = None) -> Tick:
    return lambda done, total: None
