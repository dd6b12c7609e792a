"""Recovery training: the loop `edgeprune finetune` runs, its losses and the OrthoReg regulariser.

    config = FinetuneConfig(stage="distill", steps=200, orthoreg=1e-3)
    log = train(pruned, teacher, data.calib_x, None, config, layers=producers(graph))   # a TrainLog

`train` runs SGD-style steps over the calibration part of a recipe (never the held-out part: the release measures
fidelity there), for a number of steps or of minutes, and stops with `QualityGateFailed` (exit 4) the moment the
loss is not finite. Its loss is distillation from the unpruned model (`distill_loss`: every output; KL divergence
on class logits, relative MSE otherwise) or, given labels, cross-entropy; plus `orthoreg` x `orthogonality`.

OrthoReg (Lubana et al., arXiv:2009.05014) enforces orthonormality of each layer's filters, ||W Wᵀ - I||², so that
filters are decorrelated and importance estimates of groups of filters add up. Departures: (1) the filters are
normalised to unit length first, so the penalty is the off-diagonal of their cosine Gram matrix only: a pretrained
network's filter norms carry its learnt scales (a layer without a batch norm after it would change its function if
they were pulled to 1), and decorrelation is what the paper's argument needs; (2) it is applied to the producers of
the prunable channel groups (the filters pruning chooses among), during the recovery stage, not from the start of a
training run; (3) the penalty of a layer is the mean over its filter pairs, so that wide and narrow layers weigh
alike and one weight suits models of any width.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeprune.common.progress import Stages, no_progress
from edgeprune.dependency.graph import Graph
from edgeprune.errors import EdgePruneError, QualityGateFailed
from edgeprune.inputs.outputs import flatten_outputs, is_class_logits

STAGES = ("distill", "csgd")
DEFAULT_LR = {"distill": 5e-3, "csgd": 1e-2}  # Adam for distillation, momentum SGD for C-SGD (see recovery/csgd.py)
TEACHER_CACHE_BYTES = 1 << 30  # the unpruned model's outputs are kept for the whole run below this size


@dataclass(frozen=True)
class FinetuneConfig:
    """What a recovery stage is asked to do. Length: `steps`, or `minutes` of training, or else `epochs` passes over
    the calibration part."""

    stage: str = "distill"
    steps: int | None = None
    minutes: float | None = None
    epochs: int = 3
    orthoreg: float = 0.0  # weight of the OrthoReg penalty; 0: off
    lr: float | None = None  # default DEFAULT_LR[stage]
    batch: int = 32  # samples per step
    temperature: float = 1.0  # of the distillation's softmax on class logits
    centripetal: float = 3.0  # C-SGD's centripetal strength (recovery/csgd.py)
    validation: float = 0.2  # distill: share of the calibration samples held back to keep the best epoch (0: off)
    # distill on images: random flips and shifts (`augment`), the teacher run on each batch; and batch norms kept at
    # their statistics (`freeze_batchnorm`). build --recover sets both (a pretrained model on a few hundred images);
    # finetune leaves them off: on a model sliced without the repair, batch statistics are part of the recovery
    augment: bool = False
    freeze_bn: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise EdgePruneError(f"recovery stage {self.stage!r} unknown; choose one of {', '.join(STAGES)}")
        if self.steps is not None and self.minutes is not None:
            raise EdgePruneError("give --steps or --minutes, not both")
        checks = [("--steps", self.steps, self.steps is None or self.steps >= 1),
                  ("--minutes", self.minutes, self.minutes is None or (math.isfinite(self.minutes) and self.minutes > 0)),
                  ("epochs", self.epochs, self.epochs >= 1),
                  ("--orthoreg", self.orthoreg, math.isfinite(self.orthoreg) and self.orthoreg >= 0),
                  ("--lr", self.lr, self.lr is None or (math.isfinite(self.lr) and self.lr > 0)),
                  ("batch", self.batch, self.batch >= 1),
                  ("temperature", self.temperature, math.isfinite(self.temperature) and self.temperature > 0),
                  ("centripetal", self.centripetal, math.isfinite(self.centripetal) and self.centripetal >= 0)]
        for flag, value, ok in checks:
            if not ok:
                raise EdgePruneError(f"{flag} must be a positive number (0 allowed for --orthoreg), found {value}")
        if not 0 <= self.validation < 1:
            raise EdgePruneError(f"--validation must be a fraction in [0, 1) of the calibration samples (0: none held "
                                 f"back), found {self.validation}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]


@dataclass(frozen=True)
class TrainLog:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float  # mean of the last epoch's (or last 20 steps') losses
    loss: str  # "distillation" or "cross-entropy"
    validation: dict | None = None  # samples, loss before training, best and last; best_step (0: kept untrained)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"steps": self.steps, "seconds": self.seconds, "first_loss": self.first_loss,
                "last_loss": self.last_loss, "loss": self.loss,
                **({"validation": self.validation} if self.validation is not None else {})}


def distill_loss(student: object, teacher: list[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Sum over outputs: KL(teacher || student) of softmax(·/T) × T² on class logits (Hinton et al.), and the MSE
    relative to the teacher output's mean square elsewhere (boxes, masks, features: scale-free, so outputs weigh
    alike)."""
    total = torch.zeros(())
    for (_, s), t in zip(flatten_outputs(student), teacher):
        if is_class_logits(t):
            log_p = torch.log_softmax(s / temperature, 1)
            log_q = torch.log_softmax(t / temperature, 1)
            total = total + nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature ** 2
        else:
            total = total + nn.functional.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    return total


def producers(graph: Graph) -> list[str]:
    """The filter layers OrthoReg acts on: every producer of a prunable group, once."""
    return list(dict.fromkeys(p for g in graph.groups for p in g.producers))


def _offdiag(w: torch.Tensor) -> torch.Tensor:
    """The off-diagonal of the cosine Gram matrix of a layer's filters (rows of `w`, flattened)."""
    w = w.reshape(w.shape[0], -1)
    u = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = u @ u.T
    return gram - torch.diag_embed(torch.diagonal(gram))


def orthogonality(weights: list[torch.Tensor]) -> torch.Tensor:
    """Σ over layers of the mean squared off-diagonal entry of the filters' cosine Gram matrix (rows: filters)."""
    total = torch.zeros(())
    for w in weights:
        if w.shape[0] > 1:
            total = total + _offdiag(w).pow(2).sum() / (w.shape[0] * (w.shape[0] - 1))
    return total


def gram_offdiag(module: nn.Module, layers: list[str]) -> float:
    """The Frobenius norm of the off-diagonal of each layer's cosine Gram matrix, summed over `layers`: what OrthoReg
    lowers (a report figure, and its test)."""
    modules = dict(module.named_modules())
    with torch.no_grad():
        return float(sum(float(_offdiag(modules[n].weight).norm()) for n in layers))


class _Teacher:
    """The unpruned model's outputs on the calibration samples: computed once when they fit in memory (they are the
    same every epoch), else per batch."""

    def __init__(self, teacher: nn.Module | None, x: torch.Tensor, batch: int) -> None:
        self.teacher, self.x, self.cache = teacher, x, None
        if teacher is None:
            return
        teacher.eval()
        with torch.no_grad():
            first = [t.detach() for _, t in flatten_outputs(teacher(x[:batch]))]
            per_sample = sum(t[0].numel() * t.element_size() for t in first)
            if per_sample * len(x) <= TEACHER_CACHE_BYTES:
                parts = [first] + [[t.detach() for _, t in flatten_outputs(teacher(x[i:i + batch]))]
                                   for i in range(batch, len(x), batch)]
                self.cache = [torch.cat(ts) for ts in zip(*parts)]

    def __call__(self, idx: torch.Tensor) -> list[torch.Tensor]:
        if self.cache is not None:
            return [t[idx] for t in self.cache]
        with torch.no_grad():
            return [t.detach() for _, t in flatten_outputs(self.teacher(self.x[idx]))]


@dataclass(frozen=True)
class Optimisation:
    """How a training run's optimisation departs from distillation's (C-SGD's, recovery/csgd.py): its `optimizer`
    (default Adam at the config's rate), `after_backward`, which may rewrite gradients (the centripetal update),
    `penalty_weights`, the tensors OrthoReg sees (default the `layers`' weights; C-SGD: the cluster means), and
    `anneal`: the learning rate follows a cosine from its value to 0 over the run (steps, or minutes elapsed)."""

    optimizer: torch.optim.Optimizer | None = None
    after_backward: Callable[[], None] | None = None
    penalty_weights: Callable[[], list[torch.Tensor]] | None = None
    anneal: bool = True


def train(student: nn.Module, teacher: nn.Module | None, x: np.ndarray, labels: np.ndarray | None,
          config: FinetuneConfig, layers: list[str] = (), *, optimisation: Optimisation | None = None,
          stages: Stages = no_progress, keep_best: bool = False) -> TrainLog:
    """Train `student` in place (train mode; left in eval mode) on the samples `x`: distillation from `teacher`, or
    cross-entropy on `labels` when given. `layers` get the OrthoReg penalty; `optimisation` changes the optimizer,
    the gradients, the penalty's tensors and the schedule (`Optimisation`).
    `keep_best`: hold back `config.validation` of the samples, take their loss (without OrthoReg) before training and
    after each epoch, and leave `student` at its best (the untrained model when no epoch beat it): on a calibration
    set of 1000 images, distillation fits the rest within a minute while the error on other images grows (FashionNet
    at 0.5x: held-out output error 0.12 untrained, 0.33 after 1 min, 0.54 after 5). Not for C-SGD, whose training
    moves the unpruned model away from its outputs on purpose (its merge is what is judged).
    Raises `QualityGateFailed` (exit 4) when the loss stops being finite."""
    o = optimisation or Optimisation()
    if config.orthoreg and not layers and o.penalty_weights is None:
        raise ValueError("orthoreg needs the layers it acts on (`producers` of the model's groups)")
    gen = torch.Generator().manual_seed(config.seed)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = None if labels is None else torch.from_numpy(labels)
    pool, held = _split(len(xt), config.validation if keep_best else 0.0, gen)
    batch = min(config.batch, len(pool))
    per_epoch = max(1, len(pool) // batch)
    steps = config.steps if config.steps is not None else None if config.minutes is not None else config.epochs * per_epoch
    shifted = config.augment and config.stage == "distill" and yt is None and teacher is not None and xt.ndim == 4
    if shifted:
        teacher.eval()
    targets = _Teacher(teacher if yt is None else None, xt, batch)
    modules = dict(student.named_modules())
    penalty = o.penalty_weights or (lambda: [modules[n].weight for n in layers])
    params = [p for p in student.parameters() if p.requires_grad]
    opt = o.optimizer or torch.optim.Adam(params, lr=config.learning_rate)
    what = f"{config.stage} ({'cross-entropy on labels' if yt is not None else 'distillation'})"
    tick = stages(f"fine-tuning: {what}", steps if steps is not None else int(config.minutes * 60))
    best = _Best(student, lambda: _held_loss(student, xt, yt, targets, held, batch, config)) \
        if held is not None else None
    start, done, losses, first = time.monotonic(), 0, [], float("nan")
    student.train()
    if config.freeze_bn:
        freeze_batchnorm(student)
    while True:
        for idx in pool[torch.randperm(len(pool), generator=gen)[: per_epoch * batch]].view(per_epoch, batch):
            if shifted:  # the teacher sees the same augmented batch
                xb = augment(xt[idx], gen)
                with torch.no_grad():
                    tb = [t.detach() for _, t in flatten_outputs(teacher(xb))]  # type: ignore[misc]
                loss = _loss(student, xb, None, tb, config, penalty)
            else:
                loss = _loss(student, xt[idx], None if yt is None else yt[idx], targets(idx) if yt is None else None,
                             config, penalty)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise QualityGateFailed(
                    f"the {config.stage} recovery stage diverged: its loss is {value} at step {done + 1} (learning "
                    f"rate {config.learning_rate:g}); lower --lr, nothing was written")
            first = value if done == 0 else first
            losses.append(value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o.after_backward is not None:
                o.after_backward()
            if o.anneal:
                progress = done / steps if steps is not None else (time.monotonic() - start) / (config.minutes * 60)
                for group in opt.param_groups:
                    group["lr"] = config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            opt.step()
            done += 1
            elapsed = time.monotonic() - start
            if steps is not None:
                tick(done, steps)
            else:
                tick(min(int(elapsed), int(config.minutes * 60)), int(config.minutes * 60))
            finished = (steps is not None and done >= steps) or (steps is None and elapsed >= config.minutes * 60)
            if best is not None and (finished or done % per_epoch == 0):
                best.check(done)
            if finished:
                student.eval()
                _check_finite(student, config)
                validation = best.restore(len(held)) if best is not None else None
                tail = losses[-min(len(losses), max(per_epoch, 20)):]
                return TrainLog(done, time.monotonic() - start, first, float(np.mean(tail)),
                                "cross-entropy" if yt is not None else "distillation", validation)


def freeze_batchnorm(module: nn.Module) -> None:
    """Batch norms in eval mode: distillation on a few hundred calibration images trains the weights around the
    statistics the model was trained with. In train mode each batch normalised by its own statistics and the running
    ones drifted towards batches of a few photos: a pruned ImageNet EfficientNet-Lite0's held-back loss rose from
    0.125 to 0.377 in 7 steps at learning rate 1e-4 (issue 28)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image flipped left-right with probability 1/2 and shifted by up to 1/8 of its height and width (reflected
    at the borders): a distillation on a few hundred calibration images learns them by heart without it (issue 28).
    Inputs that are not images (N x C x H x W, H and W at least 8) are returned as they are."""
    if xb.ndim != 4 or min(xb.shape[2:]) < 8:
        return xb
    n, _, h, w = xb.shape
    flip = torch.rand(n, generator=gen) < 0.5
    xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
    ph, pw = h // 8, w // 8
    padded = nn.functional.pad(xb, (pw, pw, ph, ph), mode="reflect")
    dy = torch.randint(0, 2 * ph + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pw + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _split(n: int, share: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sample indices trained on and those held back (`share` of `n`, at least 1 and leaving at least 1; none
    when `share` is 0 or there are fewer than 5 samples)."""
    if share <= 0 or n < 5:
        return torch.arange(n), None
    perm = torch.randperm(n, generator=gen)
    k = min(n - 1, max(1, round(share * n)))
    return perm[k:], perm[:k]


def _held_loss(student: nn.Module, xt: torch.Tensor, yt: torch.Tensor | None, targets: _Teacher, held: torch.Tensor,
               batch: int, config: FinetuneConfig) -> float:
    """The training loss without OrthoReg on the held-back samples, in eval mode (as the model ships)."""
    student.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(held), batch):
            idx = held[i:i + batch]
            yb, teacher = (yt[idx], None) if yt is not None else (None, targets(idx))
            total += float(_fit_loss(student(xt[idx]), yb, teacher, config)) * len(idx)
    student.train()
    if config.freeze_bn:
        freeze_batchnorm(student)
    return total / len(held)


class _Best:
    """The student's state at its lowest held-back loss so far (the untrained state first)."""

    def __init__(self, student: nn.Module, loss: Callable[[], float]) -> None:
        self.student, self.loss = student, loss
        self.before = self.best = self.last = loss()
        self.step, self.state = 0, self._copy()

    def _copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def check(self, step: int) -> None:
        self.last = self.loss()
        if self.last < self.best:
            self.best, self.step, self.state = self.last, step, self._copy()

    def restore(self, samples: int) -> dict[str, float | int]:
        self.student.load_state_dict(self.state)
        return {"samples": samples, "before": self.before, "best": self.best, "last": self.last,
                "best_step": self.step}


def _loss(student: nn.Module, xb: torch.Tensor, yb: torch.Tensor | None, teacher: list[torch.Tensor] | None,
          config: FinetuneConfig, penalty: Callable[[], list[torch.Tensor]]) -> torch.Tensor:
    """One batch's loss: `_fit_loss`, plus OrthoReg."""
    loss = _fit_loss(student(xb), yb, teacher, config)
    return loss + config.orthoreg * orthogonality(penalty()) if config.orthoreg else loss


def _fit_loss(out: object, yb: torch.Tensor | None, teacher: list[torch.Tensor] | None,
              config: FinetuneConfig) -> torch.Tensor:
    """Cross-entropy on labels, or distillation to the teacher's outputs (what `_held_loss` judges epochs by)."""
    return nn.functional.cross_entropy(flatten_outputs(out)[0][1], yb) if yb is not None \
        else distill_loss(out, teacher, config.temperature)


def _check_finite(module: nn.Module, config: FinetuneConfig) -> None:
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise QualityGateFailed(f"the {config.stage} recovery stage diverged: {name} holds NaN or infinity after "
                                    f"training (learning rate {config.learning_rate:g}); lower --lr, nothing was "
                                    "written")
