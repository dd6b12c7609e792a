"""`edgeprune finetune` and its distillation stage, on a no-compensation prune of the bundled example (three quarters
of every group removed, so there is error to recover): distillation lowers the held-out output error within seconds,
OrthoReg lowers the filters' Gram off-diagonal, the release re-checks the budget, and bad input or a diverging stage
exits 2 or 4 with one line and writes nothing."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

import edgeprune
from edgeprune.cli.commands import main
from edgeprune.config import PruneConfig
from edgeprune.dependency.graph import trace
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.data import load_data
from edgeprune.inputs.recipe import load_recipe
from edgeprune.jobs.finetune_job import read_source
from edgeprune.quality.fidelity import fidelity
from edgeprune.recovery.train import FinetuneConfig, _Best, _held_loss, _split, _Teacher, gram_offdiag, producers, train
from tests.test_api import TARGET, fake_latency


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The bundled example pruned to a quarter of its channels by l1 without compensation (no statistics: fast), on
    the digits cut to 399 samples (200 to train on, the default's 199 held out)."""
    from edgeprune.jobs.prune_job import prune_job

    root = tmp_path_factory.mktemp("finetune")
    (root / "digits-399.toml").write_text('kind = "digits"\ncount = 399\nheldout = 199\n')
    (root / "cpu-test.toml").write_text(TARGET)
    config = PruneConfig(calibration=str(root / "digits-399.toml"), criterion="l1", compensation=False,
                         channel_multiple=1, exporter="torchscript")
    prune_job(config, root / "p", ratio=0.75)
    src = read_source(root / "p")
    data = load_data(load_recipe(str(root / "digits-399.toml")), src.original.input_shape)
    return {"root": root, "dir": root / "p", "src": src, "data": data, "target": root / "cpu-test.toml"}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_distillation_lowers_the_held_out_output_error(source: dict) -> None:
    src, data = source["src"], source["data"]
    teacher = src.original.module
    before = fidelity(teacher, src.module, data)
    student = copy.deepcopy(src.module)
    log = train(student, teacher, data.calib_x, None, FinetuneConfig(steps=24, batch=32))
    after = fidelity(teacher, student, data)
    assert log.steps == 24 and log.seconds > 0 and log.loss == "distillation"  # its speed: a benchmark's, not here
    assert log.last_loss < 0.7 * log.first_loss, log
    assert before.output_rel_error > 0.5  # the prune left error to recover
    assert after.output_rel_error < 0.9 * before.output_rel_error, (before.output_rel_error, after.output_rel_error)
    assert after.top1_agreement > before.top1_agreement + 0.1
    assert all(torch.equal(a, b) for a, b in zip(src.module.state_dict().values(),  # the source model is untouched
                                                 read_source(source["dir"]).module.state_dict().values()))


def test_distillation_keeps_the_epoch_with_the_lowest_loss_on_the_samples_held_back(source: dict) -> None:
    src, data = source["src"], source["data"]
    teacher, config = src.original.module, FinetuneConfig(steps=30, batch=16, validation=0.25)
    student = copy.deepcopy(src.module)
    log = train(student, teacher, data.calib_x, None, config, keep_best=True)
    v = log.validation
    assert log.steps == 30 and v["samples"] == 50  # a quarter of the 200 calibration samples
    assert v["best"] < v["before"] and v["best"] <= v["last"]  # here the training helps: error to recover
    # the student left is the best checkpoint: the same split (the generator's first draw) gives back its loss
    xt = torch.from_numpy(data.calib_x)
    _, held = _split(len(xt), 0.25, torch.Generator().manual_seed(config.seed))
    again = _held_loss(student, xt, None, _Teacher(teacher, xt, 16), held, 16, config)
    assert again == pytest.approx(v["best"], rel=1e-5)
    off = train(copy.deepcopy(src.module), teacher, data.calib_x, None, FinetuneConfig(steps=2, validation=0.0),
                keep_best=True)
    assert off.validation is None


def test_the_best_checkpoint_is_the_untrained_model_when_no_epoch_beats_it() -> None:
    net = torch.nn.Linear(2, 1)
    losses = iter([1.0, 1.5, 0.7, 0.9])
    best = _Best(net, lambda: next(losses))
    states = {}
    for step in (5, 10, 15):
        net.weight.data += 1
        best.check(step)
        states[step] = net.weight.detach().clone()
    kept = states[10]
    assert best.restore(7) == {"samples": 7, "before": 1.0, "best": 0.7, "last": 0.9, "best_step": 10}
    assert torch.equal(net.weight, kept)
    untrained = net.weight.detach().clone()
    losses = iter([1.0, 1.2, 1.1])
    best = _Best(net, lambda: next(losses))
    for step in (1, 2):
        net.weight.data += 1
        best.check(step)
    assert best.restore(3)["best_step"] == 0 and torch.equal(net.weight, untrained)
    with pytest.raises(EdgePruneError, match="--validation"):
        FinetuneConfig(validation=1.0)


def test_orthoreg_lowers_the_filters_gram_off_diagonal(source: dict) -> None:
    src, data = source["src"], source["data"]
    layers = producers(trace(src.module, src.original.example_input))
    start = gram_offdiag(src.module, layers)
    ends = {}
    for weight in (0.0, 10.0):
        student = copy.deepcopy(src.module)
        train(student, src.original.module, data.calib_x, None, FinetuneConfig(steps=12, orthoreg=weight),
              layers)
        ends[weight] = gram_offdiag(student, layers)
    assert ends[10.0] < 0.8 * start and ends[10.0] < 0.8 * ends[0.0], (start, ends)


def test_finetune_command_releases_into_a_new_folder_with_the_budget_rechecked(
        source: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import edgeprune.runtimes as rt

    monkeypatch.setattr(rt, "measure", fake_latency)
    before = digest(source["dir"])
    out = tmp_path / "tuned"
    code = main(["finetune", str(source["dir"]), "--steps", "8", "--device", str(source["target"]),
                 "--latency", "0.9x", "--out", str(out), "--json", "--min-agreement", "0"])  # a quarter of l1: ~10%
    captured = capsys.readouterr()
    assert code == 0, captured.err
    r = json.loads((out / "report.json").read_text())
    assert json.loads(captured.out) == r
    assert r["command"] == "finetune" and r["met"] and r["budget"] == "0.9x" and r["final"]["latency_ms"]["median"] \
        <= r["budget_ms"]
    assert r["finetune"]["steps"] == 8 and r["finetune"]["stage"] == "distill"
    assert r["finetune"]["input_fidelity"]["output_rel_error"] > r["fidelity"]["output_rel_error"]  # recovered
    assert {"model.onnx", "pruned.pt", "plan.json", "report.md"} <= {p.name for p in out.iterdir()}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kept"] == json.loads((source["dir"] / "plan.json").read_text())["kept"]
    assert plan["meta"]["recovery"] == "distill"
    assert digest(source["dir"]) == before  # nothing written over the input

    result = edgeprune.finetune(source["dir"], calibration=source["data"].calib_x, heldout=0.5, steps=2,
                                device=str(source["target"]), latency="0.9x", out=tmp_path / "api",
                                min_agreement=0)
    assert result.exit_code == 0 and result.report["finetune"]["steps"] == 2
    # the 200 samples given, half held out for the release's fidelity, a fifth of the rest held back by the training
    assert result.report["finetune"]["validation"]["samples"] == 20
    assert result.report["calibration"] == "python" and (tmp_path / "api" / "report.json").is_file()


def test_finetune_refuses_what_is_not_a_build_or_prune_output(source: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "plan.json").write_text((source["dir"] / "plan.json").read_text())
    before = digest(source["dir"])
    for folder, words in [(tmp_path / "missing", "not a folder"), (tmp_path / "half", "lacks pruned.pt"),
                          (source["dir"] / "plan.json", "not a folder")]:
        code = main(["finetune", str(folder), "--out", str(tmp_path / "new")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("edgeprune: error:") and words in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    code = main(["finetune", str(source["dir"]), "--out", str(source["dir"]), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "never writes over its input" in err
    assert not (tmp_path / "new").exists() and digest(source["dir"]) == before
    with pytest.raises(EdgePruneError, match="not both"):
        FinetuneConfig(steps=3, minutes=1.0)


def test_the_release_defaults_to_the_source_builds_target_and_budget(source: dict) -> None:
    import dataclasses

    src = source["src"]
    assert src.release_settings(None, None) == ("cpu", "0.5x")  # a prune output: no target, no budget
    built = dataclasses.replace(src, report={**src.report, "target": {"name": "rpi5"}, "budget": "0.6x"})
    assert built.release_settings(None, None) == ("rpi5", "0.6x")
    assert built.release_settings("cpu", "10ms") == ("cpu", "10ms")
    custom = dataclasses.replace(src, report={**src.report, "target": {"name": "my-board"}, "budget": "0.6x"})
    with pytest.raises(EdgePruneError, match="not a bundled profile; pass --device"):
        custom.release_settings(None, None)
    assert custom.release_settings(str(source["target"]), None) == (str(source["target"]), "0.6x")


def test_a_diverging_stage_exits_4_and_writes_nothing(source: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    before = digest(source["dir"])
    code = main(["finetune", str(source["dir"]), "--steps", "6", "--lr", "1e30", "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("edgeprune: error:")]
    assert code == 4 and len(errors) == 1 and "diverged" in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.failed").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # not even the temporary folder
    assert digest(source["dir"]) == before


@pytest.mark.parametrize("stage", ["csgd", "distill"])
def test_labels_past_the_models_classes_exit_2_before_training(source: dict, tmp_path: Path, stage: str) -> None:
    """`finetune --stage csgd` on labels 1000+ exited 1 "internal error (IndexError: Target 1006 is out of bounds)";
    labels are checked against the unpruned model's 10 classes before any training, whichever the stage."""
    import subprocess
    import sys

    import numpy as np

    x = load_data(load_recipe("digits"), (1, 1, 32, 32)).calib_x[:64]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(64, dtype=np.int64) % 7 + 1000)
    (tmp_path / "big.toml").write_text('kind = "npy"\npath = "x.npy"\nlabels = "y.npy"\nheldout = 16\n')
    r = subprocess.run([sys.executable, "-m", "edgeprune", "finetune", str(source["dir"]), "--stage", stage,
                        "--steps", "2", "--calibration", str(tmp_path / "big.toml"), "--out", str(tmp_path / "ft")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "edgeprune: error: the labels of calibration recipe big go up to 1006, but model example has 10 classes (its "
        "output is N x 10); labels must be class indices 0..9: fix the labels, or give a model with 1007 or more "
        "classes")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "ft.failed").exists()


def test_a_folder_whose_pruned_pt_belongs_to_another_prune_is_refused(source: dict, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """pruned.pt of another prune beside this one's plan.json and report.json made a report mixing the two (the other
    model's input fidelity); the plan pruned.pt holds must be the one plan.json lists."""
    import shutil

    from edgeprune.jobs.prune_job import prune_job

    other = PruneConfig(calibration=str(source["root"] / "digits-399.toml"), criterion="l1", compensation=False,
                        channel_multiple=1, exporter="torchscript")
    prune_job(other, tmp_path / "other", ratio=0.5)
    mixed = tmp_path / "mixed"
    shutil.copytree(source["dir"], mixed)
    shutil.copy(tmp_path / "other" / "pruned.pt", mixed / "pruned.pt")
    code = main(["finetune", str(mixed), "--steps", "2", "--out", str(tmp_path / "ft")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"edgeprune: error: {mixed} mixes two outputs: pruned.pt holds example "
                                            "pruned by plan "), err
    assert "give a build or prune output folder as that job wrote it" in err[-1]
    assert not (tmp_path / "ft").exists() and not (tmp_path / "ft.failed").exists()
    assert read_source(source["dir"]).plan == source["src"].plan  # an unchanged folder still reads


# ---------------------------------------------------------------- augmentation and build --recover (issue 28)


def test_augment_flips_and_shifts_images_and_leaves_other_inputs_alone() -> None:
    from edgeprune.recovery.train import augment

    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)  # deterministic for a seed
    assert not torch.equal(a, x)
    # each output is a flipped or not, shifted window of its own image: every value comes from that image's pixels
    for i in range(2):
        assert set(a[i].flatten().tolist()) <= set(x[i].flatten().tolist())
    many = torch.stack([augment(x[:1], torch.Generator().manual_seed(s))[0] for s in range(16)])
    assert len({t.sum().item() for t in many}) > 4  # shifts and flips vary
    flat = torch.randn(4, 10)
    assert augment(flat, torch.Generator()) is flat


def test_build_recover_distils_the_release_and_ships_what_it_trained(tmp_path: Path) -> None:
    """`build --recover`: the released model is the trained one (its ONNX file computes it: parity), the report says
    how it trained, and the best held-back epoch (or the untrained model) is what ships."""
    import numpy as np
    import onnxruntime as ort

    from edgeprune.report.artifacts import load_pruned

    out = tmp_path / "b"
    code = main(["build", "--latency", "0.5x", "--tolerance", "0.5", "--max-steps", "4", "--recover", "0.1",
                 "--recover-lr", "0.002", "--min-agreement", "0", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out), "--json"])
    assert code == 0
    r = json.loads((out / "report.json").read_text())
    rec = r["recovery"]
    assert rec["minutes"] == 0.1 and rec["steps"] > 0 and rec["loss"] == "distillation" and rec["lr"] == 0.002
    v = rec["validation"]
    assert v["best"] <= v["before"] and (v["best_step"] == 0) == (v["best"] == v["before"])
    assert r["quality_gates"]["onnx_parity"]["passed"]
    module = load_pruned(out / "pruned.pt")[0].eval()
    x = torch.randn(3, 1, 32, 32)  # the example's input size
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    got = np.concatenate([sess.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(3)])
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-4, atol=1e-4)


def test_recover_lr_out_of_range_exits_2_before_loading(capsys: pytest.CaptureFixture) -> None:
    assert main(["build", "--latency", "0.5x", "--recover", "1", "--recover-lr", "0"]) == 2
    assert "--recover-lr is a learning rate in (0, 1), found 0" in capsys.readouterr().err
