"""Synthetic detection and segmentation tasks for edgeprune's benchmarks: data, two small nets, their metrics.

FashionNet (tools/fashion.py) measures what pruning does to a classifier; detectors and segmenters have several
outputs, dense predictions and host post-processing, and a pruned one is judged by mAP and mIoU, not top-1. Real
detection data (COCO, VOC) is not on this machine, so the data is drawn: RGB images of 1-4 shapes of three classes
(circle, square, triangle) with random sizes, rotations, colours and textures (stripes, noise), over gradient and wavy
backgrounds with clutter (lines and soft blobs that are not objects) and pixel noise. One generator gives both tasks'
ground truth: boxes (xyxy pixels) and labels for the detector, a per-pixel class mask for the segmenter.

    python -m tools.train_tasks                        # trains both nets (tools/task_*.pt) and writes bench/tasks/
    edgeprune build --model tools/tasks.py:make_detector --input-shape 1,3,96,96 --latency 0.6x \
                    --calibration bench/tasks/detector.toml --evaluate tools/tasks.py:evaluate_detector

The nets hold what edgeprune's coupled groups must handle: BatchNorm after every conv, residual adds, concats of
upsampled and skip features, depthwise convs. The detector (CenterNet-like, anchor-free, stride 4) returns raw
tensors only (`heatmap` class logits N x 3 x 24 x 24 and `box` log-distances N x 4 x 24 x 24); `decode` turns them
into boxes on the host (top-k, batched NMS), as a deployment does with the ONNX model's outputs. The segmenter
(encoder-decoder with a skip concat) returns logits N x 4 x 96 x 96 (0 background, 1 circle, 2 square, 3 triangle).

Splits: every image is drawn from its own generator seeded by (split, seed, index), so `train`, `eval` (the held-out
set `evaluate_*` scores, never trained on nor used for calibration) and `calib` (edgeprune's calibration data) draw
from disjoint generator seeds, whatever seeds they are given.

This file is loaded by path (`tools/tasks.py:make_detector`), so it imports only torch, numpy, torchvision and
(in the metric functions) torchmetrics, nothing from edgeprune and from tools/ only zoo.py (`conv_bn`, by path when
it is itself loaded by path).
"""

from __future__ import annotations

import functools
import math
import runpy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DETECTOR_WEIGHTS = HERE / "task_detector.pt"
SEGMENTER_WEIGHTS = HERE / "task_segmenter.pt"
CALIB_DIR = REPO / "bench" / "tasks"

SIZE = 96
INPUT_SHAPE = (1, 3, SIZE, SIZE)
CLASSES = ("circle", "square", "triangle")  # detection labels 0..2; mask values 1..3 (0 is background)
STRIDE = 4  # the detector's output grid: 24 x 24 cells of 4 x 4 pixels
# Mean and std of the images in [0, 1] (measured over 2000 training images: 0.495 / 0.239, within 0.006 / 0.007 on
# every channel, the colours being uniform), rounded and fixed so training, calibration and evaluation normalise alike.
MEAN, STD = 0.495, 0.24
SPLITS = {"train": 0, "eval": 1, "calib": 2}
EVAL_COUNT = 256  # the held-out set of evaluate_detector / evaluate_segmenter
EVAL_SEED = 0
CALIB_COUNT = 512
CALIB_HELDOUT = 128  # edgeprune's own held-out part of the calibration data (fidelity only, never statistics)
CALIB_SEED = 0

MIN_SIZE, MAX_SIZE = 16.0, 44.0  # diameter of a shape's circumscribed circle, pixels


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Samples:
    """A batch of synthetic images with both tasks' ground truth.

    images: float32 N x 3 x H x W, normalised; masks: int64 N x H x W (0 background, 1..3 the shape classes);
    boxes: per image a float32 K x 4 array, xyxy in pixel edges (a shape covering columns 3..7 has x1 = 3, x2 = 8);
    labels: per image an int64 K array of class indices 0..2 (the mask value minus one)."""

    images: np.ndarray
    masks: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """Ground truth in torchmetrics' detection format (one dict of boxes and labels per image)."""
        return [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lb)}
                for b, lb in zip(self.boxes, self.labels, strict=True)]


def synthesize(count: int, seed: int = 0, split: str = "train") -> Samples:
    """`count` images of `split` (train, eval, calib) drawn from `seed`: the same arguments give the same arrays.

    Each image has its own generator seeded by (split, seed, index): the splits draw from disjoint seeds, and a
    batch of n images is the first n of a batch of m > n."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    drawn = [render(np.random.default_rng([SPLITS[split], seed, i])) for i in range(count)]
    images = np.stack([d[0] for d in drawn]).transpose(0, 3, 1, 2)
    return Samples(images=normalise(images), masks=np.stack([d[1] for d in drawn]),
                   boxes=[d[2] for d in drawn], labels=[d[3] for d in drawn])


def normalise(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] (N x 3 x H x W) to the nets' input."""
    return ((images - MEAN) / STD).astype(np.float32)


GRID = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # (y, x) of the pixel centres


def render(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image (H x W x 3 in [0, 1]), its class mask and its shapes' boxes and labels.

    Clutter goes under the shapes and shapes never overlap, so every shape is whole in the mask and its box is the
    tight box of its own pixels; pixel noise goes over everything."""
    yy, xx = GRID
    image = background(rng, xx, yy)
    clutter(rng, image, xx, yy)
    mask = np.zeros((SIZE, SIZE), np.int64)
    boxes, labels = [], []
    for kind, cx, cy, diameter in placements(rng):
        inside = shape_mask(kind, cx, cy, diameter, rng.uniform(0, 2 * math.pi), xx, yy)
        image[inside] = texture(rng, image[inside], xx[inside], yy[inside])
        mask[inside] = kind + 1
        rows, cols = np.nonzero(inside)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        labels.append(kind)
    image += rng.standard_normal(image.shape, np.float32) * np.float32(rng.uniform(0.01, 0.06))
    return (np.clip(image, 0, 1), mask, np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(labels, np.int64))


def background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A linear gradient between two random colours plus two low-frequency waves (H x W x 3)."""
    c0, c1 = rng.uniform(0, 1, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = ((math.cos(angle) * xx + math.sin(angle) * yy) / SIZE + 1.5) / 3
    image = c0 + (c1 - c0) * t[..., None]
    for _ in range(2):
        freq, phase, a = rng.uniform(0.02, 0.12), rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
        wave = np.sin(freq * (math.cos(a) * xx + math.sin(a) * yy) + phase)
        image += wave[..., None] * rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    return image.astype(np.float32)


def clutter(rng: np.random.Generator, image: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> None:
    """Distractors drawn in place: 1-4 straight lines and 0-3 soft elongated blobs, none of them an object."""
    for _ in range(rng.integers(1, 5)):
        (x0, y0), (x1, y1) = rng.uniform(0, SIZE, (2, 2))
        width = rng.uniform(0.5, 1.5)
        win = window(min(x0, x1) - 2, min(y0, y1) - 2, max(x0, x1) + 2, max(y0, y1) + 2)
        on = segment_distance(xx[win], yy[win], x0, y0, x1, y1) < width
        image[win][on] = rng.uniform(0, 1, 3)
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, SIZE, 2)
        sx, sy = rng.uniform(2, 5), rng.uniform(5, 12)
        a = rng.uniform(0, math.pi)
        win = window(cx - 3 * sy, cy - 3 * sy, cx + 3 * sy, cy + 3 * sy)  # the blob is ~0 beyond 3 sigma
        u, v = rotate(xx[win] - cx, yy[win] - cy, a)
        alpha = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))[..., None] * rng.uniform(0.5, 0.9)
        image[win] = image[win] * (1 - alpha) + rng.uniform(0, 1, 3).astype(np.float32) * alpha


def window(x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
    """The rows and columns of the pixels in [x0, x1] x [y0, y1], clipped to the image: drawing a small thing
    touches only its own pixels (the clutter drew 3x faster so)."""
    def span(a: float, b: float) -> slice:
        return slice(max(int(a), 0), min(math.ceil(b) + 1, SIZE))
    return span(y0, y1), span(x0, x1)


def segment_distance(xx: np.ndarray, yy: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Distance of every pixel centre to the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    return np.hypot(xx - x0 - t * dx, yy - y0 - t * dy)


def rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def placements(rng: np.random.Generator) -> list[tuple[int, float, float, float]]:
    """1-4 (class, centre x, centre y, diameter) whose circumscribed circles lie inside the image, 2 pixels apart.

    A shape that finds no free place in 50 tries is dropped (rare: the first always fits)."""
    placed: list[tuple[int, float, float, float]] = []
    for _ in range(rng.integers(1, 5)):
        kind, diameter = int(rng.integers(0, len(CLASSES))), rng.uniform(MIN_SIZE, MAX_SIZE)
        r = diameter / 2
        for _ in range(50):
            cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
            if all(math.hypot(cx - px, cy - py) > r + pd / 2 + 2 for _, px, py, pd in placed):
                placed.append((kind, cx, cy, diameter))
                break
    return placed


def shape_mask(kind: int, cx: float, cy: float, diameter: float, angle: float, xx: np.ndarray,
               yy: np.ndarray) -> np.ndarray:
    """Pixels whose centres fall inside the shape: a circle, a rotated square or a rotated equilateral triangle,
    each inscribed in the circle of `diameter` (the circle itself slightly smaller, so sizes overlap across classes)."""
    u, v = rotate(xx - cx, yy - cy, angle)
    r = diameter / 2
    if kind == 0:
        return u * u + v * v <= (0.8 * r) ** 2
    if kind == 1:
        half = r / math.sqrt(2)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):  # an equilateral triangle: three half-planes at distance r/2 from the centre
        a = 2 * math.pi * k / 3
        inside &= math.cos(a) * u + math.sin(a) * v <= r / 2
    return inside


def texture(rng: np.random.Generator, under: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The shape's pixels: a colour far from what lies under it, plain, striped or noisy."""
    base = under.mean(0)
    for _ in range(20):
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        if np.linalg.norm(colour - base) > 0.45:
            break
    style = rng.integers(0, 3)
    if style == 1:
        a, freq = rng.uniform(0, math.pi), rng.uniform(0.5, 1.5)
        stripes = np.sin(freq * (math.cos(a) * xs + math.sin(a) * ys)) > 0
        return np.where(stripes[:, None], colour, colour * 0.6).astype(np.float32)
    if style == 2:
        return (colour + rng.normal(0, 0.1, (len(xs), 3))).astype(np.float32)
    return np.broadcast_to(colour, (len(xs), 3)).astype(np.float32)


# ---------------------------------------------------------------- nets

try:  # imported as tools.tasks
    from .zoo import conv_bn, npy_recipe
except ImportError:  # loaded by path (`--model tools/tasks.py:...`), outside any package: zoo.py beside this file
    _zoo = runpy.run_path(str(Path(__file__).with_name("zoo.py")))
    conv_bn, npy_recipe = _zoo["conv_bn"], _zoo["npy_recipe"]


class Residual(nn.Module):
    """Two 3x3 convs (or separable ones) and an identity shortcut: the add couples the block's output channels to
    its input's."""

    def __init__(self, width: int, separable: bool = False) -> None:
        super().__init__()
        self.conv1 = Separable(width, width) if separable else conv_bn(width, width)
        self.conv2 = Separable(width, width, relu=False) if separable else conv_bn(width, width, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + x)


class Separable(nn.Module):
    """Depthwise 3x3 then pointwise 1x1: the depthwise conv's channels are tied to its input's."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        super().__init__()
        self.depthwise = conv_bn(cin, cin, groups=cin)
        self.pointwise = conv_bn(cin, cout, k=1, relu=relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class Encoder(nn.Module):
    """A stride-2 stem, then per further width a stride-2 conv and a residual block (of separable convs where
    `separable` says so: cheap where the maps are small and the channels many)."""

    def __init__(self, widths: Sequence[int], separable: Sequence[bool]) -> None:
        super().__init__()
        self.stem = conv_bn(3, widths[0], stride=2)
        self.stages = nn.ModuleList(nn.Sequential(conv_bn(cin, cout, stride=2), Residual(cout, sep))
                                    for cin, cout, sep in zip(widths[:-1], widths[1:], separable, strict=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features


class Detector(nn.Module):
    """CenterNet-like, anchor-free, one stage: an encoder to stride 16, a top-down path that upsamples and
    concatenates the stride 8 and 4 features, and two separable heads on the stride-4 grid.

    forward -> {"heatmap": N x 3 x H/4 x W/4 class logits (a sigmoid per class; an object peaks at the cell holding
    its centre), "box": N x 4 x H/4 x W/4 log of the distances from the cell centre to the box's left, top, right
    and bottom edges, in units of STRIDE}. Raw tensors only: `decode` does the rest on the host."""

    def __init__(self, widths: Sequence[int] = (16, 48, 64, 96), head: int = 48) -> None:
        super().__init__()
        self.encoder = Encoder(widths, separable=(False, True, True))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse8 = conv_bn(widths[3] + widths[2], widths[2], k=1)
        self.fuse4 = conv_bn(widths[2] + widths[1], head)
        self.heatmap = nn.Sequential(Separable(head, head), nn.Conv2d(head, len(CLASSES), 1))
        self.box = nn.Sequential(Separable(head, head), nn.Conv2d(head, 4, 1))
        nn.init.constant_(self.heatmap[-1].bias, -math.log(99))  # a prior of 1% objects: a calm focal loss at start

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, f4, f8, f16 = self.encoder(x)
        p8 = self.fuse8(torch.cat([self.up(f16), f8], 1))
        p4 = self.fuse4(torch.cat([self.up(p8), f4], 1))
        return {"heatmap": self.heatmap(p4), "box": self.box(p4)}


class Segmenter(nn.Module):
    """Encoder-decoder: an encoder to stride 8, a decoder that upsamples and concatenates the stride 4 and 2
    features, a 1x1 classifier at stride 2 and a bilinear upsampling to the input's size.

    forward -> N x 4 x H x W logits (0 background, 1 + the class index of CLASSES)."""

    def __init__(self, widths: Sequence[int] = (16, 48, 64), decoder: Sequence[int] = (48, 16)) -> None:
        super().__init__()
        self.encoder = Encoder(widths, separable=(False, True))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse4 = conv_bn(widths[2] + widths[1], decoder[0])
        self.fuse2 = conv_bn(decoder[0] + widths[0], decoder[1])
        self.classifier = nn.Conv2d(decoder[1], len(CLASSES) + 1, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f2, f4, f8 = self.encoder(x)
        d4 = self.fuse4(torch.cat([self.up(f8), f4], 1))
        d2 = self.fuse2(torch.cat([self.up(d4), f2], 1))
        return self.upsample(self.classifier(d2))


def make_detector() -> Detector:
    """The trained detector (random weights while tools/task_detector.pt is absent), in eval mode:
    `--model tools/tasks.py:make_detector --input-shape 1,3,96,96`."""
    return load_weights(Detector(), DETECTOR_WEIGHTS)


def make_segmenter() -> Segmenter:
    """The trained segmenter (random weights while tools/task_segmenter.pt is absent), in eval mode:
    `--model tools/tasks.py:make_segmenter --input-shape 1,3,96,96`."""
    return load_weights(Segmenter(), SEGMENTER_WEIGHTS)


def load_weights(model: nn.Module, weights: Path) -> nn.Module:
    """`model` with the state dict in `weights` if that file exists, in eval mode."""
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


# ---------------------------------------------------------------- host post-processing and metrics


def decode(outputs: Mapping[str, Any] | Sequence[Any], score_threshold: float = 0.05, topk: int = 100,
           iou_threshold: float = 0.5, max_detections: int = 20) -> list[dict[str, torch.Tensor]]:
    """Boxes (xyxy pixels), scores and labels per image from the detector's raw outputs, as a deployment decodes
    them on the host: a sigmoid per class, the `topk` best (cell, class) scores above `score_threshold`, each cell's
    box from its four log-distances, then NMS per class.

    `outputs` is the forward's dict or its values in order (heatmap, box), as torch tensors or NumPy arrays (ONNX
    Runtime's outputs)."""
    heat, box = (outputs["heatmap"], outputs["box"]) if isinstance(outputs, Mapping) else outputs
    heat, box = _tensor(heat), _tensor(box)
    n, classes, h, w = heat.shape
    scores, idx = heat.sigmoid().reshape(n, -1).topk(min(topk, classes * h * w), dim=1)
    return [_decode_one(box[i], scores[i], idx[i], (h, w), score_threshold, iou_threshold, max_detections)
            for i in range(n)]


def _tensor(v: Any) -> torch.Tensor:
    return v.detach().float() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, np.float32))


def _decode_one(box: torch.Tensor, scores: torch.Tensor, idx: torch.Tensor, grid: tuple[int, int],
                score_threshold: float, iou_threshold: float, max_detections: int) -> dict[str, torch.Tensor]:
    keep = scores > score_threshold
    scores, idx = scores[keep], idx[keep]
    h, w = grid
    labels, cell = idx // (h * w), idx % (h * w)
    cy, cx = (cell // w).float(), (cell % w).float()
    dist = box.reshape(4, -1)[:, cell].exp() * STRIDE  # left, top, right, bottom
    centre_x, centre_y = (cx + 0.5) * STRIDE, (cy + 0.5) * STRIDE
    boxes = torch.stack([centre_x - dist[0], centre_y - dist[1], centre_x + dist[2], centre_y + dist[3]], 1)
    boxes = boxes.clamp(0, SIZE)
    kept = torchvision.ops.batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
    return {"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]}


def detection_map(preds: list[dict[str, Any]], targets: list[dict[str, Any]]) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@0.5:0.95 (torchmetrics, pycocotools backend) of per-image predictions (boxes, scores,
    labels) against per-image targets (boxes, labels); boxes xyxy in pixels."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update([{k: torch.as_tensor(v) for k, v in p.items()} for p in preds],
                  [{k: torch.as_tensor(v) for k, v in t.items()} for t in targets])
    result = metric.compute()
    return {"map_50": float(result["map_50"]), "map": float(result["map"])}


def segmentation_miou(pred: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray) -> float:
    """Mean IoU over the four classes (background included; torchmetrics' MulticlassJaccardIndex, macro) of
    N x 4 x H x W logits or N x H x W class indices against N x H x W masks."""
    from torchmetrics.classification import MulticlassJaccardIndex

    pred, masks = torch.as_tensor(pred), torch.as_tensor(masks)
    if pred.ndim == 4:
        pred = pred.argmax(1)
    metric = MulticlassJaccardIndex(num_classes=len(CLASSES) + 1, average="macro")
    return float(metric(pred.long(), masks.long()))


@functools.cache
def eval_samples(count: int = EVAL_COUNT, seed: int = EVAL_SEED) -> Samples:
    """The held-out set (split `eval`): drawn once per process, reused by every evaluation in it."""
    return synthesize(count, seed, "eval")


def predict(module: nn.Module, images: np.ndarray, batch: int = 64) -> Any:
    """The module's outputs on `images` in batches (no gradients), concatenated per output."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            outs.append(module(torch.from_numpy(images[i:i + batch])))
    if isinstance(outs[0], Mapping):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


def evaluate_detector(module: nn.Module) -> float:
    """mAP@0.5 on the held-out synthetic set: edgeprune's `--evaluate tools/tasks.py:evaluate_detector`."""
    samples = eval_samples()
    return detection_map(decode(predict(module, samples.images)), samples.targets())["map_50"]


def evaluate_segmenter(module: nn.Module) -> float:
    """mIoU on the held-out synthetic set: edgeprune's `--evaluate tools/tasks.py:evaluate_segmenter`."""
    samples = eval_samples()
    return segmentation_miou(predict(module, samples.images), samples.masks)


# ---------------------------------------------------------------- calibration data


def write_calibration(out_dir: Path | None = None, count: int = CALIB_COUNT, heldout: int = CALIB_HELDOUT,
                      seed: int = CALIB_SEED) -> dict[str, Path]:
    """Write calib_x.npy (split `calib`: neither trained on nor evaluated) and one npy recipe per task
    (detector.toml, segmenter.toml: the same images); return the recipes' paths by task.

    No labels: a detector's or segmenter's ground truth is not class indices, and edgeprune's held-out part only
    measures fidelity to the unpruned outputs; the task metric comes from `--evaluate`."""
    out_dir = Path(out_dir) if out_dir is not None else CALIB_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "calib_x.npy", synthesize(count, seed, "calib").images)
    recipes = {}
    for task in ("detector", "segmenter"):
        recipes[task] = out_dir / f"{task}.toml"
        recipes[task].write_text(recipe_text(task, count, heldout))
    return recipes


def recipe_text(task: str, count: int = CALIB_COUNT, heldout: int = CALIB_HELDOUT, seed: int = 0,
                folder: Path | None = None) -> str:
    """The npy recipe over calib_x.npy: in the recipe's own folder (relative path), or in `folder` (absolute, for a
    copy written elsewhere, e.g. one per seed). `seed` is the recipe's: it picks which samples are held out."""
    return npy_recipe(
        f"# Synthetic shapes for the {task} of tools/tasks.py (write_calibration): split 'calib', never trained on\n"
        "# nor evaluated, normalised as the nets expect. The held-out part only measures fidelity.\n",
        f"{count} synthetic shape images, 3x{SIZE}x{SIZE}, unlabelled; {heldout} held out", count, heldout, seed,
        folder, labels=False)


if __name__ == "__main__":
    print(write_calibration())
