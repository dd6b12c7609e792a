"""How faithful a pruned model is to the original, on held-out data that never fed the statistics.

    f = fidelity(base, pruned, data)     # top1_agreement, output_rel_error, accuracy before/after when labelled
    proxy = MaskedProxy(model, graph, stats, x)   # the search's inner-level proxy: proxy.error(plan)

Models with several outputs (`outputs.flatten_outputs`): the relative error is taken per output and averaged with
equal weights (one output: its error); top-1 agreement and accuracy come from the first output that is class logits
(N x C), and are None when none is (a segmenter, a detector's raw heads).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgeprune.errors import EdgePruneError
from edgeprune.inputs.data import CalibrationData
from edgeprune.inputs.outputs import flatten_outputs, is_class_logits
from edgeprune.quality.replay import Replay

if TYPE_CHECKING:
    from edgeprune.dependency.graph import Graph
    from edgeprune.plan import Plan

Named = dict[str, torch.Tensor]  # output name -> held-out outputs, N x ... (float64)


@dataclass(frozen=True)
class Fidelity:
    top1_agreement: float | None  # share of held-out samples where both predict the same class; None: no logits
    output_rel_error: float  # ||y_pruned - y_base|| / ||y_base||, averaged over outputs
    accuracy_before: float | None  # when the calibration recipe is labelled
    accuracy_after: float | None
    samples: int
    nonfinite: int = 0  # held-out samples where the pruned model's output holds NaN or infinity (never "agreeing")
    per_output: dict[str, dict[str, float | None]] = field(default_factory=dict)  # several outputs: each one's

    @property
    def accuracy_drop_pp(self) -> float | None:
        """Accuracy lost, in percentage points."""
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return 100.0 * (self.accuracy_before - self.accuracy_after)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy"] = None if self.accuracy_before is None else {
            "before": self.accuracy_before, "after": self.accuracy_after, "drop_pp": self.accuracy_drop_pp}
        return d


def outputs(model: nn.Module, data: CalibrationData) -> tuple[Named, torch.Tensor | None]:
    """Every output of `model` on the held-out part, by name, and the labels if any."""
    ys: dict[str, list[torch.Tensor]] = {}
    labels = []
    model.eval()
    with torch.no_grad():
        for x, y in data.heldout_batches():
            for name, t in flatten_outputs(model(x)):
                ys.setdefault(name, []).append(t.double())
            if y is not None:
                labels.append(y)
    return {n: torch.cat(v) for n, v in ys.items()}, (torch.cat(labels) if labels else None)


def joined(named: Named) -> torch.Tensor:
    """All outputs of each sample side by side, N x D."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in named.values()], 1)


def relative_errors(yp: Named, yb: Named) -> dict[str, float]:
    return {n: float(torch.linalg.norm(yp[n] - yb[n]) / torch.linalg.norm(yb[n]).clamp_min(1e-30)) for n in yb}


def check_finite_baseline(model: nn.Module, data: CalibrationData, named: Named, spec: str) -> None:
    """Refuse an unpruned model whose held-out outputs hold NaN or infinity, naming the first non-finite parameter
    (or buffer), else the first layer whose output is not finite: no fidelity figure means anything for it."""
    from edgeprune.errors import EdgePruneError

    yb = joined(named)
    bad = ~torch.isfinite(yb).all(1)
    if not bool(bad.any()):
        return
    head = f"the unpruned model {spec} gives non-finite outputs (NaN or infinity) on {int(bad.sum())} of " \
           f"{len(yb)} held-out samples"
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in tensors:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                n = int((~torch.isfinite(t)).sum())
                raise EdgePruneError(f"{head}: its {kind} {name} holds {n} non-finite values of {t.numel()}; fix the "
                                     f"weights (--weights) or the model factory")
    i = int(bad.nonzero()[0, 0])
    first: list[str] = []

    def hook(mod: nn.Module, args: tuple, out: object, name: str = "") -> None:
        if not first and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
            first.append(name)

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in model.named_modules()
               if n]
    try:
        with torch.no_grad():
            model(torch.from_numpy(data.heldout_x[i:i + 1].copy()))
    finally:
        for h in handles:
            h.remove()
    where = f"layer {first[0]} is the first whose output is not finite" if first else "no single layer's output is"
    raise EdgePruneError(f"{head} (first: held-out sample {i}; {where}); check the model and the calibration data's "
                         f"normalisation: edgeprune needs a model whose outputs are finite")


def fidelity(base: nn.Module, pruned: nn.Module, data: CalibrationData,
             base_outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> Fidelity:
    """Compare `pruned` with `base` on held-out data (pass `base_outputs` to reuse the base model's logits)."""
    yb, labels = base_outputs if base_outputs is not None else outputs(base, data)
    return compare(yb, labels, outputs(pruned, data)[0])


def compare(yb: Named, labels: torch.Tensor | None, yp: Named) -> Fidelity:
    """`fidelity` of outputs already computed: `yp` against the base model's `yb` (and the `labels`, if any)."""
    finite = torch.isfinite(joined(yp)).all(1) & torch.isfinite(joined(yb)).all(1)  # NaN's argmax "agrees" with NaN's
    # non-finite outputs give an infinite or NaN error, which reports write as null (report.clean)
    rels = relative_errors(yp, yb)
    agreements = {n: float(((yb[n].argmax(1) == yp[n].argmax(1)) & finite).double().mean())
                  for n in yb if is_class_logits(yb[n])}
    logits = next(iter(agreements), None)
    acc_b = acc_a = None
    if labels is not None and logits is not None:
        acc_b = float((yb[logits].argmax(1) == labels).double().mean())
        acc_a = float(((yp[logits].argmax(1) == labels) & finite).double().mean())
    per = {n: {"rel_error": rels[n], "top1_agreement": agreements.get(n)} for n in yb} if len(yb) > 1 else {}
    return Fidelity(top1_agreement=agreements.get(logits) if logits else None,
                    output_rel_error=sum(rels.values()) / len(rels), accuracy_before=acc_b, accuracy_after=acc_a,
                    samples=int(finite.shape[0]), nonfinite=int((~finite).sum()), per_output=per)


class MaskedProxy:
    """Output error of the network with a plan applied by masking, on calibration samples: the inner-level proxy of
    the search (CAP.md §0, "held-out output fidelity").

    Masking compensates the consumers and zeroes their removed input columns, without physical removal or a new
    dependency trace: a channel every consumer ignores contributes nothing, so this computes what the pruned model
    computes (tests/test_fidelity.py checks it against `prune`), at a fraction of the cost. Samples come from the
    calibration part, never the held-out part, so the reported held-out fidelity stays an independent figure.
    """

    def __init__(self, model: nn.Module, graph: Graph, stats: dict, x: torch.Tensor, repair: bool = True,
                 orders: dict[str, tuple[int, ...]] | None = None, solvers: dict | None = None,
                 weights: dict[str, float] | None = None) -> None:
        import copy

        self.model = copy.deepcopy(model).eval()
        self.graph, self.stats, self.x, self.repair = graph, stats, x, repair
        self.orders, self.solvers = orders, solvers
        self.memo: dict = {}
        modules = dict(self.model.named_modules())
        names = sorted({c.module for g in graph.groups for c in g.consumers if c.compensable})
        self.modules = {n: modules[n] for n in names}
        self.originals = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                          for n, m in self.modules.items()}
        self.replay = Replay(self.model, x, names)  # resumes at the first consumer a candidate changes
        self.removed: dict[str, frozenset[int]] = {}  # the last candidate's removed inputs, per consumer
        self.base = self._forward(set())
        self.weights = output_weights(list(self.base), weights or {})

    def _forward(self, changed: set[str] | None = None) -> Named:
        """The masked network's outputs; `changed`: the consumers whose weights changed since the last forward pass
        (None: run it whole)."""
        return {n: t.double() for n, t in flatten_outputs(self.replay.run(changed))}

    def error(self, plan: Plan) -> float:
        """||y_plan - y|| / ||y|| over the samples, a weighted mean over outputs (each weighing 1 unless given)."""
        from edgeprune.surgery.apply import compensate_consumers, removed_coords

        removed = {n: frozenset(r) for n, r in removed_coords(self.graph, plan).items() if r}
        changed = {n for n in set(removed) | set(self.removed) if removed.get(n) != self.removed.get(n)}
        self.removed = removed
        with torch.no_grad():
            for n, m in self.modules.items():
                w, b = self.originals[n]
                m.weight.copy_(w)
                if b is None:
                    m.bias = None  # compensation may have given it one
                else:
                    m.bias.copy_(b)
        compensate_consumers(self.model, self.graph, plan, self.stats, self.orders, self.solvers, memo=self.memo,
                             repair=self.repair)
        rels = relative_errors(self._forward(changed), self.base)
        return sum(self.weights[n] * r for n, r in rels.items()) / sum(self.weights.values())


def output_weights(names: list[str], given: dict[str, float]) -> dict[str, float]:
    """Each output's weight in the proxy: `given`, else 1. Names the model does not have, or weights that leave every
    output at 0, are refused before the search starts."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise EdgePruneError(f"--output-weight names {', '.join(map(repr, unknown))}, which the model does not output; "
                             f"its outputs are {', '.join(names)}")
    weights = {n: float(given.get(n, 1.0)) for n in names}
    if not any(w > 0 for w in weights.values()):
        raise EdgePruneError(f"--output-weight gives every output weight 0 ({', '.join(names)}); the search needs one "
                             "output that counts")
    return weights
