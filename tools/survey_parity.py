"""Parity survey (`python -m tools.survey_models --mode parity`): which torchvision architectures edgeprune can trace,
prune at 50% (CaP + compensation), export and run.

    python -m tools.survey_models --mode parity [--models resnet18,mobilenet_v2] [--out bench/survey-parity.json] \
        [--count 160] [--input-size 224]

Per model (random weights, random calibration of `--count` samples): the traced groups (how many, how many are
joint residual streams), the excluded groups and why, then prune -> export (torchscript) -> ONNX Runtime parity.
A sanity check of the groups themselves: with compensation off, the pruned model must compute exactly what the unpruned
model computes when every consumer ignores the removed channels (`slicing_rel_error`); an op the tracer wrongly took
for channel-by-channel (a channel shuffle, a roll) breaks this silently. A model that fails at some stage gets
`status: fail`, the stage and the error; the survey goes on with the next.
The JSON is rewritten after every model, so a killed run still leaves the models done so far.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import onnxruntime
import torch
import torch_pruning
from torch import nn

from edgeprune import __version__
from edgeprune.config import PruneConfig
from edgeprune.export.onnx import export
from edgeprune.jobs.session import prepare
from edgeprune.plan import uniform_widths
from edgeprune.report.artifacts import model_size

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
          "densenet121", "shufflenet_v2_x1_0")


def width_of(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def slicing_error(prep: Any, plan: Any) -> float:
    """Relative output difference between slicing the plan's channels out (no compensation) and the unpruned model
    whose consumers ignore those channels (their input columns set to zero): 0 when every group really is
    channel-by-channel, large when an op the tracer took for pass-through mixes channels.

    The columns are zeroed in the consumers rather than the channels at their source, because a pre-activation
    BatchNorm after a concat (DenseNet) turns a zeroed channel into a non-zero constant."""
    sliced = prep.prune(dataclasses.replace(plan, compensation=False))
    masked = copy.deepcopy(prep.loaded.module)
    mods = dict(masked.named_modules())
    with torch.no_grad():
        for g in prep.graph.groups:
            idx = plan.pruned(g.name)
            for c in g.consumers if idx else ():
                w = mods[c.module].weight
                cols = [i for j in idx for i in c.coords[j]]
                w.view(w.shape[0], -1)[:, cols] = 0.0
        x = torch.from_numpy(prep.data.heldout_x[:8])
        y_masked, y_sliced = masked(x), sliced(x)
    return float(torch.linalg.norm(y_sliced - y_masked) / torch.linalg.norm(y_masked).clamp_min(1e-30))


def survey_one(name: str, recipe: Path, ratio: float, multiple: int, tmp: Path,
               input_size: int = 224) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "status": "fail", "stage": "prepare", "error": None}
    t0 = time.perf_counter()
    try:
        config = PruneConfig(model=f"torchvision:{name}", input_shape=(1, 3, input_size, input_size),
                             calibration=str(recipe), criterion="cap",
                             compensation=True, channel_multiple=multiple, exporter="torchscript")
        prep = prepare(config)
        g = prep.graph
        row.update({
            "groups": len(g.groups),
            "joint_groups": sum(len(x.producers) > 1 for x in g.groups),
            "max_producers": max((len(x.producers) for x in g.groups), default=0),
            "consumers": len(g.consumer_modules()),
            "non_compensable_consumers": sorted({c.module for x in g.groups for c in x.consumers
                                                 if not c.compensable}),
            "excluded": dict(g.excluded),
            "output_layers": list(g.output_layers),
            "timings_s": dict(prep.timings_s),
        })
        row["stage"] = "prune"
        widths = uniform_widths(g, ratio, multiple)
        plan = prep.plan(widths, ratio=ratio)
        t = time.perf_counter()
        pruned = prep.prune(plan)
        row["timings_s"]["prune"] = time.perf_counter() - t
        modules = dict(pruned.named_modules())
        wrong = {x.name: (width_of(modules[x.name]), widths[x.name]) for x in g.groups
                 if width_of(modules[x.name]) != widths[x.name]}
        if wrong:
            raise AssertionError(f"pruned widths differ from the plan (got, planned): {wrong}")
        row["size"] = {"base": model_size(prep.loaded.module, prep.loaded.example_input),
                       "pruned": model_size(pruned, prep.loaded.example_input)}
        fid = prep.fidelity(pruned)
        row["fidelity_random_data"] = {"output_rel_error": fid.output_rel_error,
                                       "top1_agreement": fid.top1_agreement}
        row["stage"] = "slicing check"
        row["slicing_rel_error"] = slicing_error(prep, plan)
        row["stage"] = "export"
        t = time.perf_counter()
        exp = export(pruned, prep.loaded.example_input, tmp / f"{name}.onnx", exporter="torchscript")
        row["timings_s"]["export"] = time.perf_counter() - t
        row["parity_rel_error"] = exp.parity.rel_error if exp.parity else None
        row["stage"] = "parity"
        if exp.parity is None or not exp.parity.rel_error <= 1e-4:
            raise AssertionError(f"ONNX Runtime differs from torch: rel_error {row['parity_rel_error']}")
        row["stage"] = "slicing check"
        if not row["slicing_rel_error"] <= 1e-4:
            raise AssertionError(f"pruning is not channel slicing: output differs from the model whose consumers "
                                 f"ignore the same channels by {row['slicing_rel_error']:.3g} (relative); a traced "
                                 f"pass-through op mixes channels")
        row["status"], row["stage"] = "ok", None
    except Exception as e:  # a survey records failures, it does not stop on them
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if "edgeprune" in f.filename and "survey_parity" not in f.filename]
        row["where"] = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in ours[-3:]]
        row["raised_in"] = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}"
    row["time_s"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.survey_models --mode parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--channel-multiple", type=int, default=8)
    ap.add_argument("--count", type=int, default=160, help="random calibration samples (16 of them held out)")
    ap.add_argument("--input-size", type=int, default=224, help="square input side (default 224)")
    ap.add_argument("--out", default="bench/survey-parity.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"edgeprune": __version__, "torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
           "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        recipe = tmp / "random-small.toml"
        recipe.write_text(f'kind = "random"\ncount = {args.count}\nheldout = 16\nbatch_size = 16\nseed = 0\n')
        for name in args.models.split(","):
            print(f"{name} ...", flush=True)
            row = survey_one(name, recipe, args.ratio, args.channel_multiple, tmp, args.input_size)
            rows.append(row)
            print(f"  {row['status']} in {row['time_s']:.1f}s: groups {row.get('groups')}, excluded "
                  f"{len(row.get('excluded', {}))}, parity {row.get('parity_rel_error')}"
                  + (f", {row['stage']}: {row['error']}" if row["status"] != "ok" else ""), flush=True)
            out.write_text(json.dumps({"env": env, "ratio": args.ratio, "channel_multiple": args.channel_multiple,
                                       "calibration_count": args.count,
                                       "input_size": args.input_size, "models": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
