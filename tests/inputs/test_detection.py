"""torchvision's one-stage detectors as the network only: raw heads out, torchvision's own decoding on the host."""

from __future__ import annotations

import pytest
import torch

from edgeprune.inputs.detection import RawDetector, decode_detections


@pytest.mark.parametrize("name,size", [("ssdlite320_mobilenet_v3_large", 320), ("retinanet_resnet50_fpn", 256)])
def test_raw_heads_decoded_on_the_host_give_the_detectors_own_boxes(name: str, size: int) -> None:
    """RawDetector on the transformed image, then decode_detections, equals the detector's forward on the image."""
    import torchvision

    torch.manual_seed(0)
    sizes = {} if name.startswith("ssd") else {"min_size": size, "max_size": size}  # SSD's transform is fixed-size
    det = torchvision.models.get_model(name, weights=None, weights_backbone=None, **sizes)
    det.eval().score_thresh = 0.0  # random weights score low: keep every candidate the NMS keeps
    img = torch.rand(3, size, size)
    with torch.no_grad():
        want = det([img])[0]
        images, _ = det.transform([img])
        assert tuple(images.tensors.shape[-2:]) == (size, size)  # nothing resized: the boxes compare as they are
        raw = RawDetector(det)(images.tensors)
    got = decode_detections(det, {k: v.numpy() for k, v in raw.items()}, (size, size))[0]
    assert len(want["boxes"]) > 0 and torch.equal(got["labels"], want["labels"])
    torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got["scores"], want["scores"])


def test_detection_spec_loads_the_network_only_and_prunes_with_every_output_whole(tmp_path) -> None:
    import json

    from edgeprune.cli.commands import main
    from edgeprune.inputs.models import load_model

    loaded = load_model("torchvision:ssdlite320_mobilenet_v3_large")
    assert isinstance(loaded.module, RawDetector) and loaded.input_shape == (1, 3, 320, 320)
    out = tmp_path / "ssd"
    assert main(["prune", "--model", "torchvision:ssdlite320_mobilenet_v3_large", "--calibration", "random",
                 "--ratio", "0.3", "--exporter", "torchscript", "--out", str(out), "--json"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert set(r["parity"]["per_output"]) == {"bbox_regression", "cls_logits"}
    assert all(v < 1e-4 for v in r["parity"]["per_output"].values())
    assert r["pruned"]["macs"] < 0.8 * r["base"]["macs"]
