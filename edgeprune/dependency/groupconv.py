"""Grouped convolutions, pruned in whole groups.

A grouped conv X (groups=G, neither dense nor depthwise) couples its input channels with its output channels group by
group: removing one input channel of a group would leave the group's kernels a different width from the others, which
a conv cannot express. torch-pruning sees two separate channel groups around X, the one X reads (rooted at the conv
before it) and the one X makes (rooted at X), and slices X's input within every group at once. edgeprune instead
merges the two into one group whose *units* are X's groups: a unit is removed whole (its input channels, X's kernels
for it, its output channels and whatever follows them), X keeps G' < G groups of the same width, and the consumers
after X are compensated for the output channels lost, exactly as for any other group (CAP.md §3). X itself is a
member: nothing upstream of it changes for the units kept, so it needs no repair.

This is what ResNeXt's 32x4d bottleneck and RegNetX's grouped 3x3 are: 1x1 conv -> BN -> grouped 3x3 -> BN -> 1x1
conv, and RegNetY's, whose grouped conv's output is also gated by a squeeze-excite (the gate's last layer is then a
producer of the merged group). Cases outside that shape (a grouped conv whose output is added to another branch, one
reading several groups, input and output widths that differ) stay excluded, each with its reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_dense(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def is_grouped(m: nn.Module) -> bool:
    """A conv with groups that is neither dense nor depthwise."""
    return isinstance(m, nn.Conv2d) and not is_dense(m) and not is_depthwise(m)


def reroot(dg: Any, root: nn.Module, group: Any) -> Any:
    """`group` (torch-pruning's, rooted at `root`) rooted instead at a dense producer that makes every channel of
    `root` from fewer channels of its own; `group` itself when there is none. GhostNet's ghost module concatenates a
    conv's output x1 with a depthwise conv of x1: channels i and i + C of the concat are one channel of that conv,
    removed only together. Rooted at a layer after the concat (a depthwise conv, a squeeze-excite gate's last conv),
    torch-pruning lists the conv once, at one of its two positions, and a plan could keep none of its channels;
    rooted at the conv, each of its channels lists both. Tried only when the producers narrower than `root` leave some
    of its channels unmade (a concat's branches make all of them between them)."""
    channels = len(group[0].idxs)
    partial, made = [], set()
    for item in group:
        m = item.dep.target.module
        if m is not root and dg.is_out_channel_pruning_fn(item.dep.handler) and is_dense(m) \
                and _out_channels(dg, m) < channels:
            partial.append(m)
            made.update(int(r) for r in item.root_idxs)
    if len(made) == channels:
        return group
    for m in dict.fromkeys(partial):
        pruner = dg.get_pruner_of_module(m)
        alt = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(_out_channels(dg, m))))
        if len({int(i) for it in alt if it.dep.target.module is root and dg.is_out_channel_pruning_fn(it.dep.handler)
                for i in it.idxs}) == channels:
            return alt
    return group


def _out_channels(dg: Any, m: nn.Module) -> int:
    return dg.get_pruner_of_module(m).get_out_channels(m) or 0


Feeds = list[tuple[str, dict[int, int]]]  # (grouped conv, {its input channel: the group channel it is})


def merge_grouped(groups: list[Any], fed: dict[str, Feeds], modules: dict[str, nn.Module],
                  excluded: dict[str, str]) -> list[Any]:
    """`groups` with each group that feeds a grouped conv merged with the group that conv makes (units: its groups);
    the groups that cannot be merged go to `excluded` with their reason."""
    by_name = {g.name: g for g in groups}
    made_by = {p: g for g in groups for p in g.producers}  # the group a conv's output channels are in
    readers: dict[str, list[str]] = {}
    for name, feeds in fed.items():
        for conv, _ in feeds:
            readers.setdefault(conv, []).append(name)
    merged: dict[str, Any] = {}
    for name, feeds in fed.items():
        conv, pairs = feeds[0]
        why = _why_not(by_name[name], feeds, made_by.get(conv), readers, fed, modules, excluded)
        if why is not None:
            excluded[name] = why
            continue
        merged[name] = _merge(by_name[name], made_by[conv], conv, pairs, modules[conv])
    absorbed = {made_by[feeds[0][0]].name for name, feeds in fed.items() if name in merged}
    out = []
    for g in groups:
        grouped = [p for p in g.producers if is_grouped(modules[p])]
        if g.name in absorbed or g.name in excluded:
            continue
        if grouped and g.name not in merged:
            excluded[g.name] = (f"{grouped[0]} is a grouped conv (groups={modules[grouped[0]].groups}) whose input "
                                "channels cannot be removed with these output channels, group by group")
            continue
        out.append(merged.get(g.name, g))
    return out


def _why_not(a: Any, feeds: Feeds, b: Any, readers: dict[str, list[str]], fed: dict[str, Feeds],
             modules: dict[str, nn.Module], excluded: dict[str, str]) -> str | None:
    """Why group `a` cannot be pruned in whole groups of the grouped conv it feeds; None when it can."""
    conv = feeds[0][0]
    m = modules[conv]
    lead = f"it feeds the grouped conv {conv} (groups={m.groups})"
    if a.pieces or (b is not None and b.pieces):
        return f"{lead}, and a split along channels cuts these channels into pieces: not pruned in both at once"
    if len(feeds) > 1:
        return f"it feeds {len(feeds)} grouped convs ({', '.join(c for c, _ in feeds)}), whose groups need not align"
    if any(is_grouped(modules[p]) for p in a.producers):
        return f"{lead} and is itself made by a grouped conv: chained grouped convs are not pruned"
    if len(readers[conv]) > 1:
        return f"{lead}, which also reads the groups {', '.join(r for r in readers[conv] if r != a.name)}"
    if m.in_channels != m.out_channels:
        return f"{lead}, whose input and output widths differ ({m.in_channels} -> {m.out_channels})"
    if a.channels != m.in_channels or sorted(feeds[0][1]) != list(range(m.in_channels)):
        return f"{lead}, which reads only part of these channels"
    if b is None:
        return f"{lead}, whose output channels cannot be pruned: {excluded.get(conv, 'they are not a group')}"
    others = [p for p in b.producers if p != conv]
    circular = set(a.producers) & {c.module for c in b.consumers}  # a residual stream feeding back into `a`
    if circular or any(is_grouped(modules[p]) for p in others) or \
            (others and (not b.produces or any(len(set(made)) != b.channels for made in b.produces))):
        return f"{lead}, whose output channels are coupled with {', '.join(others)}"
    if b.name in fed:
        return f"{lead}, whose output feeds another grouped conv: chained grouped convs are not pruned"
    return None


def _merge(a: Any, b: Any, name: str, pairs: dict[int, int], conv: nn.Conv2d) -> Any:
    """Group `a` (read by `conv`) and group `b` (made by `conv`) as one group of `a`'s channels, in units of `conv`'s
    groups. Channel r of `a` is `conv`'s input i = pairs^-1(r); the output channel i of the same conv group stands for it
    in `b`'s consumers (within a unit, which one stands for which does not matter: a unit goes whole)."""
    per = conv.in_channels // conv.groups
    made = dict(zip(b.producers, b.produces)) if b.produces else {name: tuple(range(b.channels))}
    out_channel = dict(enumerate(made[name]))
    a_channel = {ch: pairs[o] for o, ch in out_channel.items()}  # b's channel -> a's channel
    consumers = []
    for c in b.consumers:
        coords = [()] * a.channels
        for i, r in pairs.items():
            coords[r] = c.coords[out_channel[i]]
        consumers.append(dataclasses.replace(c, coords=tuple(coords)))
    units = tuple(tuple(sorted(pairs[i] for i in range(k * per, (k + 1) * per))) for k in range(conv.groups))
    members = tuple(dict.fromkeys((*a.members, name, *b.members)))
    # producers of b's channels besides the conv (a squeeze-excite gate's last layer, RegNetY) make a's channels
    others = [(p, tuple(a_channel[ch] for ch in m)) for p, m in made.items() if p != name]
    produces = (a.produces or (tuple(range(a.channels)),) * len(a.producers)) + tuple(m for _, m in others)
    return dataclasses.replace(a, consumers=(*a.consumers, *consumers), members=members, units=units,
                               producers=(*a.producers, *(p for p, _ in others)), produces=produces)
