"""HTTP profiling agent: runs on the device, measures the models a build host sends it (DESIGN.md §1, §3).

    edgeprune agent --host 0.0.0.0 --port 8765 --token-file ~/.edgeprune-token      # on the Jetson

    from edgeprune.fleet.agent import AgentConfig, start_agent
    server = start_agent(AgentConfig(port=0))                 # loopback, in a background thread
    print(server.url); server.close()

Protocol. Every answer is JSON; an error is `{"error": "<what went wrong and what to do>", "status": <code>}`.

- `GET /health` -> `{"edgeprune": "0.1.0", "arch": "aarch64", "max_request_bytes": 536870912,
  "runtimes": {"onnxruntime": {"version": "1.18.1", "available": true, "reason": null},
  "tensorrt": {...}, "trtexec": {...}}}`
- `POST /measure`: the body is the ONNX file's bytes (`Content-Length` required); header `X-Edgeprune-Target` holds
  the target profile as one line of JSON (`Target.to_dict()`; a `remote` table is ignored) or the name of a profile
  bundled with the agent's edgeprune; optional header `X-Edgeprune-Repeats: N`. The answer is
  `LatencyStats.to_dict()` plus `"agent": {"host", "waited_s", "started_at", "finished_at"}` (Unix seconds of the
  measurement itself). With curl:
  `curl -H "Authorization: Bearer $TOKEN" -H 'X-Edgeprune-Target: cpu' --data-binary @model.onnx
  http://jetson.local:8765/measure`

Status codes: 400 bad model (one that fails to load or to run, or carries external data), target or header (the
message says which), or a measurement that ran past the agent's time limit; 401 missing or wrong token; 404 unknown
path; 411 no Content-Length; 413 body over `max_request_bytes`; 500 unexpected failure; 503 the target's runtime
cannot run on this device, or, with a `Retry-After` header (seconds), `max_queue` measurements already wait their turn
(the client waits that long and sends it again). No answer shows a path of the agent's machine.

Security: with a token every request needs `Authorization: Bearer <token>` (compared in constant time). Without a
token the agent only binds to a loopback address, and refuses to start otherwise. Measurements run one at a time
(a lock), since two at once would time each other; up to `max_queue` (default 8, `--max-queue`) wait their turn,
each holding its upload, and the next ones are answered 503 at once. A measurement stops when its client leaves or
after `max_seconds` (default 600 s, `--max-seconds`). Uploads live in one folder per agent (`edgeprune-agent-PID-*`),
removed when it stops, or by the next agent or job when a SIGKILL stopped it.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import platform
import re
import select
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgeprune._version import __version__
from edgeprune.common.atomic import scratch_dir
from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.inputs.targets import Target
from edgeprune.runtimes.remote import HEALTH_PATH, MEASURE_PATH, REPEATS_HEADER, TARGET_HEADER

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_SECONDS = 600.0  # one request's measurement, engine build included
DEFAULT_MAX_QUEUE = 8  # measurements waiting behind the running one; more are answered 503 with Retry-After
_CLIENT_CHECK_S = 0.2  # how often a running measurement looks whether its client is still there
_CHUNK = 1 << 20
_DRAIN_BYTES = 16 << 20  # an unread body up to this size is read and dropped before an error answer (see _drain)


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the agent reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


@dataclass(frozen=True)
class AgentConfig:
    """Where the agent listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    token: str | None = field(default=None, repr=False)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_seconds: float = DEFAULT_MAX_SECONDS  # a measurement that runs longer is stopped (400)
    max_queue: int = DEFAULT_MAX_QUEUE

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise EdgePruneError(f"agent port must be in 0..65535, found {self.port}")
        if self.max_request_bytes < 1:
            raise EdgePruneError(f"agent request limit must be at least 1 byte, found {self.max_request_bytes}")
        if not (math.isfinite(self.max_seconds) and 0 < self.max_seconds <= 86400):
            raise EdgePruneError(f"--max-seconds must be a number of seconds in (0, 86400], found {self.max_seconds}")
        if not 0 <= self.max_queue <= 1000:
            raise EdgePruneError(f"--max-queue must be a number of requests in 0..1000, found {self.max_queue}")
        if self.token is not None and not self.token.strip():
            raise EdgePruneError("the agent token is empty; put a long random string in the token file "
                                 "(for example `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        if self.token is None and not is_loopback(self.host):
            raise EdgePruneError(
                f"refusing to serve on {self.host} without a token: anyone who can reach it could run models on "
                f"this device; pass --token-file FILE (and set the same token in the build host's "
                f"EDGEPRUNE_AGENT_TOKEN), or bind to 127.0.0.1"
            )


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace removed); warns when others can read the file."""
    path = Path(path).expanduser()
    try:
        token = path.read_text().strip()
        mode = path.stat().st_mode
    except OSError as e:
        raise EdgePruneError(f"cannot read the token file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise EdgePruneError(f"the token file {path} is not UTF-8 text; write the token as plain text, e.g. "
                             f"`python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}`") from None
    if not token:
        raise EdgePruneError(f"the token file {path} is empty; write a long random string into it")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token


def health() -> dict[str, Any]:
    """What this device can measure with: edgeprune, its architecture and each runtime's version."""
    from edgeprune.runtimes import RUNTIMES, local_arch, runtime_module

    runtimes = {}
    for name in RUNTIMES:
        if name == "remote":
            continue
        mod = runtime_module(name)
        reason = mod.unavailable_reason()
        runtimes[name] = {"version": mod.version(), "available": reason is None, "reason": reason}
    return {"edgeprune": __version__, "arch": local_arch(), "python": platform.python_version(), "runtimes": runtimes}


class _HttpError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class _Stopped(Exception):
    def __init__(self, client_gone: bool) -> None:  # from a measurement's progress callback: client gone, or time up
        super().__init__("client gone" if client_gone else "time limit")
        self.client_gone = client_gone


def parse_target_header(value: str | None) -> Target:
    """The target a request asks for: JSON of `Target.to_dict()`, or the name of a bundled profile."""
    from edgeprune.inputs.targets import bundled_targets

    if not value or not value.strip():
        raise _HttpError(400, f"missing {TARGET_HEADER} header: send the target profile as one line of JSON "
                              f"(Target.to_dict()) or the name of a bundled profile")
    value = value.strip()
    if value.startswith("{"):
        try:
            d = json.loads(value)
        except json.JSONDecodeError as e:
            raise _HttpError(400, f"{TARGET_HEADER} is not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(d, dict):
            raise _HttpError(400, f"{TARGET_HEADER} must be a JSON object")
        d.pop("remote", None)  # the agent measures locally; a [remote] table would point back at itself
        try:
            return Target.from_dict(d, where=f"{TARGET_HEADER} header")
        except EdgePruneError as e:
            raise _HttpError(400, str(e)) from None
    targets = bundled_targets()  # names only: a path would let a client read files on the device
    for t in targets.values():
        if value == t.name or value in t.aliases:
            return t
    raise _HttpError(400, f"unknown target {value!r}; profiles bundled here: {', '.join(targets)}; or send the "
                          f"profile as JSON")


class AgentServer(ThreadingHTTPServer):
    """The agent's HTTP server; one thread per request, one measurement at a time."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: at socketserver's 5, 30 clients connecting at once got resets

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.measure_lock = threading.Lock()
        # requests measuring or waiting their turn (at most max_queue + 1); a running mean of one's seconds
        self.queue_lock, self.admitted, self.seconds_each = threading.Lock(), 0, 1.0
        self.measurements = 0
        self.stopped = 0  # measurements stopped because their client went away or their time ran out
        super().__init__((config.host, config.port), _Handler)
        self._scratch = scratch_dir("agent")  # every upload; a SIGKILLed agent's is swept by the next (its PID)
        self.upload_dir = Path(self._scratch.name)

    def hide_paths(self, text: str) -> str:
        """An error message whose upload-folder paths read 'the upload folder' (the model: 'the uploaded model')."""
        for p in {str(self.upload_dir), str(self.upload_dir.resolve())}:
            text = re.sub(re.escape(p) + r"[^\s'\"]*", "the upload folder", text)
        return text

    @contextmanager
    def queued(self) -> Iterator[list[float]]:
        """A place among the requests measuring or waiting their turn, or 503 with Retry-After (about how long the
        ones admitted take); the request appends its measurement's seconds."""
        with self.queue_lock:
            if self.admitted > self.config.max_queue:
                wait = max(1, min(600, math.ceil(self.seconds_each * self.admitted)))
                raise _HttpError(503, f"{self.admitted - 1} measurements already wait their turn (this agent's "
                                      f"--max-queue is {self.config.max_queue}); send it again in {wait} s", wait)
            self.admitted += 1
        took: list[float] = []
        try:
            yield took
        finally:
            with self.queue_lock:
                self.admitted -= 1
                self.seconds_each = 0.7 * self.seconds_each + 0.3 * took[0] if took else self.seconds_each

    def server_close(self) -> None:
        super().server_close()
        self._scratch.cleanup()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://[{shown}]:{port}" if ":" in str(shown) else f"http://{shown}:{port}"

    def close(self) -> None:
        """Stop serving (from another thread than `serve_forever`'s) and release the socket."""
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer
    server_version = f"edgeprune-agent/{__version__}"
    timeout = 600  # seconds a client may stall mid-request before its thread gives up

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, obj: dict[str, Any], retry_after: int | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="edgeprune-agent"')
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, message: str, retry_after: int | None = None) -> None:
        self._send_json(status, {"error": message, "status": status}, retry_after)

    def _authorize(self) -> None:
        token = self.server.config.token
        if token is None:
            if not is_loopback(self.server.config.host):  # AgentConfig forbids this; never serve it by accident
                raise _HttpError(401, "this agent has no token and is not bound to loopback; it serves nothing")
            return
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise _HttpError(401, "missing or wrong token: send `Authorization: Bearer <token>` with the token from "
                                  "the agent's --token-file")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            self._authorize()
            if self.path.rstrip("/") != HEALTH_PATH:
                raise _HttpError(404, f"no such endpoint {self.path}; GET {HEALTH_PATH} or POST {MEASURE_PATH}")
            self._send_json(200, {**health(), "max_request_bytes": self.server.config.max_request_bytes})
        except _HttpError as e:
            self._send_error(e.status, str(e))

    def do_POST(self) -> None:  # noqa: N802
        self._body_read = False
        try:
            self._authorize()
            if self.path.rstrip("/") != MEASURE_PATH:
                raise _HttpError(404, f"no such endpoint {self.path}; POST {MEASURE_PATH}")
            self._send_json(200, self._measure())
        except _HttpError as e:
            self._drain()
            self._send_error(e.status, str(e), e.retry_after)
        except _Stopped:  # its client has gone (a time limit is answered as an _HttpError): nobody to answer
            self.close_connection = True
        except Exception as e:  # a bug, not the client's fault: answer it, keep serving
            log.exception("measurement failed")
            self._drain()
            self._send_error(500, self.server.hide_paths(f"the agent failed: {type(e).__name__}: {e}"))

    def _drain(self) -> None:
        """Read and drop a body the request still has in flight, so the client reads the error answer.

        Closing a socket with unread data makes the kernel reset the connection, and a reset can reach the client
        before it has read the answer; past `_DRAIN_BYTES` the agent closes anyway."""
        self.close_connection = True
        if self._body_read:
            return
        self._body_read = True
        length = self.headers.get("Content-Length", "")
        remaining = int(length) if length.strip().isdigit() else 0
        if remaining > _DRAIN_BYTES:
            return
        try:
            while remaining and (chunk := self.rfile.read(min(_CHUNK, remaining))):
                remaining -= len(chunk)
        except OSError:
            pass

    def _read_body(self, dest: Path) -> int:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise _HttpError(411, "Content-Length is required (send the ONNX file as the request body)")
        size = int(length)
        limit = self.server.config.max_request_bytes
        if size > limit:
            raise _HttpError(413, f"the model is {size} bytes and this agent accepts at most {limit}; restart the "
                                  f"agent with a larger --max-request-mb")
        remaining = size
        self._body_read = True
        with open(dest, "wb") as f:
            while remaining:
                chunk = self.rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    raise _HttpError(400, f"the request body ended after {size - remaining} of {size} bytes")
                f.write(chunk)
                remaining -= len(chunk)
        return size

    def _measure(self) -> dict[str, Any]:
        from edgeprune.export.onnx import check_onnx
        from edgeprune.runtimes import local_unavailable_reason, runtime_module

        target = parse_target_header(self.headers.get(TARGET_HEADER))
        repeats_header = self.headers.get(REPEATS_HEADER)
        repeats = None
        if repeats_header is not None:
            most = target.measure.LIMITS["repeats"]
            if not repeats_header.strip().isdigit() or not 1 <= int(repeats_header) <= most:
                raise _HttpError(400, f"{REPEATS_HEADER} must be an integer in 1..{most}, found {repeats_header!r}")
            repeats = int(repeats_header)
        with self.server.queued() as took, tempfile.TemporaryDirectory(dir=self.server.upload_dir) as tmp:
            path = Path(tmp) / "model.onnx"
            self._read_body(path)
            hide = self.server.hide_paths
            try:
                check_onnx(path)
            except EdgePruneError as e:
                raise _HttpError(400, hide(str(e).replace(str(path), "the uploaded model"))) from None
            mod = runtime_module(target.runtime)
            reason = local_unavailable_reason(target)
            if reason is not None:
                raise _HttpError(503, f"this device cannot measure target {target.name} with {target.runtime}: "
                                      f"{reason}")
            asked = time.time()
            with self.server.measure_lock:
                started = time.time()
                limit = self.server.config.max_seconds
                try:
                    stats = mod.measure(path, dataclasses.replace(target, remote=None), repeats=repeats,
                                        progress=self._watchdog(started + limit))
                except _Stopped as e:
                    self.server.stopped += 1
                    log.warning("measurement of %s stopped: %s", target.name, e)
                    if e.client_gone:
                        raise
                    raise _HttpError(400, f"the measurement ran longer than this agent's limit of {limit:.0f} s per "
                                          f"request and was stopped; lower [measure] iterations or repeats, set "
                                          f"max_seconds, or restart the agent with a larger --max-seconds") from None
                except DeviceUnreachable as e:
                    raise _HttpError(503, hide(str(e).replace(str(path), "the uploaded model"))) from None
                except EdgePruneError as e:
                    raise _HttpError(400, hide(str(e).replace(str(path), "the uploaded model"))) from None
                finished = time.time()
                self.server.measurements += 1
                took.append(finished - started)
        log.info("measured %s on %s: median %.4f ms (n %d) in %.1fs", target.name, target.runtime, stats.median,
                 stats.n, finished - started)
        return {**stats.to_dict(), "agent": {"host": platform.node(), "waited_s": started - asked,
                                             "started_at": started, "finished_at": finished}}

    def _client_gone(self) -> bool:
        """Whether the client closed its connection: readable with nothing to read (its body was read in full)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _watchdog(self, deadline: float) -> Callable[[int, int], None]:
        """A progress callback for the runtime's measure: raises `_Stopped` once the client has gone (checked every
        `_CLIENT_CHECK_S`) or the deadline has passed, which ends the measurement and frees the lock."""
        next_check = [0.0]

        def check(done: int, total: int) -> None:
            now = time.time()
            if now < next_check[0]:
                return
            next_check[0] = now + _CLIENT_CHECK_S
            if now > deadline:
                raise _Stopped(client_gone=False)
            if self._client_gone():
                raise _Stopped(client_gone=True)

        return check


def start_agent(config: AgentConfig) -> AgentServer:
    """An agent serving in a daemon thread (for tests and for embedding); stop it with `server.close()`."""
    server = AgentServer(config)
    threading.Thread(target=server.serve_forever, name="edgeprune-agent", daemon=True).start()
    return server


def serve(config: AgentConfig, on_ready: Callable[[AgentServer], None] | None = None) -> None:
    """Serve until interrupted (the `edgeprune agent` command)."""
    try:
        server = AgentServer(config)
    except OSError as e:
        raise EdgePruneError(f"cannot listen on {config.host}:{config.port}: {e.strerror}") from None
    log.info("edgeprune agent on %s (%s)", server.url, "token required" if config.token else "loopback, no token")
    if on_ready is not None:
        on_ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()  # removes the uploads of requests still in flight


__all__ = ["AgentConfig", "AgentServer", "health", "is_loopback", "read_token_file", "serve", "start_agent",
           "DEFAULT_PORT", "DEFAULT_MAX_REQUEST_BYTES", "TARGET_HEADER", "REPEATS_HEADER"]
