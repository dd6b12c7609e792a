"""Models with several outputs: named, exported with every output, parity and fidelity per output, heads whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeprune.errors import EdgePruneError
from edgeprune.inputs.outputs import check_outputs, flatten_outputs


class TwoHeads(nn.Module):
    """A segmenter-like model: a dict with per-pixel class scores (`out`, `aux`) and a tuple of image logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.seg = nn.Conv2d(48, 5, 1)
        self.aux = nn.Conv2d(32, 5, 1)
        self.cls = nn.Linear(48, 7)

    def forward(self, x: torch.Tensor) -> dict:
        a = self.stem(x)
        b = self.body(a)
        return {"out": self.seg(b), "aux": self.aux(a), "extra": (self.cls(b.mean((2, 3))),)}


def make_two_heads() -> TwoHeads:
    torch.manual_seed(0)
    return TwoHeads().eval()


def test_flatten_names_nested_outputs_in_forward_order() -> None:
    t = torch.zeros(1)
    assert [n for n, _ in flatten_outputs(t)] == ["output"]
    assert [n for n, _ in flatten_outputs({"out": t, "aux": (t, [t])})] == ["out", "aux.0", "aux.1.0"]
    with pytest.raises(EdgePruneError, match="returns int at '1'"):
        check_outputs((t, 3), "m")


def test_prune_of_a_model_with_several_outputs_names_and_checks_each(tmp_path: Path) -> None:
    from edgeprune.cli.commands import main

    out = tmp_path / "p"
    code = main(["prune", "--model", f"{__file__}:make_two_heads", "--input-shape", "1,3,16,16", "--calibration",
                 "random", "--ratio", "0.5", "--out", str(out), "--json"])
    assert code == 0
    r = json.loads((out / "report.json").read_text())
    assert set(r["parity"]["per_output"]) == {"out", "aux", "extra.0"}
    assert all(v < 1e-4 for v in r["parity"]["per_output"].values())
    per = r["fidelity"]["per_output"]
    assert set(per) == {"out", "aux", "extra.0"}
    assert per["out"]["top1_agreement"] is None and per["extra.0"]["top1_agreement"] is not None
    assert r["fidelity"]["output_rel_error"] == pytest.approx(np.mean([v["rel_error"] for v in per.values()]))
    # the heads are whole: every output keeps its shape, and the ONNX file names each output
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["out", "aux", "extra.0"]
    x = np.random.default_rng(0).normal(size=(1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for _, t in flatten_outputs(make_two_heads()(torch.from_numpy(x)))]
    got = sess.run(None, {sess.get_inputs()[0].name: x})
    assert [g.shape for g in got] == [w.shape for w in want]
    assert any(w["after"] < w["before"] for w in r["widths"].values())


def test_fidelity_proxy_weighs_each_output_as_told() -> None:
    """The search's proxy is a weighted mean of per-output relative errors: with `aux` at weight 0 it is the mean of
    the other two outputs' errors of the same masked network, with `out` at 3 that output counts three times."""
    from edgeprune.quality.fidelity import MaskedProxy, relative_errors
    from edgeprune.dependency.graph import trace
    from edgeprune.plan import Plan
    from edgeprune.compensation.statistics import collect_statistics

    model = make_two_heads()
    x = torch.randn(16, 3, 16, 16)
    graph = trace(model, x[:1])
    stats = collect_statistics(model, graph.consumer_modules(), [x[:8], x[8:]])
    plan = Plan(kept={g.name: tuple(range(g.channels // 2)) for g in graph.groups},
                channels={g.name: g.channels for g in graph.groups})
    plain = MaskedProxy(model, graph, stats, x)
    base = plain.base
    plain.error(plan)
    rels = relative_errors(plain._forward(), base)
    assert plain.error(plan) == pytest.approx(np.mean(list(rels.values())))
    assert len(set(round(v, 6) for v in rels.values())) == 3  # the weights below change the figure
    no_aux = MaskedProxy(model, graph, stats, x, weights={"aux": 0.0})
    assert no_aux.error(plan) == pytest.approx((rels["out"] + rels["extra.0"]) / 2)
    heavy = MaskedProxy(model, graph, stats, x, weights={"out": 3.0})
    assert heavy.error(plan) == pytest.approx((3 * rels["out"] + rels["aux"] + rels["extra.0"]) / 5)


@pytest.mark.parametrize("weights, words", [({"boxes": 1.0}, "names 'boxes', which the model does not output; its "
                                             "outputs are out, aux, extra.0"),
                                            ({"out": 0, "aux": 0, "extra.0": 0}, "every output weight 0")])
def test_output_weights_naming_no_output_or_silencing_all_are_refused(weights: dict, words: str) -> None:
    from edgeprune.quality.fidelity import output_weights

    with pytest.raises(EdgePruneError, match=words):
        output_weights(["out", "aux", "extra.0"], weights)


@pytest.mark.parametrize("flag, words", [("out", "must be NAME=WEIGHT"), ("out=-1", "finite number >= 0"),
                                         ("boxes=2", "does not output")])
def test_build_refuses_a_bad_output_weight_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str,
                                                       words: str) -> None:
    from edgeprune.cli.commands import main

    out = tmp_path / "b"
    code = main(["build", "--model", f"{__file__}:make_two_heads", "--input-shape", "1,3,16,16", "--calibration",
                 "random", "--proxy", "fidelity", "--latency", "0.7x", "--output-weight", flag, "--out", str(out),
                 "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("edgeprune: error:") and words in err[0], err
    assert not out.exists()
