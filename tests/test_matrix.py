"""Release matrices: the manifest, bad input, and whole runs on two `edgeprune agent` processes on loopback
(`tests/agents.py`: real servers and sockets, a deterministic latency model so that plans compare exactly),
embedded and on a local Ray cluster: measurements spread over both boards, a board dying mid-run, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.cli import main
from edgeprune.errors import EdgePruneError
from edgeprune.matrixjob import (
    digest,
    entry_inputs,
    load_manifest,
    matrix_exit_code,
    run_matrix,
)
from edgeprune.pool import load_pool
from tests.agents import devices_toml, start_agents

MODELS = {"chain": "tests.models:ConvChain", "residual": "tests.models:Residual"}


def manifest_toml(path: Path, models: tuple[str, ...] = ("chain",), budgets: tuple[str, ...] = ("0.5x", "0.7x"),
                  extra: str = "") -> Path:
    """A manifest of zoo models (16x16 inputs, random calibration, few search steps, no measurement cache: every
    figure comes from a board)."""
    text = f'targets = ["cpu"]\nbudgets = {json.dumps(list(budgets))}\n{extra}\n' \
           "[build]\nmax_steps = 4\ncache = false\nchannel_multiple = 2\n"
    for name in models:
        text += f'\n[[models]]\nname = "{name}"\nmodel = "{MODELS[name]}"\ninput_shape = [1, 3, 16, 16]\n' \
                f'calibration = "random"\n'
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def agents():
    """Two healthy boards, and a third that dies on its third measurement (paired with a)."""
    running = start_agents(a=None, b=None, d=2)
    yield running
    for agent in running.values():
        agent.stop()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr("edgeprune.runtimes.remote.RETRY_DELAYS_S", (0.1, 0.2))


def pair(tmp_path: Path, agents, names: tuple[str, str] = ("a", "b")) -> Path:
    return devices_toml(tmp_path / f"devices-{''.join(names)}.toml", {n: agents[n] for n in names})


def plans(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): {g: len(k) for g, k in json.loads(p.read_text())["kept"].items()}
            for p in sorted(out.glob("*/*/*/plan.json"))}


# ---------------------------------------------------------------- the manifest


def test_manifest_expands_models_targets_and_budgets(tmp_path):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "w.pt").write_bytes(b"weights")
    path = tmp_path / "release.toml"
    path.write_text('targets = ["cpu", "rpi5"]\nbudgets = ["0.5x", "10ms"]\n[gates]\nmin_agreement = 0.9\n'
                    '[[models]]\nname = "a"\nmodel = "example"\n'
                    '[[models]]\nname = "b"\nmodel = "nets/net.py:make"\nweights = "nets/w.pt"\nbudgets = ["2ms"]\n'
                    'gates = { max_accuracy_drop = 1.5 }\n')
    m = load_manifest(path)
    assert [e.key for e in m.entries] == ["a/cpu/0.5x", "a/cpu/10ms", "a/rpi5/0.5x", "a/rpi5/10ms", "b/cpu/2ms",
                                         "b/rpi5/2ms"]
    b = m.entries[-1]
    assert b.model == f"{tmp_path}/nets/net.py:make" and b.weights == str(tmp_path / "nets" / "w.pt")
    assert dict(b.gates) == {"min_agreement": 0.9, "max_accuracy_drop": 1.5}
    assert b.folder(Path("rel")) == Path("rel/b/rpi5/2ms")
    config = m.entries[0].config()
    assert (config.device, config.latency, config.min_agreement, config.prune.exporter) == \
        ("cpu", "0.5x", 0.9, "torchscript")


def test_resume_digest_follows_every_input(tmp_path):
    m = load_manifest(manifest_toml(tmp_path / "m.toml"))
    base = digest(entry_inputs(m.entries[0]))
    assert digest(entry_inputs(m.entries[0])) == base  # stable
    assert digest(entry_inputs(m.entries[1])) != base  # another budget
    other = load_manifest(manifest_toml(tmp_path / "m2.toml", extra="[gates]\nmin_agreement = 0.5\n"))
    assert digest(entry_inputs(other.entries[0])) != base  # gates
    steps = tmp_path / "m3.toml"
    steps.write_text(manifest_toml(tmp_path / "m3.toml").read_text().replace("max_steps = 4", "max_steps = 5"))
    assert digest(entry_inputs(load_manifest(steps).entries[0])) != base  # build settings


def test_matrix_exit_code_is_the_most_urgent_entry_code():
    assert matrix_exit_code([{"exit_code": 0}, {"exit_code": 0}]) == 0
    assert matrix_exit_code([{"exit_code": 3}, {"exit_code": 4}, {"exit_code": 0}]) == 4
    assert matrix_exit_code([{"exit_code": 3}, {"exit_code": 5}, {"exit_code": 4}]) == 5
    assert matrix_exit_code([{"exit_code": 3}]) == 3


@pytest.mark.parametrize("case, words", [
    ("unknown-key", "unknown key 'budget'"),
    ("no-board", "target rpi5 has no board in the device pool"),
    ("bad-budget", "--latency must look like"),
    ("unknown-target", "unknown device 'nowhere'"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case, words):
    devices = tmp_path / "devices.toml"
    devices.write_text('[cpu]\nboards = [{ name = "a", agent = "http://127.0.0.1:9" }]\n')
    path = manifest_toml(tmp_path / "m.toml")
    text = path.read_text()
    text = {"unknown-key": text.replace("budgets =", "budget ="), "no-board": text.replace('["cpu"]', '["rpi5"]'),
            "bad-budget": text.replace('"0.7x"', '"fast"'), "unknown-target": text.replace('"cpu"', '"nowhere"')}[case]
    path.write_text(text)
    out = tmp_path / "release"
    assert main(["matrix", str(path), "--devices", str(devices), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeprune: error: ") and words in err[-1]
    assert not out.exists()


def test_unreachable_ray_address_exits_5_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("ray")
    devices = tmp_path / "devices.toml"
    devices.write_text('[cpu]\nboards = [{ name = "a", agent = "http://127.0.0.1:9" }]\n')
    out = tmp_path / "release"
    code = main(["matrix", str(manifest_toml(tmp_path / "m.toml")), "--devices", str(devices), "--out", str(out),
                 "--ray", "127.0.0.1:9"])
    assert code == 5
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_of_other_files_is_refused(tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    devices = tmp_path / "devices.toml"
    devices.write_text('[cpu]\nboards = [{ name = "a", agent = "http://127.0.0.1:9" }]\n')
    with pytest.raises(EdgePruneError, match="holds files and no index.json"):
        run_matrix(load_manifest(manifest_toml(tmp_path / "m.toml")), load_pool(devices), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- runs on two boards


def test_embedded_matrix_spreads_over_boards_and_resumes(tmp_path, agents):
    """One model at two budgets on two boards, entries one after another: both boards measure, the index says which
    measured what, index.md lists every entry; a second run skips both entries and measures nothing."""
    manifest, devices, out = manifest_toml(tmp_path / "m.toml"), pair(tmp_path, agents), tmp_path / "release"
    lines: list[str] = []
    index = run_matrix(load_manifest(manifest), load_pool(devices), out, echo=lines.append)
    assert index["exit_code"] == 0 and index["complete"] and index["down"] == []
    assert [e["key"] for e in index["entries"]] == ["chain/cpu/0.5x", "chain/cpu/0.7x"]
    for e in index["entries"]:
        assert e["met"] and e["latency_ms"] <= e["budget_ms"] and (out / e["report"]).is_file()
        assert {m["board"] for m in e["measurements"]} == {"a", "b"}  # the least-used free board, alternately
        assert sum(e["measured_on"].values()) == len(e["measurements"]) >= 3
        report = json.loads((out / e["report"]).read_text())
        assert report["device_measurements"] == len(e["measurements"])
        assert report["final"]["latency_ms"]["median"] == e["latency_ms"]
    boards = index["boards"]
    assert boards["a"]["measurements"] + boards["b"]["measurements"] == sum(len(e["measurements"])
                                                                            for e in index["entries"])
    assert json.loads((out / "index.json").read_text())["entries"] == json.loads(json.dumps(index["entries"]))
    md = (out / "index.md").read_text()
    assert "| chain | cpu | 0.5x | yes |" in md and "[report](chain/cpu/0.5x/report.json)" in md
    assert len([ln for ln in lines if ln.startswith("edgeprune: [")]) == 2 and "[boards: " in lines[-1]
    first = plans(out)

    again = run_matrix(load_manifest(manifest), load_pool(devices), out, echo=lines.append)
    assert all(e["skipped"] for e in again["entries"]) and again["exit_code"] == 0
    assert all(b["measurements"] == 0 for b in again["boards"].values())
    assert plans(out) == first


def test_embedded_matrix_survives_a_board_dying(tmp_path, agents, fast_retries):
    """Board d dies on its third measurement, a request in flight: every entry completes on board a, none is lost,
    and the index names d as down."""
    manifest, out = manifest_toml(tmp_path / "m.toml"), tmp_path / "release"
    lines: list[str] = []
    index = run_matrix(load_manifest(manifest), load_pool(pair(tmp_path, agents, ("a", "d"))), out,
                       echo=lines.append)
    assert "edgeprune: boards: 0 busy, 1 free, 1 down" in lines  # the live count, as the board went down
    assert index["exit_code"] == 0 and len(index["entries"]) == 2 and all(e["met"] for e in index["entries"])
    assert index["down"] == ["d"] and "cannot reach" in index["boards"]["d"]["down_reason"]
    assert index["boards"]["d"]["measurements"] == 2 and not agents["d"].alive
    assert {m["board"] for m in index["entries"][-1]["measurements"]} == {"a"}
    assert "| d | cpu |" in (out / "index.md").read_text()


# ---------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_cluster(agents):
    """A local Ray cluster with 2 CPUs whose node carries the boards a, b, d as resources (kind:cpu: two units, as
    each pool below has two boards)."""
    ray = pytest.importorskip("ray")
    resources = {f"device:{n}": 1.0 for n in agents} | {"kind:cpu": 2.0}
    ray.init(num_cpus=2, resources=resources, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_matrix_spreads_fails_over_resumes_and_plans_as_embedded(tmp_path, agents, ray_cluster):
    """2 models x 2 budgets on Ray: builds as tasks, every measurement a task holding one unit of kind:cpu, spread
    over both boards; the plans are the embedded run's; a second run skips every entry. (Slow: Ray's start and a
    worker per build, each loading torch, take minutes on this 2-core machine.)"""
    manifest = manifest_toml(tmp_path / "m.toml", models=("chain", "residual"))
    devices, out = pair(tmp_path, agents), tmp_path / "release"
    index = run_matrix(load_manifest(manifest), load_pool(devices), out, ray="auto", echo=print)
    assert index["mode"] == "ray" and index["exit_code"] == 0 and len(index["entries"]) == 4
    used = {m["board"] for e in index["entries"] for m in e["measurements"]}
    assert used == {"a", "b"} and all(index["boards"][n]["measurements"] > 0 for n in "ab")
    assert ray_cluster.is_initialized()  # a cluster edgeprune joined is left running

    embedded = tmp_path / "embedded"
    run_matrix(load_manifest(manifest), load_pool(devices), embedded, echo=print)
    assert plans(out) == plans(embedded) and len(plans(out)) == 4

    again = run_matrix(load_manifest(manifest), load_pool(devices), out, ray="auto", echo=print)
    assert all(e["skipped"] for e in again["entries"])


@pytest.mark.slow
def test_ray_matrix_survives_a_board_dying(tmp_path, agents, ray_cluster):
    """Board d dies mid-run (the embedded test may have killed it already: then it is down from the start): every
    entry completes on a, nothing is lost, d is named down in the index."""
    manifest = manifest_toml(tmp_path / "m.toml", models=("chain", "residual"))
    index = run_matrix(load_manifest(manifest), load_pool(pair(tmp_path, agents, ("a", "d"))), tmp_path / "release",
                       ray="auto", echo=print)
    assert index["exit_code"] == 0 and len(index["entries"]) == 4 and all(e["met"] for e in index["entries"])
    assert index["down"] == ["d"]
    assert {m["board"] for e in index["entries"] for m in e["measurements"]} <= {"a", "d"}


def test_matrix_is_the_api_function_after_its_modules_load():
    import edgeprune
    import edgeprune.matrixjob
    import edgeprune.matrixray

    assert callable(edgeprune.matrix) and edgeprune.matrix.__module__ == "edgeprune.api"
