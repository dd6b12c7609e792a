"""Attention heads pruned whole: q, k and v of a head removed together, its head_dim kept, and the output
projection's input columns of that head with them.

An attention module here is one with the layout of timm's `Attention` (ViT, DeiT) and `WindowAttention` (Swin): an
int `num_heads`, a `qkv` Linear whose outputs are q, k and v one after the other, each `num_heads` heads of
`head_dim` channels, and a `proj` Linear that reads the heads' outputs in the same head order. Its group is rooted
at the qkv layer; its channels are the H·D columns `proj` reads (channel h·D + d is head h's d-th channel: q, k and v
outputs h·D + d, C + h·D + d and 2C + h·D + d); its units are the heads, so a width steps in head_dim
(`plan.width_step`) and a plan keeps whole heads (`plan.keep_first`). `proj` is its one consumer, compensated in
closed form like any Linear: the kept heads' outputs do not change when others go, so the removed heads' columns
are regressed onto the kept ones (CAP.md §3) from the statistics of proj's (B, N, C) input, tokens as samples. CaP
ranks the group in units (`scoring.registry.rank_units`): a head's score is the exact drop of proj's compensated
residual when its D columns join the kept ones together (the joint gain of its coordinate block), which accounts for
the correlation between a head's channels that a sum of per-channel losses would ignore.

The layout is checked against torch-pruning's dependency graph, not assumed: rooted at proj's input channels (as
torch-pruning's own head pruning roots it, `MetaPruner._downstream_node_as_root_if_attention`), its walk must reach
qkv's outputs c, C + c and 2C + c from proj's channel c and nothing with weights outside the attention module but a
per-head table of its own (Swin's `relative_position_bias_table`, sliced by head). `prune_heads` then slices
qkv, proj and the tables and rewrites `num_heads` (and timm's `attn_dim`), so forward() runs at the new width.

Left whole, with the reason in `Graph.excluded`: a normalisation over the heads' outputs (timm's `scale_norm`), a
gate, separate q/kv layers, per-head parameters other than a relative position bias table, and modules that call
their weights functionally (torchvision's `ShiftedWindowAttention`: head_dim is its input width over num_heads, so
fewer heads cannot keep head_dim; `nn.MultiheadAttention`: its inner width is its embed_dim).

    groups = head_groups(model, dg, names, excluded, ignored)   # in graph.trace
    prune_heads(model, group, kept)                    # in surgery.apply.prune
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgeprune.dependency.groups import Consumer, Group
from edgeprune.errors import first_line

TABLES = ("relative_position_bias_table",)  # per-head parameters sliced with the heads (last dim: the heads)


@dataclass(frozen=True)
class Heads:
    """An attention module's head layout: `heads` heads of `head_dim` channels in q, k and v each."""

    module: str
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def _layout(name: str, m: nn.Module) -> Heads | str | None:
    """The head layout of module `m`, the reason it cannot be pruned by heads, or None when it is no attention."""
    if isinstance(m, nn.MultiheadAttention):
        return ("torch's MultiheadAttention ties its inner width to embed_dim, the residual stream's width: fewer "
                "heads would change head_dim")
    qkv, proj, h = getattr(m, "qkv", None), getattr(m, "proj", None), getattr(m, "num_heads", None)
    if not isinstance(h, int) or not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return None
    width = proj.in_features
    if qkv.out_features != 3 * width or width % h:
        return f"its qkv layer makes {qkv.out_features} channels, not q, k and v of {h} heads of the {width} proj reads"
    d = width // h
    if getattr(m, "head_dim", d) != d:
        return f"its head_dim {m.head_dim} is not proj's input width {width} over its {h} heads"
    for attr in ("norm", "gate"):
        sub = getattr(m, attr, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            return f"its {attr} ({type(sub).__name__}) reads every head's output together"
    for pname, p in m.named_parameters(recurse=False):
        if pname not in TABLES:
            return f"its parameter {pname} {tuple(p.shape)} would have to follow the heads"
    return Heads(name, h, d)


def _reached(dg: Any, m: nn.Module, heads: Heads, names: dict[nn.Module, str]) -> str | None:
    """Why torch-pruning's walk from proj's input channels does not match `heads` (None when it does)."""
    import torch_pruning as tp

    proj, qkv = m.proj, m.qkv
    if proj not in dg.module2node or qkv not in dg.module2node:
        return ("it calls its layers' weights functionally (torchvision's shifted_window_attention takes head_dim "
                "as its input width over num_heads): fewer heads cannot keep head_dim")
    c = heads.width
    group = dg.get_pruning_group(proj, tp.prune_linear_in_channels, idxs=list(range(c)))
    made: dict[int, set[int]] = {}
    own = {id(p) for n, p in m.named_parameters(recurse=False) if n in TABLES}
    for item in group:
        target = item.dep.target.module
        if target is qkv and dg.is_out_channel_pruning_fn(item.dep.handler):
            for i, r in zip(item.idxs, item.root_idxs):
                made.setdefault(int(r), set()).add(int(i))
        elif isinstance(target, nn.Parameter) and id(target) not in own:
            return f"torch-pruning couples its heads with a parameter of shape {tuple(target.shape)}"
        elif isinstance(target, nn.Module) and target not in (qkv, proj) and any(True for _ in target.parameters(False)):
            inside = names.get(target, "").startswith(heads.module + ".")
            if not (inside and isinstance(target, nn.LayerNorm) and target.normalized_shape == (heads.head_dim,)):
                return f"torch-pruning couples its heads with {names.get(target, type(target).__name__)}"
    if made != {r: {r, r + c, r + 2 * c} for r in range(c)}:
        return "torch-pruning does not map proj's input channel c onto qkv's outputs c, C + c and 2C + c"
    return None


def head_groups(model: nn.Module, dg: Any, names: dict[nn.Module, str], excluded: dict[str, str],
                ignored: list[nn.Module]) -> list[Group]:
    """A `Group` for each attention module pruned by whole heads (rooted at its qkv layer, which torch-pruning's
    grouping excludes: its channels pass through the heads' permute); the others excluded with the reason. An
    attention whose qkv or proj `ignored` holds (--ignore, output layers) is left whole."""
    skip = {id(x) for x in ignored}
    groups = []
    for name, m in model.named_modules():
        found = _layout(name, m)
        if found is None:
            continue
        key = f"{name}.qkv" if hasattr(m, "qkv") else name
        if isinstance(found, Heads) and ({id(m.qkv), id(m.proj)} & skip or
                                         (m.qkv in dg.module2node and key not in excluded)):
            continue  # an --ignore or output layer, or grouped some other way: left as it is
        try:
            reason = found if isinstance(found, str) else _reached(dg, m, found, names)
        except (IndexError, ValueError, KeyError, RuntimeError) as e:  # torch-pruning's walk failed: left whole
            reason = f"torch-pruning cannot follow its heads ({type(e).__name__}: {first_line(e, 80)})"
        if reason is not None:
            excluded[key] = f"attention heads of {name or type(m).__name__}: {reason}"
            continue
        excluded.pop(key, None)
        c, d = found.width, found.head_dim
        proj = Consumer(module=f"{name}.proj", coords=tuple((j,) for j in range(c)), compensable=True,
                        bn_follows=False)
        groups.append(Group(name=key, channels=c, producers=(key,), consumers=(proj,), members=(),
                            produces=(tuple(range(c)) * 3,), units=tuple(tuple(range(h * d, (h + 1) * d))
                                                                     for h in range(found.heads)), heads=name))
    return groups


def prune_heads(model: nn.Module, group: Group, kept: tuple[int, ...]) -> None:
    """Keep the heads of `group` (a head group) whose channels `kept` lists: qkv's q, k and v rows of those heads,
    proj's columns, the per-head tables' columns; `num_heads` (and `attn_dim`) rewritten."""
    m = model.get_submodule(group.heads)
    c, d = group.channels, group.unit
    heads = sorted({ch // d for ch in kept})
    cols = torch.tensor([h * d + j for h in heads for j in range(d)])
    rows = torch.cat([cols + k * c for k in range(3)])
    with torch.no_grad():
        _slice(m.qkv, rows, 0)
        _slice(m.proj, cols, 1)
        for t in TABLES:
            if isinstance(getattr(m, t, None), nn.Parameter):
                setattr(m, t, nn.Parameter(getattr(m, t)[..., heads].clone()))
    m.qkv.out_features, m.proj.in_features = len(rows), len(cols)
    m.num_heads = len(heads)
    if hasattr(m, "attn_dim"):
        m.attn_dim = len(cols)


def _slice(layer: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    layer.weight = nn.Parameter(layer.weight.index_select(dim, idx).clone())
    if dim == 0 and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[idx].clone())
