"""A pool of devices: the boards of each kind (`devices.toml`), their state, and measurements routed to a free one.

    pool = load_pool("devices.toml")
    boards = BoardState(pool)                        # free / busy / down, one measurement per board at a time
    measure = pooled_measure(boards, "cpu", log)     # runtimes.measure's signature: a build's `measure_fn`
    stats = measure("model.onnx", load_target("cpu"))

A board is an `edgeprune agent` URL or an SSH host (`runtimes/remote.py` speaks to both); its kind is the name of
the target profile it runs (`cpu`, `jetson-orin-nano`), so a build for that target may measure on any board of the
kind: the measurement goes to the free board that has measured least, a board that fails (`DeviceUnreachable`) is
marked down and the measurement retried on another board of the kind, and only when every board of the kind is down
does the measurement fail (exit 5).

The file:

    [cpu]                                   # a kind: a target profile's name (or alias)
    boards = [
      { name = "lab-a", agent = "http://10.0.0.11:8765", token_env = "LAB_TOKEN" },
      { name = "lab-b", ssh = "pi@10.0.0.12" },
    ]
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeprune.common.tomlcheck import check_keys, read_toml, take
from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.inputs.targets import RemoteConfig, Target, check_agent_url
from edgeprune.runtimes.stats import LatencyStats

if TYPE_CHECKING:
    from edgeprune.common.progress import Tick
    from edgeprune.runtimes.base import Calibration
    from edgeprune.runtimes.cache import MeasurementCache

_KIND_KEYS = ("boards",)
_BOARD_KEYS = ("name", "agent", "ssh", "token_env", "timeout_s")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STATES = ("free", "busy", "down")


@dataclass(frozen=True)
class Board:
    """One device: an agent URL or an SSH host, and the variable that holds the agent's token."""

    name: str
    kind: str
    agent: str | None = None
    ssh: str | None = None
    token_env: str = "EDGEPRUNE_AGENT_TOKEN"
    timeout_s: float = 600.0

    @property
    def address(self) -> str:
        return self.agent or f"ssh {self.ssh}"

    def target(self, target: Target) -> Target:
        """`target` measured on this board: its profile with this board's [remote] table."""
        return dataclasses.replace(target, remote=RemoteConfig(agent=self.agent, ssh=self.ssh,
                                                               token_env=self.token_env, timeout_s=self.timeout_s))


@dataclass(frozen=True)
class Pool:
    """The boards of a devices file, in file order."""

    boards: tuple[Board, ...]
    source: str = ""

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.kind for b in self.boards))

    def of_kind(self, kind: str) -> tuple[Board, ...]:
        return tuple(b for b in self.boards if b.kind == kind)

    def kind_for(self, target: Target) -> str:
        """The kind whose boards measure `target`: its name, or one of its aliases; an error naming the kinds."""
        for name in (target.name, *target.aliases):
            if self.of_kind(name):
                return name
        raise EdgePruneError(f"target {target.name} has no board in the device pool {self.source or ''}: its kinds "
                             f"are {', '.join(self.kinds) or 'none'}; add a [{target.name}] table with boards to "
                             f"the devices file, or drop that target from the manifest")

    def route(self, target: Target) -> str | None:
        """Where `target` is measured: the kind of its boards in the pool, else None when it needs no board (its
        runtime runs on this machine, or its profile has its own [remote]); an error when it can be measured neither
        way (a board list is for remote boards: a local target needs no devices file)."""
        for name in (target.name, *target.aliases):
            if self.of_kind(name):
                return name
        if target.remote is not None:
            return None
        from edgeprune.runtimes import local_unavailable_reason

        reason = local_unavailable_reason(target)
        if reason is None:
            return None
        where = f"the device pool {self.source}" if self.source else "the device pool (no devices file)"
        raise EdgePruneError(f"target {target.name} has no board in {where} and cannot be measured here ({reason}); "
                             f"add a [{target.name}] table with boards to the devices file (--devices), or drop that "
                             f"target from the manifest")

    def ray_resources(self) -> dict[str, float]:
        """Ray custom resources: `device:NAME` (1) for each board, `kind:KIND` (one unit per board) for each kind."""
        out: dict[str, float] = {f"device:{b.name}": 1.0 for b in self.boards}
        for k in self.kinds:
            out[f"kind:{k}"] = float(len(self.of_kind(k)))
        return out


def load_pool(path: str | Path) -> Pool:
    """A devices file, every key and value checked (exit 2 naming the file, table and key)."""
    path = Path(path)
    table = read_toml(path, "devices")
    boards: list[Board] = []
    for kind, value in table.items():
        where = f"devices file {path} [{kind}]"
        if not isinstance(value, dict):
            raise EdgePruneError(f"devices file {path}: {kind!r} must be a table of a kind's boards ([{kind}] with "
                                 f"boards = [...]), found {type(value).__name__}")
        check_keys(value, _KIND_KEYS, where)
        items = take(value, "boards", list, where)
        if not items:
            raise EdgePruneError(f"{where}: boards is empty; list at least one {{ name = ..., agent = ... }}")
        for i, item in enumerate(items):
            bw = f"{where} boards[{i}]"
            if not isinstance(item, dict):
                raise EdgePruneError(f"{bw}: must be a table {{ name = ..., agent = ... }}, found {item!r}")
            check_keys(item, _BOARD_KEYS, bw)
            board = Board(name=take(item, "name", str, bw), kind=kind, agent=take(item, "agent", str, bw, None),
                          ssh=take(item, "ssh", str, bw, None),
                          token_env=take(item, "token_env", str, bw, "EDGEPRUNE_AGENT_TOKEN"),
                          timeout_s=take(item, "timeout_s", float, bw, 600.0))
            check_board(board, bw)
            boards.append(board)
    names = [b.name for b in boards]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EdgePruneError(f"devices file {path}: board names must be unique, found {', '.join(dup)} twice")
    if not boards:
        raise EdgePruneError(f"devices file {path} lists no boards; add a table per kind, e.g. [cpu] with "
                             f"boards = [{{ name = \"lab-a\", agent = \"http://HOST:8765\" }}]")
    return Pool(tuple(boards), str(path))


DEFAULT_DEVICES = "devices.toml"


def default_pool(path: str | Path | None) -> Pool:
    """The pool of `path`; without one, ./devices.toml when it exists, else no boards (every target measured here or
    through its own [remote])."""
    if path is not None:
        return load_pool(path)
    if Path(DEFAULT_DEVICES).is_file():
        return load_pool(DEFAULT_DEVICES)
    return Pool(())


def check_board(board: Board, where: str) -> None:
    if not _NAME.fullmatch(board.name):
        raise EdgePruneError(f"{where}: name {board.name!r} must be letters, digits, '.', '_' or '-' (it names a "
                             f"Ray resource and a column of the index)")
    if (board.agent is None) == (board.ssh is None):
        raise EdgePruneError(f"{where}: give exactly one of agent = \"http://HOST:PORT\" or ssh = \"user@host\"")
    if board.agent is not None:
        check_agent_url(board.agent)
    if not 0 < board.timeout_s <= 86400:
        raise EdgePruneError(f"{where}: timeout_s must be in (0, 86400], found {board.timeout_s}")


# ---------------------------------------------------------------- board state


class Boards(Protocol):
    """What a pooled measurement needs of the boards' state (`BoardState` here, an actor's handle under Ray)."""

    def acquire(self, kind: str) -> Board | None: ...  # a free board, now busy; None: none free; raises: all down

    def release(self, name: str, measured: bool = True) -> None: ...

    def mark_down(self, name: str, reason: str) -> None: ...


class BoardState:
    """Which boards are free, busy or down, and how many measurements each made. Thread-safe; `on_change(counts)` is
    called after every change (the progress line of free, busy and down boards)."""

    def __init__(self, pool: Pool, on_change: Callable[[dict[str, int]], None] | None = None) -> None:
        self.pool = pool
        self.state = {b.name: "free" for b in pool.boards}
        self.measured = {b.name: 0 for b in pool.boards}
        self.reasons: dict[str, str] = {}
        self.on_change = on_change
        self._lock = threading.Lock()

    def acquire(self, kind: str) -> Board | None:
        with self._lock:
            boards = self.pool.of_kind(kind)
            if boards and all(self.state[b.name] == "down" for b in boards):
                raise DeviceUnreachable(
                    f"every board of kind {kind} is down ({'; '.join(f'{b.name}: {self.reasons[b.name]}' for b in boards)}); "
                    f"restart their agents and run the matrix again (finished entries are skipped)")
            free = [b for b in boards if self.state[b.name] == "free"]
            if not free:
                return None
            board = min(free, key=lambda b: self.measured[b.name])  # spread: the free board that measured least
            self.state[board.name] = "busy"
        self._changed()
        return board

    def release(self, name: str, measured: bool = True) -> None:
        """The board is free again; `measured`: it made a device measurement (not one served from the cache)."""
        with self._lock:
            if self.state[name] == "busy":
                self.state[name] = "free"
                self.measured[name] += measured
        self._changed()

    def mark_down(self, name: str, reason: str) -> None:
        with self._lock:
            self.state[name] = "down"
            self.reasons[name] = reason
        self._changed()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {s: sum(1 for v in self.state.values() if v == s) for s in STATES}

    def summary(self) -> dict[str, dict[str, Any]]:
        """Every board: kind, address, state, measurements made, why it went down."""
        with self._lock:
            return {b.name: {"kind": b.kind, "address": b.address, "state": self.state[b.name],
                             "measurements": self.measured[b.name], "down_reason": self.reasons.get(b.name)}
                    for b in self.pool.boards}

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.counts())


# ---------------------------------------------------------------- pooled measurement

WAIT_S = 0.05  # how often a measurement waiting for a free board looks again


def measure_on_pool(boards: Boards, kind: str, path: str | Path, target: Target, cache: MeasurementCache | None = None,
                    repeats: int | None = None, progress: Tick | None = None, calibration: Calibration | None = None,
                    ) -> tuple[LatencyStats, str]:
    """`runtimes.measure` of `path` on a free board of `kind` (waiting for one), failing over to another board of the
    kind when one is unreachable. Returns the figure and the board that measured it. Boards of a kind share cache
    entries: the cache key leaves the [remote] address out, as boards of one kind are the same device."""
    from edgeprune.runtimes import measure

    while True:
        board = boards.acquire(kind)
        if board is None:
            time.sleep(WAIT_S)
            continue
        try:
            stats = measure(path, board.target(target), cache=cache, repeats=repeats, progress=progress,
                            calibration=calibration)
        except DeviceUnreachable as e:
            boards.mark_down(board.name, str(e)[:300])
            continue
        except BaseException:
            boards.release(board.name, measured=False)
            raise
        boards.release(board.name, measured=stats.source == "measured")
        return stats, board.name


def local_measure(log: list[dict[str, Any]]) -> Callable[..., LatencyStats]:
    """A `measure_fn` for a target no board of the pool runs: `runtimes.measure` here (or through the profile's own
    [remote]), logged as `pooled_measure` logs, the board being `local` (or the [remote] address)."""
    from edgeprune.runtimes import measure
    from edgeprune.runtimes.cache import file_sha256

    def measure_fn(path: str | Path, target: Target, cache: MeasurementCache | None = None, repeats: int | None = None,
                   progress: Tick | None = None, calibration: Calibration | None = None) -> LatencyStats:
        stats = measure(path, target, cache=cache, repeats=repeats, progress=progress, calibration=calibration)
        board = "local" if target.remote is None else (target.remote.agent or f"ssh {target.remote.ssh}")
        log.append({"board": board, "model": file_sha256(path)[:12], "ms": stats.median, "source": stats.source})
        return stats

    return measure_fn


def pooled_measure(boards: Boards, kind: str, log: list[dict[str, Any]]) -> Callable[..., LatencyStats]:
    """A `measure_fn` for `build_job.build` that measures on the pool and appends to `log` which board measured
    which model (`board`, `model`: the ONNX file's SHA-256 prefix, `ms`, `source`)."""
    from edgeprune.runtimes.cache import file_sha256

    def measure_fn(path: str | Path, target: Target, cache: MeasurementCache | None = None, repeats: int | None = None,
                   progress: Tick | None = None, calibration: Calibration | None = None) -> LatencyStats:
        stats, name = measure_on_pool(boards, kind, path, target, cache, repeats, progress, calibration)
        log.append({"board": name, "model": file_sha256(path)[:12], "ms": stats.median, "source": stats.source})
        return stats

    return measure_fn
