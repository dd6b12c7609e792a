"""Splits along channels pruned in equal shares (dependency/splits.py, issue 31): the groups, their pieces, the
mappings torch-pruning got wrong, and the splits that keep their groups excluded."""

from __future__ import annotations

import pytest
import torch

from edgeprune.dependency.graph import trace
from edgeprune.plan import uniform_widths, width_step
from tests.splitnets import C2fNet, FixedSplit, MixNet, build


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
        assert g.resizes == ((name, "splits"),)
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
    assert g.resizes == ()  # chunk(2) follows by itself
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
                                        ("list", "sizes [8, 8] written in the forward code"),
                                        ("unequal", "unequal sizes [12, 4]")])
def test_a_split_the_pruned_pieces_cannot_follow_keeps_its_group_excluded(how: str, words: str) -> None:
    graph = trace(build(FixedSplit, how), x())
    assert "conv" in graph.excluded and words in graph.excluded["conv"], graph.excluded
    assert [g.name for g in graph.groups] == ["a", "b"]


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
