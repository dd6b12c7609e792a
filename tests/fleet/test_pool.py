"""The device pool: devices.toml, board state (one measurement per board, the least used first, boards marked
down), and measurements routed to real agents on loopback, failing over when one dies."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from edgeprune.errors import DeviceUnreachable, EdgePruneError
from edgeprune.fleet.pool import BoardState, load_pool, measure_on_pool, pooled_measure
from edgeprune.inputs.targets import load_target
from edgeprune.runtimes.stats import stats_from_repeats
from tests.agents import devices_toml, start_agents

POOL = """
[cpu]
boards = [
  { name = "lab-a", agent = "http://127.0.0.1:9001" },
  { name = "lab-b", agent = "http://127.0.0.1:9002", token_env = "LAB_B_TOKEN", timeout_s = 30 },
]
[rpi5]
boards = [{ name = "pi-1", ssh = "pi@10.0.0.12" }]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(text)
    return path


def test_pool_reads_boards_by_kind_and_their_ray_resources(tmp_path):
    pool = load_pool(write(tmp_path, POOL))
    assert pool.kinds == ("cpu", "rpi5")
    assert [b.name for b in pool.of_kind("cpu")] == ["lab-a", "lab-b"]
    b = pool.of_kind("cpu")[1]
    assert (b.token_env, b.timeout_s) == ("LAB_B_TOKEN", 30.0)
    remote = b.target(load_target("cpu")).remote
    assert (remote.agent, remote.token_env) == ("http://127.0.0.1:9002", "LAB_B_TOKEN")
    assert b.target(load_target("cpu")).fingerprint() == load_target("cpu").fingerprint()  # boards share the cache
    assert pool.of_kind("rpi5")[0].address == "ssh pi@10.0.0.12"
    assert pool.ray_resources() == {"device:lab-a": 1.0, "device:lab-b": 1.0, "device:pi-1": 1.0, "kind:cpu": 2.0,
                                    "kind:rpi5": 1.0}
    assert pool.kind_for(load_target("rpi5")) == "rpi5"
    with pytest.raises(EdgePruneError, match="target jetson-orin-nano has no board.*kinds are cpu, rpi5") as e:
        pool.kind_for(load_target("jetson"))
    assert e.value.code == 2


@pytest.mark.parametrize("text, words", [
    ('[cpu]\nboards = [{ name = "a", agent = "http://h:1" }]\nspare = 1\n', "unknown key 'spare'"),
    ('[cpu]\nboards = [{ name = "a", agent = "http://h:1", port = 2 }]\n', "unknown key 'port'"),
    ('[cpu]\nboards = [{ name = "a", agent = "http://h:1", ssh = "u@h" }]\n', "exactly one of agent"),
    ('[cpu]\nboards = [{ name = "a" }]\n', "exactly one of agent"),
    ('[cpu]\nboards = [{ name = "a b", agent = "http://h:1" }]\n', "letters, digits"),
    ('[cpu]\nboards = [{ name = "a", agent = "ftp://h:1" }]\n', "http:// or https://"),
    ('[cpu]\nboards = [{ name = "a", agent = "http://h:1" }]\n[rpi5]\nboards = [{ name = "a", ssh = "u@h" }]\n',
     "unique, found a"),
    ('[cpu]\nboards = []\n', "boards is empty"),
    ('cpu = "http://h:1"\n', "must be a table"),
    ('', "lists no boards"),
])
def test_bad_devices_files_are_refused(tmp_path, text, words):
    with pytest.raises(EdgePruneError, match=words) as e:
        load_pool(write(tmp_path, text))
    assert e.value.code == 2


def fake_figure(ms: float = 1.0):
    return stats_from_repeats([[ms] * 3], target="cpu", runtime="onnxruntime", runtime_version="x", precision="fp32")


def test_one_measurement_per_board_at_a_time_least_used_first(tmp_path, monkeypatch, tiny_onnx):
    """Eight measurements from eight threads on two boards: never two at once on a board, four each."""
    pool = load_pool(write(tmp_path, POOL))
    state = BoardState(pool)
    running: dict[str, int] = {"http://127.0.0.1:9001": 0, "http://127.0.0.1:9002": 0}
    most = dict.fromkeys(running, 0)
    lock = threading.Lock()

    def measure(path, target, **kw):
        url = target.remote.agent
        with lock:
            running[url] += 1
            most[url] = max(most[url], running[url])
        time.sleep(0.05)
        with lock:
            running[url] -= 1
        return fake_figure()

    monkeypatch.setattr("edgeprune.runtimes.measure", measure)
    log: list[dict] = []
    fn = pooled_measure(state, "cpu", log)
    threads = [threading.Thread(target=fn, args=(tiny_onnx, load_target("cpu"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == {"http://127.0.0.1:9001": 1, "http://127.0.0.1:9002": 1}
    assert len(log) == 8 and {m["board"] for m in log} == {"lab-a", "lab-b"}
    summary = state.summary()
    assert summary["lab-a"]["measurements"] + summary["lab-b"]["measurements"] == 8
    assert abs(summary["lab-a"]["measurements"] - summary["lab-b"]["measurements"]) <= 2
    assert summary["pi-1"]["measurements"] == 0  # another kind
    assert state.counts() == {"free": 3, "busy": 0, "down": 0}


def test_a_failing_board_is_marked_down_and_the_measurement_retried(tmp_path, monkeypatch, tiny_onnx):
    pool = load_pool(write(tmp_path, POOL))
    changes: list[dict] = []
    state = BoardState(pool, on_change=changes.append)

    def measure(path, target, **kw):
        if target.remote.agent.endswith(":9001"):
            raise DeviceUnreachable("cannot reach the edgeprune agent at http://127.0.0.1:9001")
        return fake_figure(2.0)

    monkeypatch.setattr("edgeprune.runtimes.measure", measure)
    stats, board = measure_on_pool(state, "cpu", tiny_onnx, load_target("cpu"))
    assert (stats.median, board) == (2.0, "lab-b")  # lab-a was tried first (least used, file order) and failed
    assert state.summary()["lab-a"]["state"] == "down"
    assert "9001" in state.summary()["lab-a"]["down_reason"]
    assert {"busy": 0, "free": 2, "down": 1} == changes[-1]
    state.mark_down("lab-b", "gone too")
    with pytest.raises(DeviceUnreachable, match="every board of kind cpu is down.*lab-a.*lab-b: gone too") as e:
        measure_on_pool(state, "cpu", tiny_onnx, load_target("cpu"))
    assert e.value.code == 5


@pytest.fixture(scope="module")
def agents():
    running = start_agents(good=None, other=None, dying=1)
    yield running
    for agent in running.values():
        agent.stop()


def test_measurements_fail_over_between_real_agents(tmp_path, tiny_onnx, monkeypatch, agents):
    """Two agent processes on loopback; one dies on its second measurement, with the request in flight: every
    measurement still gets its figure (the model's, from the other board), and the dead board is down."""
    monkeypatch.setattr("edgeprune.runtimes.remote.RETRY_DELAYS_S", (0.1, 0.2))
    pool = load_pool(devices_toml(tmp_path / "devices.toml", {n: agents[n] for n in ("good", "dying")}))
    state = BoardState(pool)
    log: list[dict] = []
    fn = pooled_measure(state, "cpu", log)
    figures = [fn(tiny_onnx, load_target("cpu")).median for _ in range(4)]
    from tests.matrixagent import model_ms

    assert figures == [pytest.approx(model_ms(tiny_onnx))] * 4
    assert [m["board"] for m in log][:2] == ["good", "dying"]  # spread while both were up
    assert [m["board"] for m in log][2:] == ["good", "good"]
    summary = state.summary()
    assert summary["dying"]["state"] == "down" and summary["good"]["state"] == "free"
    assert summary["good"]["measurements"] == 3 and summary["dying"]["measurements"] == 1
    assert not agents["dying"].alive


def test_a_table_split_over_two_boards_equals_one_boards(tmp_path, agents, capsys):
    """`edgeprune lut --devices`: the entries of a latency table measured on two boards at once (a layer signature
    per board) are the entries one board measures, and both boards took a share."""
    from edgeprune.cli.commands import main

    tables = {}
    for names in (("good",), ("good", "other")):
        devices = devices_toml(tmp_path / f"devices-{len(names)}.toml", {n: agents[n] for n in names})
        out = tmp_path / f"lut-{len(names)}.json"
        assert main(["lut", "--model", "tests.models:Residual", "--input-shape", "1,3,16,16", "--device", "cpu",
                     "--out", str(out), "--devices", str(devices), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        tables[len(names)] = json.loads(out.read_text())
        counts = {n: b["measurements"] for n, b in summary["boards"].items()}
        assert all(c > 0 for c in counts.values()), counts
    one, two = tables[1], tables[2]
    assert len(one["entries"]) >= 3 and one["entries"] == two["entries"]
    assert one["models"]["tests.models:Residual"]["calibration"] == two["models"]["tests.models:Residual"]["calibration"]
