"""The statistics pass of the criteria that read activations or labels (`papers.py`), over the calibration data:
only what the chosen criterion needs, once per job.

    sig = collect_signals(model, graph, data, needs=frozenset({"features"}), seed=0)
    sig.rows("features", consumer, coords)   # (items, values): the input channels a consumer reads, sampled

What each criterion reads of a group is the input of one of its dense consumers (a conv or a linear), where the group's
channels are what the next layer sees (after BatchNorm and activation): `features` (values at a few positions of a
fixed sample of images, per channel), `means` (each channel's spatial mean per sample), `labels` (the recipe's, or the
unpruned model's predictions with `pseudo_labels`), `grads` (the K-FAC output factor of every consumer, `kfac.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgeprune.compensation.statistics import layer_rng
from edgeprune.dependency.graph import Graph, Group
from edgeprune.errors import EdgePruneError

FEATURE_SAMPLES = 256  # images whose feature maps the similarity criterion compares
FEATURE_POSITIONS = 16  # positions per image and channel (a fixed random draw per batch and layer)
SIGNALS = ("features", "means", "labels", "grads")


@dataclass
class Signals:
    """What a job's activation- and label-based criterion read, per consumer module."""

    features: dict[str, np.ndarray] = field(default_factory=dict)  # (inputs, values): channel (conv) or feature (linear)
    means: dict[str, np.ndarray] = field(default_factory=dict)  # (samples, inputs): spatial mean per sample
    labels: np.ndarray | None = None  # (samples,) int64
    grads: dict[str, np.ndarray] = field(default_factory=dict)  # (outputs, outputs): K-FAC's G of each consumer
    blocks: dict[str, int] = field(default_factory=dict)  # coordinates per input of a consumer: kh*kw, or 1

    def inputs_of(self, consumer: str, coords: tuple[int, ...]) -> np.ndarray:
        """The consumer's input channels (conv) or features (linear) that unfolded coordinates `coords` belong to."""
        return np.unique(np.asarray(coords, dtype=np.int64) // self.blocks[consumer])

    def rows(self, what: str, consumer: str, items: tuple[tuple[int, ...], ...]) -> np.ndarray:
        """One row per item (a group channel, or a unit, given by its coordinates in the consumer): `features` as
        the item's values concatenated, `means` as its spatial mean per sample."""
        table = getattr(self, what)[consumer]
        if what == "means":
            return np.stack([table[:, self.inputs_of(consumer, c)].mean(1) for c in items])
        return np.stack([table[self.inputs_of(consumer, c)].ravel() for c in items])


def signal_consumer(group: Group, modules: dict[str, nn.Module]) -> str | None:
    """The consumer whose input the activation criteria read for a group: its first dense conv or linear."""
    for c in group.consumers:
        m = modules.get(c.module)
        if c.compensable and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)):
            return c.module
    return None


def logits(out: object, what: str) -> torch.Tensor:
    """A classifier's (N, classes) output, or a one-line refusal: labels mean classes."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EdgePruneError(f"{what} needs a classifier whose output is one (batch, classes) tensor, found {shape}; "
                             f"choose another --criterion (cap, l1, fpgm, epruner, similarity)")
    return out


def collect_signals(model: nn.Module, graph: Graph, batches: Iterable[tuple[torch.Tensor, np.ndarray | None]],
                    needs: frozenset[str], seed: int = 0, pseudo_labels: bool = False,
                    kfac: Callable[..., dict[str, np.ndarray]] | None = None) -> Signals:
    """One pass of the unpruned model over the calibration `batches` ((inputs, labels or None) pairs), recording what
    `needs` names (see `SIGNALS`); `grads` is the K-FAC pass `kfac` (`kfac.output_factors`) on the same labels."""
    modules = dict(model.named_modules())
    names = sorted({n for g in graph.groups if (n := signal_consumer(g, modules)) is not None})
    sig = Signals(blocks={n: _block(modules[n]) for n in names})
    feats: dict[str, list[np.ndarray]] = {n: [] for n in names}
    means: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
    seen = [0]

    def hook(name: str) -> Callable:
        rng = layer_rng(seed, name)

        def record(m: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            if isinstance(m, nn.Linear):
                x = x.reshape(-1, x.shape[-1])
                if "means" in needs:
                    means[name].append(x.numpy().copy())
                if "features" in needs and seen[0] < FEATURE_SAMPLES:
                    feats[name].append(x.numpy().T.copy())
                return
            if "means" in needs:
                means[name].append(x.mean((2, 3)).numpy())
            if "features" in needs and seen[0] < FEATURE_SAMPLES:
                flat = x.flatten(2)
                pos = rng.choice(flat.shape[2], size=min(FEATURE_POSITIONS, flat.shape[2]), replace=False)
                feats[name].append(flat[:, :, torch.from_numpy(np.sort(pos))].permute(1, 0, 2).reshape(x.shape[1], -1)
                                   .numpy())
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names] if needs & {"features", "means"} else []
    batches = list(batches)
    try:
        with torch.no_grad():
            for x, y in batches:
                out = model(x)
                if pseudo_labels:
                    y = logits(out, "--pseudo-labels").argmax(1).numpy()
                if needs & {"labels", "grads"}:
                    labels.append(np.asarray(y, dtype=np.int64))
                seen[0] += len(x)
    finally:
        for h in handles:
            h.remove()
    sig.labels = np.concatenate(labels) if labels and "labels" in needs else None
    sig.features = {n: np.concatenate(v, axis=1) for n, v in feats.items() if v}
    sig.means = {n: np.concatenate(v, axis=0) for n, v in means.items() if v}
    if "grads" in needs and kfac is not None:
        sig.grads = kfac(model, graph, [(x, torch.from_numpy(y)) for (x, _), y in zip(batches, labels)])
    return sig


def _block(m: nn.Module) -> int:
    return int(np.prod(m.kernel_size)) if isinstance(m, nn.Conv2d) else 1
