"""The Python API on a model class of this file, data in a DataLoader and a metric of our own: the same plan as the
command line on the same data saved as an .npy recipe; release of a fine-tuned pruned model; typed results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import edgeprune
from edgeprune.cli.commands import main
from edgeprune.errors import EdgePruneError

TARGET = """name = "cpu-test"
runtime = "onnxruntime"
precision = "fp32"
channel_multiple = 8
threads = 1
[measure]
warmup = 2
iterations = 5
repeats = 2
final_repeats = 2
"""


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(48, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(self.b(self.a(x))).mean((2, 3)))


def make_net() -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN()
    for m in net.modules():  # statistics that make the batch norms do something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def dataset() -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images (correlated pixels, as in real data) and the unpruned net's own top-1 as labels."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(480, 1, 16, 16)).astype(np.float32)
    x = (x + np.roll(x, 1, 2) + np.roll(x, 1, 3) + np.roll(x, (1, 1), (2, 3))) / 2
    with torch.no_grad():
        y = make_net()(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)
    return x, y


X, Y = dataset()


def top1(module: nn.Module) -> float:
    """Our own metric: top-1 on the last 120 samples."""
    with torch.no_grad():
        return float((module(torch.from_numpy(X[-120:])).argmax(1).numpy() == Y[-120:]).mean())


def fake_latency(path, target, cache=None, repeats=None, progress=None, calibration=None):  # noqa: ANN001, ANN201
    """A deterministic latency: proportional to the weights in the ONNX file. The API's equivalence with the CLI is
    what these tests check, and on this machine two measurements of one model rarely agree to the digit."""
    from edgeprune.runtimes.stats import stats_from_repeats

    weights = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    return stats_from_repeats([[weights * 1e-5]] * (repeats or 2), target=target.name, runtime=target.runtime,
                              runtime_version="fake", precision=target.precision, source="measured")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    import edgeprune.runtimes as rt

    monkeypatch.setattr(rt, "measure", fake_latency)
    (tmp_path / "cpu-test.toml").write_text(TARGET)
    return {"root": tmp_path, "target": tmp_path / "cpu-test.toml"}


def test_api_build_from_a_dataloader_gives_the_cli_plan_on_the_same_npy_data(env: dict[str, Path],
                                                                              capsys: pytest.CaptureFixture) -> None:
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=40, shuffle=False)
    result = edgeprune.build(net, calibration=loader, device=str(env["target"]), latency="0.5x", evaluate=top1,
                             out=env["root"] / "api")
    assert result.met and result.exit_code == 0 and result.final.median <= result.budget_ms
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the caller's module is untouched
    assert result.metric == {"before": top1(make_net()), "after": top1(result.module),
                             "drop": top1(make_net()) - top1(result.module)}
    assert json.loads(result.to_json())["metric"] == result.metric
    assert result.report["quality_gates"]["onnx_parity"]["passed"]

    np.save(env["root"] / "x.npy", X)
    np.save(env["root"] / "y.npy", Y)
    (env["root"] / "recipe.toml").write_text('kind = "npy"\npath = "x.npy"\nlabels = "y.npy"\n')
    code = main(["build", "--model", f"{__file__}:make_net", "--input-shape", "1,1,16,16", "--calibration",
                 str(env["root"] / "recipe.toml"), "--device", str(env["target"]), "--latency", "0.5x",
                 "--out", str(env["root"] / "cli"), "--json"])
    assert code == 0, capsys.readouterr().err
    api_plan = json.loads((env["root"] / "api" / "plan.json").read_text())
    cli_plan = json.loads((env["root"] / "cli" / "plan.json").read_text())
    # the same plan, but for the names of the model and the data, which say where each came from
    assert api_plan["meta"].pop("calibration") == "python"
    assert cli_plan["meta"].pop("calibration") == str(env["root"] / "recipe.toml")
    assert api_plan.pop("model").startswith("python:") and cli_plan.pop("model").endswith(":make_net")
    assert api_plan == cli_plan
    assert any(len(k) < api_plan["channels"][g] for g, k in api_plan["kept"].items())  # it did prune

    saved = result.save(env["root"] / "copy")
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in result.out.iterdir())


def test_api_calibration_forms_split_alike_and_bad_forms_say_what_to_give() -> None:
    from edgeprune.inputs.batches import as_arrays

    x, y = as_arrays(DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=64))
    assert np.array_equal(x, X) and np.array_equal(y, Y)
    x2, y2 = as_arrays([torch.from_numpy(s) for s in X[:10]], sample_ndim=3)  # one sample at a time, no labels
    assert np.array_equal(x2, X[:10]) and y2 is None
    x3, y3 = as_arrays((X, Y))
    assert np.array_equal(x3, X) and np.array_equal(y3, Y)
    with pytest.raises(EdgePruneError, match="floats already normalised"):
        as_arrays(np.zeros((8, 1, 4, 4), dtype=np.uint8))
    with pytest.raises(EdgePruneError, match="different sample shapes"):
        as_arrays([torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 5, 5)])
    with pytest.raises(EdgePruneError, match="unknown option 'frobnicate'; known options: .*heldout.*max_steps"):
        edgeprune.build(make_net(), calibration=X, frobnicate=1)
    with pytest.raises(EdgePruneError, match="unknown option 'criterion'; known options: .*evaluate"):
        edgeprune.release("pruned.pt", criterion="l1")  # release prunes nothing


def test_api_keywords_go_through_from_dict_old_spellings_too(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr("edgeprune.api.run_build", lambda config, out, **kw: seen.append(config))
    edgeprune.build("example", device="cpu-2t", latency="2ms", input_shape=(1, 1, 32, 32), noise_margin=0.5,
                    cache=False, max_steps=6, out="unused")
    c = seen[0]
    assert (c.device, c.latency, c.prune.input_shape, c.margin_k, c.use_cache, c.max_steps, c.prune.exporter) == \
        ("cpu-2t", "2ms", (1, 1, 32, 32), 0.5, False, 6, "torchscript")


def test_release_of_a_finetuned_pruned_model_reports_its_own_fidelity_and_gates(env: dict[str, Path],
                                                                                capsys: pytest.CaptureFixture) -> None:
    from edgeprune.report.artifacts import load_pruned
    from edgeprune.inputs.data import load_data
    from edgeprune.quality.fidelity import fidelity
    from edgeprune.inputs.models import load_model
    from edgeprune.inputs.recipe import load_recipe

    root = env["root"]
    assert main(["prune", "--ratio", "0.5", "--exporter", "torchscript", "--out", str(root / "p"), "--json"]) == 0
    capsys.readouterr()
    module, plan = load_pruned(root / "p" / "pruned.pt")
    data = load_data(load_recipe("digits"), (1, 1, 32, 32))
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    module.train()
    for i in range(5):  # a few steps of fine-tuning on the calibration part
        part = slice(i * 32, (i + 1) * 32)
        xb, yb = torch.from_numpy(data.calib_x[part]), torch.from_numpy(data.calib_y[part])
        opt.zero_grad()
        nn.functional.cross_entropy(module(xb), yb).backward()
        opt.step()
    module.eval()
    torch.save(module.state_dict(), root / "ft.pt")

    code = main(["release", "--model", str(root / "p" / "pruned.pt"), "--weights", str(root / "ft.pt"),
                 "--device", str(env["target"]), "--latency", "0.9x", "--min-agreement", "0.5", "--out",
                 str(root / "r"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    r = json.loads(out.out)
    expect = fidelity(load_model("example").module, module, data)
    assert r["fidelity"]["output_rel_error"] == pytest.approx(expect.output_rel_error, rel=1e-5)
    pruned_report = json.loads((root / "p" / "report.json").read_text())
    assert r["fidelity"]["output_rel_error"] != pytest.approx(pruned_report["fidelity"]["output_rel_error"])
    assert r["final"]["latency_source"] == "measured" and r["met"] and r["command"] == "release"
    assert set(r["quality_gates"]) == {"finite_outputs", "onnx_parity", "top1_agreement"}
    assert all(g["passed"] for g in r["quality_gates"].values())
    assert "ft.pt" in json.loads((root / "r" / "plan.json").read_text())["meta"]["widths_from"]

    code = main(["release", "--model", str(root / "p" / "pruned.pt"), "--input-shape", "1,3,32,32",
                 "--device", str(env["target"]), "--out", str(root / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgeprune: error:") and "input shape" in err and "Traceback" not in err
    assert not (root / "bad").exists()


def test_release_on_an_int8_target_measures_and_judges_the_quantised_model(pruned_example: dict,
                                                                          tmp_path: Path) -> None:
    """An int8 release: model.onnx is the quantised model (its float export beside it), the latency is the quantised
    model's, and fidelity and the user's metric are taken on it in ONNX Runtime."""
    from edgeprune.inputs.data import load_data
    from edgeprune.quality.fidelity import fidelity
    from edgeprune.export.quantize import OnnxModule, has_qdq
    from edgeprune.inputs.recipe import load_recipe

    prep = pruned_example["prep"]
    (tmp_path / "int8.toml").write_text(TARGET.replace('"fp32"', '"int8"') + "[quantization]\nsamples = 64\n"
                                        "reduce_range = true\n")
    x, y = torch.from_numpy(prep.data.heldout_x), torch.from_numpy(prep.data.heldout_y)
    seen: list[str] = []

    def top1(module: nn.Module) -> float:
        seen.append(type(module).__name__)
        return float((module(x).argmax(1) == y).double().mean())

    r = edgeprune.release(pruned_example["pruned"], original=prep.loaded.module, plan=pruned_example["plan"],
                          calibration=str(pruned_example["recipe"]), device=str(tmp_path / "int8.toml"),
                          example_input=prep.loaded.example_input, latency="0.95x", evaluate=top1,
                          out=tmp_path / "r")
    rep = r.report
    assert has_qdq(onnx.load(str(r.onnx_path))) and not has_qdq(onnx.load(str(r.out / "model.fp32.onnx")))
    assert seen == ["ExampleNet", "ExampleNet", "OnnxModule"]
    data = load_data(load_recipe(str(pruned_example["recipe"])), prep.loaded.input_shape)
    expect = fidelity(prep.loaded.module, OnnxModule(r.onnx_path), data)
    assert rep["fidelity"]["output_rel_error"] == pytest.approx(expect.output_rel_error, rel=1e-6)
    assert rep["metric"]["after"] == pytest.approx(expect.accuracy_after)
    q = rep["quantization"]
    assert q["settings"]["samples"] == 64 and q["against_float"]["top1_agreement"] >= 0.98
    assert rep["speedup_over_float"] == pytest.approx(rep["base_float"]["latency_ms"]["median"] /
                                                      rep["final"]["latency_ms"]["median"])
    assert rep["final"]["latency_source"] == "measured" and r.final.precision == "int8"


def test_build_leaves_the_callers_random_state_where_it_was(env: dict[str, Path]) -> None:
    """A training loop after `edgeprune.build` goes on from where it was (the job seeded torch's generator to 0)."""
    import random

    def draws() -> tuple[torch.Tensor, np.ndarray, float]:
        return torch.rand(4), np.random.rand(4), random.random()

    net = make_net()  # which seeds torch itself
    torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)
    draws()
    expected = draws()
    torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)
    draws()
    result = edgeprune.build(net, calibration=X[:200], device=str(env["target"]), latency="0.8x",
                             max_steps=2, out=env["root"] / "b")
    assert result.exit_code in (0, 3)
    got = draws()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert torch.initial_seed() == 1234


@pytest.mark.parametrize("kind", ["meta", "script", "trace"])
def test_a_meta_or_torchscript_module_is_refused_in_one_line(kind: str) -> None:
    """Raw NotImplementedError ("Cannot copy out of meta tensor") and RuntimeError (hooks on a ScriptModule) were
    what these gave; now an EdgePruneError saying what to pass instead (the meta copy's failure chained)."""
    net = make_net()
    if kind == "meta":
        with torch.device("meta"):
            model = SmallCNN()
        match = "meta device \\(first: a.0.weight\\).*load its weights first"
    else:
        model = torch.jit.script(net) if kind == "script" else torch.jit.trace(net, torch.from_numpy(X[:1]))
        match = "is a TorchScript module .*pass the module you scripted or traced"
    with pytest.raises(EdgePruneError, match=match) as e:
        edgeprune.prune(model, ratio=0.5, calibration=X[:64])
    assert "\n" not in str(e.value)
    assert kind != "meta" or isinstance(e.value.__cause__, NotImplementedError)


@pytest.mark.parametrize("criterion", ["cap", "nap"])
def test_labels_past_the_models_classes_are_refused_naming_both(criterion: str) -> None:
    """Labels 10..19 on a 10-class model: the accuracy gate passed silently at 0% before and after, and nap's
    cross-entropy blamed the model ("set batch_size = 1"); now one line names the largest label and the classes."""
    with pytest.raises(EdgePruneError) as e:
        edgeprune.build(make_net(), calibration=(X[:200], np.arange(200) % 10 + 10), max_accuracy_drop=1.0, criterion=criterion)
    assert str(e.value) == ("the labels of the calibration data given in Python go up to 19, but model "
                            "python:tests.test_api.SmallCNN has 10 classes (its output is N x 10); labels must be "
                            "class indices 0..9: fix the labels, or give a model with 20 or more classes")


def test_a_build_from_a_live_module_can_be_finetuned_and_released_again(env: dict[str, Path]) -> None:
    """README: `edgeprune.finetune("out/digits", ...)` after `edgeprune.build(model, ...)` exited 2 "cannot import
    'python' for model spec 'python:...'": the folder named a model nothing could load. Its pruned.pt now holds the
    unpruned module: finetune and release work through the API, and the CLI in another process (where the class can
    be imported)."""
    import subprocess
    import sys

    net = make_net()
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=40)
    built = edgeprune.build(net, calibration=loader, device=str(env["target"]), latency="0.5x", evaluate=top1,
                            out=env["root"] / "digits")
    assert built.exit_code == 0
    steps: list = []  # on_step: the one measured model of each release, as a build reports its candidates
    tuned = edgeprune.finetune(built.out, calibration=loader, steps=3, device=str(env["target"]),
                               out=env["root"] / "tuned", on_step=steps.append)
    assert tuned.exit_code == 0 and tuned.report["finetune"]["steps"] == 3
    assert tuned.report["model"] == built.report["model"] == "python:tests.test_api.SmallCNN"
    assert tuned.fidelity.top1_agreement > 0.9  # against the unpruned module pruned.pt holds
    again = edgeprune.release(built.out / "pruned.pt", calibration=loader, device=str(env["target"]),
                              latency="0.5x", out=env["root"] / "again", on_step=steps.append)
    assert again.exit_code == 0 and again.fidelity.top1_agreement == built.fidelity.top1_agreement
    assert [(c.step, c.latency_ms, c.source) for c in steps] == [(1, r.final.median, r.final.source)
                                                                 for r in (tuned, again)]
    assert steps[1].strength == pytest.approx(1 - again.final.median / again.base.median, abs=1e-6)
    assert steps[1].widths == {g: w["after"] for g, w in again.report["widths"].items()}
    with pytest.raises(EdgePruneError, match="original= is not the module .* was pruned from"):
        edgeprune.finetune(built.out, original=SmallCNN(), calibration=loader, steps=1, device=str(env["target"]),
                           out=env["root"] / "x")

    np.save(env["root"] / "x.npy", X)
    np.save(env["root"] / "y.npy", Y)
    (env["root"] / "recipe.toml").write_text('kind = "npy"\npath = "x.npy"\nlabels = "y.npy"\n')
    cli = [sys.executable, "-m", "edgeprune", "release", "--model", str(built.out / "pruned.pt"), "--device",
           str(env["target"]), "--latency", "0.9x", "--out", str(env["root"] / "cli")]
    root = Path(__file__).resolve().parents[1]  # where tests.test_api imports from
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"edgeprune: error: {built.out / 'pruned.pt'} was made on calibration data given in Python, which is not "
        f"saved with it; pass --calibration RECIPE (calibration= in Python: a recipe or the data)"), r.stderr
    r = subprocess.run([*cli, "--calibration", str(env["root"] / "recipe.toml")], capture_output=True, text=True,
                       timeout=300, cwd=root)
    assert r.returncode in (0, 3), r.stderr  # 3: a real measurement of this 0.03 ms model may miss 0.9x
    report = json.loads(next(p for p in (env["root"] / "cli", env["root"] / "cli.failed")
                             if p.is_dir()).joinpath("report.json").read_text())
    assert report["model"] == "python:tests.test_api.SmallCNN" and report["fidelity"]["top1_agreement"] > 0.9


def test_a_live_module_pickle_cannot_save_asks_for_original(env: dict[str, Path],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    class Unsaved(SmallCNN):  # a local class: pickle cannot save it, so pruned.pt cannot hold it
        pass

    net = Unsaved()
    net.load_state_dict(make_net().state_dict())
    net.eval()
    built = edgeprune.build(net, calibration=(X, Y), device=str(env["target"]), latency="0.5x",
                            out=env["root"] / "b")
    assert built.exit_code == 0 and "cannot be saved in pruned.pt" in caplog.text
    with pytest.raises(EdgePruneError, match="could not be saved with it; pass original= the unpruned module"):
        edgeprune.finetune(built.out, calibration=(X, Y), steps=1, device=str(env["target"]), out=env["root"] / "t1")
    tuned = edgeprune.finetune(built.out, original=net, calibration=(X, Y), steps=2, device=str(env["target"]),
                               out=env["root"] / "t2")
    assert tuned.exit_code == 0 and tuned.fidelity.top1_agreement > 0.9


SCRIPT = '''
import sys
import numpy as np
import torch
from torch import nn
import edgeprune


class Net(nn.Module):  # defined in the script, as in the README
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


torch.manual_seed(0)
net = Net().eval()
x = torch.randn(200, 1, 16, 16)
y = net(x).argmax(1)
np.save("x.npy", x.numpy())
np.save("y.npy", y.numpy())
device, out = sys.argv[1], sys.argv[2]
built = edgeprune.build(net, calibration=(x, y), device=device, latency="0.9x", max_steps=2, out=out)
tuned = edgeprune.finetune(built.out, calibration=(x, y), device=device, steps=2, out=out + "-tuned")
print(built.report["model"], tuned.report["finetune"]["steps"], tuned.fidelity.top1_agreement, built.out)
'''


def test_the_readme_path_build_then_finetune_in_a_script_and_what_the_cli_says_of_it(tmp_path: Path) -> None:
    """The README's own path: a class defined in the user's script, `edgeprune.build(model, ...)`, then
    `edgeprune.finetune(folder, ...)` in the same script (real measurements). The CLI in another process cannot
    import `__main__.Net`, and says so, and what to do."""
    import subprocess
    import sys

    (tmp_path / "cpu-test.toml").write_text(TARGET)
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "r.toml").write_text('kind = "npy"\npath = "x.npy"\nlabels = "y.npy"\n')
    r = subprocess.run([sys.executable, "train.py", "cpu-test.toml", "out/digits"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model, steps, agreement, built = r.stdout.split()  # built: out/digits, or out/digits.failed when a loaded
    assert model == "python:__main__.Net" and steps == "2" and float(agreement) > 0.5  # machine missed the budget
    built = str(Path(built).relative_to(tmp_path)) if Path(built).is_absolute() else built
    r = subprocess.run([sys.executable, "-m", "edgeprune", "finetune", built, "--calibration", "r.toml",
                        "--device", "cpu-test.toml", "--steps", "2", "--out", "cli"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"edgeprune: error: {built}/pruned.pt holds the unpruned python:__main__.Net as a live module whose class "
        "__main__.Net cannot be imported here; run this where that class is importable (a class defined in a script: "
        "in that script, through the Python API), or pass original= the unpruned module"), r.stderr
