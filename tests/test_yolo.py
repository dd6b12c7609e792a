"""Ultralytics YOLO (an optional extra): built from its config, pruned with its head whole, decoded by Ultralytics'
own NMS to the same boxes from ONNX Runtime as from the pruned torch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ultralytics", reason="ultralytics is an optional extra (pip install ultralytics)")


def test_yolov8n_prunes_outside_its_splits_and_keeps_ultralytics_boxes(tmp_path: Path) -> None:
    import onnxruntime as ort
    from torchvision.ops import box_iou
    from ultralytics.utils.nms import non_max_suppression

    from edgeprune.artifacts import load_pruned
    from edgeprune.cli import main

    out = tmp_path / "yolo"
    assert main(["prune", "--model", "ultralytics:yolov8n.yaml", "--input-shape", "1,3,320,320", "--calibration",
                 "random", "--ratio", "0.3", "--exporter", "torchscript", "--out", str(out), "--json"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["pruned"]["macs"] < 0.8 * r["base"]["macs"] and r["parity"]["rel_error"] < 1e-4
    splits = [g for g, why in r["excluded_groups"].items() if "split along channels" in why]
    assert splits and all(".m." in g or ".cv" in g for g in splits)  # C2f's chunked groups, said why
    module, _ = load_pruned(out / "pruned.pt")
    head = module.model[-1]
    for branch in (*head.cv2, *head.cv3):  # the Detect head's last convs keep every channel, DFL untouched
        assert branch[-1].out_channels in (head.no - head.nc, head.nc)
    assert head.dfl.conv.in_channels == head.reg_max

    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        want = non_max_suppression(module(x), conf_thres=0.0, max_det=50, agnostic=True)[0]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    got = non_max_suppression(onnx_out, conf_thres=0.0, max_det=50, agnostic=True)[0]
    # random weights score every box and class about alike, so which class wins and which boxes make the last places
    # of max_det are noise: the ten best boxes must each be found again, with their scores
    assert len(want) >= 10 and len(got) > 0
    best = want[:10]
    iou = box_iou(best[:, :4], got[:, :4])
    assert float(iou.max(1).values.min()) > 0.99
    np.testing.assert_allclose(got[iou.argmax(1), 4].numpy(), best[:, 4].numpy(), rtol=1e-3)


def test_a_yolo_that_torch_pruning_cannot_group_in_time_exits_2_with_nothing_written(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeprune.cli import main

    monkeypatch.setenv("EDGEPRUNE_TRACE_SECONDS", "5")
    out = tmp_path / "y11"
    code = main(["prune", "--model", "ultralytics:yolo11n.yaml", "--input-shape", "1,3,320,320", "--calibration",
                 "random", "--ratio", "0.3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "did not finish in 5 s" in err and err.strip().splitlines()[-1].startswith("edgeprune: error:")
    assert not out.exists()
