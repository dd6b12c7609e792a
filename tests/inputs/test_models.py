from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeprune.errors import EdgePruneError
from edgeprune.inputs.example import TRAIN_COUNT, digits_32
from edgeprune.inputs.models import load_model, parse_shape


def test_example_is_trained_on_digits() -> None:
    """The shipped weights classify digits never seen in training."""
    m = load_model("example")
    x, y, perm = digits_32()
    held = perm[TRAIN_COUNT:]
    with torch.no_grad():
        pred = m.module(torch.from_numpy(x[held])).argmax(1).numpy()
    assert (pred == y[held]).mean() >= 0.95


def test_load_model_is_deterministic() -> None:
    a, b = load_model("torchvision:resnet18"), load_model("torchvision:resnet18")
    assert torch.equal(a.module.fc.weight, b.module.fc.weight) and torch.equal(a.example_input, b.example_input)
    c = load_model("torchvision:resnet18", seed=1)
    assert not torch.equal(a.module.fc.weight, c.module.fc.weight)


def test_load_model_factory_spec_with_weights(tmp_path: Path) -> None:
    src = tmp_path / "mynet.py"
    src.write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())\n")
    ref = load_model(f"{src}:make", input_shape=(1, 3, 8, 8), seed=3)
    torch.save(ref.module.state_dict(), tmp_path / "w.pt")
    m = load_model(f"{src}:make", weights=tmp_path / "w.pt", input_shape=(1, 3, 8, 8), seed=4)
    assert torch.equal(m.module[0].weight, ref.module[0].weight)


def test_load_model_weights_mismatch_is_clear(tmp_path: Path) -> None:
    torch.save({"bogus.weight": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(EdgePruneError, match="do not fit the model.*unexpected"):
        load_model("torchvision:resnet18", weights=tmp_path / "w.pt")


def test_load_model_wrong_input_shape_is_clear() -> None:
    with pytest.raises(EdgePruneError, match="does not run on an input of shape.*--input-shape"):
        load_model("example", input_shape=(1, 3, 32, 32))


@pytest.mark.parametrize("spec,match", [
    ("resnet18", "unknown model spec"),
    ("torchvision:resnet19", "did you mean"),
    ("no_such_pkg.mod:fn", "cannot import"),
])
def test_load_model_bad_spec(spec: str, match: str) -> None:
    with pytest.raises(EdgePruneError, match=match):
        load_model(spec)


def test_parse_shape() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224) == parse_shape("1x3x224x224")
    with pytest.raises(EdgePruneError):
        parse_shape("1,-3")


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large"])
def test_torchvision_specs_never_download_a_backbone(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's segmentation and detection builders fetch ImageNet backbone weights by default
    (`weights_backbone`); a spec must build offline unless --weights asks for weights."""
    import torch.hub
    import torchvision.models._api as tv_api

    from edgeprune.inputs.models import _torchvision

    def no_network(*a: object, **kw: object) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)  # torchvision's own reference to it
    assert isinstance(_torchvision(name), torch.nn.Module)


def test_segmenters_with_an_auxiliary_head_are_built_with_it() -> None:
    """fcn and deeplabv3 come with their auxiliary classifier, as torchvision's trained weights have it: two named
    outputs, `out` and `aux`, both at the input's resolution; lraspp has one."""
    from edgeprune.inputs.outputs import flatten_outputs

    loaded = load_model("torchvision:deeplabv3_mobilenet_v3_large", input_shape=(1, 3, 64, 64))
    with torch.no_grad():
        outs = dict(flatten_outputs(loaded.module(loaded.example_input)))
    assert list(outs) == ["out", "aux"] and all(t.shape == (1, 21, 64, 64) for t in outs.values())
    lraspp = load_model("torchvision:lraspp_mobilenet_v3_large", input_shape=(1, 3, 64, 64))
    with torch.no_grad():
        assert [n for n, _ in flatten_outputs(lraspp.module(lraspp.example_input))] == ["out"]


def without(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`edgeprune ARGV` in a fresh interpreter where `import MODULE` fails, as on a machine without that extra."""
    code = (f"import sys; sys.modules[{module!r}] = None; from edgeprune.cli.commands import main; "
            f"raise SystemExit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("module,spec,extra", [("ultralytics", "ultralytics:yolov8n.yaml", "yolo"),
                                               ("timm", "timm:resnet18", "timm")])
def test_a_model_spec_without_its_extra_names_the_extra(tmp_path: Path, module: str, spec: str, extra: str) -> None:
    r = without(module, "export", "--model", spec, "-o", "m.onnx", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("edgeprune: error: ") and f"pip install 'edgeprune[{extra}]'" in line
    assert f"pip install -e '.[{extra}]'" in line and not (tmp_path / "m.onnx").exists()
