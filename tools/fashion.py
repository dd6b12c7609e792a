"""Fashion-MNIST benchmark model for edgeprune: a small CNN with residual, concat and depthwise parts, and its data.

The bundled example (digits) is nearly saturated (99% on its held-out digits), so pruning criteria barely separate
on it. Fashion-MNIST is harder (92.5% test accuracy for this model), has a 10k test set for honest held-out accuracy,
and this net holds every coupled structure edgeprune handles: a residual add, a concat of two conv branches and a
depthwise-separable block, with BatchNorm after every conv.

    python -m tools.train_fashion                   # writes tools/fashion_weights.pt and the calibration data
    edgeprune build --model tools/fashion.py:make_net --input-shape 1,1,28,28 \
                    --calibration bench/fashion/recipe.toml --latency 0.5x --out out/fashion

Data: Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), the original idx ubyte .gz files in
/usr/share/datasets/fashion-mnist (train 60000, t10k 10000; 28x28 uint8, labels 0..9). `$FASHION_MNIST_DIR` points
elsewhere. The model trains on the 60k training set only; the calibration recipe draws from the test set only.

Size: 268k parameters, 27 M MACs; ONNX Runtime on one CPU thread about 0.5 ms at batch 1 (`edgeprune profile`).

This file is loaded by path (`tools/fashion.py:make_net`), so it imports only torch/numpy and from tools/ only
zoo.py (`conv_bn`, by path when it is itself loaded by path).
"""

from __future__ import annotations

import gzip
import os
import runpy
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WEIGHTS = HERE / "fashion_weights.pt"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INPUT_SHAPE = (1, 1, 28, 28)
# Mean and std of the training images scaled to [0, 1] (computed over all 60k: 0.2860, 0.3530), rounded and fixed so
# that training, calibration data and any later user normalise identically.
MEAN, STD = 0.286, 0.353
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# Calibration data: the first CALIB_COUNT images of the seeded permutation of the 10k test images (none trained the
# model); the recipe holds out CALIB_HELDOUT of them (chosen by the recipe's seed), which only measure accuracy.
CALIB_COUNT = 2000
CALIB_HELDOUT = 1000
CALIB_SPLIT_SEED = 0
CALIB_DIR = REPO / "bench" / "fashion"


# ---------------------------------------------------------------- model

try:  # imported as tools.fashion
    from .zoo import conv_bn, npy_recipe
except ImportError:  # loaded by path (`--model tools/fashion.py:...`), outside any package: zoo.py beside this file
    _zoo = runpy.run_path(str(Path(__file__).with_name("zoo.py")))
    conv_bn, npy_recipe = _zoo["conv_bn"], _zoo["npy_recipe"]


class ResidualBlock(nn.Module):
    """Two 3x3 convs and an identity shortcut: the add couples the block's output channels to its input's."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(width, width)
        self.conv2 = conv_bn(width, width, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + x)


class ConcatBlock(nn.Module):
    """A 1x1 and a 3x3 branch concatenated: the consumer's input channels split between two producers."""

    def __init__(self, cin: int, half: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, half, k=1)
        self.branch3 = conv_bn(cin, half, k=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x)], dim=1)


class SeparableBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1: the depthwise conv's channels are tied to its input's."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = conv_bn(cin, cin, k=3, groups=cin)
        self.pointwise = conv_bn(cin, cout, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class FashionNet(nn.Module):
    """28x28 -> 14x14 (32, 64 wide) -> 7x7 (128): stem, residual block, concat block, separable block, pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)  # 28x28
        self.down1 = conv_bn(32, 64, stride=2)  # 14x14
        self.block1 = ResidualBlock(64)
        self.down2 = conv_bn(64, 128, stride=2)  # 7x7
        self.block2 = ConcatBlock(128, 64)  # -> 128
        self.block3 = SeparableBlock(128, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.down1(self.stem(x)))
        x = self.block3(self.block2(self.down2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def make_net() -> FashionNet:
    """The trained model, for `--model tools/fashion.py:make_net --input-shape 1,1,28,28`."""
    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS} is missing: run `python -m tools.train_fashion` to train it "
                                f"(needs `apt-get install dataset-fashion-mnist`)")
    model = FashionNet()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


# ---------------------------------------------------------------- data


def data_dir() -> Path:
    """Where the idx files are: `$FASHION_MNIST_DIR`, else Debian's dataset-fashion-mnist location."""
    d = Path(os.environ.get("FASHION_MNIST_DIR", DATA_DIR))
    if not (d / "t10k-labels-idx1-ubyte.gz").is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {d}: `apt-get install dataset-fashion-mnist`, or set "
                                f"FASHION_MNIST_DIR to a folder holding the four *-idx?-ubyte.gz files")
    return d


def read_idx(path: Path) -> np.ndarray:
    """An idx ubyte file (gzipped or not) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {raw[:4].hex()})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, file holds {data.size} bytes of data (truncated?)")
    return data.reshape(dims)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """`train` (60k) or `test` (10k): uint8 images (N, 28, 28) and int64 labels."""
    prefix = {"train": "train", "test": "t10k"}[split]
    d = data_dir()
    x = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    y = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) to float32 (N, 1, 28, 28), scaled to [0, 1] and standardised: the model's input."""
    x = images.astype(np.float32)[:, None] / 255.0
    return ((x - MEAN) / STD).astype(np.float32)


def write_calibration(out_dir: Path | None = None, count: int = CALIB_COUNT, heldout: int = CALIB_HELDOUT) -> Path:
    """Write calib_x.npy, calib_y.npy and recipe.toml (kind npy) from test images only; return the recipe's path.

    The images are a fixed seeded draw from the test set, so they neither trained the model nor depend on the recipe
    seed; the recipe's seed then picks which `heldout` of them measure accuracy (never statistics).
    """
    out_dir = Path(out_dir) if out_dir is not None else CALIB_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_split("test")
    idx = np.sort(np.random.default_rng(CALIB_SPLIT_SEED).permutation(len(images))[:count])
    np.save(out_dir / "calib_x.npy", normalise(images[idx]))
    np.save(out_dir / "calib_y.npy", labels[idx])
    recipe = out_dir / "recipe.toml"
    recipe.write_text(recipe_text(count, heldout, seed=0))
    return recipe


def recipe_text(count: int = CALIB_COUNT, heldout: int = CALIB_HELDOUT, seed: int = 0,
                folder: Path | None = None) -> str:
    """The npy recipe over calib_x.npy / calib_y.npy: in the recipe's own folder (relative paths resolve against it),
    or in `folder` (absolute paths, for a recipe copy written elsewhere, e.g. one per seed)."""
    return npy_recipe(
        "# Fashion-MNIST calibration data written by tools/fashion.py (write_calibration): test images only, never\n"
        "# seen in training, normalised as in tools/train_fashion.py. The held-out part only measures accuracy.\n",
        f"{count} Fashion-MNIST test images, 1x28x28, labelled; {heldout} held out", count, heldout, seed, folder,
        labels=True)


if __name__ == "__main__":
    print(write_calibration())
