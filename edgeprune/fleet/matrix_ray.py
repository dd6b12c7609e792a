"""A release matrix on Ray (`edgeprune matrix --ray auto|ADDRESS`, the optional extra `edgeprune[ray]`).

    started = connect("auto", pool)      # a running cluster, or a local one with the pool's boards as resources
    boards = run_on_ray(entries, kinds, out, pool, run_entry, None, finish, on_counts)

Ray schedules, edgeprune does not: each entry's build (the CPU stages: statistics, ranking, the search's pruning and
export) is a task asking for one CPU, so builds go to whichever worker is free; each board is a custom resource,
`device:NAME` (one unit) and `kind:KIND` (one unit per board of the kind), and every measurement is a task asking for
one unit of its target's kind, so no more measurements of a kind run at once than it has boards. Which board of the
kind a measurement uses is decided by one actor that holds the boards' state (`pool.BoardState`: the free board that
measured least); a board that fails is marked down there and the measurement retried on another board of the kind,
inside the same task. The measurement tasks must run where the boards can be reached: the node that carries the
`device:` resources (`ray start --head --resources=...`, the line `edgeprune matrix` prints when they are missing).

Departure from "every board a resource the task itself holds": Ray cannot tell a task which unit of a resource it
got, so the `device:` units are advertised (they place the tasks on the node that reaches the boards) and the actor
picks the board; the `kind:` units bound the concurrency per kind as the design asks.
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.common.resources import install_hint
from edgeprune.errors import DeviceUnreachable, EdgePruneError, ExitCode
from edgeprune.fleet.pool import Board, BoardState, Pool, local_measure, measure_on_pool

if TYPE_CHECKING:
    from edgeprune.common.progress import Tick
    from edgeprune.fleet.manifest import Entry
    from edgeprune.inputs.targets import Target
    from edgeprune.runtimes.base import Calibration
    from edgeprune.runtimes.cache import MeasurementCache
    from edgeprune.runtimes.stats import LatencyStats

POLL_S = 0.5  # how often the driver looks at finished entries and the boards' counts


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EdgePruneError(f"--ray needs Ray, which is not installed: {install_hint('ray')}; or run without --ray "
                             f"(entries one after another on this machine)") from None
    return ray


def _reachable(address: str) -> None:
    """A TCP connection to the cluster's GCS address, so that an unreachable one is exit 5 within seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EdgePruneError(f"--ray {address!r} must be auto or HOST:PORT of a running cluster's head node (the "
                             f"address `ray start --head` prints, e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as e:
        raise EdgePruneError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it with `ray start "
                             f"--head` on that machine, or use --ray auto for a local one",
                             ExitCode.DEVICE_UNREACHABLE) from None


def connect(address: str, pool: Pool) -> bool:
    """Join the Ray cluster at `address` (`auto`: the running one, else a new local one that carries the pool's
    boards as resources); checks that the cluster has every board's resources. Returns whether it started Ray (the
    caller shuts it down)."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        if address == "auto":
            try:
                ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
            except (ConnectionError, RuntimeError):  # no cluster running: a local one with the boards
                ray.init(resources=pool.ray_resources(), include_dashboard=False, logging_level="ERROR",
                         log_to_driver=False)
        else:
            _reachable(address)
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            except (ConnectionError, RuntimeError) as e:
                raise EdgePruneError(f"cannot join the Ray cluster at {address} ({str(e)[:200]})",
                                     ExitCode.DEVICE_UNREACHABLE) from None
        started = True
    have = ray.cluster_resources()
    missing = {k: v for k, v in pool.ray_resources().items() if have.get(k, 0) < v}
    if missing:
        if started:
            ray.shutdown()
        raise EdgePruneError(f"the Ray cluster has no resource {', '.join(missing)} for the boards of "
                             f"{pool.source}; start the node that reaches the boards with `ray start --head "
                             f"--resources='{json.dumps(pool.ray_resources())}'`")
    return started


class ActorBoards:
    """`pool.Boards` through the board actor's handle (inside a measurement task)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def acquire(self, kind: str) -> Board | None:
        status, value = _ray().get(self.actor.acquire.remote(kind))
        if status == "down":
            raise DeviceUnreachable(value)
        return value

    def release(self, name: str, measured: bool = True) -> None:
        _ray().get(self.actor.release.remote(name, measured))

    def mark_down(self, name: str, reason: str) -> None:
        _ray().get(self.actor.mark_down.remote(name, reason))


class BoardActor:
    """`pool.BoardState` as a Ray actor (errors come back as values: an exception type with its own constructor does
    not always survive Ray's wrapping)."""

    def __init__(self, pool: Pool) -> None:
        self.state = BoardState(pool)

    def acquire(self, kind: str) -> tuple[str, Any]:
        try:
            return "ok", self.state.acquire(kind)
        except DeviceUnreachable as e:
            return "down", str(e)

    def release(self, name: str, measured: bool) -> None:
        self.state.release(name, measured)

    def mark_down(self, name: str, reason: str) -> None:
        self.state.mark_down(name, reason)

    def counts(self) -> dict[str, int]:
        return self.state.counts()

    def summary(self) -> dict[str, Any]:
        return self.state.summary()


def measure_task(actor: Any, kind: str, name: str, data: bytes, target: Target, cache: MeasurementCache | None,
                 repeats: int | None, calibration: Calibration | None) -> tuple[str, Any, Any]:
    """One measurement (a Ray task holding one unit of `kind:KIND`): the model's bytes written here, measured on a
    board of the kind (failing over), the figure and the board back; an error as (code, message)."""
    from edgeprune.runtimes.stats import LatencyStats  # noqa: F401 - loaded before the figure is pickled back

    with tempfile.TemporaryDirectory(prefix="edgeprune-measure-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            stats, board = measure_on_pool(ActorBoards(actor), kind, path, target, cache, repeats, None, calibration)
        except EdgePruneError as e:
            return "error", int(e.code), str(e)
    return "ok", stats, board


_REMOTE: dict[str, Any] = {}


def _remote(fn: Callable[..., Any], **options: Any) -> Any:
    if fn.__name__ not in _REMOTE:
        _REMOTE[fn.__name__] = _ray().remote(**options)(fn)
    return _REMOTE[fn.__name__]


def entry_task(run_entry: Callable[..., dict[str, Any]], entry: Entry, out: Path, kind: str | None, actor: Any,
               cache_dir: str | None) -> dict[str, Any]:
    """One entry's build (a Ray task holding one CPU), each of its measurements a task on a board of `kind`; kind
    None (a target no board runs): measured by the task itself, on the node that runs it."""
    from edgeprune.runtimes.cache import file_sha256

    ray = _ray()
    log: list[dict[str, Any]] = []
    if kind is None:
        return {**run_entry(entry, out, local_measure(log), cache_dir), "measurements": log}
    measure = _remote(measure_task, num_cpus=0, max_retries=0)

    def measure_fn(path: str | Path, target: Target, cache: MeasurementCache | None = None, repeats: int | None = None,
                   progress: Tick | None = None, calibration: Calibration | None = None) -> LatencyStats:
        path = Path(path)
        ref = measure.options(resources={f"kind:{kind}": 1}).remote(actor, kind, path.name, path.read_bytes(), target,
                                                                    cache, repeats, calibration)
        status, value, board = ray.get(ref)
        if status == "error":
            raise EdgePruneError(board, ExitCode(value))
        log.append({"board": board, "model": file_sha256(path)[:12], "ms": value.median, "source": value.source})
        return value

    rec = run_entry(entry, out, measure_fn, cache_dir)
    return {**rec, "measurements": log}


def run_on_ray(entries: list[Entry], kinds: dict[str, str | None], out: Path, pool: Pool,
               run_entry: Callable[..., dict[str, Any]], cache_dir: str | None,
               finish: Callable[[Entry, dict[str, Any], dict[str, Any]], None],
               on_counts: Callable[[dict[str, int]], None]) -> dict[str, Any]:
    """Every entry as a Ray task on a connected cluster; `finish(entry, record, boards)` as each one ends. Returns
    the boards' summary (state, measurements, why a board went down)."""
    ray = _ray()
    actor = ray.remote(num_cpus=0, max_concurrency=64)(BoardActor).remote(pool)
    try:
        build = _remote(entry_task, num_cpus=1, max_retries=0)
        pending = {build.remote(run_entry, e, out, kinds[e.key], actor, cache_dir): e for e in entries}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            on_counts(ray.get(actor.counts.remote()))
            for ref in ready:
                entry = pending.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a worker that died: the entry's row says so
                    rec = {"key": entry.key, "model": entry.name, "spec": entry.model, "target": entry.target_name,
                           "budget": entry.budget, "exit_code": int(ExitCode.INTERNAL), "met": False, "report": None,
                           "message": f"the Ray task of this entry failed: {str(e).splitlines()[0][:200]}"}
                finish(entry, rec, ray.get(actor.summary.remote()))
        return ray.get(actor.summary.remote())
    finally:
        ray.kill(actor)
