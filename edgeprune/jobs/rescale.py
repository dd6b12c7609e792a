"""The input resolution against the channels: a build's release at a lower input size, when that keeps more.

    release, entry = rescaled_release(run, session, release, work_dir)   # after the channel release is verified

A pretrained classifier run at a smaller input (resized inside the model, `surgery/resize.py`) loses less than
channel pruning at the same latency when its weights were trained, not fitted here: on EfficientNet-Lite0 with
ImageNet weights, judged on crops of photos no calibration crop came from (issue 28), 192 x 192 kept the unpruned
top-1 on 73% at 0.74x of the latency and 184 x 184 on 66% at 0.73x, where the channel search's releases at 0.7x kept
42%; resolution and then channels (208 x 208 and channels to 0.69x) kept 46%. Where the repair is all but exact (a
random-weight net on a smooth 3-channel input, tests/jobs/test_rescale.py) channels win. So the build measures both
and ships the one that keeps more (accuracy where labelled, else top-1 agreement; ties by the softmax's KL
divergence) on the held-back scenes (`session.hold_back`: calibration samples the statistics, and so the repair,
never saw; the recipe's held-out part where there are none). Not on the held-out part: its crops come from the photos
the repair was fitted on, and there Lite0's channel release agreed on 52% against 44% for 168 x 168, where on the
held-back scenes it was 37% against 69% and on other photos 40% against 64%. Nor by output error: 168 x 168 had the
larger one on both (0.51 against 0.43 held back).

Sizes are tried on a grid of 16 pixels where the input's sides are multiples of 16 (else 8), square or not (the
aspect within `ASPECT` of the input's), largest area first, aimed at the middle of the search's band by a latency model
`base x (fixed + (1 - fixed) x area share)` whose fixed share each measurement corrects (Lite0: 176 x 176, 62% of the
area, ran at 0.695 of the latency, the resize itself 1.4%), at most `TRIES` measured, each verified like the channel
release (the target's final repeats, beside the baseline). Only for a single image input of at least `MIN_SIDE`
pixels a side, on real calibration data (on random data fidelity means nothing), and a model whose outputs keep their
shapes at the smaller size (`size_free_outputs`).

Why 16: a network trained at 224 x 224 halves it evenly four times (112, 56, 28, 14); a side that is not a multiple
of 16 puts an odd map into a stride-2 layer and shifts its sampling grid against what the weights learned. Lite0's
top-1 agreement with itself on split 0's 600 judged crops (docs/benchmarks.md): 200 x 200 70.3% against
192 x 192 73.2%, 184 x 184 65.8% against 176 x 176 69.3%, 168 x 168 63.2%: each size off the 16-grid kept less than
the smaller one on it. Non-square sizes fill the latency between the squares (192 x 176: 70.3%, 176 x 192: 70.2%, at
0.673 of the area): ImageNet training crops vary their aspect from 3/4 to 4/3, so 15% costs little.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from edgeprune.common.parallel import timed
from edgeprune.jobs.oracle import Verified, export_candidate
from edgeprune.quality.fidelity import Fidelity, compare, outputs
from edgeprune.search.strength import Band, Candidate
from edgeprune.surgery.resize import INPUT_SIZE, size_free_outputs

if TYPE_CHECKING:
    from edgeprune.jobs.delivery import ReleaseRun
    from edgeprune.jobs.session import Prepared

log = logging.getLogger(__name__)

MIN_SIDE = 64  # below this a row of pixels is a large share of the image: not resized
GRID = 8  # sizes on multiples of 8 pixels at least
ALIGNED = 16  # and of 16 where the input's sides are (see the module's docstring)
ASPECT = 0.15  # a size's aspect ratio within this fraction of the input's
TRIES = 4  # sizes measured at most
FIXED = 0.15  # the latency model's first fixed share (`next_size`)
SPREAD = 0.015  # the relative standard error every size is aimed with (a verified figure's, typically)


def not_applicable(run: ReleaseRun) -> str | None:
    """Why the input of this build is not resized (None: it may be)."""
    if run.config.input_scale == "off":
        return "--input-scale off"
    if run.config.lut:
        return "a --lut search: the table prices channels, not input sizes"
    if run.data.recipe.kind == "random":
        return "random calibration data: which keeps more cannot be told"
    shape = tuple(run.loaded.input_shape)
    if len(shape) != 4 or min(shape[2:]) < MIN_SIDE:
        return f"input shape {list(shape)}: not an image of at least {MIN_SIDE} pixels a side"
    if not size_free_outputs(run.loaded.module, run.loaded.example_input, (shape[2] // 2, shape[3] // 2)):
        return "the model's outputs change shape with the input size (a detector's grid, a segmenter's mask)"
    return None


def grid_of(shape: tuple[int, ...]) -> int:
    """The grid sizes are tried on: `ALIGNED` where both input sides are multiples of it, else `GRID`."""
    return ALIGNED if shape[2] % ALIGNED == 0 and shape[3] % ALIGNED == 0 else GRID


def sizes(shape: tuple[int, ...], ratio: float, grid: int = GRID) -> list[tuple[int, int]]:
    """Input sizes on the grid whose area is at most `ratio` of the input's and whose aspect is within `ASPECT` of
    its, largest area first (ties: the aspect nearer the input's, then the taller)."""
    h, w = shape[2], shape[3]
    def skew(size: tuple[int, int]) -> float:  # how far its aspect is from the input's
        return abs(math.log(size[0] / size[1] / (h / w)))

    sides = [range(side // grid * grid, 4 * GRID - 1, -grid) for side in (h, w)]
    out = [(a, b) for a in sides[0] for b in sides[1]
           if a * b <= ratio * h * w and (a, b) != (h, w) and skew((a, b)) <= math.log(1 + ASPECT)]
    return sorted(out, key=lambda s: (-s[0] * s[1], skew(s), -s[0]))


@dataclass(frozen=True)
class Kept:
    """What a release keeps of the unpruned model on the judged samples."""

    fidelity: Fidelity
    kl: float | None  # mean KL(p_unpruned || p_release) of the first class-logits output's softmax (None: none)

    @property
    def key(self) -> tuple[float, ...]:
        """Larger is better: accuracy where labelled, top-1 agreement, then the softmax's KL divergence (on 35-49
        held-back scenes two agreements tie often; the output error would then mislead, see the module's docstring)
        or, without class logits, the output error."""
        f = self.fidelity
        return tuple(v for v in (f.accuracy_after, f.top1_agreement) if v is not None) + (
            -(self.kl if self.kl is not None else f.output_rel_error),)

    def to_dict(self) -> dict[str, Any]:
        f = self.fidelity
        return {"top1_agreement": None if f.top1_agreement is None else float(f.top1_agreement),
                "output_rel_error": float(f"{f.output_rel_error:.6g}"),
                **({"kl": float(f"{self.kl:.6g}")} if self.kl is not None else {}),
                **({"accuracy": float(f.accuracy_after)} if f.accuracy_after is not None else {})}


def rescaled_release(run: ReleaseRun, session: Prepared, release: Verified,
                     work_dir: Path) -> tuple[Verified, dict[str, Any]]:
    """`release`, or the unpruned model at a smaller input size when that meets the budget and keeps more; and the
    report's entry of what was tried (`searched` false and the reason where `not_applicable`)."""
    why = not_applicable(run)
    if why is not None:
        log.info("input size not searched: %s", why)
        return release, {"searched": False, "reason": why}
    band = Band(run.budget_ms, run.config.tolerance, run.config.margin_k)
    judge = Judge(session)
    with timed(run.timings_s, "fidelity"):
        channels = judge(release.pruned)
    trials: list[dict[str, Any]] = []
    best: tuple[Verified, Kept] | None = None
    fixed, aim = FIXED, band.ceiling(SPREAD) * (1 - run.config.tolerance / 2)  # one figure's spread: not the next's
    for _ in range(TRIES):
        size = next_size(run, trials, aim, fixed)
        if size is None:
            break
        v, f = measure_size(run, session, release, size, work_dir, judge)
        area = size[0] * size[1] / math.prod(run.loaded.input_shape[2:])
        fixed = min(0.9, max(0.0, (v.stats.median / run.base.median - area) / (1 - area)))
        probe = v.candidate  # the size's figure as a search candidate: what the band judges
        feasible = bool(band.feasible(probe))
        trials.append({"size": list(size), "latency_ms": float(v.stats.median), "spread": float(v.stats.spread),
                       "feasible": feasible, **f.to_dict()})
        if feasible and (best is None or f.key > best[1].key):
            best = (v, f)
        if band.in_band(probe):  # not below it: a wide figure's margin, or a size far under, tries a larger one
            break
    met = release.stats.median <= run.budget_ms
    chosen = best is not None and (not met or best[1].key > channels.key)
    entry = {"searched": True, "chosen": list(best[0].plan.meta[INPUT_SIZE]) if chosen and best else None,
             "judged_on": judge.what, "trials": trials,
             "channels": {"latency_ms": float(release.stats.median), "feasible": met, **channels.to_dict()}}
    if chosen and best:
        log.info("released at input size %s: it keeps more than the channel release (%s against %s)",
                 best[0].plan.meta[INPUT_SIZE], best[1].key, channels.key)
        return best[0], entry
    return release, entry


def next_size(run: ReleaseRun, trials: list[dict[str, Any]], aim_ms: float, fixed: float) -> tuple[int, int] | None:
    """The largest size not yet tried whose predicted latency, base x (fixed + (1 - fixed) x its area share), is at
    most `aim_ms`, in area between the largest feasible size tried and the smallest infeasible one, on the grid
    (`grid_of`), or else half of it between an infeasible size and a feasible one; None when there is none."""
    ratio = (aim_ms / run.base.median - fixed) / (1 - fixed)
    over = min((t["size"][0] * t["size"][1] for t in trials if not t["feasible"]), default=math.inf)
    under = max((t["size"][0] * t["size"][1] for t in trials if t["feasible"]), default=0)
    shape = tuple(run.loaded.input_shape)
    grid = grid_of(shape)
    for g in (grid, grid // 2):  # half the grid where none lies between (Lite0 at 0.5x: 136 px over, 128 far under)
        pick = next((size for size in sizes(shape, ratio, g) if under < size[0] * size[1] < over), None)
        if pick is not None or over == math.inf:  # not bracketed: a half-grid step up the aim allows is not worth
            return pick  # its measurement (Lite0 at 0.7x: 168 x 168 after 160 x 176, 0.2% more area)
    return None


class Judge:
    """Fidelity to the unpruned model on the held-back scenes (the held-out part where there are none)."""

    def __init__(self, session: Prepared) -> None:
        data = session.data
        if data.held_back:
            n = data.held_back
            data = dataclasses.replace(data, heldout_x=data.calib_x[:n],
                                       heldout_y=None if data.calib_y is None else data.calib_y[:n])
        self.what = f"{len(data.heldout_x)} {'held-back' if session.data.held_back else 'held-out'} samples"
        self.session, self.data = session, data
        self.base = outputs(session.loaded.module, data)

    def __call__(self, model: nn.Module) -> Kept:
        import torch

        from edgeprune.inputs.outputs import is_class_logits

        (yb, labels), yp = self.base, outputs(model, self.data)[0]  # one pass for both figures
        f = compare(yb, labels, yp)
        name = next((n for n, y in yb.items() if is_class_logits(y)), None)
        if name is None:
            return Kept(f, None)
        lb, lm = torch.log_softmax(yb[name], 1), torch.log_softmax(yp[name], 1)
        return Kept(f, float((lb.exp() * (lb - lm)).sum(1).mean()))


def measure_size(run: ReleaseRun, session: Prepared, release: Verified, size: tuple[int, int], work_dir: Path,
                 judge: Judge) -> tuple[Verified, Kept]:
    """The unpruned model at input `size`, as it would ship: planned (every width full), exported, verified."""
    measurer = run.measurer
    full = {g.name: g.channels for g in session.graph.groups}
    plan = dataclasses.replace(session.plan(full, **{**release.plan.meta, INPUT_SIZE: list(size)}),
                               target=release.plan.target, compensation=False)  # nothing removed: nothing to repair
    with timed(run.timings_s, "prune"):
        model = session.prune(plan)
    float_path = work_dir / f"size-{size[0]}x{size[1]}.onnx"
    with timed(run.timings_s, "export"):
        path = export_candidate(model, run.loaded.example_input, float_path, session.config.exporter,
                                measurer.quantizer)
    stats = measurer(path, f"measuring the unpruned model at input size {size[0]}x{size[1]}", cached=False,
                     repeats=measurer.target.measure.final_repeats, stage="verify")
    cand = Candidate(step=0, strength=0.0, widths_digest=f"input-{size[0]}x{size[1]}", latency_ms=stats.median,
                     source=stats.source, widths=full, spread=stats.spread)
    with timed(run.timings_s, "fidelity"):
        f = judge(model)
    return Verified(cand, stats, model, plan, path, float_path if path != float_path else None), f
