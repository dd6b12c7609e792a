from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.dependency.graph import Graph, Group
from edgeprune.errors import EdgePruneError
from edgeprune.plan import PLAN_VERSION, Plan, plan_from_rankings, round_width, uniform_widths
from edgeprune.scoring.base import Ranking


def make_plan(**kw: object) -> Plan:
    args: dict = dict(kept={"conv1": (0, 2, 3), "layer1.0.conv1": (1,)}, channels={"conv1": 8, "layer1.0.conv1": 4},
                      criterion="l1", compensation=False, channel_multiple=1, model="torchvision:resnet18",
                      target="cpu", seed=3, meta={"ratio": 0.5, "note": "x"})
    args.update(kw)
    return Plan(**args)  # type: ignore[arg-type]


def graph_of(widths: dict[str, int]) -> Graph:
    return Graph(groups=[Group(name=n, channels=c, producers=(n,), consumers=(), members=())
                         for n, c in widths.items()])


def write_json(path: Path, d: object) -> Path:
    path.write_text(json.dumps(d))
    return path


# ---------------------------------------------------------------- round trip


def test_plan_save_load_round_trips_equal(tmp_path: Path) -> None:
    plan = make_plan()
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert json.loads(path.read_text())["version"] == PLAN_VERSION
    assert not list(tmp_path.glob(".plan.json.tmp-*"))  # written atomically


def test_plan_round_trips_defaults(tmp_path: Path) -> None:
    plan = Plan(kept={"a": (0,)}, channels={"a": 1})
    assert Plan.load(plan.save(tmp_path / "p.json")) == plan


def test_plan_widths_and_pruned_channels() -> None:
    plan = make_plan()
    assert plan.widths() == {"conv1": 3, "layer1.0.conv1": 1}
    assert plan.pruned("conv1") == [1, 4, 5, 6, 7]
    assert plan.pruned("layer1.0.conv1") == [0, 2, 3]


def test_plan_pruned_is_empty_for_group_without_kept_entry() -> None:
    plan = make_plan(channels={"conv1": 8, "layer1.0.conv1": 4, "other": 5})
    assert plan.pruned("other") == []


# ---------------------------------------------------------------- invalid plans


@pytest.mark.parametrize("kept, words", [
    ({"conv1": (0, 8)}, "must be ascending, unique and below 8"),
    ({"conv1": (-1, 2)}, "must be ascending, unique and below 8"),
    ({"conv1": (3, 2)}, "must be ascending, unique and below 8"),
    ({"conv1": (2, 2, 3)}, "must be ascending, unique and below 8"),
    ({"conv1": ()}, "keeps no channel of group 'conv1'"),
    ({"nowidth": (0,)}, "does not give its width"),
])
def test_plan_rejects_invalid_kept_indices(kept: dict, words: str) -> None:
    with pytest.raises(EdgePruneError, match=words):
        Plan(kept=kept, channels={"conv1": 8})


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(version=2), "plan version 2 is not supported"),
    (lambda d: d.pop("version"), "plan version None is not supported"),
    (lambda d: d["kept"].update(conv1=[0, 9]), "must be ascending, unique and below 8"),
    (lambda d: d["kept"].update(conv1=[3, 0]), "must be ascending, unique and below 8"),
    (lambda d: d["kept"].update(conv1=[]), "keeps no channel"),
    (lambda d: d.pop("kept"), "malformed plan: KeyError"),
    (lambda d: d.pop("criterion"), "malformed plan: KeyError"),
    (lambda d: d["kept"].update(conv1=["a"]), "malformed plan"),
    (lambda d: d.update(kept=[1, 2]), "malformed plan"),
    (lambda d: d.update(channels={"conv1": "eight"}), "malformed plan"),
])
def test_plan_load_rejects_invalid_file(tmp_path: Path, change: object, words: str) -> None:
    d = make_plan().to_dict()
    change(d)  # type: ignore[operator]
    with pytest.raises(EdgePruneError, match=words):
        Plan.load(write_json(tmp_path / "plan.json", d))


def test_plan_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EdgePruneError, match=f"plan file {tmp_path / 'nope.json'} does not exist"):
        Plan.load(tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2"])
def test_plan_load_bad_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(EdgePruneError, match="is not valid JSON"):
        Plan.load(path)


@pytest.mark.parametrize("top", [[1, 2], "plan", 3, None])
def test_plan_load_rejects_json_that_is_not_an_object(tmp_path: Path, top: object) -> None:
    with pytest.raises(EdgePruneError, match="plan"):
        Plan.load(write_json(tmp_path / "plan.json", top))


# ---------------------------------------------------------------- widths


@pytest.mark.parametrize("width, channels, multiple, min_width, want", [
    (32.0, 64, 8, None, 32),
    (35.9, 64, 8, None, 32),   # nearest multiple
    (36.1, 64, 8, None, 40),
    (3.0, 64, 8, None, 8),     # at least one multiple
    (0.0, 64, 8, None, 8),
    (70.0, 64, 8, None, 64),   # never above the original width
    (62.0, 60, 8, None, 60),   # rounding up past an unaligned original width stops at it
    (4.0, 6, 8, None, 6),      # a group narrower than the multiple keeps its width
    (5.0, 10, 1, None, 5),
    (5.4, 10, 1, None, 5),
    (0.2, 10, 1, None, 1),     # at least one channel
    (3.0, 64, 8, 16, 16),      # explicit minimum
    (3.0, 10, 8, 16, 10),      # a minimum above the width is capped at it
])
def test_round_width(width: float, channels: int, multiple: int, min_width: int | None, want: int) -> None:
    assert round_width(width, channels, multiple, min_width) == want


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("multiple", [1, 4, 8, 16])
def test_uniform_widths_respects_multiple_and_never_exceeds_width(ratio: float, multiple: int) -> None:
    widths = {"a": 8, "b": 12, "c": 64, "d": 100, "e": 3, "f": 1, "g": 1280}
    got = uniform_widths(graph_of(widths), ratio, multiple)
    assert set(got) == set(widths)
    for name, c in widths.items():
        w = got[name]
        assert 1 <= w <= c, (name, w)
        assert w % multiple == 0 or w == c, (name, w)  # a multiple, or the whole (unaligned) group
        assert abs(w - c * (1 - ratio)) <= multiple / 2 or w in (c, min(c, multiple)), (name, w)


def test_uniform_widths_at_zero_ratio_keeps_every_aligned_group_whole() -> None:
    widths = {"a": 8, "b": 64, "c": 1280}
    assert uniform_widths(graph_of(widths), 0.0, 8) == widths


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_uniform_widths_rejects_ratio_outside_unit_interval(ratio: float) -> None:
    with pytest.raises(EdgePruneError, match=f"must be in \\[0, 1\\), found {ratio}"):
        uniform_widths(graph_of({"a": 8}), ratio)


def test_plan_from_rankings_keeps_first_ranked_channels_sorted() -> None:
    graph = graph_of({"a": 6, "b": 4})
    rankings = {"a": Ranking(order=(5, 0, 3, 1, 2, 4)), "b": Ranking(order=(2, 3, 1, 0))}
    plan = plan_from_rankings(graph, rankings, {"a": 3, "b": 4}, criterion="random", seed=2)
    assert plan.kept == {"a": (0, 3, 5), "b": (0, 1, 2, 3)}
    assert plan.channels == {"a": 6, "b": 4} and plan.criterion == "random" and plan.seed == 2
    assert plan.pruned("a") == [1, 2, 4] and plan.pruned("b") == []


@pytest.mark.parametrize("change", [
    lambda d: d["kept"].update(conv1=[0, 2.5, 3]),
    lambda d: d["channels"].update(conv1=8.9),
    lambda d: d.update(compensation="false"),
], ids=["float_index", "float_width", "string_bool"])
def test_plan_load_rejects_values_of_the_wrong_type(tmp_path: Path, change: object) -> None:
    d = make_plan().to_dict()
    change(d)  # type: ignore[operator]
    with pytest.raises(EdgePruneError, match="plan"):
        Plan.load(write_json(tmp_path / "plan.json", d))
