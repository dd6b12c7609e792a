"""Build reports: `report.json` (the machine contract of DESIGN.md §4), `report.md`, and PNG plots with matplotlib.

    write_report(out_dir, report)    # report: a contract.BuildReport (`jobs.delivery.release_report`)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.report.contract import BuildReport

if TYPE_CHECKING:  # torch: not at module level (`clean` needs none)
    import torch

    from edgeprune.inputs.models import LoadedModel
    from edgeprune.inputs.targets import Target
    from edgeprune.runtimes.stats import LatencyStats


def _clean(obj: Any, path: str = "", found: dict[str, str] | None = None) -> Any:
    """NaN and infinities become null, and `found` records where and what they were: strict JSON parsers (and CI
    tools) reject bare NaN."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if found is not None:
            found[path] = "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return None
    if isinstance(obj, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def clean(report: dict[str, Any]) -> dict[str, Any]:
    """The report with every non-finite number replaced by null and listed under `non_finite` (key path -> "nan",
    "inf" or "-inf"): the reason a value is null."""
    found: dict[str, str] = {}
    out = _clean(report, found=found)
    if found:
        out["non_finite"] = {**out.get("non_finite", {}), **found}
    return out


def latency_entry(stats: LatencyStats, module: torch.nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """A model's row of the report: its latency on the target, where the figure came from, MACs and parameters."""
    from edgeprune.report.artifacts import model_size  # imports torch: not at module level (`clean` needs none)

    return {"latency_ms": stats.summary(), "latency_source": stats.source, **model_size(module, example)}


def int8_entries(target: Target, quantization: dict[str, Any] | None, base_float: LatencyStats | None,
                 final: LatencyStats, loaded: LoadedModel) -> dict[str, Any]:
    """An int8 release's rows (none for a float one): `quantization` (the target's settings, the float pruned
    model's fidelity, what quantisation alone cost: `gates.Assessment.quantization`), and the unpruned float model's
    latency on the target's float variant with the speed-up over it (`base_float`; None: not measured)."""
    if quantization is None:
        return {}
    settings = dataclasses.asdict(target.quantization) if target.quantization is not None else None
    extra: dict[str, Any] = {"quantization": {"settings": settings, **quantization}}
    if base_float is not None:
        extra.update(base_float=latency_entry(base_float, loaded.module, loaded.example_input),
                     speedup_over_float=base_float.median / final.median)
    return extra


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(clean(report), indent=2, allow_nan=False)


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f} ms"


def _num(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, fmt)


def render_markdown(report: BuildReport | dict[str, Any], plots: list[str]) -> str:
    """report.md of a report (a report.json dict is read as its type)."""
    r = report if isinstance(report, BuildReport) else BuildReport.from_dict(report)
    b, f = r.base, r.final
    lines = [
        f"# edgeprune {r.command or 'build'}: {r.model} on {r.target}",
        "",
        f"**Budget {r.budget} = {_ms(r.budget_ms)}: {'met' if r.met else 'NOT met'}** "
        f"(exit code {r.exit_code}). Final latency {_ms(f['latency_ms']['median'])} against "
        f"{_ms(b['latency_ms']['median'])} unpruned: {_num(r.speedup, '.2f')}x faster."
        + (" Candidates and the final model were measured session by session beside the unpruned model and are "
           "given in the units of its figure (the target's `interleave`)." if r.interleaved else ""),
        "",
        "| | latency median | p90 | std | n | MACs | params |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = (("unpruned", b), ("final", f)) + ((("unpruned float", r.base_float),) if r.base_float else ())
    for name, row in rows:
        lat = row["latency_ms"]
        lines.append(f"| {name} | {_ms(lat['median'])} | {_ms(lat['p90'])} | {_ms(lat['std'])} | {lat['n']} | "
                     f"{row['macs'] / 1e6:.1f} M | {row['params'] / 1e6:.3f} M |")
    fid = r.fidelity
    lines += ["", "## Fidelity (held-out data, never used for statistics)", "",
              f"- top-1 agreement with the unpruned model: {_num(fid['top1_agreement'], '.2f', 100)}% of "
              f"{fid['samples']} samples",
              f"- output relative error: {_num(fid['output_rel_error'], '.4f')}"]
    if fid.get("nonfinite"):
        lines.append(f"- **{fid['nonfinite']} held-out samples give non-finite outputs** (NaN or infinity)")
    if fid.get("accuracy"):
        a = fid["accuracy"]
        lines.append(f"- accuracy: {_num(a['before'], '.2f', 100)}% -> {_num(a['after'], '.2f', 100)}% "
                     f"({_num(a['drop_pp'], '.2f')} points lost)")
    if r.metric:
        m = r.metric
        lines.append(f"- your metric (evaluate): {_num(m['before'], '.4g')} -> {_num(m['after'], '.4g')} "
                     f"(drop {_num(m['drop'], '.4g')})")
    if r.widths_from:
        lines.append(f"- released as given, widths from {r.widths_from}")
    lines += int8_markdown(r)
    for k, g in r.quality_gates.items():
        lines.append(f"- gate {k}: {_num(g['value'], '.4g')} against {_num(g['limit'], '.4g')}: "
                     f"{'passed' if g['passed'] else 'FAILED'}")
    s = r.search
    lines += ["", "## Search", "",
              f"Criterion `{s['criterion']}`, compensation {'on' if s['compensation'] else 'off'}, proxy "
              f"`{s['proxy']}`, channel multiple {s['channel_multiple']}, tolerance {100 * s['tolerance']:.0f}%, "
              f"{s['measured_candidates']} measured candidates"
              + (f", {s['proxy_evaluations']} proxy evaluations" if "proxy_evaluations" in s else "")
              + f", {'converged' if s['converged'] else 'not converged'}."]
    lines += input_size_markdown(s.get("input_size"))
    if r.lut_check:  # the --lut table's stored self-check (`latency.table.stored_check`)
        c = r.lut_check
        lines += ["", f"Latency table `{c['table']}`: {c['line']}." + (f" **{c['warning']}**" if c["warning"] else "")]
    lines += ["", "| step | strength | latency | source | widths |", "|---|---|---|---|---|"]
    for c in s["trace"]:
        lines.append(f"| {c['step']} | {_num(c['strength'], '.4f')} | {_ms(c['latency_ms'])} | {c['source']} | "
                     f"`{c['widths_digest']}` |")
    lines += ["", "## Widths per group", "", "| group | before | after |", "|---|---|---|"]
    for g, w in r.widths.items():
        lines.append(f"| `{g}` | {w['before']} | {w['after']} |")
    lines += ["", "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {_num(v, '.2f')} |" for k, v in r.timings_s.items()]
    if r.non_finite:
        lines += ["", "## Non-finite values", "", "Reported as null in report.json:", ""]
        lines += [f"- `{k}`: {v}" for k, v in r.non_finite.items()]
    lines += ["", "(`search` includes the prune, export and measure time of its candidates.)"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in r.versions.items()]
    return "\n".join(lines) + "\n"


def int8_markdown(r: BuildReport) -> list[str]:
    """The lines an int8 release adds under Fidelity: the figures above are the quantised model's; these are the
    float pruned model's and what quantisation alone cost."""
    q = r.quantization
    if not q:
        return []
    s, fl, qa = q.get("settings") or {}, q["float"], q["against_float"]
    lines = [(f"- int8 ({s.get('method')} calibration on {s.get('samples')} samples, {s.get('activations')} "
              f"activations): the figures above are the quantised model's, run in ONNX Runtime"),
             (f"- the float pruned model: top-1 agreement {_num(fl['top1_agreement'], '.2f', 100)}%, output error "
              f"{_num(fl['output_rel_error'], '.4f')}")]
    if fl.get("accuracy"):
        lines[-1] += f", accuracy {_num(fl['accuracy']['after'], '.2f', 100)}%"
    lines.append(f"- quantisation alone: top-1 agreement with the float pruned model "
                 f"{_num(qa['top1_agreement'], '.2f', 100)}%, output error {_num(qa['output_rel_error'], '.4f')}, "
                 f"accuracy cost {_num(qa['accuracy_drop_pp'], '.2f')} points")
    if r.speedup_over_float is not None and r.base_float is not None:
        lines.append(f"- {_num(r.speedup_over_float, '.2f')}x faster than the unpruned float model "
                     f"({_ms(r.base_float['latency_ms']['median'])})")
    return lines


def plot(out: Path, r: BuildReport) -> list[str]:
    """search.png (latency per step against the budget) and widths.png; nothing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import logging

        from edgeprune.common.resources import install_hint

        logging.getLogger(__name__).info("no plots in report.md: they need matplotlib, which is not installed: %s",
                                         install_hint("report"))
        return []
    trace = r.search["trace"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["step"] for c in trace], [c["latency_ms"] for c in trace], "o-", label="candidate latency")
    ax.axhline(r.budget_ms, color="red", linestyle="--", label="budget")
    ax.axhspan(r.budget_ms * (1 - r.search["tolerance"]), r.budget_ms, color="green", alpha=0.15,
               label="target band")
    ax.set_xlabel("search step")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{r.model} on {r.target}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "search.png", dpi=100)
    plt.close(fig)
    names = list(r.widths)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.25), 3.5))
    xs = range(len(names))
    ax.bar(xs, [r.widths[n]["before"] for n in names], color="lightgray", label="before")
    ax.bar(xs, [r.widths[n]["after"] for n in names], color="tab:blue", label="after")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "widths.png", dpi=100)
    plt.close(fig)
    return ["search.png", "widths.png"]


def write_report(out: Path, report: BuildReport) -> None:
    """report.json, the plots and report.md (its figures those of report.json: non-finite ones given as n/a)."""
    out = Path(out)
    (out / "report.json").write_text(to_json(report.to_dict()) + "\n")
    plots = plot(out, report)
    (out / "report.md").write_text(render_markdown(BuildReport.from_dict(clean(report.to_dict())), plots))


def input_size_markdown(sized: dict[str, Any] | None) -> list[str]:
    """The input sizes a build measured against its channel release (`jobs/rescale.py`)."""
    if not sized or not sized.get("searched"):
        return [] if not sized else ["", f"Input size not searched: {sized['reason']}."]
    ch = sized["channels"]
    chosen = sized["chosen"]
    lines = ["", ("**Released at input size " + "x".join(map(str, chosen)) + "** (resized inside the model; the input "
                  "shape is unchanged): it keeps more than the pruned channels." if chosen else
                  "Released with pruned channels: no input size measured kept more."),
             "", f"Judged on {sized['judged_on']}.", "",
             "| release | latency | within budget | top-1 agreement | KL | output error |", "|---|---|---|---|---|---|"]
    for name, t in [("channels pruned", ch)] + [("input " + "x".join(map(str, t["size"])), t) for t in sized["trials"]]:
        lines.append(f"| {name} | {_ms(t.get('latency_ms'))} | {'yes' if t.get('feasible', True) else 'no'} | "
                     f"{_num(t['top1_agreement'], '.2f', 100)}% | {_num(t.get('kl'), '.4f')} | "
                     f"{_num(t['output_rel_error'], '.4f')} |")
    return lines
