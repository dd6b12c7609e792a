from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgeprune.dependency.graph import Graph, trace
from edgeprune.errors import EdgePruneError
from edgeprune.inputs.models import load_model
from tests.models import ZOO, ZooEntry

ZOO_PARAMS = [pytest.param(e, id=n) for n, e in ZOO.items()]


def traced(entry: ZooEntry, ignore: tuple[str, ...] = ()) -> tuple[nn.Module, Graph]:
    model = entry.build()
    return model, trace(model, entry.example_input(), ignore)


def execution_order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Position of each conv/linear in the order forward() first runs it."""
    order: dict[str, int] = {}

    def seen(name: str) -> None:
        order.setdefault(name, len(order))

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: seen(n))
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return order


@pytest.fixture(scope="module")
def torchvision_graphs() -> dict[str, tuple[nn.Module, torch.Tensor, Graph]]:
    out = {}
    for name in ("resnet18", "mobilenet_v2"):
        loaded = load_model(f"torchvision:{name}", input_shape=(1, 3, 64, 64))
        out[name] = (loaded.module, loaded.example_input, trace(loaded.module, loaded.example_input))
    return out


@pytest.mark.parametrize("entry", ZOO_PARAMS)
def test_trace_finds_expected_groups(entry: ZooEntry) -> None:
    model, graph = traced(entry)
    entry.check_graph(graph, model)


@pytest.mark.parametrize("entry", ZOO_PARAMS)
def test_trace_every_channel_has_coords_in_every_consumer_once(entry: ZooEntry) -> None:
    """Across all groups, a consumer's coordinates are disjoint, and cover its whole input when nothing is excluded."""
    model, graph = traced(entry)
    modules = dict(model.named_modules())
    seen: dict[str, list[int]] = {}
    for g in graph.groups:
        for c in g.consumers:
            seen.setdefault(c.module, []).extend(i for ch in c.coords for i in ch)
    for name, coords in seen.items():
        assert len(coords) == len(set(coords)), name
        w = modules[name].weight
        if not graph.excluded:
            assert sorted(coords) == list(range(w[0].numel())), name


def test_trace_residual_stream_is_one_group_with_all_its_producers() -> None:
    _, graph = traced(ZOO["residual"])
    stream = [g for g in graph.groups if "stem.0" in g.producers]
    assert len(stream) == 1
    assert set(stream[0].producers) == {"stem.0", "block1.conv2", "block2.conv2"}
    assert {c.module for c in stream[0].consumers} == {"block1.conv1", "block2.conv1", "fc"}
    # no producer of the stream is the producer of any other group
    others = {p for g in graph.groups if g is not stream[0] for p in g.producers}
    assert not others & set(stream[0].producers)


def test_trace_depthwise_conv_is_member_not_consumer() -> None:
    _, graph = traced(ZOO["depthwise"])
    g = next(g for g in graph.groups if "stem.0" in g.producers)
    assert "dw.0" in g.members and "dw.1" in g.members
    assert [c.module for c in g.consumers] == ["pw.0"]
    assert all(c.module != "dw.0" for grp in graph.groups for c in grp.consumers)
    assert all("dw.0" not in grp.producers for grp in graph.groups)


def test_trace_se_fc1_consumes_and_fc2_produces_the_gated_group() -> None:
    _, graph = traced(ZOO["se"])
    gated = next(g for g in graph.groups if "conv.0" in g.producers)
    assert set(gated.producers) == {"conv.0", "se.fc2"}
    assert {c.module for c in gated.consumers} == {"se.fc1", "proj.0"}
    squeeze = graph.group("se.fc1")
    assert squeeze.producers == ("se.fc1",) and [c.module for c in squeeze.consumers] == ["se.fc2"]
    # fc1 reads a 1x1 pooled map: one coordinate per channel; proj.0 reads 3x3 patches
    fc1 = next(c for c in gated.consumers if c.module == "se.fc1")
    assert fc1.coords == tuple((j,) for j in range(16)) and not fc1.bn_follows
    proj = next(c for c in gated.consumers if c.module == "proj.0")
    assert proj.coords[3] == tuple(range(27, 36)) and proj.bn_follows


def test_trace_concat_consumer_coords_are_offset_by_first_branch_width() -> None:
    _, graph = traced(ZOO["concat"])
    a = next(c for c in graph.group("branch_a.0").consumers if c.module == "fuse.0")
    b = next(c for c in graph.group("branch_b.0").consumers if c.module == "fuse.0")
    k2 = 9
    assert a.coords[0] == tuple(range(0, k2)) and a.coords[-1] == tuple(range(5 * k2, 6 * k2))
    assert b.coords[0] == tuple(range(6 * k2, 7 * k2))  # first branch is 6 channels wide
    assert b.coords[-1] == tuple(range(15 * k2, 16 * k2))


def test_trace_linear_after_flatten_maps_each_channel_to_its_spatial_features() -> None:
    _, graph = traced(ZOO["flatten_head"])
    fc1 = graph.group("conv2.0").consumers[0]
    assert fc1.module == "fc1" and not fc1.bn_follows
    assert fc1.coords == tuple(tuple(range(4 * j, 4 * j + 4)) for j in range(8))


def test_trace_bn_follows_only_convs_read_by_a_batchnorm() -> None:
    _, graph = traced(ZOO["chain"])
    bn = {c.module: c.bn_follows for g in graph.groups for c in g.consumers}
    assert bn == {"conv2.0": True, "conv3.0": True, "fc": False}


@pytest.mark.parametrize("entry", ZOO_PARAMS)
def test_trace_excludes_output_layer(entry: ZooEntry) -> None:
    model, graph = traced(entry)
    assert graph.output_layers == entry.output_layers
    for out in entry.output_layers:
        assert all(out not in g.producers for g in graph.groups) and out not in graph.excluded
        with pytest.raises(EdgePruneError, match=f"no prunable group '{out}'"):
            graph.group(out)


@pytest.mark.parametrize("pattern", ["block1.*", "re:block1\\.conv\\d"])
def test_trace_ignore_pattern_excludes_group(pattern: str) -> None:
    _, full = traced(ZOO["residual"])
    _, graph = traced(ZOO["residual"], ignore=(pattern,))
    assert [g.name for g in full.groups] == ["stem.0", "block1.conv1", "block2.conv1"]
    # block1.conv1's group is gone; the stream is gone too, since block1.conv2 is one of its producers
    assert [g.name for g in graph.groups] == ["block2.conv1"]


def test_trace_ignore_regex_must_match_whole_name() -> None:
    _, graph = traced(ZOO["residual"], ignore=("re:conv1",))  # matches no full name
    assert [g.name for g in graph.groups] == ["stem.0", "block1.conv1", "block2.conv1"]
    _, graph = traced(ZOO["residual"], ignore=("re:.*conv1",))
    assert [g.name for g in graph.groups] == ["stem.0"]


def test_trace_ignore_fnmatch_leaves_other_groups_identical() -> None:
    _, full = traced(ZOO["concat"])
    _, graph = traced(ZOO["concat"], ignore=("branch_b*",))
    assert [g.name for g in graph.groups] == ["stem.0", "branch_a.0", "fuse.0"]
    for g in graph.groups:
        assert g == full.group(g.name)


def test_graph_group_unknown_name_lists_groups() -> None:
    _, graph = traced(ZOO["chain"])
    with pytest.raises(EdgePruneError, match="no prunable group 'nope'; groups: conv1.0, conv2.0, conv3.0"):
        graph.group("nope")


def test_graph_consumer_modules_each_once_in_group_order() -> None:
    _, graph = traced(ZOO["concat"])
    # fuse.0 reads two groups (both branches) but is listed once
    assert sorted(graph.consumer_modules()) == ["branch_a.0", "branch_b.0", "fc", "fuse.0"]
    assert len(graph.consumer_modules()) == 4


def test_trace_raises_when_forward_output_is_not_traceable() -> None:
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
            return self.fc(self.conv(x).mean((2, 3))), 0

    with pytest.raises(EdgePruneError, match="torch-pruning cannot trace TupleOut") as info:
        trace(TupleOut().eval(), torch.randn(1, 3, 16, 16))
    assert "TypeError" in str(info.value)


# ---------------------------------------------------------------- forward order


FORWARD_ORDER = [pytest.param(ZOO[n], id=n) for n in ZOO if n != "se"] + [
    pytest.param(ZOO["se"], id="se")]


@pytest.mark.parametrize("entry", FORWARD_ORDER)
def test_trace_groups_are_in_forward_order(entry: ZooEntry) -> None:
    """Graph's documented contract ("groups in forward order"): the order the search walks the groups in."""
    model, graph = traced(entry)
    pos = execution_order(model, entry.example_input())
    first = [min(pos[p] for p in g.producers) for g in graph.groups]
    assert first == sorted(first), [g.name for g in graph.groups]


def test_trace_groups_are_in_forward_order_on_mobilenet_v2(torchvision_graphs: dict) -> None:
    model, x, graph = torchvision_graphs["mobilenet_v2"]
    pos = execution_order(model, x)
    first = [min(pos[p] for p in g.producers) for g in graph.groups]
    assert first == sorted(first), [g.name for g in graph.groups]


# ---------------------------------------------------------------- torchvision


def test_trace_resnet18_has_one_joint_group_per_stage_stream(torchvision_graphs: dict) -> None:
    _, _, graph = torchvision_graphs["resnet18"]
    assert len(graph.groups) == 12 and graph.excluded == {} and graph.output_layers == ("fc",)
    joint = {g.name: set(g.producers) for g in graph.groups if len(g.producers) > 1}
    assert joint == {
        "conv1": {"conv1", "layer1.0.conv2", "layer1.1.conv2"},
        "layer2.0.downsample.0": {"layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"},
        "layer3.0.downsample.0": {"layer3.0.downsample.0", "layer3.0.conv2", "layer3.1.conv2"},
        "layer4.0.downsample.0": {"layer4.0.downsample.0", "layer4.0.conv2", "layer4.1.conv2"},
    }
    # every other group is one block's internal channels: conv1 -> bn1 -> conv2
    for g in graph.groups:
        if g.name not in joint:
            assert g.name.endswith(".conv1") and g.producers == (g.name,)
            assert [c.module for c in g.consumers] == [g.name[:-1] + "2"]
    stream4 = graph.group("layer4.0.downsample.0")
    assert {c.module for c in stream4.consumers} == {"layer4.1.conv1", "fc"}
    assert all(c.compensable for g in graph.groups for c in g.consumers)


def test_trace_mobilenet_v2_joins_every_residual_stream(torchvision_graphs: dict) -> None:
    model, _, graph = torchvision_graphs["mobilenet_v2"]
    assert len(graph.groups) == 25 and graph.excluded == {} and graph.output_layers == ("classifier.1",)
    # a stage of n inverted-residual blocks with stride 1 shares one stream among its n projection convs
    stages = [(2, 3), (4, 5, 6), (7, 8, 9, 10), (11, 12, 13), (14, 15, 16)]
    joint = sorted(sorted(g.producers) for g in graph.groups if len(g.producers) > 1)
    assert joint == sorted(sorted(f"features.{i}.conv.2" for i in s) for s in stages)
    for g in graph.groups:
        if len(g.producers) == 1 and "conv.0.0" in g.producers[0]:  # expansion -> depthwise -> projection
            i = g.producers[0].split(".")[1]
            assert f"features.{i}.conv.1.0" in g.members and g.name == f"features.{i}.conv.1.0"
            assert [c.module for c in g.consumers] == [f"features.{i}.conv.2"]
    # depthwise convs are members, never consumers
    depthwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert len(depthwise) == 17
    assert not depthwise & {c.module for g in graph.groups for c in g.consumers}
    assert depthwise <= {m for g in graph.groups for m in g.members}


def test_trace_error_names_the_model_and_what_torch_pruning_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """When torch-pruning's dependency build itself fails (as it did on shufflenet_v2 before the guard below), the
    error is one line naming the model and torch-pruning's exception."""
    import torch_pruning as tp

    def fails(self: object, model: nn.Module, example_inputs: object, **kw: object) -> None:
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    model = ZOO["chain"].build()
    with pytest.raises(EdgePruneError, match="cannot trace ConvChain: .*ZeroDivisionError: integer division") as e:
        trace(model, ZOO["chain"].example_input())
    assert "\n" not in str(e.value)


def test_channel_shuffle_traces_with_the_groups_through_it_excluded() -> None:
    """shufflenet_v2 was refused (torch-pruning divides by zero mapping the shuffle's 5-D view): now the trace goes
    on, the groups inside each branch are prunable, and the groups through the shuffle (split halves, transposed
    channels) are excluded with their reason; a pruned copy runs with the original's output shape."""
    import torchvision

    from edgeprune.plan import Plan
    from edgeprune.surgery.apply import prune

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = trace(model, x)
    inner = [g for g in graph.groups if ".branch2.3" in g.name]  # each block's 1x1 -> depthwise -> 1x1 middle
    assert len(inner) == 16 and all(f"{g.name[:-1]}5" in [c.module for c in g.consumers] for g in inner)
    assert graph.excluded and all("torch-pruning cannot follow its channels" in why or "Transpose" in why
                                  or "split" in why or "reshape of a" in why for why in graph.excluded.values())
    assert all(".branch2.5" not in g.name for g in graph.groups)  # a block's output goes through the shuffle
    plan = Plan(kept={g.name: tuple(range(g.channels // 2)) for g in inner},
                channels={g.name: g.channels for g in graph.groups}, compensation=False)
    pruned = prune(model, x, plan, graph=graph)
    assert pruned.stage2[0].branch2[3].groups == inner[0].channels // 2
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


class _LogitsAndFeatures(nn.Module):
    """Returns {"logits", "feat"}: the feature map is returned and also read by the head (audit case M21)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.b2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = torch.relu(self.b2(self.c2(torch.relu(self.c1(x)))))
        return {"logits": self.fc(f.mean((2, 3))), "feat": f}


def test_trace_keeps_the_channels_of_a_feature_map_the_model_also_returns(tmp_path) -> None:  # noqa: ANN001
    import edgeprune

    torch.manual_seed(0)
    model = _LogitsAndFeatures().eval()
    graph = trace(model, torch.randn(1, 3, 16, 16))
    assert set(graph.output_layers) == {"c2", "fc"}  # c2's channels are what "feat" returns
    assert [g.name for g in graph.groups] == ["c1"]
    # the whole prune: the pruned model returns a feature map of the same shape (was: RuntimeError 16 vs 32)
    result = edgeprune.prune(model, ratio=0.5, calibration=torch.randn(64, 3, 16, 16), out=tmp_path / "p")
    out = result.module(torch.randn(2, 3, 16, 16))
    assert out["feat"].shape == (2, 32, 16, 16) and out["logits"].shape == (2, 10)
    assert result.report["widths"] == {"c1": {"before": 32, "after": 16}}
    assert set(result.fidelity.per_output) == {"logits", "feat"}


class _Ghost(nn.Module):
    """GhostNet's ghost module (a conv's output x1 concatenated with a depthwise conv of x1), gated by a
    squeeze-excite and followed by a depthwise conv, as in timm's strided GhostBottleneck (issue 31)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.primary = nn.Conv2d(16, 16, 1)
        self.cheap = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1 = nn.Conv2d(32, 8, 1)
        self.fc2 = nn.Conv2d(8, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32)
        self.proj = nn.Conv2d(32, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = torch.relu(self.primary(torch.relu(self.stem(x))))
        x = torch.cat([x1, torch.relu(self.cheap(x1))], 1)
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(torch.relu(self.proj(self.dw(x))).mean((2, 3)))


def test_trace_roots_a_ghost_module_at_its_primary_conv(tmp_path: Path) -> None:
    """Channels i and i + 16 of the concat are one channel of `primary`: one group channel, removed together. Rooted
    after the concat (at `dw` or `fc2`), the group listed `primary` at one of its two positions, and a plan could
    keep none of its channels (a conv with 0 outputs at the first forward pass)."""
    import edgeprune

    torch.manual_seed(0)
    model = _Ghost().eval()
    g = trace(model, torch.randn(1, 3, 16, 16)).group("primary")
    assert g.channels == 16 and set(g.producers) == {"primary", "fc2"} and not g.branches
    assert {"cheap", "dw"} <= set(g.members)
    proj = next(c for c in g.consumers if c.module == "proj")
    assert proj.coords == tuple((i, i + 16) for i in range(16))
    result = edgeprune.prune(model, ratio=0.5, calibration=torch.randn(64, 3, 16, 16), out=tmp_path / "p")
    assert result.module.primary.out_channels == 8 and result.module.dw.out_channels == 16
    assert result.module(torch.randn(2, 3, 16, 16)).shape == (2, 10)


class _SubsampledTokens(nn.Module):
    """LeViT's downsampling attention: tokens (B, N, C) viewed as a grid, strided, reshaped back, read by q."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.q = nn.Linear(16, 12)
        self.kv = nn.Linear(16, 12)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fc1(x)  # (B, 16 tokens, 16 channels)
        b, n, c = t.shape
        sub = t.view(b, 4, 4, c)[:, ::2, ::2].reshape(b, -1, c)
        return self.head(torch.cat([self.q(sub).mean(1), self.kv(t).mean(1)], 1))


def test_a_consumer_torch_pruning_maps_onto_half_its_inputs_excludes_the_group() -> None:
    """levit_128s exited 1 with a shape error in its first candidate: torch-pruning mapped the residual stream through
    the Subsample (view, strided slice, reshape) onto half of q's inputs, and the group was pruned with a consumer that
    did not read it channel by channel. Now such a group is excluded with its reason, and every kept group gives each
    channel a coordinate in each consumer."""
    torch.manual_seed(0)
    model = _SubsampledTokens().eval()
    graph = trace(model, torch.randn(2, 16, 8))
    assert "does not map channel by channel" in graph.excluded["fc1"]
    assert all(all(c.coords) for g in graph.groups for c in g.consumers)
