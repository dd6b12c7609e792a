"""Tiny networks that split along channels (issue 31): MixNet's MixConv (kernel sizes over `torch.split` pieces, then
concat), YOLO's C2f (`chunk(2)`, a bottleneck on one half, concat of all), and splits that cannot follow pruning."""

from __future__ import annotations

import torch
from torch import nn

from tests.models import settle


class MixConv(nn.Module):
    """1x1 expand, MixConv (a depthwise conv of its own kernel size per piece; the sizes kept as `self.splits`, as
    timm's MixedConv2d does), BN, 1x1 project."""

    def __init__(self, cin: int, width: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        n = width // len(kernels)
        self.pw = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.splits = [n] * len(kernels)
        self.dw = nn.ModuleList(nn.Conv2d(n, n, k, padding=k // 2, groups=n, bias=False) for k in kernels)
        self.bn2 = nn.BatchNorm2d(width)
        self.pwl = nn.Conv2d(width, cin, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.pw(x)))
        y = torch.cat([conv(p) for conv, p in zip(self.dw, torch.split(y, self.splits, 1))], 1)
        return x + self.bn3(self.pwl(torch.relu(self.bn2(y))))


class MixNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b1 = MixConv(16, 32, (3, 5))
        self.b2 = MixConv(16, 48, (3, 5, 7))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.cv2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """ultralytics' C2f: cv1, chunk(2), bottlenecks on the last piece, concat of both pieces and every output, cv2."""

    def __init__(self, cin: int, cout: int, c: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = nn.Sequential(nn.Conv2d(cin, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.SiLU())
        self.m = nn.ModuleList(Bottleneck(c, shortcut) for _ in range(n))
        self.cv2 = nn.Sequential(nn.Conv2d((2 + n) * c, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2fNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.c2f = C2f(16, 32, 16, n=1, shortcut=True)
        self.head = C2f(32, 16, 8, n=2, shortcut=False)  # YOLOv8's neck: no shortcut, two bottlenecks
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.c2f(self.stem(x))).mean((2, 3)))


class FixedSplit(nn.Module):
    """A split the pruned pieces cannot follow: `how` is "size" (an int in the code), "list" (sizes written in the
    code) or "unequal" (a list attribute of unequal sizes)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.sizes = [12, 4]
        self.a = nn.Conv2d(12 if how == "unequal" else 8, 8, 3, padding=1)
        self.b = nn.Conv2d(4 if how == "unequal" else 8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        p, q = {"size": lambda: y.split(8, 1), "list": lambda: torch.split(y, [8, 8], 1),
                "unequal": lambda: torch.split(y, self.sizes, 1)}[self.how]()
        return self.fc(torch.cat([self.a(p), self.b(q)], 1).mean((2, 3)))


class Mixed(nn.Module):
    """timm's MixedConv2d in small: a conv of its own per piece of its input (split by the sizes it keeps as
    `self.splits`), outputs concatenated; depthwise when `depthwise` (kernel 3, 5, 7, ... per piece)."""

    def __init__(self, splits: list[int], outs: list[int], depthwise: bool = False) -> None:
        super().__init__()
        self.splits = list(splits)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3 + 2 * k if depthwise else 1, padding=1 + k if depthwise else 0,
                                             groups=i if depthwise else 1, bias=False)
                                   for k, (i, o) in enumerate(zip(splits, outs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(p) for conv, p in zip(self.convs, torch.split(x, self.splits, 1))], 1)


class PieceOwners(nn.Module):
    """Issue 31's first case (timm's mixnet blocks 1.0, 3.0, 4.0): `a` is two convs concatenated, and the next block's
    `b.pw` splits that concat back into the same two pieces; the block's residual adds to each piece its own
    projection conv. Each conv of `a` roots a group that owns one piece of `b.pw.splits` (and so do the convs of
    `b.pw`, each one piece of `b.pwl.splits`)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = Mixed([8, 8], [12, 12])
        self.bn_a = nn.BatchNorm2d(24)
        self.pw = Mixed([12, 12], [24, 24])
        self.bn1 = nn.BatchNorm2d(48)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False)
        self.bn2 = nn.BatchNorm2d(48)
        self.pwl = Mixed([24, 24], [12, 12])
        self.bn3 = nn.BatchNorm2d(24)
        self.head = nn.Sequential(nn.Conv2d(24, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_a(self.a(self.stem(x)))
        z = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.pw(y))))))
        return self.fc(self.head(y + self.bn3(self.pwl(z))).mean((2, 3)))


class SplitTwice(nn.Module):
    """Issue 31's second case (timm's mixnet blocks 3.0, 4.x, 5.x): the expansion (two convs concatenated) is split
    [8, 8, 8] for the depthwise MixConv, gated by a squeeze-excite, and split [12, 12] for the projection: one group,
    rooted at the SE's expand conv, cut into the common refinement [8, 4, 4, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = Mixed([8, 8], [12, 12])
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = Mixed([8, 8, 8], [8, 8, 8], depthwise=True)
        self.bn2 = nn.BatchNorm2d(24)
        self.reduce = nn.Conv2d(24, 8, 1)
        self.expand = nn.Conv2d(8, 24, 1)
        self.pwl = Mixed([12, 12], [8, 8])
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.pw(x))))))
        y = y * torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.fc((x + self.bn3(self.pwl(y))).mean((2, 3)))


def split_readers(model: nn.Module) -> list[tuple[str, list[int], list[int]]]:
    """Every module that splits by a `splits` attribute: its name, the sizes, and the input channels of the convs
    that read each piece (equal to the sizes in a model that runs as the sizes say)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "splits", None), list):
            convs = list(m.convs) if hasattr(m, "convs") else list(m.dw) if hasattr(m, "dw") else list(m.values())
            out.append((name, list(m.splits), [c.in_channels for c in convs]))
    return out


def build(cls: type[nn.Module], *args: object, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return settle(cls(*args), seed)
