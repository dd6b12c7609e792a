"""What the benchmark models (tools/fashion.py, tools/tasks.py) share: their building block and their calibration
recipe.

The model files are also loaded by path (`--model tools/fashion.py:make_net`), outside any package; they then load
this file by path too, so it imports only torch.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias: BatchNorm follows) + BatchNorm (+ ReLU), the unit edgeprune folds and prunes."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def npy_recipe(comment: str, description: str, count: int, heldout: int, seed: int, folder: Path | None,
               labels: bool) -> str:
    """An npy recipe over calib_x.npy (and calib_y.npy with `labels`): in the recipe's own folder (relative paths
    resolve against it), or in `folder` (absolute paths, for a copy written elsewhere, e.g. one per seed). `seed` is
    the recipe's: it picks which samples are held out."""
    where = "" if folder is None else f"{Path(folder).resolve()}/"
    return (comment + 'kind = "npy"\n' + f'description = "{description}"\n' + f'path = "{where}calib_x.npy"\n'
            + (f'labels = "{where}calib_y.npy"\n' if labels else "")
            + f"count = {count}\nheldout = {heldout}\nbatch_size = 32\nseed = {seed}\n")
