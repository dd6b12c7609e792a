"""torchvision's one-stage detectors as deployments run them: the network on the device, the rest on the host.

    raw = RawDetector(torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None))
    heads = raw(normalised)                       # {"cls_logits": N x A x C, "bbox_regression": N x A x 4}
    boxes = decode_detections(detector, heads, image_size=(320, 320))   # torchvision's own post-processing

`RawDetector` is the backbone (with its FPN or extra layers) and the head, returning the raw class and box tensors;
edgeprune prunes and exports that. The input is an image already normalised and resized as the detector's
`transform` would (`detector.transform.normalize`, at the size it resizes to). `decode_detections` turns raw outputs
(torch tensors or the ONNX model's arrays) back into boxes with the detector's own anchors, box decoding and NMS
(`postprocess_detections`): written here only because torchvision keeps those steps inside `forward`, and a user
evaluating a pruned ONNX model needs them outside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

ONE_STAGE = ("ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
             "fcos_resnet50_fpn")
INPUT_SIZE = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}  # the others: 512 (their transform's
# min_size is 800; a smaller square input keeps CPU builds practical, and anchors follow the feature maps)


class RawDetector(nn.Module):
    """Backbone and head of a torchvision one-stage detector; forward returns the head's raw tensors by name."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.backbone(x)
        return [f] if isinstance(f, torch.Tensor) else list(f.values())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.features(x))
        return {k: out[k] for k in sorted(out)}  # a fixed order: the ONNX outputs follow it


def decode_detections(detector: nn.Module, raw: Mapping[str, Any], image_size: tuple[int, int]) -> list[dict]:
    """Boxes, scores and labels per image from raw head outputs, by `detector`'s own anchors and post-processing.

    `raw` maps output names to torch tensors or NumPy arrays (the ONNX model's outputs, by name); `image_size` is the
    (height, width) the network saw. Boxes are in that image's pixels."""
    from torchvision.models.detection.image_list import ImageList

    heads = {k: torch.as_tensor(v) for k, v in raw.items()}
    n = next(iter(heads.values())).shape[0]
    h, w = image_size
    with torch.no_grad():
        # anchors follow the feature maps' sizes: the unpruned backbone on a blank image of this size gives them
        # (a pruned backbone keeps every spatial size, only channels change)
        features = RawDetector(detector).eval().features(torch.zeros(1, 3, h, w))
        features = [f.expand(n, *f.shape[1:]) for f in features]
        images = ImageList(torch.zeros(n, 3, h, w), [(h, w)] * n)
        anchors = detector.anchor_generator(images, features)
        if type(detector).__name__ == "SSD":
            return detector.postprocess_detections(heads, anchors, images.image_sizes)
        per_level = [f.size(2) * f.size(3) for f in features]
        a = heads["cls_logits"].size(1) // sum(per_level)
        sizes = [hw * a for hw in per_level]
        split = {k: list(v.split(sizes, dim=1)) for k, v in heads.items()}
        split_anchors = [list(x.split(sizes)) for x in anchors]
        return detector.postprocess_detections(split, split_anchors, images.image_sizes)


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """`torchvision:NAME` for a one-stage detector: its RawDetector (no download) and the default input shape."""
    import torchvision

    detector = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    size = INPUT_SIZE.get(name, 512)
    return RawDetector(detector.eval()), (1, 3, size, size)
