"""Release matrices: the manifest, bad input, and whole runs on two `edgeprune agent` processes on loopback
(`tests/agents.py`: real servers and sockets, a deterministic latency model so that plans compare exactly),
embedded and on a local Ray cluster: measurements spread over both boards, a board dying mid-run, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.cli.commands import main
from edgeprune.errors import EdgePruneError
from edgeprune.fleet.matrix_job import digest, entry_inputs, load_manifest, matrix_exit_code, run_matrix
from edgeprune.fleet.pool import Pool, load_pool
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


def test_ray_without_ray_installed_names_the_extra(tmp_path):
    """In a fresh interpreter where `import ray` fails, as on a machine without the extra."""
    import subprocess
    import sys

    manifest_toml(tmp_path / "m.toml")
    code = "import sys; sys.modules['ray'] = None; from edgeprune.cli import main; raise SystemExit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "matrix", "m.toml", "--out", "rel", "--ray", "auto"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("edgeprune: error: --ray needs Ray") and "pip install 'edgeprune[ray]'" in line
    assert "pip install -e '.[ray]'" in line and not (tmp_path / "rel").exists()


def test_a_folder_of_other_files_is_refused(tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    devices = tmp_path / "devices.toml"
    devices.write_text('[cpu]\nboards = [{ name = "a", agent = "http://127.0.0.1:9" }]\n')
    with pytest.raises(EdgePruneError, match="holds files and no index.json"):
        run_matrix(load_manifest(manifest_toml(tmp_path / "m.toml")), load_pool(devices), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- local targets, names that become folders


def test_a_local_target_without_a_devices_file_is_measured_here_and_a_rerun_skips(tmp_path, monkeypatch, capsys):
    """targets = ["cpu"], no devices file (none in the working folder either): the entry is built and measured on
    this machine, as `edgeprune build` does; a second run skips it."""
    manifest_toml(tmp_path / "m.toml", budgets=("0.7x",))
    monkeypatch.chdir(tmp_path)
    code = main(["matrix", "m.toml", "--out", "rel"])
    index = json.loads((tmp_path / "rel" / "index.json").read_text())
    (e,) = index["entries"]
    assert code == index["exit_code"] == e["exit_code"] and code in (0, 3) and index["complete"]
    assert e["latency_ms"] > 0 and (tmp_path / "rel" / e["report"]).is_file() and index["pool"] == ""
    assert e["measured_on"] == {"local": len(e["measurements"])} and len(e["measurements"]) >= 2
    capsys.readouterr()
    assert main(["matrix", "m.toml", "--out", "rel"]) == code
    assert "chain/cpu/0.7x: skipped (inputs and artifacts unchanged)" in capsys.readouterr().err


def test_a_target_with_no_board_that_cannot_run_here_is_refused(tmp_path, capsys, monkeypatch):
    path = manifest_toml(tmp_path / "m.toml")
    path.write_text(path.read_text().replace('["cpu"]', '["jetson-orin-nano"]'))
    monkeypatch.chdir(tmp_path)
    assert main(["matrix", "m.toml", "--out", "rel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("edgeprune: error: target jetson-orin-nano has no board in the device pool (no devices "
                          "file) and cannot be measured here (") and "--devices" in err
    assert not (tmp_path / "rel").exists()


@pytest.mark.parametrize("name", ["../../../escaped", "", ".", "a/b"])
def test_a_target_name_that_would_leave_its_folder_is_refused(tmp_path, capsys, monkeypatch, name):
    """The harness's MX-escape and MX-collide_names: a target named ../../../escaped wrote outside the release,
    targets named "" and "." shared one folder."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    target = tmp_path / "a" / "b" / "t.toml"
    target.write_text(f'name = {json.dumps(name)}\nruntime = "onnxruntime"\n')
    path = manifest_toml(tmp_path / "a" / "b" / "m.toml")
    path.write_text(path.read_text().replace('["cpu"]', '["t.toml"]'))
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert main(["matrix", "m.toml", "--out", "rel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("edgeprune: error: target file ") and "must be one plain folder name" in err
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["m.toml", "t.toml"]
    assert not list(tmp_path.rglob("escaped"))


def test_a_budget_that_is_a_hidden_folder_name_is_refused(tmp_path):
    path = manifest_toml(tmp_path / "m.toml", budgets=(".5x",))
    with pytest.raises(EdgePruneError, match=r"budget '.5x' names a folder .* \(e.g. 10ms or 0.5x\)"):
        load_manifest(path)


# ---------------------------------------------------------------- kill -9


def test_kill_9_in_the_first_entry_resumes_and_removes_what_it_left(tmp_path):
    """A real `edgeprune matrix` process: index.json exists before its first entry ends, a second run on the same
    folder exits 2 while the first holds it; killed with SIGKILL in its first entry (its .0.5x.tmp-PID and
    edgeprune-build-PID-* left), the rerun builds every entry and removes both."""
    import os
    import signal
    import subprocess
    import sys
    import time

    manifest_toml(tmp_path / "m.toml")
    tmp, rel = tmp_path / "tmp", tmp_path / "rel"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "edgeprune", "matrix", "m.toml", "--out", "rel"]
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    entry_tmp = rel / "chain" / "cpu" / f".0.5x.tmp-{first.pid}"
    try:
        deadline = time.monotonic() + 240
        while not (entry_tmp.is_dir() and list(tmp.glob(f"edgeprune-build-{first.pid}-*"))):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()
            time.sleep(0.02)
        index = json.loads((rel / "index.json").read_text())  # written before the first entry started
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    assert index["entries"] == [] and not index["complete"]
    assert entry_tmp.is_dir() and list(tmp.glob(f"edgeprune-build-{first.pid}-*"))  # kill -9 cleans nothing up

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode in (0, 3), second.stderr
    assert "removed 1 temporary folder(s) of killed runs: chain/cpu/.0.5x.tmp-" in second.stderr
    index = json.loads((rel / "index.json").read_text())
    assert index["complete"] and [e["key"] for e in index["entries"]] == ["chain/cpu/0.5x", "chain/cpu/0.7x"]
    assert all((rel / e["report"]).is_file() for e in index["entries"])
    assert not [p for p in rel.rglob("*") if ".tmp-" in p.name]
    assert not list(tmp.glob(f"edgeprune-build-{first.pid}-*"))


def test_a_second_run_on_a_release_being_written_exits_2(tmp_path):
    """The harness's MX-two_at_once: the second of two runs on one --out, 1 s apart, said the folder "holds files and
    no index.json"; now it names the run that holds the release and writes nothing."""
    import subprocess
    import sys
    import time

    from edgeprune.fleet.matrix_job import release_lock

    manifest = load_manifest(manifest_toml(tmp_path / "m.toml"))
    rel = tmp_path / "rel"
    rel.mkdir()
    code = ("import sys; from pathlib import Path; from edgeprune.fleet.matrix_job import release_lock\n"
            "with release_lock(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(rel)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(EdgePruneError, match=rf"--out {rel} is being written by another edgeprune matrix "
                                                 rf"\(PID {holder.pid}\); wait for it"):
            run_matrix(manifest, Pool(()), rel)
        assert sorted(p.name for p in rel.iterdir()) == [".edgeprune-matrix.lock"]
    finally:
        holder.kill()
        holder.wait()
    with release_lock(rel):  # the kernel dropped the killed holder's lock
        time.sleep(0)


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
    import edgeprune.fleet.matrix_job
    import edgeprune.fleet.matrix_ray

    assert callable(edgeprune.matrix) and edgeprune.matrix.__module__ == "edgeprune.api"
