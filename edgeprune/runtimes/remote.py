"""Measurement on another machine, for targets with a `[remote]` table: an `edgeprune agent`, or SSH.

    # targets/my-jetson.toml: a copy of jetson-orin-nano.toml plus
    # [remote]
    # agent = "http://jetson.local:8765"          # token in $EDGEPRUNE_AGENT_TOKEN (or [remote] token_env)
    stats = measure("model.onnx", load_target("targets/my-jetson.toml"))

Agent: the model's bytes and the target profile go to `POST /measure` (`edgeprune.fleet.agent` describes the protocol
and serves it; its constants are defined here, so the client never imports the server);
connection failures are retried with back-off, and a device that stays unreachable is `DeviceUnreachable` (exit 5).

SSH (`ssh = "user@host"`): the system's `scp` copies the model and the target profile (written as TOML, without its
`[remote]` table) to a fresh temporary folder on the device, `ssh` runs `edgeprune profile --json` there and removes
the folder. It needs key-based login (BatchMode: no password prompts) and `edgeprune` on the PATH of a
non-interactive shell on the device (or `$EDGEPRUNE_REMOTE_BIN`).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edgeprune.common.progress import Tick
from edgeprune.errors import DeviceUnreachable, EdgePruneError, ExitCode
from edgeprune.inputs.targets import Target
from edgeprune.runtimes.base import Calibration
from edgeprune.runtimes.stats import LatencyStats

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 1.0, 2.0)  # back-off between connection attempts; len + 1 attempts in all
HEALTH_TIMEOUT_S = 10.0
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=15")
REMOTE_BIN_ENV = "EDGEPRUNE_REMOTE_BIN"

# The agent protocol (both sides: this client and `edgeprune.fleet.agent`, which imports them from here).
HEALTH_PATH = "/health"
MEASURE_PATH = "/measure"
TARGET_HEADER = "X-Edgeprune-Target"  # the target profile as one line of JSON, or a bundled profile's name
REPEATS_HEADER = "X-Edgeprune-Repeats"  # optional: fresh sessions to time

_CONNECTION_ERRORS = (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine, socket.timeout,
                      TimeoutError)


def version(target: Target | None = None) -> str | None:
    """The version of the runtime that measures `target` on its device, as the agent reports it ("onnxruntime
    1.18.1"), so the measurement cache tells devices' runtime upgrades apart; "remote" when that cannot be asked
    (no target, SSH, or the agent not answering: the measurement itself then reports the problem)."""
    if target is None or target.remote is None or target.remote.agent is None:
        return "remote"
    try:
        info = agent_health(target, retry=False)
    except EdgePruneError:
        return "remote"
    rt = info.get("runtimes", {}).get(target.runtime, {})
    return f"{target.runtime} {rt.get('version')}" if rt.get("version") else "remote"


def unavailable_reason(target: Target | None = None) -> str | None:
    return None  # whether the device answers is found out when measuring


def measure(
    onnx_path: str | Path,
    target: Target,
    repeats: int | None = None,
    progress: Tick | None = None,
    calibration: Calibration | None = None,
) -> LatencyStats:
    """Latency of `onnx_path` on the device named by `target.remote`, measured there with the target's runtime.

    `calibration` does not travel: the agent's request and `edgeprune profile` carry the model and the target only,
    so a float model on an int8 device is calibrated there on random data (its latency is representative, its
    accuracy is not); a warning says so when calibration data is passed for an int8 target with a float model. A
    build sends Q/DQ models, quantised on the recipe's data before they leave (`quantize.py`): their scales travel.
    """
    if target.remote is None:
        raise EdgePruneError(f"target {target.name} has no [remote] table; the remote runtime needs one")
    if calibration is not None and target.precision == "int8" and not _quantized(Path(onnx_path)):
        log.warning("calibration data does not travel to a remote device: the int8 engine of %s on %s is calibrated "
                    "on random data there (its latency is representative, its accuracy is not)", Path(onnx_path).name,
                    target.remote.agent or target.remote.ssh)
    total = (repeats or target.measure.repeats) * target.measure.iterations
    if progress is not None:
        progress(0, total)
    if target.remote.agent is not None:
        stats = measure_agent(Path(onnx_path), target, repeats)
    else:
        stats = measure_ssh(Path(onnx_path), target, repeats)
    if progress is not None:
        progress(total, total)
    return stats


def _quantized(path: Path) -> bool:
    import onnx

    from edgeprune.export.quantize import has_qdq

    return has_qdq(onnx.load(str(path), load_external_data=False))


# ---------------------------------------------------------------- agent


def _token(target: Target) -> str | None:
    assert target.remote is not None
    token = os.environ.get(target.remote.token_env)
    return token.strip() if token and token.strip() else None


def _opener() -> urllib.request.OpenerDirector:
    # The device is on the local network: proxies from the environment would only get in the way.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300] or "(no message)"


def _request(target: Target, method: str, path: str, body: Path | None = None, headers: dict[str, str] | None = None,
             timeout: float | None = None, retry: bool = True) -> dict[str, Any]:
    """One JSON exchange with the target's agent, retrying connection failures; HTTP errors become EdgePruneErrors."""
    assert target.remote is not None and target.remote.agent is not None
    url = target.remote.agent.rstrip("/") + path
    timeout = target.remote.timeout_s if timeout is None else timeout
    hdrs = dict(headers or {})
    token = _token(target)
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    delays = RETRY_DELAYS_S if retry else ()
    last: BaseException | None = None
    for attempt in range(len(delays) + 1):
        if attempt:
            time.sleep(delays[attempt - 1])
        data = body.read_bytes() if body is not None else None
        if data is not None:
            hdrs["Content-Type"] = "application/octet-stream"
        try:
            req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
            with _opener().open(req, timeout=timeout) as resp:
                raw = resp.read()
            try:
                return json.loads(raw)
            except ValueError as e:
                raise EdgePruneError(f"the agent at {url} answered with something that is not JSON ({e}); is that "
                                     f"address an edgeprune agent?") from None
        except urllib.error.HTTPError as e:
            raise _http_error(target, e.code, _error_message(e.read()), e.headers.get("Retry-After")) from None
        except urllib.error.URLError as e:
            last = e.reason if isinstance(e.reason, BaseException) else e
            if isinstance(last, (socket.timeout, TimeoutError)) and method != "GET":
                break  # the device may be measuring it still: sending it again would queue a second measurement
        except (socket.timeout, TimeoutError) as e:
            last = e
            if method != "GET":
                break
        except _CONNECTION_ERRORS as e:
            last = e
        except (http.client.InvalidURL, ValueError) as e:  # a URL or setting the checks let through
            raise EdgePruneError(f"cannot send a request to the agent at {url} ({e}); check [remote] agent and "
                                 f"timeout_s in the target file") from None
        log.info("agent %s: attempt %d failed (%s)", url, attempt + 1, last)
    if isinstance(last, (socket.timeout, TimeoutError)):
        raise DeviceUnreachable(f"the agent at {url} did not answer within {timeout:.0f} s; raise [remote] "
                                f"timeout_s in the target file if the device is just slow")
    raise DeviceUnreachable(
        f"cannot reach the edgeprune agent at {url} ({type(last).__name__}: {last}) after {len(delays) + 1} "
        f"attempt{'s' if delays else ''}; is `edgeprune agent --host 0.0.0.0` running on the device, and is that "
        f"address reachable from here?"
    )


class AgentBusy(DeviceUnreachable):
    """503 with Retry-After: the agent's queue is full; send the request again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _http_error(target: Target, status: int, message: str, retry_after: str | None = None) -> EdgePruneError:
    assert target.remote is not None
    where = target.remote.agent
    if status == 503 and retry_after is not None and retry_after.strip().isdigit():
        return AgentBusy(f"the agent at {where} is busy: {message}", float(retry_after))
    if status == 401:
        env = target.remote.token_env
        given = "a token that the agent refused" if _token(target) else f"no token (${env} is not set)"
        return EdgePruneError(f"the agent at {where} requires its token and this request had {given}: set ${env} "
                              f"to the contents of the agent's --token-file ({message})")
    if status == 503:
        return DeviceUnreachable(f"the agent at {where} cannot measure this target: {message}")
    return EdgePruneError(f"the agent at {where} answered {status}: {message}")


def agent_health(target: Target, retry: bool = True) -> dict[str, Any]:
    """The agent's `GET /health`: edgeprune and runtime versions on the device, and its request size limit."""
    assert target.remote is not None
    timeout = min(HEALTH_TIMEOUT_S, target.remote.timeout_s)
    return _request(target, "GET", HEALTH_PATH, timeout=timeout, retry=retry)


def measure_agent(onnx_path: Path, target: Target, repeats: int | None = None) -> LatencyStats:
    """Measure through the target's `edgeprune agent`."""
    info = agent_health(target)
    limit = info.get("max_request_bytes")
    size = onnx_path.stat().st_size
    if isinstance(limit, int) and size > limit:
        raise EdgePruneError(f"{onnx_path.name} is {size / 2**20:.1f} MiB and the agent at {target.remote.agent} "
                             f"accepts at most {limit / 2**20:.1f} MiB; restart it with a larger --max-request-mb")
    profile = target.to_dict()
    profile.pop("remote", None)
    headers = {TARGET_HEADER: json.dumps(profile, separators=(",", ":"))}
    if repeats is not None:
        headers[REPEATS_HEADER] = str(repeats)
    deadline = time.monotonic() + target.remote.timeout_s
    while True:
        try:
            answer = _request(target, "POST", MEASURE_PATH, body=onnx_path, headers=headers)
            break
        except AgentBusy as e:  # its queue is full: wait as long as it says, within the target's timeout_s
            if time.monotonic() + e.retry_after > deadline:
                raise
            log.info("%s; sending it again in %.0f s", e, e.retry_after)
            time.sleep(e.retry_after)
    try:
        stats = LatencyStats.from_dict(answer)
    except (TypeError, ValueError) as e:
        raise EdgePruneError(f"the agent at {target.remote.agent} answered without latency figures ({e})") from None
    return stats


# ---------------------------------------------------------------- ssh


def _toml_string(text: str) -> str:
    # json's escapes are TOML's, except that TOML has no surrogate pairs (so keep non-ASCII as UTF-8) and wants DEL
    # escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return f"[{', '.join(_toml_value(v) for v in value)}]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):  # a float stays a float: max_seconds = 0.5 must not reach the device as 0
        return repr(value)
    return str(int(value))


def target_toml(target: Target) -> str:
    """The target as a TOML profile file, without its [remote] table (the device measures locally); reading it back
    gives a target with the same fingerprint."""
    d = target.to_dict()
    d.pop("remote", None)
    lines = [f"{key} = {_toml_value(d[key])}"
             for key in ("name", "aliases", "description", "runtime", "precision", "channel_multiple", "threads", "arch")]
    lines.append("")
    lines.append("[measure]")
    lines += [f"{key} = {_toml_value(value)}" for key, value in d["measure"].items()]
    if d.get("quantization"):  # how the device quantises a float model it is sent (a build sends Q/DQ models)
        lines += ["", "[quantization]"] + [f"{key} = {_toml_value(value)}" for key, value in d["quantization"].items()]
    return "\n".join(lines) + "\n"


def stats_from_profile_json(doc: dict[str, Any], target: Target) -> LatencyStats:
    """LatencyStats from the output of `edgeprune profile --json`."""
    try:
        lat = doc["latency_ms"]
        return LatencyStats(
            median=float(lat["median"]), p90=float(lat["p90"]), std=float(lat["std"]), min=float(lat["min"]),
            max=float(lat["max"]), mean=float(lat["mean"]), n=int(lat["n"]),
            repeat_medians=tuple(float(x) for x in doc.get("repeat_medians_ms", ())),
            target=target.name, runtime=str(doc["runtime"]), runtime_version=str(doc["runtime_version"]),
            precision=target.precision, source="measured", timing=str(doc.get("timing", "wall")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise EdgePruneError(f"`edgeprune profile --json` on the device printed no usable result ({e!r})") from None


def _ssh_run(cmd: list[str], what: str, host: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except FileNotFoundError:
        raise EdgePruneError(f"{cmd[0]} is not installed here; the [remote] ssh setting needs OpenSSH's ssh and "
                             f"scp") from None
    except subprocess.TimeoutExpired:
        raise DeviceUnreachable(f"{what} on {host} did not finish within {timeout:.0f} s ([remote] "
                                f"timeout_s)") from None
    if proc.returncode == 255:  # ssh's and scp's own failure: connection, authentication, host key
        said = (proc.stderr.strip().splitlines() or ["ssh failed"])[-1]
        raise DeviceUnreachable(f"cannot {what} on {host}: {said}; check that `ssh {host}` logs in without a "
                                f"password prompt")
    return proc


def measure_ssh(onnx_path: Path, target: Target, repeats: int | None = None) -> LatencyStats:
    """Measure with `edgeprune profile --json` run on the device over SSH."""
    assert target.remote is not None and target.remote.ssh is not None
    host = target.remote.ssh
    timeout = target.remote.timeout_s
    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            raise EdgePruneError(f"{tool} is not installed here; the [remote] ssh setting needs OpenSSH")
    made = _ssh_run(["ssh", *SSH_OPTIONS, host, "mktemp -d /tmp/edgeprune.XXXXXX"], "make a folder", host, timeout)
    remote_dir = made.stdout.strip()
    if made.returncode != 0 or not remote_dir.startswith("/tmp/edgeprune."):
        raise EdgePruneError(f"cannot make a temporary folder on {host}: {made.stderr.strip()[-300:]}")
    try:
        with tempfile.TemporaryDirectory(prefix="edgeprune-ssh-") as tmp:
            local_target = Path(tmp) / "target.toml"
            local_target.write_text(target_toml(target))
            local_model = Path(tmp) / "model.onnx"
            shutil.copyfile(onnx_path, local_model)
            copied = _ssh_run(["scp", "-q", *SSH_OPTIONS, str(local_model), str(local_target), f"{host}:{remote_dir}/"],
                              "copy the model", host, timeout)
            if copied.returncode != 0:
                raise EdgePruneError(f"scp to {host} failed: {copied.stderr.strip()[-300:]}")
        binary = os.environ.get(REMOTE_BIN_ENV, "edgeprune")
        profile = [binary, "profile", "--json", "--no-cache", "--device", f"{remote_dir}/target.toml"]
        if repeats is not None:
            profile += ["--repeats", str(repeats)]
        profile.append(f"{remote_dir}/model.onnx")
        proc = _ssh_run(["ssh", *SSH_OPTIONS, host, shlex.join(profile)], "run edgeprune profile", host, timeout)
    finally:
        subprocess.run(["ssh", *SSH_OPTIONS, host, shlex.join(["rm", "-rf", remote_dir])], capture_output=True,
                       timeout=60, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode == 127:
            last += f"; is edgeprune installed on {host} and on the PATH of non-interactive shells (or set " \
                    f"${REMOTE_BIN_ENV})?"
        cls = DeviceUnreachable if proc.returncode == int(ExitCode.DEVICE_UNREACHABLE) else EdgePruneError
        raise cls(f"`edgeprune profile` on {host} failed: {last}")
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        raise EdgePruneError(f"`edgeprune profile --json` on {host} printed no JSON: {proc.stdout[-300:]!r}") from None
    return stats_from_profile_json(doc, target)


__all__ = ["HEALTH_PATH", "MEASURE_PATH", "REPEATS_HEADER", "RETRY_DELAYS_S", "TARGET_HEADER", "agent_health",
           "measure", "measure_agent", "measure_ssh", "stats_from_profile_json", "target_toml", "unavailable_reason",
           "version"]
