"""Splits along channels pruned piece by piece (dependency/splits.py, shares.py, issue 31): the groups, their pieces,
how a width is shared over them, the mappings torch-pruning got wrong, and the splits that keep their groups
excluded."""

from __future__ import annotations

import pytest
import torch

from edgeprune.dependency.graph import trace
from edgeprune.dependency.groups import Resize
from edgeprune.dependency.shares import piece_widths, refine
from edgeprune.plan import uniform_widths, width_step
from tests.splitnets import C2fNet, FixedSplit, MixNet, PieceOwners, SplitTwice, build


def x(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_mixconv_groups_hold_every_piece_in_position_and_name_the_sizes_to_rewrite() -> None:
    graph = trace(build(MixNet), x())
    assert graph.excluded == {}
    groups = {g.name: g for g in graph.groups}
    assert set(groups) == {"b2.pwl", "b1.pw", "b2.pw"}  # the residual stream, and each block's expanded channels
    for name, k in (("b1", 2), ("b2", 3)):
        g = groups[f"{name}.pw"]
        n = g.channels // k
        assert g.pieces == tuple(tuple(range(i * n, (i + 1) * n)) for i in range(k))
        assert g.resizes == (Resize(name, "splits", tuple((i, (i,)) for i in range(k))),)
        assert {f"{name}.dw.{i}" for i in range(k)} <= set(g.members)
        # the concat puts piece i back at its place: the projection reads channel j at its input j
        (pwl,) = g.consumers
        assert pwl.module == f"{name}.pwl" and pwl.coords == tuple((j,) for j in range(g.channels))


def test_torch_pruning_gives_each_piece_to_the_conv_that_reads_it() -> None:
    """torch-pruning handed MixConv's i-th reader (in the order it met them: 7x7, 5x5, 3x3) the i-th piece; the
    group rooted at the expand conv now slices each depthwise conv at the piece it reads."""
    import torch_pruning as tp

    from edgeprune.dependency.graph import build_dependency_graph

    model = build(MixNet)
    dg = build_dependency_graph(model, x())
    group = dg.get_pruning_group(model.b2.pw, tp.prune_conv_out_channels, list(range(48)))
    roots = {it.dep.target.module: sorted(int(r) for r in it.root_idxs) for it in group}
    for i in range(3):
        assert roots[model.b2.dw[i]] == list(range(16 * i, 16 * (i + 1)))


def test_c2f_group_holds_both_halves_the_bottleneck_and_every_read_of_them() -> None:
    graph = trace(build(C2fNet), x())
    assert graph.excluded == {}
    groups = {g.name: g for g in graph.groups}
    g = groups["c2f.cv1.0"]  # rooted at cv1 although its last bottleneck conv adds to one half
    assert g.channels == 32 and g.pieces == (tuple(range(16)), tuple(range(16, 32)))
    assert g.resizes == () and g.equal  # chunk(2) follows by itself, in equal pieces
    assert set(g.producers) == {"c2f.cv1.0", "c2f.m.0.cv2.0"}
    cv2 = next(c for c in g.consumers if c.module == "c2f.cv2.0")
    assert cv2.coords[:16] == tuple((j,) for j in range(16))  # the first half, read once
    assert cv2.coords[16:] == tuple((j, j + 16) for j in range(16, 32))  # the second, and the bottleneck's sum
    bottleneck = next(c for c in g.consumers if c.module == "c2f.m.0.cv1.0")
    assert not any(bottleneck.coords[:16]) and all(bottleneck.coords[16:])  # reads the second half only
    head = groups["head.cv1.0"]
    assert head.pieces == (tuple(range(8)), tuple(range(8, 16)))
    assert {"head.m.0.cv2.0", "head.m.1.cv2.0"} <= set(groups)  # without shortcut: the bottlenecks' own groups


def test_split_groups_widths_step_in_pieces() -> None:
    graph = trace(build(MixNet), x())
    groups = {g.name: g for g in graph.groups}
    assert width_step(groups["b2.pw"], 8) == 24 and width_step(groups["b2.pwl"], 8) == 8
    widths = uniform_widths(graph, 0.5, 8)
    assert widths["b1.pw"] == 16 and widths["b2.pw"] == 24


@pytest.mark.parametrize("how, words", [("size", "a fixed size of 8 channels"),
                                        ("list", "sizes [8, 8] written in the forward code")])
def test_a_split_the_pruned_pieces_cannot_follow_keeps_its_group_excluded(how: str, words: str) -> None:
    graph = trace(build(FixedSplit, how), x())
    assert "conv" in graph.excluded and words in graph.excluded["conv"], graph.excluded
    assert [g.name for g in graph.groups] == ["a", "b"]


def test_a_split_by_unequal_sizes_kept_as_an_attribute_shares_the_width_in_proportion() -> None:
    graph = trace(build(FixedSplit, "unequal"), x())
    assert graph.excluded == {}
    g = graph.group("conv")
    assert g.pieces == (tuple(range(12)), tuple(range(12, 16))) and not g.equal
    assert g.resizes == (Resize("", "sizes", ((0, (0,)), (1, (1,)))),)  # the model itself splits, by self.sizes
    assert g.piece_widths(8) == (6, 2) and g.piece_widths(2) == (1, 1) and g.piece_widths(16) == (12, 4)


def test_piece_widths_are_proportional_aligned_nested_and_never_empty() -> None:
    sizes = (80, 40, 40, 80)
    assert piece_widths(sizes, 120) == (40, 20, 20, 40)
    assert piece_widths(sizes, 128, multiple=16) == (48, 16, 16, 48)  # each a multiple of 16, summing to the width
    assert piece_widths(sizes, 4, multiple=16) == (1, 1, 1, 1)  # one each before any alignment
    assert piece_widths((16, 16, 16), 24) == (8, 8, 8)  # equal pieces: equal shares, as before
    assert piece_widths((16, 16), 9, equal=True) == (4, 4)  # a chunk's pieces stay equal
    last = (0, 0, 0, 0)
    for w in range(4, 241):  # a wider plan keeps what a narrower one keeps: shares never shrink
        now = piece_widths(sizes, w, multiple=8)
        assert sum(now) == w and all(a <= b for a, b in zip(last, now)) and min(now) >= 1
        last = now


def test_refine_cuts_a_group_into_what_every_split_puts_together_in_position_order() -> None:
    three, two = [tuple(range(8)), tuple(range(8, 16)), tuple(range(16, 24))], [tuple(range(12)), tuple(range(12, 24))]
    assert [len(p) for p in refine([three, two])] == [8, 4, 4, 8]
    assert refine([three, two])[1] == tuple(range(8, 12))
    assert refine([[(3, 2), (1, 0)]], 6) == ((3, 2), (1, 0), (4, 5))  # channels no split reaches: one more piece


def test_a_group_owning_one_piece_of_a_split_rewrites_only_its_entry() -> None:
    """Issue 31's first case: each conv of a concat roots a group that owns its piece of the next block's split."""
    graph = trace(build(PieceOwners), x())
    assert graph.excluded == {}
    groups = {g.name: g for g in graph.groups}
    for k in (0, 1):
        g = groups[f"pwl.convs.{k}"]
        assert g.channels == 12 and g.pieces == (tuple(range(12)),)
        assert g.resizes == (Resize("pw", "splits", ((k, (0,)),)),)
        assert set(g.producers) == {f"pwl.convs.{k}", f"a.convs.{k}"}
        assert {c.module for c in g.consumers} == {"head.0", f"pw.convs.{k}"}
    assert width_step(groups["pwl.convs.0"], 4) == 4  # one piece: the width moves by the multiple alone


def test_two_splits_cutting_a_group_differently_make_its_pieces_their_refinement() -> None:
    """Issue 31's second case: the SE-gated expansion split [8, 8, 8] then [12, 12] is cut into [8, 4, 4, 8]; each
    split's sizes are sums of those pieces, and each layer of some pieces only is noted with them."""
    graph = trace(build(SplitTwice), x())
    assert graph.excluded == {}
    g = graph.group("expand")
    assert [len(p) for p in g.pieces] == [8, 4, 4, 8] and not g.equal
    assert set(g.resizes) == {Resize("dw", "splits", ((0, (0,)), (1, (1, 2)), (2, (3,)))),
                              Resize("pwl", "splits", ((0, (0, 1)), (1, (2, 3))))}
    assert dict(g.parts)["dw.convs.1"] == (1, 2) and dict(g.parts)["pwl.convs.1"] == (2, 3)
    kept = g.piece_widths(12)
    assert kept == (4, 2, 2, 4)
    assert [r.sizes([8, 8, 8] if r.owner == "dw" else [12, 12], kept) for r in sorted(g.resizes, key=str)] == \
        [[4, 4, 4], [6, 6]]


def test_the_latency_model_reads_each_layer_s_share_of_a_split_group() -> None:
    from edgeprune.latency.table import LayerModel

    model = build(SplitTwice)
    graph = trace(model, x())
    layers = {ly.name: ly for ly in LayerModel.from_model(model, x(), graph, multiple=1).layers}
    channels = {g.name: g.channels for g in graph.groups}
    w = channels | {"expand": 12}  # pieces [8, 4, 4, 8] keep (4, 2, 2, 4)
    assert layers["dw.convs.0"].widths(w, channels) == (4, 4)  # a depthwise conv of piece 0 only
    assert layers["dw.convs.1"].widths(w, channels) == (4, 4)  # of pieces 1 and 2
    assert layers["pwl.convs.1"].widths(w, channels) == (6, 8)  # reads pieces 2 and 3: 2 + 4 of its 12
    assert layers["pw.convs.0"].widths(w, channels) == (8, 6)  # makes pieces 0 and 1
    assert layers["reduce"].widths(w, channels) == (12, 8)


def test_yolov8n_prunes_every_c2f_split_and_excludes_only_the_dfl_box_convs() -> None:
    """Every C2f of YOLOv8n (random weights from its yaml) is one group over both halves; what stays excluded is the
    box branch's last conv of each scale, whose 64 channels the DFL views as 4 x 16 bins (not a split)."""
    pytest.importorskip("ultralytics")
    from edgeprune.inputs.models import load_model

    loaded = load_model("ultralytics:yolov8n.yaml", input_shape=(1, 3, 160, 160))
    graph = trace(loaded.module, loaded.example_input)
    split = {g.name: g for g in graph.groups if g.pieces}
    assert set(split) == {f"model.{i}.cv1.conv" for i in (2, 4, 6, 8, 12, 15, 18, 21)}
    assert all(len(g.pieces) == 2 and g.resizes == () for g in split.values())
    assert set(graph.excluded) == {f"model.22.cv2.{i}.2" for i in range(3)}
    assert all("DFL bins" in why for why in graph.excluded.values())


@pytest.mark.slow
def test_yolov8n_prunes_at_half_with_its_c2f_blocks(tmp_path) -> None:  # noqa: ANN001 - about 40 s
    pytest.importorskip("ultralytics")
    import edgeprune

    result = edgeprune.prune("ultralytics:yolov8n.yaml", ratio=0.5, input_shape=(1, 3, 160, 160), out=tmp_path / "y")
    assert result.exit_code == 0, result.message
    assert not any("split" in why for why in result.report["excluded_groups"].values())
    assert result.report["widths"]["model.21.cv1.conv"] == {"before": 256, "after": 128}
    assert result.report["parity"]["rel_error"] < 1e-4
