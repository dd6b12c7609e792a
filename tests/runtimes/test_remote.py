"""Remote measurement: through a real `edgeprune agent` on loopback, and the pieces of the SSH path."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import time

import onnxruntime
import pytest

from edgeprune import cli
from edgeprune.errors import DeviceUnreachable, EdgePruneError, ExitCode
from edgeprune.fleet.agent import AgentConfig, start_agent
from edgeprune.inputs.targets import RemoteConfig, load_target, load_target_file
from edgeprune.runtimes import MeasurementCache, measure, remote
from edgeprune.runtimes import onnxruntime as ort_backend
from edgeprune.runtimes.stats import LatencyStats

TOKEN = "test-token-3f9c1d"
TOKEN_ENV = "EDGEPRUNE_TEST_AGENT_TOKEN"


@pytest.fixture(scope="module")
def agent():
    server = start_agent(AgentConfig(host="127.0.0.1", port=0, token=TOKEN))
    yield server
    server.close()


def via_agent(target, url: str, timeout_s: float = 60.0):
    return dataclasses.replace(target, remote=RemoteConfig(agent=url, token_env=TOKEN_ENV, timeout_s=timeout_s))


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_measure_through_agent_gives_same_fields_as_local(agent, tiny_onnx, fast_cpu, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    local = ort_backend.measure(tiny_onnx, fast_cpu)
    progress = []
    far = remote.measure(tiny_onnx, via_agent(fast_cpu, agent.url), progress=lambda d, t: progress.append((d, t)))
    assert isinstance(far, LatencyStats)
    same = ("target", "runtime", "runtime_version", "precision", "timing", "n", "source")
    assert {k: getattr(far, k) for k in same} == {k: getattr(local, k) for k in same}
    assert (far.runtime, far.runtime_version, far.n) == ("onnxruntime", onnxruntime.__version__, 20)
    assert len(far.repeat_medians) == 2
    assert far.median == pytest.approx(sum(far.repeat_medians) / 2)  # median of the two repeat medians
    assert 0 < far.min <= far.median <= far.max and far.min <= far.p90 <= far.max
    assert progress == [(0, 20), (20, 20)]


def test_measure_through_agent_is_cached_under_the_agents_runtime_version(agent, tiny_onnx, fast_cpu, monkeypatch,
                                                                          tmp_path):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    target = via_agent(fast_cpu, agent.url)
    assert remote.version(target) == f"onnxruntime {onnxruntime.__version__}"
    cache = MeasurementCache(tmp_path)
    first = measure(tiny_onnx, target, cache=cache)
    again = measure(tiny_onnx, target, cache=cache)
    assert first.source == "measured" and again.source == "cache"
    assert dataclasses.replace(again, source="measured") == first


def test_measure_with_repeats_asks_agent_for_them(agent, tiny_onnx, fast_cpu, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    s = remote.measure(tiny_onnx, via_agent(fast_cpu, agent.url), repeats=1)
    assert s.n == fast_cpu.measure.iterations and len(s.repeat_medians) == 1


def test_measure_with_wrong_token_names_the_variable(agent, tiny_onnx, fast_cpu, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    with pytest.raises(EdgePruneError, match=f"refused.*set \\${TOKEN_ENV}") as info:
        remote.measure(tiny_onnx, via_agent(fast_cpu, agent.url))
    assert info.value.code == ExitCode.BAD_INPUT


def test_measure_without_token_says_variable_is_unset(agent, tiny_onnx, fast_cpu, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(EdgePruneError, match=f"\\${TOKEN_ENV} is not set"):
        remote.measure(tiny_onnx, via_agent(fast_cpu, agent.url))


def test_measure_unreachable_agent_is_device_unreachable_after_retries(tiny_onnx, fast_cpu, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS_S", (0.05, 0.1))
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(DeviceUnreachable, match="after 3 attempts") as info:
        remote.measure(tiny_onnx, via_agent(fast_cpu, url))
    assert info.value.code == ExitCode.DEVICE_UNREACHABLE
    assert time.perf_counter() - t0 >= 0.15  # it did back off between the attempts
    assert remote.version(via_agent(fast_cpu, url)) == "remote"  # the cache key falls back; measure reports why


def test_measure_refuses_model_over_agents_limit_before_uploading(tiny_onnx, fast_cpu, monkeypatch):
    server = start_agent(AgentConfig(port=0, max_request_bytes=1024))
    try:
        with pytest.raises(EdgePruneError, match="accepts at most 0.0 MiB; restart it with a larger --max-request-mb"):
            remote.measure(tiny_onnx, via_agent(fast_cpu, server.url))
        assert server.measurements == 0
    finally:
        server.close()


def test_measure_reports_runtime_missing_on_device(agent, tiny_onnx, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    target = via_agent(dataclasses.replace(load_target("x86-trt"), arch="any"), agent.url)
    if remote.agent_health(target)["runtimes"]["trtexec"]["available"]:
        pytest.skip("trtexec is installed here")
    with pytest.raises(DeviceUnreachable, match="cannot measure target x86-trt with trtexec: trtexec is not on PATH"):
        remote.measure(tiny_onnx, target)


# ---------------------------------------------------------------- ssh pieces



def test_a_busy_agent_is_asked_again_after_its_retry_after(tiny_onnx, fast_cpu, monkeypatch):
    """An agent whose queue is full answers 503 with Retry-After; the client waits that long and sends the model
    again (within the target's timeout_s), where a plain 503 (no runtime on the device) still fails at once."""
    import threading

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    server = start_agent(AgentConfig(host="127.0.0.1", port=0, token=TOKEN, max_queue=0))
    try:
        slow = dataclasses.replace(fast_cpu, measure=dataclasses.replace(fast_cpu.measure, iterations=3000,
                                                                         repeats=1))
        first = threading.Thread(target=remote.measure, args=(tiny_onnx, via_agent(slow, server.url)))
        first.start()
        deadline = time.monotonic() + 30
        while server.measurements == 0 and not server.measure_lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.measure_lock.locked()  # the slow one is measuring: the next is answered 503 + Retry-After
        with pytest.raises(remote.AgentBusy, match="is busy: 0 measurements already wait") as e:
            remote.measure(tiny_onnx, via_agent(fast_cpu, server.url, timeout_s=0.5))
        assert e.value.retry_after >= 1
        stats = remote.measure(tiny_onnx, via_agent(fast_cpu, server.url, timeout_s=60))  # waits, then measured
        first.join(timeout=60)
        assert stats.n == 20 and server.measurements == 2
    finally:
        server.close()


def test_target_toml_round_trips_without_remote(tmp_path):
    original = dataclasses.replace(load_target("jetson"), description='Orin "nano" – 8 GB, ü\ttab',
                                   remote=RemoteConfig(ssh="nvidia@jetson.local"))
    path = tmp_path / "t.toml"
    path.write_text(remote.target_toml(original))
    loaded = load_target_file(path)
    assert loaded.remote is None
    assert loaded.to_dict() == dataclasses.replace(original, remote=None).to_dict()


def test_target_toml_carries_an_int8_targets_quantisation_settings(tmp_path):
    """The agent quantises a float model it is sent as the build host's target says (its [quantization] table)."""
    from edgeprune.inputs.targets import QuantizeConfig

    original = dataclasses.replace(load_target("cpu-int8"), quantization=QuantizeConfig(method="percentile",
                                                                                          percentile=99.9, samples=64))
    path = tmp_path / "t.toml"
    path.write_text(remote.target_toml(original))
    loaded = load_target_file(path)
    assert loaded.quantization == original.quantization and loaded.fingerprint() == original.fingerprint()
    assert "[quantization]" not in remote.target_toml(load_target("cpu"))


def test_stats_from_profile_json_reads_real_profile_output(tiny_onnx, fast_cpu, tmp_path, capsys):
    path = tmp_path / "fast.toml"
    path.write_text(remote.target_toml(fast_cpu))
    assert cli.main(["profile", "--json", "--no-cache", "--device", str(path), str(tiny_onnx)]) == 0
    doc = json.loads(capsys.readouterr().out)
    s = remote.stats_from_profile_json(doc, fast_cpu)
    lat = doc["latency_ms"]
    assert (s.median, s.p90, s.std, s.min, s.max, s.mean, s.n) == \
        (lat["median"], lat["p90"], lat["std"], lat["min"], lat["max"], lat["mean"], lat["n"])
    assert list(s.repeat_medians) == doc["repeat_medians_ms"]
    assert (s.runtime, s.runtime_version, s.timing) == ("onnxruntime", onnxruntime.__version__, "wall")


@pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("scp") is None, reason="needs OpenSSH's ssh and scp")
def test_measure_ssh_unreachable_host_is_device_unreachable(tiny_onnx, fast_cpu, tmp_path):
    # Nothing answers SSH on this loopback address, or it refuses a password-less login (BatchMode): ssh exits 255.
    target = dataclasses.replace(fast_cpu, remote=RemoteConfig(ssh="edgeprune-test@127.0.0.9", timeout_s=20))
    with pytest.raises(DeviceUnreachable, match="cannot make a folder on edgeprune-test@127.0.0.9") as info:
        remote.measure(tiny_onnx, target)
    assert info.value.code == ExitCode.DEVICE_UNREACHABLE
