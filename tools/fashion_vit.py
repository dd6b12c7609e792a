"""A small ViT on Fashion-MNIST (issue 31, item 3): transformer widths (MLP hidden width, whole attention heads)
pruned on real data, and the accuracy the repair keeps.

The model is timm's `VisionTransformer`: 28x28 images in 4x4 patches (49 tokens and a class token), 64 wide, 3
blocks of 4 heads of 16 and an MLP of 256. It trains on the 60k training images in about 11 minutes on one quiet core (8 epochs, 84.0% on the unseen test images)
(`train`: AdamW under a one-cycle schedule, the CNN's light augmentation, deterministic). It is calibrated and
pruned on the CNN's recipe (`bench/fashion/recipe.toml`: 2000 test images, 1000 held out; `python -m tools.fashion`
writes it), and `evaluate` grades a release on the 8000 test images the recipe never draws.

    python -m tools.fashion_vit train                      # tools/fashion_vit_weights.pt (about 11 minutes, one core)
    edgeprune build --model tools/fashion_vit.py:make_vit --input-shape 1,1,28,28 \\
                    --calibration bench/fashion/recipe.toml --latency 0.7x --out out/fashion_vit
    python -m tools.fashion_vit evaluate out/fashion_vit   # top-1 of the unpruned model and of pruned.pt

This file is loaded by path (`tools/fashion_vit.py:make_vit`), so it imports from tools/ only fashion.py (by path
when it is itself loaded by path).
"""

from __future__ import annotations

import argparse
import json
import runpy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "fashion_vit_weights.pt"
ARCH = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 3, "num_heads": 4,
        "mlp_ratio": 4.0, "num_classes": 10}

try:  # imported as tools.fashion_vit
    from . import fashion
except ImportError:  # loaded by path: fashion.py beside this file

    class _Namespace:
        def __init__(self, d: dict) -> None:
            self.__dict__.update(d)

    fashion = _Namespace(runpy.run_path(str(Path(__file__).with_name("fashion.py"))))


def build_vit(seed: int = 0) -> nn.Module:
    """The architecture with seeded random weights."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(**ARCH)


def make_vit() -> nn.Module:
    """The trained model, for `--model tools/fashion_vit.py:make_vit --input-shape 1,1,28,28`."""
    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS} is missing: run `python -m tools.fashion_vit train`")
    model = build_vit()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def unseen_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The test images `fashion.write_calibration` does not draw (8000 of 10000), normalised, with their labels."""
    images, labels = fashion.load_split("test")
    drawn = np.random.default_rng(fashion.CALIB_SPLIT_SEED).permutation(len(images))[:fashion.CALIB_COUNT]
    rest = np.setdiff1d(np.arange(len(images)), drawn)
    return torch.from_numpy(fashion.normalise(images[rest])), torch.from_numpy(labels[rest])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    return hits / len(x)


def train(epochs: int = 8, lr: float = 2e-3, out: Path = WEIGHTS) -> dict:
    """Train on the 60k training images (one thread, deterministic; `train_fashion.train`'s loop with AdamW and a
    one-cycle warm-up of 15%) and save the weights; a summary."""
    from tools.train_fashion import train as train_loop

    torch.manual_seed(0)
    torch.set_num_threads(1)
    xtr_u8, ytr_np = fashion.load_split("train")
    xtr, ytr = torch.from_numpy(fashion.normalise(xtr_u8)), torch.from_numpy(ytr_np)
    model = build_vit()
    t0 = time.time()

    def adamw(params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.05)

    def on_epoch(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{epochs} train loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)

    train_loop(model, xtr, ytr, epochs, lr, on_epoch, make_optimizer=adamw, pct_start=0.15, channels_last=False)
    x, y = unseen_test()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    return {"epochs": epochs, "lr": lr, "train_s": round(time.time() - t0, 1), "unseen_test_accuracy":
            accuracy(model, x, y), "unseen_test_count": len(x), "weights": str(out)}


def onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 of an exported model under ONNX Runtime (one thread), one image at a time (its batch is fixed at 1)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    hits = sum(int(sess.run(None, {name: x[i:i + 1].numpy()})[0].argmax(1)[0] == y[i]) for i in range(len(x)))
    return hits / len(x)


def evaluate(out_dir: Path) -> dict:
    """Top-1 on the unseen test images of the unpruned model, of a build's pruned.pt and of its model.onnx (the
    release), and the share of the unpruned accuracy the release keeps."""
    from edgeprune.report.artifacts import load_pruned

    x, y = unseen_test()
    base = accuracy(make_vit(), x, y)
    pruned, plan = load_pruned(Path(out_dir) / "pruned.pt")
    after = accuracy(pruned, x, y)
    released = onnx_accuracy(Path(out_dir) / "model.onnx", x, y)
    return {"out": str(out_dir), "count": len(x), "accuracy_before": base, "accuracy_after": after,
            "accuracy_onnx": released, "kept": released / base, "widths": plan.widths(), "channels": plan.channels,
            "compensation": plan.compensation, "repair": plan.repair}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--out", type=Path, default=WEIGHTS, help=f"weights file (default {WEIGHTS})")
    e = sub.add_parser("evaluate")
    e.add_argument("out", nargs="+", type=Path)
    args = ap.parse_args()
    if args.cmd == "train":
        print(json.dumps(train(args.epochs, args.lr, args.out)))
    else:
        for out in args.out:
            print(json.dumps(evaluate(out)))


if __name__ == "__main__":
    main()
