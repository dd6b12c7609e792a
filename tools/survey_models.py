"""Coverage survey (issue 31): `edgeprune build` at 0.7x on the models edge users run, random weights, on `cpu`.

    python -m tools.survey_models [--models SPEC,SPEC] [--budget 0.7x] [--timeout 900] [--passes 5] [--resume]
                                  [--out bench/survey.json] [--work bench/survey-work] [--build-flags '--max-steps 8']
    python -m tools.survey_models --table-only [--out bench/survey.json]     # bench/survey.md again from the JSON
    python -m tools.survey_models --mode parity ...                          # tools/survey_parity.py: prune + parity

Per model of `MODELS` (its spec as `--model` takes it and the input shape given with `--input-shape`), one
`python -m edgeprune build --model SPEC --input-shape SHAPE --calibration random --device cpu --latency 0.7x
--no-cache --json` in a subprocess, stopped after `--timeout` seconds (exit code null, reason "timeout"). A row of the JSON records:

- `exit_code`, `reason`: the build's exit code and its `edgeprune: error:` line (else the log's last line);
- `wall_s`: the build's wall time; `peak_rss_mib`: the peak resident memory of the build process and everything it
  waited for (`ru_maxrss` of the children of a small parent of its own: `PARENT_SCRIPT`);
- from report.json: `base_ms`, `final_ms`, `budget_ms`, `final_over_budget` (the build's own verification),
  `measured_candidates`, `timings_s`, `excluded_groups` (group -> why it is left whole), `groups` (prunable ones);
- `channels`, `prunable_share`: the share of the channels the graph grouped that the search may prune:
  sum of `widths[g].before` over the prunable groups / (that sum + the channels of the excluded groups). report.json
  gives an excluded group only its name (the root layer) and reason, so its channels are read from the unpruned
  model here: the output width of the layer it names (a conv's out_channels, a linear's out_features, a norm's
  features; a qkv layer whose heads are excluded counts its width, a third of its outputs). Layers no group reaches
  (the output layers, which are never pruned) count on neither side; an excluded name that is no such layer (e.g.
  `<Type>`) is listed in `channels.unresolved` and left out of the share;
- for a model that built (exit 0, or 4, which random data cannot cause): the released model.onnx and the unpruned
  model (exported here by the build's exporter, as the build exports its baseline) re-measured independently of the
  build, interleaved in `--passes` passes of fresh 1-thread ONNX Runtime sessions (`harness.interleaved`):
  `remeasured_ratio` = released / unpruned (their medians over the passes, as bench_build and bench_families),
  `remeasured_over_budget` = that ratio / 0.7, `in_band` when in [0.90, 1.05]; `remeasured_pass_ratios`, each pass's
  released / unpruned, show how much the machine moved under the figure;
- `unpruned_error` / `survey_error` where loading or exporting the unpruned model here, or the measurement, failed.

The JSON (`--out`) is rewritten after every model, so a killed run keeps what it did; `--resume` skips the models
already in it. The Markdown table (the JSON's name with .md) has the issue's columns and a summary line: the built
share, the in-band share of the built models, the failures by exit code and the largest peak memory. A full run (about
50 models, minutes each) belongs on a quiet machine: `taskset -c 0` and nothing beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import ROOT, edgeprune_env, interleaved, released_folder, run_python, table

LOW, HIGH = 0.90, 1.05
BUILT = (0, 4)  # exit codes after which a model was built (4: a quality gate, which random data never has)


@dataclass(frozen=True)
class Spec:
    spec: str  # as `edgeprune build --model` takes it
    input_shape: str  # given with --input-shape
    family: str


def _specs(family: str, shape: str, *specs: str) -> list[Spec]:
    return [Spec(s, shape, family) for s in specs]


S224, S256, S320 = "1,3,224,224", "1,3,256,256", "1,3,320,320"
# Input shapes: timm's pretrained_cfg input_size of each model (tinynet_e 106, tf_efficientnetv2_b0 192,
# MobileNetV4 medium / MobileViT / FastViT / EdgeNeXt 256); torchvision classifiers and segmenters 224 (as
# bench_families), ssdlite its own 320; YOLO at 320 (bench_families' size: 640 quadruples every build's time).
MODELS: list[Spec] = [
    *_specs("timm mobile CNN", S224, "timm:mobilenetv2_050", "timm:mobilenetv2_100", "timm:mobilenetv3_small_050",
            "timm:mobilenetv3_small_100", "timm:mobilenetv3_large_100", "timm:lcnet_050", "timm:lcnet_100",
            "timm:mnasnet_100", "timm:fbnetc_100", "timm:mixnet_s", "timm:hardcorenas_a"),
    Spec("timm:tinynet_e", "1,3,106,106", "timm mobile CNN"),
    *_specs("EfficientNet", S224, "timm:efficientnet_b0", "timm:efficientnet_lite0", "timm:efficientnet_es"),
    Spec("timm:tf_efficientnetv2_b0", "1,3,192,192", "EfficientNet"),
    *_specs("RegNet", S224, "timm:regnetx_002", "timm:regnety_002", "timm:regnety_004"),
    *_specs("GhostNet", S224, "timm:ghostnet_050", "timm:ghostnet_100", "timm:ghostnetv2_100",
            "timm:repghostnet_050"),
    Spec("timm:mobilenetv4_conv_small", S224, "MobileNetV4"),
    *_specs("MobileNetV4", S256, "timm:mobilenetv4_conv_medium", "timm:mobilenetv4_hybrid_medium"),
    *_specs("RepVGG / MobileOne", S224, "timm:repvgg_a0", "timm:mobileone_s0", "timm:mobileone_s1"),
    *_specs("ConvNeXt", S224, "timm:convnext_atto", "timm:convnextv2_atto"),
    *_specs("ViT / Swin", S224, "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224",
            "timm:swin_tiny_patch4_window7_224", "timm:levit_128s", "timm:efficientvit_b0"),
    *_specs("MobileViT / hybrid", S256, "timm:mobilevit_xxs", "timm:mobilevitv2_050", "timm:fastvit_t8",
            "timm:edgenext_xx_small"),
    *_specs("torchvision classification", S224, "torchvision:mobilenet_v3_small", "torchvision:shufflenet_v2_x0_5",
            "torchvision:mnasnet0_5", "torchvision:squeezenet1_1", "torchvision:regnet_y_400mf",
            "torchvision:resnet18"),
    Spec("torchvision:ssdlite320_mobilenet_v3_large", S320, "torchvision detection"),
    *_specs("torchvision segmentation", S224, "torchvision:lraspp_mobilenet_v3_large",
            "torchvision:deeplabv3_mobilenet_v3_large"),
    *_specs("Ultralytics YOLO", S320, "ultralytics:yolov8n.yaml", "ultralytics:yolo11n.yaml",
            "ultralytics:yolov8n-seg.yaml"),
]

# Run by the checkout under test: the unpruned model exported as the build exports its baseline, and the output width
# of each excluded group's root layer (null where the name is no such layer).
UNPRUNED_SCRIPT = """
import json, sys
from pathlib import Path
from torch import nn
from edgeprune.inputs.models import load_model, parse_shape
from edgeprune.jobs.oracle import export_candidate
spec, shape, path, exporter, excluded = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
loaded = load_model(spec, input_shape=parse_shape(shape))
mods = dict(loaded.module.named_modules())
def width(name, reason):
    m = mods.get(name)
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features // 3 if reason.startswith("attention heads") else m.out_features
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[0]
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim
    return None
widths = {name: width(name, reason) for name, reason in excluded.items()}
if path:
    export_candidate(loaded.module, loaded.example_input, Path(path), exporter, None, search=True)
print(json.dumps(widths))
"""


# The parent of each build: a small python of its own, so that the peak it reports (RUSAGE_CHILDREN: its one child and
# what that waited for) is the build's. A child's ru_maxrss starts at its parent's resident size at the fork (exec keeps
# the copied memory's high-water mark), so timed from this process, which holds ONNX Runtime and the models it has
# measured, every build would read at least this process's size.
PARENT_SCRIPT = """
import json, resource, signal, subprocess, sys
timeout, result = float(sys.argv[1]), sys.argv[2]
p = subprocess.Popen(sys.argv[3:])
try:
    code = p.wait(timeout=timeout)
except subprocess.TimeoutExpired:
    p.send_signal(signal.SIGTERM)  # edgeprune cleans up on SIGTERM
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    code = None
with open(result, "w") as f:
    json.dump({"exit_code": code, "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
"""


def run_limited(cmd: list[str], cwd: Path, stdout: Path, log: Path, timeout: float
                ) -> tuple[int | None, float, float | None]:
    """Run `cmd` under `PARENT_SCRIPT`: exit code (None when stopped at `timeout` seconds: SIGTERM, SIGKILL 30 s
    later), wall seconds, and the peak resident memory in MiB of `cmd` and the children it waited for."""
    t0 = time.perf_counter()
    result = cwd / ".peak.json"
    result.unlink(missing_ok=True)
    with open(stdout, "w") as out, open(log, "w") as err:
        try:
            subprocess.run([sys.executable, "-c", PARENT_SCRIPT, str(timeout), str(result), *cmd], check=False,
                           cwd=cwd, stdout=out, stderr=err, env=edgeprune_env(ROOT), timeout=timeout + 300)
        except subprocess.TimeoutExpired:  # the parent itself hung: no figure, but the survey goes on
            pass
    if not result.is_file():
        return None, time.perf_counter() - t0, None
    r = json.loads(result.read_text())
    result.unlink()
    return r["exit_code"], time.perf_counter() - t0, r["peak_rss_kib"] / 1024


def reason_of(log: Path, code: int | None, timeout: float) -> str | None:
    """Why a build did not exit 0: its `edgeprune: error:` line, else the log's last line."""
    if code is None:
        return f"timeout: killed after {timeout:.0f} s"
    if code == 0:
        return None
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("edgeprune: error:")]
    return (errors or lines or [f"exit {code} and nothing on stderr"])[-1]


def channel_share(report: dict, excluded_widths: dict[str, int | None]) -> dict[str, Any]:
    """Channels of the prunable groups (their widths before pruning) and of the excluded groups (their root layer's
    width, `excluded_widths`), the share of the two that is prunable, the share of the prunable ones the build kept."""
    prunable = sum(w["before"] for w in report["widths"].values())
    kept = sum(w["after"] for w in report["widths"].values())
    excluded = sum(w for w in excluded_widths.values() if w)
    unresolved = sorted(n for n, w in excluded_widths.items() if not w)
    total = prunable + excluded
    return {"channels": {"prunable": prunable, "excluded": excluded, "kept": kept, "unresolved": unresolved},
            "prunable_share": prunable / total if total else None,
            "kept_share": kept / prunable if prunable else None}


def measure(m: Spec, r: dict, code: int, budget: str, passes: int, work: Path, out: Path) -> dict[str, Any]:
    """What a row takes from a build's report `r`, the share of prunable channels and, for a model that built, its
    release re-measured interleaved with the unpruned model exported here."""
    row: dict[str, Any] = {
        "base_ms": r["base"]["latency_ms"]["median"], "final_ms": r["final"]["latency_ms"]["median"],
        "budget_ms": r["budget_ms"], "final_over_budget": r["final"]["latency_ms"]["median"] / r["budget_ms"],
        "measured_candidates": r["search"]["measured_candidates"], "timings_s": r.get("timings_s"),
        "groups": len(r["widths"]), "excluded_groups": r.get("excluded_groups") or {}}
    built = code in BUILT
    base = work / "unpruned.onnx"
    p = run_python(ROOT, UNPRUNED_SCRIPT, m.spec, m.input_shape, str(base) if built else "",
                   r.get("exporter") or "torchscript", json.dumps(row["excluded_groups"]), cwd=work)
    if p.returncode != 0:
        row["unpruned_error"] = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return row
    row.update(channel_share(r, json.loads(p.stdout.strip().splitlines()[-1])))
    if built:
        lat = interleaved({"unpruned": base, "released": released_folder(r, out, code) / "model.onnx"}, passes)
        ratio = lat["released"]["median_ms"] / lat["unpruned"]["median_ms"]
        pairs = [a / b for a, b in zip(lat["released"]["passes_ms"], lat["unpruned"]["passes_ms"], strict=True)]
        row.update(remeasured=lat, remeasured_pass_ratios=[round(v, 4) for v in pairs], remeasured_ratio=ratio,
                   remeasured_over_budget=ratio / float(budget.rstrip("x")))
        row["in_band"] = LOW <= row["remeasured_over_budget"] <= HIGH
    return row


def survey_one(m: Spec, budget: str, timeout: float, passes: int, work: Path, flags: list[str],
               keep: bool = False) -> dict[str, Any]:
    """Build one model, measure what it released; a row of the survey (see the module's docstring)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    row: dict[str, Any] = {"model": m.spec, "family": m.family, "input_shape": m.input_shape, "budget": budget,
                           "loadavg_before": os.getloadavg()[0]}
    out = work / "out"
    cmd = [sys.executable, "-m", "edgeprune", "build", "--model", m.spec, "--input-shape", m.input_shape,
           "--calibration", "random", "--device", "cpu", "--latency", budget, "--no-cache", "--cache-dir",
           str(work / "cache"), "--json", "--out", str(out), *flags]
    code, wall, rss = run_limited(cmd, work, work / "report.out", work / "build.log", timeout)
    row.update(exit_code=code, reason=reason_of(work / "build.log", code, timeout), wall_s=round(wall, 1),
               peak_rss_mib=None if rss is None else round(rss, 1))
    try:
        r = json.loads((work / "report.out").read_text()) if code in (0, 3, 4) else None
    except json.JSONDecodeError:
        r = None
    if r is not None:
        try:
            row.update(measure(m, r, code, budget, passes, work, out))
        except Exception as e:  # noqa: BLE001 - a survey records what went wrong and goes on with the next model
            row["survey_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if not keep:  # the logs stay; the models and caches go
        for p in work.iterdir():
            if p.name not in ("build.log", "report.out"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return row


def summary(rows: list[dict]) -> dict[str, Any]:
    """Counts over the rows: built (exit 0 or 4) out of all, re-measured within [LOW, HIGH] out of the built,
    failures by exit code ("timeout" for a killed build), the largest peak memory."""
    built = [r for r in rows if r.get("exit_code") in BUILT]
    failures = Counter("timeout" if r.get("exit_code") is None else str(r["exit_code"]) for r in rows
                       if r.get("exit_code") not in BUILT)
    peak = max(rows, key=lambda r: r.get("peak_rss_mib") or 0, default=None)
    return {"models": len(rows), "built": len(built), "built_share": len(built) / len(rows) if rows else None,
            "in_band": sum(bool(r.get("in_band")) for r in built),
            "in_band_share": sum(bool(r.get("in_band")) for r in built) / len(built) if built else None,
            "failures": dict(sorted(failures.items())),
            "peak_rss_mib": peak.get("peak_rss_mib") if peak else None, "peak_rss_model": peak["model"] if peak
            else None}


def _cell(text: str | None, limit: int = 160) -> str:
    text = (text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def summary_line(s: dict, budget: str) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    fails = ", ".join(f"exit {k}: {v}" if k != "timeout" else f"timeout: {v}" for k, v in s["failures"].items())
    peak = "-" if s["peak_rss_mib"] is None else f"{s['peak_rss_mib'] / 1024:.2f} GiB ({s['peak_rss_model']})"
    plural = "" if s["models"] == 1 else "s"
    return (f"**{s['models']} model{plural} at {budget}: {s['built']} built ({pct(s['built_share'])}); {s['in_band']} of "
            f"the {s['built']} built re-measured within [{LOW:.2f}, {HIGH:.2f}] of the budget "
            f"({pct(s['in_band_share'])}); failures by exit code: {fails or 'none'}; largest peak RSS {peak}.**")


def markdown(result: dict) -> str:
    """The survey's table: a row per model, the summary line under it."""
    rows = []
    for r in result["rows"]:
        code = r.get("exit_code")
        share = r.get("prunable_share")
        prunable = "-" if share is None else (f"{100 * share:.1f}% ({len(r.get('excluded_groups', {}))} excluded"
                                              + (f", {len(r['channels']['unresolved'])} unresolved"
                                                 if r["channels"]["unresolved"] else "") + ")")
        over = r.get("remeasured_over_budget")
        measured = "-" if over is None else f"{over:.3f}" + ("" if r.get("in_band") else " (out of band)")
        if over is None and code in BUILT:  # built, but not re-measured: why
            measured = "not measured: " + _cell(r.get("unpruned_error") or r.get("survey_error"), 80)
        rss = r.get("peak_rss_mib")
        rows.append([r["model"], r["family"], r["input_shape"].split(",", 1)[-1].replace(",", "x"),
                     "yes" if code in BUILT else "no",
                     _cell(r.get("reason")) or "timeout" if code is None
                     else str(code) + (f": {_cell(r.get('reason'))}" if r.get("reason") else ""),
                     prunable, measured, f"{r['wall_s']:.0f}", "-" if rss is None else f"{rss / 1024:.2f}"])
    head = ["model", "family", "input", "built", "exit: reason", "channels prunable (groups excluded)",
            f"re-measured / budget ({result['budget']})", "build s", "peak RSS GiB"]
    return "\n".join([*table(head, rows), "", summary_line(summary(result["rows"]), result["budget"])]) + "\n"


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True)
    return {"edgeprune_commit": commit.stdout.strip() or None, "python": platform.python_version(),
            **{k: version(k) for k in ("torch", "torchvision", "timm", "ultralytics", "onnxruntime", "onnx")},
            "cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def write(out: Path, result: dict) -> None:
    result["summary"] = summary(result["rows"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", choices=("build", "parity"), default="build")
    known, rest = pre.parse_known_args(argv)
    if known.mode == "parity":
        from .survey_parity import main as parity

        return parity(rest)
    ap = argparse.ArgumentParser(prog="python -m tools.survey_models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("build", "parity"), default="build",
                    help="build: this coverage survey (default); parity: prune + export + parity of torchvision models")
    ap.add_argument("--models", default=None, help="comma-separated specs (default: all of MODELS); one not in MODELS "
                                                   "takes SPEC@NxCxHxW (default input 1x3x224x224)")
    ap.add_argument("--budget", default="0.7x", help="relative budget (default 0.7x)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one build may take (default 900)")
    ap.add_argument("--passes", type=int, default=5, help="interleaved re-measurement passes (default 5)")
    ap.add_argument("--build-flags", default="", metavar="FLAGS", help="extra build flags, e.g. '--max-steps 8'")
    ap.add_argument("--out", default="bench/survey.json", help="JSON results; the table beside it as .md")
    ap.add_argument("--work", default="bench/survey-work", help="build folders (logs kept, models removed)")
    ap.add_argument("--keep", action="store_true", help="keep every build's models and caches in --work")
    ap.add_argument("--resume", action="store_true", help="keep the rows in --out and skip their models")
    ap.add_argument("--table-only", action="store_true", help="only write the Markdown table from --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        result = json.loads(out.read_text())
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result), end="")
        return None
    if not args.budget.endswith("x"):
        ap.error(f"--budget must be relative (0.7x), found {args.budget!r}")
    known_specs = {m.spec: m for m in MODELS}
    chosen = []
    for name in args.models.split(",") if args.models else list(known_specs):
        spec, _, shape = name.partition("@")
        shape = shape.replace("x", ",")
        chosen.append(known_specs.get(spec) if not shape and spec in known_specs
                      else Spec(spec, shape or "1,3,224,224", known_specs[spec].family if spec in known_specs
                                else "other"))
    result: dict[str, Any] = {"survey": "coverage", "budget": args.budget, "band": [LOW, HIGH],
                              "timeout_s": args.timeout, "passes": args.passes, "build_flags": args.build_flags,
                              "env": environment(), "rows": []}
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if old.get("budget") != args.budget:
            ap.error(f"--resume: {out} was run at {old.get('budget')}, not {args.budget}")
        result["rows"], result["env_runs"] = old["rows"], [*old.get("env_runs", []), old.get("env")]
    done = {r["model"] for r in result["rows"]}
    for m in chosen:
        if m.spec in done:
            continue
        print(f"{m.spec} {m.input_shape} ...", file=sys.stderr, flush=True)
        work = Path(args.work).resolve() / m.spec.replace(":", "_").replace("/", "_")
        row = survey_one(m, args.budget, args.timeout, args.passes, work, shlex.split(args.build_flags), args.keep)
        result["rows"].append(row)
        write(out, result)
        print(json.dumps({k: row.get(k) for k in ("model", "exit_code", "reason", "wall_s", "peak_rss_mib",
                                                  "final_over_budget", "remeasured_over_budget", "prunable_share")}),
              file=sys.stderr, flush=True)
    write(out, result)
    print(markdown(result), end="")
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return None


if __name__ == "__main__":
    main()
