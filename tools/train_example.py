"""Train the bundled example (edgeprune/example.py) on digits and write its weights into the package.

Deterministic: fixed seeds, one thread, a fixed split (the first TRAIN_COUNT digits of the seeded permutation train;
the rest are never seen in training and feed the `digits` calibration recipe). Writes a JSON summary.

    python -m tools.train_example [--epochs 12] [--out edgeprune/assets/example_digits.pt]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from edgeprune.inputs.example import TRAIN_COUNT, WEIGHTS, ExampleNet, digits_32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "edgeprune" / "assets" / WEIGHTS))
    ap.add_argument("--json", default="bench/train_example.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x, y, perm = digits_32()
    tr, te = perm[:TRAIN_COUNT], perm[TRAIN_COUNT:]
    xtr, ytr = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    xte, yte = torch.from_numpy(x[te]), torch.from_numpy(y[te])
    model = ExampleNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * ((len(tr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(tr), generator=g)
        for i in range(0, len(tr), 64):
            idx = order[i:i + 64]
            xb = xtr[idx]
            # light augmentation: random shifts of up to 2 pixels
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} held-out acc {acc:.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    summary = {"epochs": args.epochs, "train_s": time.time() - t0, "heldout_accuracy": acc,
               "train_count": len(tr), "heldout_count": len(te), "weights": args.out}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
