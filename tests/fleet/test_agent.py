"""The profiling agent, served on loopback by the test and spoken to over real HTTP."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import onnxruntime
import pytest

from edgeprune import __version__, cli
from edgeprune.errors import EdgePruneError
from edgeprune.fleet.agent import TARGET_HEADER, AgentConfig, is_loopback, read_token_file, start_agent
from edgeprune.inputs.targets import MeasureConfig, load_target
from edgeprune.runtimes import local_arch
from edgeprune.runtimes.stats import LatencyStats

TOKEN = "agent-test-token-8d2e"


@pytest.fixture
def model(tiny_onnx: Path) -> Path:
    """The suite's tiny conv net (tests/conftest.py), exported with torch's TorchScript exporter."""
    return tiny_onnx


@pytest.fixture(scope="module")
def agent():
    server = start_agent(AgentConfig(host="127.0.0.1", port=0, token=TOKEN))
    yield server
    server.close()


def fast_target(iterations: int = 5) -> dict:
    t = dataclasses.replace(load_target("cpu"), measure=MeasureConfig(warmup=1, iterations=iterations, repeats=1))
    return t.to_dict()


def call(url: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=body, headers=hdrs, method="POST" if body is not None else "GET")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_measure(url: str, model_bytes: bytes, target: dict | str, token: str | None = TOKEN) -> tuple[int, dict]:
    value = target if isinstance(target, str) else json.dumps(target)
    return call(url, "/measure", model_bytes, token, {TARGET_HEADER: value})


def test_agent_health_reports_versions(agent):
    status, info = call(agent.url, "/health")
    assert status == 200
    assert info["edgeprune"] == __version__ and info["arch"] == local_arch()
    assert info["runtimes"]["onnxruntime"] == {"version": onnxruntime.__version__, "available": True, "reason": None}
    assert set(info["runtimes"]) == {"onnxruntime", "tensorrt", "trtexec"}
    assert info["max_request_bytes"] == 512 * 1024 * 1024


def test_agent_measures_posted_model_with_onnxruntime(agent, model):
    status, answer = post_measure(agent.url, model.read_bytes(), fast_target())
    assert status == 200
    stats = LatencyStats.from_dict(answer)
    assert (stats.target, stats.runtime, stats.runtime_version, stats.timing, stats.n) == \
        ("cpu", "onnxruntime", onnxruntime.__version__, "wall", 5)
    assert 0 < stats.min <= stats.median <= stats.max
    assert answer["agent"]["finished_at"] >= answer["agent"]["started_at"]


def test_agent_accepts_bundled_target_name_and_repeats(agent, model):
    status, answer = call(agent.url, "/measure", model.read_bytes(), TOKEN,
                          {TARGET_HEADER: "cpu-1t", "X-Edgeprune-Repeats": "1"})  # an alias of the cpu profile
    assert status == 200
    assert answer["target"] == "cpu" and answer["n"] == load_target("cpu").measure.iterations


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_agent_rejects_missing_or_wrong_token(agent, model, token):
    status, answer = post_measure(agent.url, model.read_bytes(), fast_target(), token=token)
    assert status == 401 and "Authorization: Bearer" in answer["error"]
    assert call(agent.url, "/health", token=token)[0] == 401
    assert call(agent.url, "/health")[0] == 200  # and keeps serving


def test_agent_rejects_non_onnx_upload_and_keeps_serving(agent, model):
    status, answer = post_measure(agent.url, b"this is not a protobuf" * 50, fast_target())
    assert status == 400 and "the uploaded model is not a readable ONNX model" in answer["error"]
    status, _ = post_measure(agent.url, model.read_bytes(), fast_target())
    assert status == 200


@pytest.mark.parametrize("target, message", [
    ("no-such-device", "unknown target 'no-such-device'"),
    ("../../etc/passwd", "unknown target"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"name": "x", "precision": "fp64"}), "precision"),
])
def test_agent_rejects_bad_target(agent, model, target, message):
    status, answer = post_measure(agent.url, model.read_bytes(), target)
    assert status == 400 and message in answer["error"]


def test_agent_rejects_oversize_upload_with_413_and_keeps_serving(model):
    server = start_agent(AgentConfig(port=0, max_request_bytes=1024))
    try:
        body = model.read_bytes()
        assert len(body) > 1024
        status, answer = post_measure(server.url, body, fast_target(), token=None)
        assert status == 413 and f"the model is {len(body)} bytes" in answer["error"]
        assert "--max-request-mb" in answer["error"]
        status, info = call(server.url, "/health", token=None)
        assert status == 200 and info["max_request_bytes"] == 1024
        assert server.measurements == 0
    finally:
        server.close()


def test_agent_requires_content_length(agent):
    conn = http.client.HTTPConnection(*agent.server_address[:2], timeout=30)
    try:
        conn.putrequest("POST", "/measure")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader(TARGET_HEADER, "cpu")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length is required" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_agent_answers_404_for_unknown_path(agent):
    status, answer = call(agent.url, "/metrics")
    assert status == 404 and "GET /health or POST /measure" in answer["error"]


def at_once(n: int, request, timeout: float) -> list:
    """`request()` from `n` threads released together; the answers of those that finished within `timeout`."""
    answers: list = []
    start = threading.Barrier(n)

    def client() -> None:
        start.wait()
        answers.append(request())

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return answers


def test_agent_serialises_concurrent_measurements(agent, model):
    body = model.read_bytes()
    target = fast_target(iterations=200)
    answers = at_once(4, lambda: post_measure(agent.url, body, target), timeout=120)
    assert [status for status, _ in answers] == [200] * 4
    spans = sorted((a["agent"]["started_at"], a["agent"]["finished_at"]) for _, a in answers)
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin >= end  # the next measurement starts only after the previous one finished
    assert all(a["n"] == 200 for _, a in answers)


def test_agent_on_all_interfaces_requires_token():
    server = start_agent(AgentConfig(host="0.0.0.0", port=0, token=TOKEN))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        status, answer = call(url, "/health", token=None)
        assert status == 401 and "missing or wrong token" in answer["error"]
        assert call(url, "/health")[0] == 200
    finally:
        server.close()


def test_agent_refuses_to_start_on_non_loopback_without_token(capsys):
    with pytest.raises(EdgePruneError, match="refusing to serve on 0.0.0.0 without a token"):
        AgentConfig(host="0.0.0.0")
    with pytest.raises(EdgePruneError, match="without a token"):
        AgentConfig(host="jetson.local")
    assert cli.main(["agent", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "refusing to serve on 0.0.0.0 without a token" in capsys.readouterr().err


def test_is_loopback_classifies_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "jetson.local"))


def test_read_token_file_strips_and_rejects_empty(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    path.chmod(0o600)
    assert read_token_file(path) == TOKEN
    path.write_text("\n")
    with pytest.raises(EdgePruneError, match="is empty"):
        read_token_file(path)
    with pytest.raises(EdgePruneError, match="cannot read the token file"):
        read_token_file(tmp_path / "missing")


def test_cli_agent_serves_with_token_file(tmp_path):
    import subprocess
    import sys

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    proc = subprocess.Popen([sys.executable, "-m", "edgeprune", "agent", "--port", "0", "--token-file", str(token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("edgeprune agent listening on 127.0.0.1:") and "token required" in line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        assert call(f"http://127.0.0.1:{port}", "/health", token=None)[0] == 401
        status, info = call(f"http://127.0.0.1:{port}", "/health")
        assert status == 200 and info["edgeprune"] == __version__
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- bad models and hostile requests (the matrix's A rows)


@pytest.mark.parametrize("kind", ["A18_fails_at_run_time", "A19_external_data_traversal", "A19b_external_data_abs"])
def test_agent_answers_400_for_bad_models_without_its_paths(agent, tmp_path, kind):
    from tests.badinputs import external_data_onnx, tiny_onnx_file

    path = tmp_path / "m.onnx"
    if kind.startswith("A18"):
        tiny_onnx_file(path, dynamic_hw=True)
    else:
        external_data_onnx(path, "../../../../../../../../etc/hostname" if "traversal" in kind else "/etc/hostname")
    status, answer = post_measure(agent.url, path.read_bytes(), fast_target())
    assert status == 400, answer
    assert ("symbolic dimensions" if kind.startswith("A18") else "external weight data") in answer["error"]
    for shown in (str(agent.upload_dir), str(agent.upload_dir.resolve()), "edgeprune-agent-", "tmp"):
        assert shown not in answer["error"], answer["error"]
    assert call(agent.url, "/health")[0] == 200  # and it keeps serving


def test_agent_repeats_header_has_an_upper_bound(agent, model):
    status, answer = call(agent.url, "/measure", model.read_bytes(), TOKEN,
                          {TARGET_HEADER: "cpu", "X-Edgeprune-Repeats": "1000000"})
    assert status == 400 and "must be an integer in 1..100" in answer["error"]


def test_agent_refuses_unbounded_measurement_settings(agent, model):
    hostile = {**fast_target(), "measure": {"warmup": 0, "iterations": 10**12, "repeats": 1, "final_repeats": 1,
                                            "max_seconds": 0.0}}
    status, answer = post_measure(agent.url, model.read_bytes(), hostile)
    assert status == 400 and "measure.iterations must be in 1..100000" in answer["error"]


def hostile_target() -> dict:
    """Within every bound, yet about 10 minutes of timed runs of the tiny model: only the agent's limits stop it."""
    return {**fast_target(), "measure": {"warmup": 0, "iterations": 100_000, "repeats": 100, "final_repeats": 1,
                                         "max_seconds": 0.0}}


def test_A14_time_limit_frees_the_agent_for_the_next_client(model):
    """A request that would measure for minutes is stopped at the agent's --max-seconds (400, with the way out),
    and a second client, sent while it runs, is answered within 5 s."""
    server = start_agent(AgentConfig(port=0, max_seconds=2.0))
    try:
        body = model.read_bytes()
        hog: list[tuple[int, dict]] = []
        t = threading.Thread(target=lambda: hog.append(post_measure(server.url, body, hostile_target(), token=None)))
        t.start()
        time.sleep(0.5)
        sent = time.monotonic()
        status, answer = post_measure(server.url, body, fast_target(), token=None)
        waited = time.monotonic() - sent
        t.join(timeout=30)
        assert status == 200 and waited < 5.0, (status, waited)
        assert hog[0][0] == 400 and "limit of 2 s per request" in hog[0][1]["error"]
        assert "--max-seconds" in hog[0][1]["error"] and server.stopped == 1
    finally:
        server.close()


def test_A14_client_that_disconnects_frees_the_agent(model):
    """A client that sends a long measurement and goes away no longer holds the measurement lock: the agent notices
    within a fraction of a second, stops, and serves the next client within 5 s, although its time limit is 600 s."""
    import socket

    server = start_agent(AgentConfig(port=0))
    try:
        body = model.read_bytes()
        head = (f"POST /measure HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                f"{TARGET_HEADER}: {json.dumps(hostile_target())}\r\n\r\n").encode()
        sock = socket.create_connection(server.server_address[:2])
        sock.sendall(head + body)
        time.sleep(0.5)
        sock.close()  # gone, mid-measurement
        sent = time.monotonic()
        status, _ = post_measure(server.url, body, fast_target(), token=None)
        assert status == 200 and time.monotonic() - sent < 5.0
        assert server.stopped == 1 and server.measurements == 1
    finally:
        server.close()


def test_A28_sigterm_removes_the_agents_uploads(model, tmp_path):
    """`systemctl stop` (SIGTERM) mid-measurement: exit 143 and the upload folder is gone."""
    import signal
    import subprocess
    import sys

    tmpdir = tmp_path / "TMPDIR"
    tmpdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "edgeprune", "agent", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmpdir)})
    try:
        port = int(proc.stdout.readline().split("127.0.0.1:")[1].split()[0])
        url = f"http://127.0.0.1:{port}"
        threading.Thread(target=lambda: _ignore_errors(post_measure, url, model.read_bytes(), hostile_target(), None),
                         daemon=True).start()
        deadline = time.monotonic() + 30
        while not list(tmpdir.glob("edgeprune-agent-*/*/model.onnx")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmpdir.glob("edgeprune-agent-*/*/model.onnx")), "the upload never arrived"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "edgeprune: terminated", err
    assert [p.name for p in tmpdir.iterdir() if p.name != ".ses"] == []


def test_an_agent_killed_with_sigkill_has_its_upload_folder_removed_by_the_next_agent(tmp_path):
    """SIGKILL leaves no chance to clean up: the folder stays until the next agent starts in the same temporary
    folder, which removes the dead agent's (its PID is in the name) and keeps its own."""
    import signal
    import subprocess
    import sys

    tmpdir = tmp_path / "TMPDIR"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "edgeprune", "agent", "--port", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        assert "127.0.0.1:" in proc.stdout.readline()
        return proc

    first = start()
    try:
        folders = list(tmpdir.glob(f"edgeprune-agent-{first.pid}-*"))
        assert len(folders) == 1
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL and folders[0].is_dir()  # left behind
        second = start()
        try:
            assert not folders[0].exists() and len(list(tmpdir.glob(f"edgeprune-agent-{second.pid}-*"))) == 1
        finally:
            second.send_signal(signal.SIGTERM)
            second.communicate(timeout=30)
    finally:
        first.kill()
    assert not list(tmpdir.glob("edgeprune-agent-*"))


def _ignore_errors(fn, *args):  # noqa: ANN001, ANN202
    try:
        return fn(*args)
    except OSError:
        return None


# ---------------------------------------------------------------- under load (audit AG-concurrent30, AG-bomb_input)


def raw_post(url: str, body: bytes, target: dict) -> tuple[object, dict, dict]:
    """One POST /measure on its own connection: (status or the exception's name, headers, JSON answer)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/measure", body, {"Authorization": f"Bearer {TOKEN}",
                                                TARGET_HEADER: json.dumps(target)})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__, {}, {}
    finally:
        conn.close()


def test_thirty_concurrent_clients_each_get_an_answer_and_a_full_queue_says_when_to_retry(model):
    """Was: 1-5 of 30 clients reset with no HTTP status (socketserver's listen backlog of 5), and no bound on the
    uploads waiting. Now every client gets 200, or 503 with Retry-After once `max_queue` requests wait."""
    server = start_agent(AgentConfig(host="127.0.0.1", port=0, token=TOKEN, max_queue=4))
    try:
        body, target = model.read_bytes(), fast_target(iterations=100)
        answers = at_once(30, lambda: raw_post(server.url, body, target), timeout=150)
        statuses = sorted(str(s) for s, _, _ in answers)
        assert len(answers) == 30 and set(statuses) <= {"200", "503"}, statuses
        assert 5 <= statuses.count("200") < 30, statuses  # the running one and the 4 waiting, at least
        for status, headers, answer in answers:
            if status == 503:
                assert int(headers["Retry-After"]) >= 1 and "--max-queue is 4" in answer["error"], (headers, answer)
        assert server.admitted == 0 and call(server.url, "/health")[0] == 200
        assert not any(server.upload_dir.iterdir())  # no upload left behind
    finally:
        server.close()


def test_agent_answers_400_naming_the_size_of_a_huge_declared_input(agent, tmp_path):
    """Was 500 "the agent failed: MemoryError ... 74.5 GiB ... float64" with a traceback in its log."""
    from tests.runtimes.test_onnxruntime import huge_input_onnx

    status, answer = post_measure(agent.url, huge_input_onnx(tmp_path / "h.onnx").read_bytes(), fast_target())
    assert status == 400, answer
    assert "model input x declares shape [1, 1, 100000, 100000]: 37.3 GiB of float32" in answer["error"]
    assert call(agent.url, "/health")[0] == 200
