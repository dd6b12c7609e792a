"""tools/tasks.py: the synthetic data's determinism and ground truth, the detector's host decoding, the metrics, the
trained nets against random ones, their ONNX export, and the calibration recipe edgeprune loads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.inputs.data import load_data
from edgeprune.inputs.recipe import load_recipe
from tests.tools import tool_by_path


@pytest.fixture(scope="module")
def tasks():
    yield from tool_by_path("tasks")


def same(a, b) -> bool:
    return (np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
            and all(np.array_equal(x, y) for x, y in zip(a.boxes + a.labels, b.boxes + b.labels, strict=True)))


def test_synthesize_gives_the_same_arrays_for_the_same_seed_and_others_for_another(tasks) -> None:
    a = tasks.synthesize(6, seed=3, split="train")
    assert same(a, tasks.synthesize(6, seed=3, split="train"))
    assert not np.array_equal(a.images, tasks.synthesize(6, seed=4, split="train").images)
    assert not np.array_equal(a.images, tasks.synthesize(6, seed=3, split="eval").images)
    first = tasks.synthesize(2, seed=3, split="train")  # a batch is a prefix of a larger one
    assert np.array_equal(first.images, a.images[:2])
    assert a.images.dtype == np.float32 and a.images.shape == (6, *tasks.INPUT_SHAPE[1:])


def test_synthesize_boxes_bound_their_shapes_mask_pixels_tightly(tasks) -> None:
    from scipy import ndimage

    s = tasks.synthesize(40, seed=0, split="eval")
    for mask, boxes, labels in zip(s.masks, s.boxes, s.labels, strict=True):
        assert 1 <= len(boxes) <= 4 and set(np.unique(mask)) == {0, *(labels + 1)}
        for label in set(labels):
            # each shape is one 8-connected patch of its class (shapes never touch): its tight box is a box
            patches, _ = ndimage.label(mask == label + 1, structure=np.ones((3, 3)))
            found = ndimage.find_objects(patches)
            tight = sorted((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) for sl in found)
            assert tight == sorted(tuple(b) for b in boxes[labels == label].astype(int).tolist())
        assert np.array_equal(boxes, boxes.round())  # pixel edges


def perfect_outputs(tasks, boxes: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
    """Raw detector outputs by hand: one confident cell per object (the one holding its centre) whose four
    log-distances reach its box's edges; every other score very low."""
    g, s = tasks.SIZE // tasks.STRIDE, tasks.STRIDE
    heat = torch.full((1, len(tasks.CLASSES), g, g), -12.0)
    box = torch.zeros((1, 4, g, g))
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        ix, iy = int((x1 + x2) / 2 // s), int((y1 + y2) / 2 // s)
        cx, cy = (ix + 0.5) * s, (iy + 0.5) * s
        heat[0, label, iy, ix] = 12.0
        box[0, :, iy, ix] = torch.tensor([math.log(d / s) for d in (cx - x1, cy - y1, x2 - cx, y2 - cy)])
    return {"heatmap": heat, "box": box}


def test_decode_of_a_perfect_output_gives_the_ground_truth_boxes(tasks) -> None:
    s = tasks.synthesize(8, seed=1, split="eval")
    preds = []
    for boxes, labels in zip(s.boxes, s.labels, strict=True):
        raw = perfect_outputs(tasks, boxes, labels)
        (p,) = tasks.decode(raw)
        order = np.lexsort((p["boxes"][:, 0].numpy(), p["labels"].numpy()))
        truth = np.lexsort((boxes[:, 0], labels))
        np.testing.assert_allclose(p["boxes"].numpy()[order], boxes[truth], atol=1e-4)
        np.testing.assert_array_equal(p["labels"].numpy()[order], labels[truth])
        # ONNX Runtime hands back a list of arrays in output order: the same boxes
        (q,) = tasks.decode([raw["heatmap"].numpy(), raw["box"].numpy()])
        torch.testing.assert_close(q["boxes"], p["boxes"])
        preds.append(p)
    assert tasks.detection_map(preds, s.targets()) == {"map_50": 1.0, "map": 1.0}


def test_detection_map_drops_when_a_box_is_shifted(tasks) -> None:
    target = [{"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([1])}]
    shifted = [{"boxes": torch.tensor([[20.0, 10.0, 40.0, 30.0]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1])}]  # IoU 1/3: a miss at every threshold
    assert tasks.detection_map(shifted, target) == {"map_50": 0.0, "map": 0.0}


def test_segmentation_miou_takes_logits_or_labels(tasks) -> None:
    masks = torch.tensor([[[0, 1], [2, 3]]])
    assert tasks.segmentation_miou(masks, masks) == 1.0
    logits = torch.nn.functional.one_hot(masks, 4).permute(0, 3, 1, 2).float()
    assert tasks.segmentation_miou(logits, masks) == 1.0
    half = torch.tensor([[[0, 1], [2, 2]]])  # class 3 missed, class 2 half right: (1 + 1 + 1/2 + 0) / 4
    assert tasks.segmentation_miou(half, masks) == pytest.approx(0.625)


@pytest.mark.parametrize(("task", "floor", "ceiling"), [("detector", 0.7, 0.05), ("segmenter", 0.75, 0.3)])
def test_evaluate_scores_the_trained_net_far_above_a_random_one(tasks, task: str, floor: float,
                                                                ceiling: float) -> None:
    weights = {"detector": tasks.DETECTOR_WEIGHTS, "segmenter": tasks.SEGMENTER_WEIGHTS}[task]
    if not weights.is_file():
        pytest.skip(f"{weights.name} not trained (python -m tools.train_tasks)")
    evaluate = getattr(tasks, f"evaluate_{task}")
    trained = evaluate(getattr(tasks, f"make_{task}")())
    torch.manual_seed(0)
    random = evaluate({"detector": tasks.Detector, "segmenter": tasks.Segmenter}[task]().eval())
    assert trained > floor and random < ceiling, (trained, random)


@pytest.mark.parametrize("task", ["detector", "segmenter"])
def test_onnx_export_runs_in_onnxruntime_as_in_torch(tasks, task: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = getattr(tasks, f"make_{task}")()
    x = torch.from_numpy(tasks.synthesize(1, seed=0, split="eval").images)
    with torch.no_grad():
        ref = model(x)
    ref = list(ref.values()) if isinstance(ref, dict) else [ref]
    path = tmp_path / f"{task}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"])
    outs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref, strict=True):
        assert got.shape == tuple(want.shape)
        assert np.abs(got - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()


def test_write_calibration_gives_an_npy_recipe_edgeprune_loads(tasks, tmp_path: Path) -> None:
    recipes = tasks.write_calibration(tmp_path, count=12, heldout=4)
    assert set(recipes) == {"detector", "segmenter"}
    d = load_data(load_recipe(recipes["detector"]), tasks.INPUT_SHAPE)
    assert len(d.calib_x) == 8 and len(d.heldout_x) == 4 and not d.labelled
    calib = tasks.synthesize(12, seed=tasks.CALIB_SEED, split="calib").images
    rows = {x.tobytes() for x in calib}
    assert all(x.tobytes() in rows for x in np.concatenate([d.calib_x, d.heldout_x]))
    held_out = {x.tobytes() for x in tasks.eval_samples().images}
    assert not rows & held_out


def test_detector_traces_residual_concat_and_depthwise_groups(tasks) -> None:
    from edgeprune.dependency.graph import trace

    graph = trace(tasks.make_detector(), torch.randn(tasks.INPUT_SHAPE))
    groups = {g.name: g for g in graph.groups}
    stride8, stride16 = groups["encoder.stages.1.0.0"], groups["encoder.stages.2.0.0"]
    # the residual add couples the stage's stride-2 conv with its block's last conv, through the depthwise convs
    assert set(stride8.producers) == {"encoder.stages.1.0.0", "encoder.stages.1.1.conv2.pointwise.0"}
    assert "encoder.stages.1.1.conv1.depthwise.0" in stride8.members
    # fuse8 reads cat([upsampled stride 16, stride 8]): its 1x1 conv's input channels split between the two groups
    fuse16 = next(c for c in stride16.consumers if c.module == "fuse8.0")
    fuse8 = next(c for c in stride8.consumers if c.module == "fuse8.0")
    assert fuse16.coords[0] == (0,) and fuse8.coords[0] == (stride16.channels,)
    assert set(graph.output_layers) == {"heatmap.1", "box.1"} and not graph.excluded
