"""Ultralytics YOLO (an optional extra): built from its config, pruned with its head whole, decoded by Ultralytics'
own NMS to the same boxes from ONNX Runtime as from the pruned torch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ultralytics", reason="ultralytics is the optional extra yolo: pip install -e '.[yolo]'")


def _prune(spec: str, size: int, out: Path) -> tuple[dict, nn.Module]:
    """`edgeprune prune --ratio 0.3` of a YOLO config: its report, and the pruned module."""
    from edgeprune.report.artifacts import load_pruned
    from edgeprune.cli.commands import main

    assert main(["prune", "--model", spec, "--input-shape", f"1,3,{size},{size}", "--calibration", "random",
                 "--ratio", "0.3", "--exporter", "torchscript", "--out", str(out), "--json"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["pruned"]["macs"] < 0.8 * r["base"]["macs"] and r["parity"]["rel_error"] < 1e-4
    module, _ = load_pruned(out / "pruned.pt")
    return r, module


def _check_head_whole(module: nn.Module) -> None:
    """The Detect head's last convs keep every channel, and DFL is untouched."""
    head = module.model[-1]
    for branch in (*head.cv2, *head.cv3):
        assert branch[-1].out_channels in (head.no - head.nc, head.nc)
    assert head.dfl.conv.in_channels == head.reg_max


def _check_same_boxes(module: nn.Module, onnx_path: Path, size: int) -> None:
    """Ultralytics' NMS finds the pruned torch model's ten best boxes again in ONNX Runtime's output, scores too."""
    import onnxruntime as ort
    from torchvision.ops import box_iou
    from ultralytics.utils.nms import non_max_suppression

    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        want = non_max_suppression(module(x), conf_thres=0.0, max_det=50, agnostic=True)[0]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert onnx_out.shape == module(x).shape
    got = non_max_suppression(onnx_out, conf_thres=0.0, max_det=50, agnostic=True)[0]
    # random weights score every box and class about alike, so which class wins and which boxes make the last places
    # of max_det are noise: the ten best boxes must each be found again, with their scores
    assert len(want) >= 10 and len(got) > 0
    best = want[:10]
    iou = box_iou(best[:, :4], got[:, :4])
    assert float(iou.max(1).values.min()) > 0.99
    np.testing.assert_allclose(got[iou.argmax(1), 4].numpy(), best[:, 4].numpy(), rtol=1e-3)


def test_yolov8n_prunes_its_c2f_splits_in_equal_halves_and_keeps_ultralytics_boxes(tmp_path: Path) -> None:
    """C2f's `chunk(2)` groups are pruned (dependency/splits.py), each half losing as many channels as the other:
    the pruned model runs, and ONNX Runtime finds its boxes again."""
    from edgeprune.inputs.models import load_model

    r, module = _prune("ultralytics:yolov8n.yaml", 320, tmp_path / "yolo")
    splits = [g for g, why in r["excluded_groups"].items() if "split along channels" in why]
    assert not splits, splits
    base = dict(load_model("ultralytics:yolov8n.yaml", input_shape=(1, 3, 320, 320)).module.named_modules())
    pruned = dict(module.named_modules())
    for c2f in (2, 4, 6, 8, 12, 15, 18, 21):
        cv1 = f"model.{c2f}.cv1.conv"
        assert pruned[cv1].out_channels < base[cv1].out_channels and pruned[cv1].out_channels % 2 == 0
        assert pruned[f"model.{c2f}.m.0.cv1.conv"].in_channels == pruned[cv1].out_channels // 2  # reads one half
    _check_head_whole(module)
    _check_same_boxes(module, tmp_path / "yolo" / "model.onnx", 320)


def test_yolo11n_prunes_outside_its_attention_and_splits_and_keeps_ultralytics_boxes(tmp_path: Path) -> None:
    """yolo11n's C2PSA attention views its channels as heads: those groups are excluded, said why, and the grouping
    ends in seconds (it ran for minutes before the reshapes torch-pruning cannot map were cut)."""
    from edgeprune.inputs.models import load_model

    r, module = _prune("ultralytics:yolo11n.yaml", 192, tmp_path / "y11")
    assert r["timings_s"]["trace"] < 30
    why = r["excluded_groups"]
    heads = {g for g, w in why.items() if "reshape of a" in w and "attention heads" in w}
    assert {"model.10.m.0.attn.qkv.conv", "model.10.m.0.attn.pe.conv"} <= heads
    assert any("split along channels" in w for w in why.values())  # C3k2's chunks, as in yolov8n
    base = dict(load_model("ultralytics:yolo11n.yaml", input_shape=(1, 3, 192, 192)).module.named_modules())
    for name, m in module.named_modules():  # the attention keeps every channel
        if ".attn." in name and isinstance(m, nn.Conv2d):
            assert m.weight.shape == base[name].weight.shape, name
    _check_head_whole(module)
    _check_same_boxes(module, tmp_path / "y11" / "model.onnx", 192)


def test_prune_exits_2_with_nothing_written_when_the_grouping_runs_past_its_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeprune.cli.commands import main

    monkeypatch.setenv("EDGEPRUNE_TRACE_SECONDS", "0.01")  # yolo11n groups in about a second: far past the limit
    out = tmp_path / "y11"
    code = main(["prune", "--model", "ultralytics:yolo11n.yaml", "--input-shape", "1,3,192,192", "--calibration",
                 "random", "--ratio", "0.3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "did not finish in 0.01 s" in err
    assert err.strip().splitlines()[-1].startswith("edgeprune: error:")
    assert not out.exists()
