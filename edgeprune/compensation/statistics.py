"""Activation statistics of consumer inputs: mean and covariance of their unfolded patches (CAP.md §2).

    stats = collect_statistics(model, graph.consumer_modules(), data.calib_batches())
    stats["layer2.0.conv1"].cov       # (D, D) float64, shrunk towards its diagonal

Statistics are taken once, on the unpruned model, then frozen (CAP.md §7.1): hooks are removed before returning.
The closed-form repairs that use them are in `compensation/solve.py` (independent) and `surgery/repair.py` (sequential).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.errors import EdgePruneError, first_line

log = logging.getLogger(__name__)

MAX_POSITIONS = 64  # patches kept per image and layer: a 56x56 map is subsampled by a stride of 7


@dataclass
class LayerStats:
    """Mean and covariance (float64) of one consumer's unfolded input, over `count` patches."""

    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D)
    count: int
    block: int  # coordinates per input channel: kh*kw for a conv, 1 for a linear
    shrinkage: float = 0.0  # weight of the diagonal target the covariance was shrunk towards (see `shrink_towards_diagonal`)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]


class _Accumulator:
    """Running sums of x and x xᵀ, accumulated in float64.

    Each batch's product is a float32 symmetric rank-k update (BLAS ssyrk: half the flops of a GEMM, upper triangle
    only) on data shifted by the first batch's mean (so no large common offset cancels), summed in float32 over at
    most FLUSH batches and then into the float64 total: several times faster than float64 products, with covariances
    within ~1e-6 relative of all-float64 ones on the bundled example (measured), far below the sampling noise of the
    statistics. The float64 total exists only from the second partial sum on: with up to FLUSH batches the covariance
    is made straight from the float32 one, which saves touching 1.5 D² doubles (resnet50's 4608-wide layers: 255 MB
    each, ~0.6 s of page faults).
    """

    FLUSH = 8

    def __init__(self, dim: int) -> None:
        self.shift: np.ndarray | None = None
        self.s = np.zeros(dim, dtype=np.float64)
        self.q: np.ndarray | None = None  # float64 upper triangle of the flushed partial sums
        # float32 partial sum of `pending` batches; zeros (calloc: no extra pass) so that the lower triangle, which
        # BLAS never writes, holds no garbage that a cast would trip over
        self.buf = np.zeros((dim, dim), dtype=np.float32, order="F")
        self.pending = 0
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        from scipy.linalg.blas import ssyrk

        # NumPy and BLAS only from here: a torch operation would wake torch's OpenMP threads, which then spin
        # against BLAS's on a 2-core machine (a 64-wide layer's update took 7-37 ms instead of 1)
        x = x.to(torch.float32).numpy()
        if self.shift is None:
            self.shift = x.mean(0, dtype=np.float64).astype(np.float32)
        if self.pending == self.FLUSH:
            self.flush()
        x32 = np.subtract(x, self.shift)  # keeps x's memory order
        self.s += x32.sum(0, dtype=np.float64)
        beta = 1.0 if self.pending else 0.0  # a new partial sum overwrites the buffer (BLAS never reads it at beta 0)
        # ssyrk computes x32ᵀ x32 into buf's upper triangle without copying x32, in either memory order; the
        # Fortran-ordered (n, D) that unfold_input gives is the faster one for narrow layers (1.8x at D = 576)
        if x32.flags.f_contiguous:
            self.buf = ssyrk(1.0, x32, beta=beta, c=self.buf, trans=1, lower=0, overwrite_c=1)
        else:
            x32 = np.ascontiguousarray(x32)
            self.buf = ssyrk(1.0, x32.T, beta=beta, c=self.buf, trans=0, lower=0, overwrite_c=1)
        self.pending += 1
        self.n += x.shape[0]

    def flush(self) -> None:
        if not self.pending:
            return
        if self.q is None:
            self.q = self.buf.astype(np.float64, order="F")  # the lower triangle is never read
        else:
            self.q += self.buf
        self.pending = 0

    def finish(self, block: int) -> LayerStats:
        m = self.s / self.n
        parts = [p for p in (self.q, self.buf if self.pending else None) if p is not None]
        cov = _covariance(parts, self.n, m)  # E[xxᵀ] - μμᵀ of the shifted data
        self.q, self.buf = None, np.empty((0, 0), dtype=np.float32)
        return LayerStats(mean=m + self.shift, cov=cov, count=self.n, block=block)


def _covariance(uppers: list[np.ndarray], n: int, mean: np.ndarray, step: int = 512) -> np.ndarray:
    """Σ uppers / n - mean meanᵀ as a full float64 matrix, from upper triangles, in column blocks: no D×D
    temporaries beyond the result."""
    d = mean.shape[0]
    out = np.empty((d, d), dtype=np.float64)
    for i in range(0, d, step):
        j = min(i + step, d)
        blk = sum(u[:j, i:j].astype(np.float64) for u in uppers)  # columns i:j down to the diagonal block
        blk /= n
        blk -= np.outer(mean[:j], mean[i:j])
        out[:i, i:j] = blk[:i]
        out[i:j, :i] = blk[:i].T
        diag = np.triu(blk[i:j])
        out[i:j, i:j] = diag + np.triu(diag, 1).T
    return out


def unfold_input(module: nn.Module, x: torch.Tensor, max_positions: int = MAX_POSITIONS,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
    """(patches, D) view of a consumer's input, channel-major (C, kh, kw) so that it matches weight.reshape(N, -1).

    Large maps are subsampled to about `max_positions` output positions per image, on a grid of step `sub` whose
    offset in [0, sub) is drawn from `rng` for rows and columns (one draw per call, i.e. per batch): over batches every
    position, border rows and columns and both phases of upsampled maps included, is equally likely. A fixed offset 0
    over-sampled the top and left borders and never saw the bottom and right ones (held-out output error of the
    example at 50% pruned: 0.195 against 0.075, the audit's F1). Without `rng` the offset is 0 (tests of the layout).
    Any padding (numbers, 'same', 'valid', and the reflect/replicate/circular modes) is applied as the conv applies
    it. Convolutions give the result Fortran-ordered (the transpose of a contiguous (D, patches)), the order the
    statistics' BLAS update is fastest on.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(module, nn.Conv2d) and module.groups == 1
    left, right, top, bottom = _padding(module)
    if left or right or top or bottom:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = nn.functional.pad(x, (left, right, top, bottom), mode=mode)
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    h_out = (x.shape[2] - dh * (kh - 1) - 1) // module.stride[0] + 1
    w_out = (x.shape[3] - dw * (kw - 1) - 1) // module.stride[1] + 1
    sub = max(1, math.ceil(math.sqrt(h_out * w_out / max_positions)))  # spatial subsampling for large maps
    if sub > 1 and rng is not None:
        oh, ow = (int(v) for v in rng.integers(0, sub, size=2))
        x = x[:, :, oh * module.stride[0]:, ow * module.stride[1]:]
    # Tensor.unfold makes views and one copy at the end; F.unfold's parallel im2col was up to 50x slower on a busy
    # 2-core machine (measured), with identical values.
    sh, sw = module.stride[0] * sub, module.stride[1] * sub
    u = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # B, C, Ho, Wo, kh', kw'
    if dh > 1 or dw > 1:
        u = u[..., ::dh, ::dw]
    return u.permute(1, 4, 5, 0, 2, 3).reshape(x.shape[1] * kh * kw, -1).T


def _padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) as the conv pads: numbers, 'valid', and 'same' (asymmetric for even kernels)."""
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        pads = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):  # width first, as F.pad wants
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = conv.padding
    return pw, pw, ph, ph


def block_of(module: nn.Module) -> int:
    return module.kernel_size[0] * module.kernel_size[1] if isinstance(module, nn.Conv2d) else 1


def collect_statistics(
    model: nn.Module,
    consumers: list[str],
    batches: Iterable[torch.Tensor],
    max_positions: int = MAX_POSITIONS,
    progress: Callable[[int, int], None] | None = None,
    total_batches: int | None = None,
    strict: bool = True,
    observe: Callable[[nn.Module], AbstractContextManager[Any]] | None = None,
    seed: int = 0,
    shrink: bool = True,
) -> dict[str, LayerStats]:
    """One pass of calibration batches through the unpruned model, accumulating each consumer's input statistics.

    `strict=False` (random calibration data, for latency work) turns too few samples into a warning: such statistics
    carry no meaning anyway, and latency does not depend on them. `observe(copy)` wraps the pass over the model's
    calibration copy (which keeps the module names): the pipeline records there which layers every batch runs.
    `seed` draws the subsampling offsets (`unfold_input`), one stream per layer: the same seed and data give the
    same statistics, whatever order the layers run in. `shrink=False` keeps the raw sample covariance (tests that
    check the algebra against least squares on the very patches).
    """
    model, channels_last = _calibration_copy(model, consumers)
    modules = dict(model.named_modules())
    accs: dict[str, _Accumulator] = {}
    pending: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name in consumers:
        module = modules[name]
        rng = layer_rng(seed, name)

        def hook(mod: nn.Module, args: tuple, name: str = name, rng: np.random.Generator = rng) -> None:
            pending.append((name, unfold_input(mod, args[0].detach(), max_positions, rng)))

        handles.append(module.register_forward_pre_hook(hook))
    t0 = time.perf_counter()
    model.eval()
    try:
        with torch.no_grad(), (observe(model) if observe is not None else nullcontext()):
            for i, x in enumerate(batches):
                if not torch.isfinite(x).all():
                    raise EdgePruneError(f"calibration batch {i} contains NaN or infinite values")
                model(x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x)
                # accumulate after the forward pass, not in the hooks: torch's and BLAS's thread pools then take
                # turns once per batch instead of spinning against each other at every layer
                while pending:
                    name, cols = pending.pop(0)
                    if name not in accs:
                        accs[name] = _Accumulator(cols.shape[1])
                    accs[name].add(cols)
                    del cols
                if progress is not None:
                    progress(i + 1, total_batches or i + 1)
    finally:
        pending.clear()
        for h in handles:
            h.remove()  # statistics are frozen after calibration (CAP.md §7.1)
    stats = {}
    for name in consumers:
        if name not in accs:
            raise EdgePruneError(f"layer {name} never ran during calibration; is it used in forward()?")
        acc = accs[name]
        dim = acc.s.shape[0]
        need = min_patches_needed(dim)
        if acc.n < max(need, 2) and not strict and acc.n >= 2:
            log.warning("layer %s: %d calibration samples for %d dimensions (random data: statistics are only "
                        "placeholders for latency work)", name, acc.n, dim)
        elif acc.n < need:
            raise EdgePruneError(
                f"layer {name} needs at least {need} calibration samples (patches) for its {dim}-dimensional input "
                f"statistics, the calibration data gives {acc.n}; raise `count` in the calibration recipe "
                f"(full-rank statistics need {dim + 1})")
        # shrunk always: the Ledoit-Wolf weight vanishes by itself as samples grow, and just above D samples the raw
        # covariance still overfits (held-out error over the optimum at n = 1.2 D: 1.77 raw, 1.41 shrunk; at 2 D:
        # 1.36 and 1.26; at 10 D: 1.06 both; the audit's F6)
        stats[name] = acc.finish(block_of(modules[name]))
        if shrink:
            stats[name] = shrink_towards_diagonal(stats[name])
        if acc.n <= dim:
            log.warning("statistics of %s are rank-deficient (%d patches for %d dimensions): the covariance is shrunk "
                        "towards its diagonal (weight %.2g); more calibration data gives a better repair", name, acc.n,
                        dim, stats[name].shrinkage)
    log.info("statistics of %d layers in %.2fs", len(stats), time.perf_counter() - t0)
    return stats


def layer_rng(seed: int, name: str) -> np.random.Generator:
    """The subsampling offsets' stream of one layer: seeded by the job's seed and the layer's name."""
    import zlib

    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _calibration_copy(model: nn.Module, consumers: list[str]) -> tuple[nn.Module, bool]:
    """A copy of `model` that runs the calibration pass faster and computes the same consumer inputs.

    BatchNorms that directly follow a conv are folded into it (torch.fx; models fx cannot trace keep them), and
    convolutional models run in channels-last memory format: together 1.5x faster on resnet50 (35 s to 24 s for 256
    images at 224x224 on 2 cores, measured). Consumer modules keep their names; the caller's model is untouched.
    """
    model = copy.deepcopy(model).eval()
    try:
        model = _fold_batchnorms(model, consumers)
    except Exception as e:  # noqa: BLE001 - any tracing failure only costs speed
        log.debug("calibration pass without BatchNorm folding (torch.fx: %s)", first_line(e))
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if conv:
        try:
            model = model.to(memory_format=torch.channels_last)
        except RuntimeError:  # a 5-D parameter or buffer (timm's Swin: its attention mask) refuses it: the convs only
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.to(memory_format=torch.channels_last)
    return model, conv


def _fold_batchnorms(model: nn.Module, consumers: list[str]) -> nn.Module:
    """`model` as a torch.fx graph with BatchNorms folded into the convs before them, every consumer still called as
    a module (its pre-hook fires); `model` itself where the graph would call a consumer some other way.

    fx's default tracer traces into a layer whose class is defined outside torch.nn: timm's `Linear` classifier
    became `F.linear` on its weights, so the module stayed in the graph but never ran (issue 31). Consumers are
    leaves here, whatever their class."""
    import torch.fx
    from torch.fx.experimental.optimization import fuse

    wanted = set(consumers)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in wanted or super().is_leaf_module(m, qualname)

    fused = fuse(torch.fx.GraphModule(model, Tracer().trace(model)), inplace=True, no_trace=True)
    leaves = [str(n.target) for n in fused.graph.nodes if n.op == "call_module"]
    if all(any(c == t or c.startswith(t + ".") for t in leaves) for c in consumers):
        return fused
    log.debug("calibration pass without BatchNorm folding: torch.fx's graph does not call every consumer")
    return model


def min_patches_needed(dim: int) -> int:
    """Fewest patches edgeprune accepts for a layer's statistics: one per 16 input dimensions, at least 8.

    A full-rank covariance needs dim + 1; below that the compensation is regularised by a ridge that grows with the
    deficiency (see `compensate_layer`), which keeps a 256-image calibration usable for resnet50's 2048-wide head.
    """
    return max(8, dim // 16)


def shrink_towards_diagonal(stats: LayerStats) -> LayerStats:
    """Σ' = (1 - α) Σ + α diag(Σ), with the Ledoit-Wolf-type α that minimises the expected error of Σ' under a Gaussian
    model: Var(s_ij) ≈ (s_ij² + s_ii s_jj) / n, α = Σ_{i≠j} Var(s_ij) / Σ_{i≠j} s_ij².

    With fewer samples than dimensions the sample covariance invents correlations, and the closed-form repair fitted
    on them was ~1.8x worse than plain slicing on held-out data (16 samples, 64 dimensions); shrunk, it is better than
    slicing (0.96x at 16 samples, 0.82x at 48; tests/compensation/test_solve.py). The diagonal target keeps each input's
    variance, which the BatchNorm rescale relies on; as α -> 1 the repair tends to the mean-only repair
    b' = b + W_P μ_P.

    n is the number of patches, although patches of one image are correlated: counting images instead (an effective
    sample size no larger than the true one) over-shrank; the example's held-out output error at 50/70/80% removed,
    independent repair: 0.072/0.216/0.266 with patches, 0.080/0.245/0.290 with images (measured, 2026-12).
    """
    cov, n = stats.cov, max(stats.count, 1)
    d = np.diag(cov).copy()
    off2 = np.sum(cov * cov) - np.sum(d * d)
    var = (off2 + np.sum(d) ** 2 - np.sum(d * d)) / n  # Σ_{i≠j} (s_ij² + s_ii s_jj) / n
    alpha = float(min(1.0, var / off2)) if off2 > 0 else 1.0
    shrunk = cov * (1.0 - alpha)
    shrunk[np.diag_indices_from(shrunk)] = d
    return dataclasses.replace(stats, cov=shrunk, shrinkage=alpha)
