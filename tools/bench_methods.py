"""Benchmark the pruning methods edgeprune is built from at equal measured latency (issue 17): every selection
criterion, width allocation and search, each with and without compensation.

For each model x budget x seed, one `edgeprune build` on `cpu` per method (`python -m edgeprune build --json`, a
subprocess each, a fresh measurement cache each; tools/harness.py runs them). Every method after the first aims
at the first one's budget in ms, so one unpruned measurement decides the budget for all. Then, independently of
the builds' own figures: the released model.onnx files and the unpruned model measured interleaved (fresh ONNX
Runtime sessions, 1 thread) and run on the recipe's held-out samples (which never fed statistics); `fashion` also on
its test set (the 8000 Fashion-MNIST test images no recipe draws; column "test % (unpruned)"), as bench_accuracy.

Methods, read from the checkout under test at run time (so that criteria, allocations and searches added later
appear without editing this file): `criterion=NAME` for each of `scoring.registry.CRITERIA` (default allocation
and search), `allocation=NAME` for each of `search.registry.ALLOCATIONS` but the one `--allocation auto` resolves to
(latency with compensation, step without; criterion cap, or the allocation's own criterion where it is one: epruner,
nap), `search=NAME` for each of `search.registry.SEARCHES` but `strength`; each as `+comp` (compensation, the
default) and `-comp` (`--no-compensation`).

Recovery stages: when the checkout has `edgeprune finetune`, the `criterion=cap+comp` release of each case is
trained for each of `--minutes` (default 1 and 5) with each `--stages` stage and released again; its held-out
accuracy beside the untrained release's.

    python -m tools.bench_methods [--models example,fashion] [--budgets 0.5x,0.3x] [--seeds 0,1,2]
                                  [--methods criterion=cap+comp,allocation=itpruner-comp,...] [--no-recovery]
                                  [--minutes 1,5] [--stages distill,csgd] [--out bench/methods.json]
                                  [--markdown bench/methods.md] [--repo PATH] [--passes 5] [--keep DIR] [--list]

The full run is long (2 models x 2 budgets x 3 seeds x ~20 methods, 20-400 s a build on a 2-core machine) and its
latencies need a quiet machine: run it alone, on a reserved core (`taskset -c 0`). `--list` prints the methods the
checkout offers and exits. A build that fails is recorded with its exit code and last error line, and the run goes
on; the Markdown table (for the README) is printed and written with `--markdown`. The JSON and the table are
rewritten after each (model, budget, seed), so a run stopped early keeps the cases it finished.
`--merge A.json B.json ... --out ALL.json --markdown ALL.md` joins runs split by `--seeds` or `--budgets` into one
result and table (means over every seed), running nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from .harness import (
    RELEASED_CODES,
    accuracy,
    add_repo_flag,
    cases,
    checkout,
    choose,
    edgeprune_env,
    export_base,
    heldout,
    interleaved,
    model_table,
    num,
    pct,
    released_folder,
    run_build,
    run_edgeprune,
    run_python,
    same_budget,
    table,
    tail,
    write_json,
)

REGISTRIES = """
import json
from edgeprune.scoring.registry import CRITERIA  # every criterion, the papers' too
from edgeprune.search.registry import ALLOCATIONS, SEARCHES
print(json.dumps({"criteria": list(CRITERIA), "allocations": list(ALLOCATIONS), "searches": list(SEARCHES)}))
"""
# `--allocation auto` (the default) is latency with compensation and step without (BuildConfig.allocation_for):
# each is listed only where it is not what the criterion rows already ran.
AUTO_ALLOCATION = {"+comp": "latency", "-comp": "step"}
DEFAULT_SEARCH = "strength"


def registries(repo: Path) -> dict[str, list[str]]:
    """The criteria, allocations and searches the checkout under test offers."""
    p = run_python(repo, REGISTRIES)
    if p.returncode != 0:
        raise SystemExit(f"reading the registries of {repo} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout)


def all_methods(reg: dict[str, list[str]]) -> dict[str, list[str]]:
    """Method name -> build flags: each criterion, each allocation but the one `auto` resolves to, each non-default
    search, with and without compensation."""
    base: dict[str, list[str]] = {f"criterion={c}": ["--criterion", c] for c in reg["criteria"]}
    # a method's own width rule (epruner, nap) reads its criterion's rankings: the two go together
    base |= {f"allocation={a}": ["--allocation", a] + (["--criterion", a] if a in reg["criteria"] else [])
             for a in reg["allocations"]}
    base |= {f"search={s}": ["--search", s] for s in reg["searches"] if s != DEFAULT_SEARCH}
    out = {}
    for name, flags in base.items():
        for comp, extra in (("+comp", []), ("-comp", ["--no-compensation"])):
            if name != f"allocation={AUTO_ALLOCATION[comp]}":
                out[f"{name}{comp}"] = [*flags, *extra]
    return out


def has_finetune(repo: Path) -> bool:
    p = subprocess.run([sys.executable, "-m", "edgeprune", "finetune", "--help"], check=False, capture_output=True,
                       text=True, env=edgeprune_env(repo))
    return p.returncode == 0


def build(repo: Path, model: dict, budget: str, seed: int, recipe: Path, flags: list[str], work: Path) -> dict:
    """One `edgeprune build` with `flags`: its report's key figures and the path of the model it released."""
    code, wall, r, released = run_build(repo, model, budget, seed, recipe, flags, work)
    row: dict = {"flags": flags, "exit_code": code, "build_s": round(wall, 2)}
    if r is None:
        return {**row, "error": tail(work / "build.log"), "onnx": None}
    return {**row, "onnx": str(released / "model.onnx"), "out": str(released), "met": r["met"],
            "budget_ms": r["budget_ms"], "build_final_ms": r["final"]["latency_ms"]["median"],
            "measured_candidates": r["search"]["measured_candidates"], "macs": r["final"].get("macs")}


def finetune(repo: Path, source: str, recipe: Path, stage: str, minutes: float, seed: int, work: Path) -> dict:
    """`edgeprune finetune SOURCE --stage STAGE --minutes M`: exit code, wall seconds, the model it released."""
    out = work / "out"
    work.mkdir(parents=True, exist_ok=True)
    code, stdout, wall = run_edgeprune(repo, ["finetune", source, "--calibration", str(recipe), "--stage", stage,
                                              "--minutes", str(minutes), "--seed", str(seed), "--out", str(out),
                                              "--cache-dir", str(work / "cache"), "--json"], work / "finetune.log")
    row: dict = {"stage": stage, "minutes": minutes, "exit_code": code, "wall_s": round(wall, 2)}
    if code not in RELEASED_CODES:
        return {**row, "error": tail(work / "finetune.log"), "onnx": None}
    r = json.loads(stdout)
    return {**row, "onnx": str(released_folder(r, out, code) / "model.onnx"), "met": r.get("met")}


def bench_case(repo: Path, name: str, model: dict, budget: str, seed: int, methods: dict[str, list[str]],
               base_onnx: Path, work: Path, passes: int, recovery: list[tuple[str, float]],
               test: tuple | None = None) -> dict:
    """One (model, budget, seed): a build per method, then latency and accuracy measured here (also on the model's
    `test` set, when it has one); recovery stages."""
    recipe = model["recipe"](seed, work)
    x, y, n_calib, edgeprune_file = heldout(repo, model, recipe, work)
    row: dict = {"model": name, "budget": budget, "seed": seed, "heldout": len(y), "calibration": n_calib,
                 "edgeprune": edgeprune_file, "methods": {}}
    first = None
    for m, flags in methods.items():
        b = build(repo, model, same_budget(budget, first), seed, recipe, flags, work / f"{name}-{budget}-{seed}-{m}")
        first = first if first and first.get("budget_ms") else b
        print(json.dumps({"model": name, "budget": budget, "seed": seed, "method": m, "exit_code": b["exit_code"],
                          "build_s": b["build_s"]}), file=sys.stderr, flush=True)
        row["methods"][m] = b
    released = {m: b["onnx"] for m, b in row["methods"].items() if b["onnx"]}
    lat = interleaved({"unpruned": base_onnx, **released}, passes)
    row["unpruned_accuracy"] = accuracy(base_onnx, x, y)
    row["unpruned_ms"] = lat["unpruned"]["median_ms"]
    if test is not None:
        row["test"] = len(test[1])
        row["unpruned_test_accuracy"] = accuracy(base_onnx, *test)
    for m, b in row["methods"].items():
        if b["onnx"]:
            b["accuracy"] = accuracy(b["onnx"], x, y)
            if test is not None:
                b["test_accuracy"] = accuracy(b["onnx"], *test)
            b["latency_ms"] = lat[m]["median_ms"]
            b["ratio_to_unpruned"] = lat[m]["median_ms"] / lat["unpruned"]["median_ms"]
    source = row["methods"].get("criterion=cap+comp", {})
    row["recovery"] = []
    for stage, minutes in recovery if source.get("onnx") else []:
        ft_work = work / f"{name}-{budget}-{seed}-ft-{stage}-{minutes}"
        f = finetune(repo, source["out"], recipe, stage, minutes, seed, ft_work)
        if f["onnx"]:
            f["accuracy"] = accuracy(f["onnx"], x, y)
            f["untrained_accuracy"] = source.get("accuracy")
            if test is not None:
                f["test_accuracy"] = accuracy(f["onnx"], *test)
                f["untrained_test_accuracy"] = source.get("test_accuracy")
        row["recovery"].append(f)
    return row


def mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def mean_of(items: list[dict], key: str) -> float | None:
    """The mean of `key` over `items` when every item has it (a figure over some seeds only would mislead)."""
    return mean([i[key] for i in items]) if items and all(i.get(key) is not None for i in items) else None


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per (model, budget, method): means over seeds of accuracy, re-measured latency and build time."""
    out = []
    for key in dict.fromkeys((r["model"], r["budget"]) for r in rows):
        group = [r for r in rows if (r["model"], r["budget"]) == key]
        unpruned = mean([r["unpruned_accuracy"] for r in group])
        unpruned_test = mean_of(group, "unpruned_test_accuracy")
        for m in methods:
            done = [r["methods"][m] for r in group if r["methods"].get(m, {}).get("accuracy") is not None]
            out.append({"model": key[0], "budget": key[1], "method": m, "seeds": len(done),
                        "builds": sum(1 for r in group if m in r["methods"]),
                        "unpruned_accuracy": unpruned, "accuracy": mean([b["accuracy"] for b in done]),
                        "accuracy_min": min((b["accuracy"] for b in done), default=None),
                        "unpruned_test_accuracy": unpruned_test, "test_accuracy": mean_of(done, "test_accuracy"),
                        "latency_ms": mean([b["latency_ms"] for b in done]),
                        "ratio_to_unpruned": mean([b["ratio_to_unpruned"] for b in done]),
                        "met": sum(bool(b.get("met")) for b in done), "build_s": mean([b["build_s"] for b in done])})
        trained = [r for r in group if r.get("recovery")]  # the seeds that ran recovery (maybe not all)
        for stage, minutes in dict.fromkeys((f["stage"], f["minutes"]) for r in trained for f in r["recovery"]):
            done = [f for r in trained for f in r["recovery"]
                    if (f["stage"], f["minutes"]) == (stage, minutes) and f.get("accuracy") is not None]
            out.append({"model": key[0], "budget": key[1], "method": f"finetune {stage} {minutes:g} min",
                        "recovery": True, "seeds": len(done),
                        "unpruned_accuracy": mean([r["unpruned_accuracy"] for r in trained]),
                        "accuracy": mean([f["accuracy"] for f in done]),
                        "untrained_accuracy": mean([f["untrained_accuracy"] for f in done
                                                    if f.get("untrained_accuracy") is not None]),
                        "unpruned_test_accuracy": mean_of(trained, "unpruned_test_accuracy"),
                        "test_accuracy": mean_of(done, "test_accuracy"),
                        "untrained_test_accuracy": mean_of(done, "untrained_test_accuracy"),
                        "met": sum(bool(f.get("met")) for f in done), "build_s": mean([f["wall_s"] for f in done])})
    return out


def markdown(summary: list[dict]) -> str:
    """The README table: per model and budget, each method's mean held-out accuracy (and worst seed), re-measured
    latency against the unpruned model, budgets met and build time; then the recovery stages. Where a model has a
    test set, a column gives the mean accuracy on it and the unpruned model's in brackets."""
    test = any(s.get("test_accuracy") is not None for s in summary)
    head = ["model", "budget", "method", "seeds", "accuracy % (worst)", "unpruned %"] + \
        (["test % (unpruned)"] if test else []) + ["latency x unpruned", "latency ms", "met", "build s"]
    lines = table(head, [[
        s["model"], s["budget"], f"`{s['method']}`", f"{s['seeds']}/{s['builds']}",
        f"{pct(s['accuracy'])} ({pct(s['accuracy_min'])})", pct(s["unpruned_accuracy"])] +
        ([test_cell(s, "test_accuracy", "unpruned_test_accuracy")] if test else []) + [
        num(s["ratio_to_unpruned"], ".2f"), num(s["latency_ms"], ".3f"), f"{s['met']}/{s['seeds']}",
        num(s["build_s"], ".0f")] for s in summary if not s.get("recovery")])
    rec = [s for s in summary if s.get("recovery")]
    if rec:
        head = ["model", "budget", "recovery", "seeds", "accuracy %", "untrained %", "unpruned %"] + \
            (["test % (untrained)"] if test else []) + ["met", "wall s"]
        lines += [""] + table(head, [[
            s["model"], s["budget"], s["method"], str(s["seeds"]), pct(s["accuracy"]),
            pct(s["untrained_accuracy"]), pct(s["unpruned_accuracy"])] +
            ([test_cell(s, "test_accuracy", "untrained_test_accuracy")] if test else []) + [
            f"{s['met']}/{s['seeds']}", num(s["build_s"], ".0f")] for s in rec])
    return "\n".join(lines)


def test_cell(s: dict, key: str, beside: str) -> str:
    return "-" if s.get(key) is None else f"{pct(s[key])} ({pct(s.get(beside))})"


def pick(available: dict[str, list[str]], wanted: str | None, ap: argparse.ArgumentParser) -> dict[str, list[str]]:
    """`--methods` as given (names, or a prefix such as `criterion=` or `+comp` suffix match), else all."""
    if not wanted:
        return available
    out = {}
    for w in wanted.split(","):
        hits = [m for m in available if m == w or m.startswith(w) or (w.startswith(("+", "-")) and m.endswith(w))]
        if not hits:
            ap.error(f"--methods {w!r} matches none of: {', '.join(available)}")
        out |= {m: available[m] for m in hits}
    return out


def write(args: argparse.Namespace, repo: Path, methods: dict[str, list[str]], recovery: list, rows: list[dict]) -> str:
    """Write the JSON (and the Markdown table with `--markdown`) of the cases done so far; return the table."""
    summary = summarise(rows, list(methods))
    result = {"benchmark": "methods", "repo": str(repo), "methods": methods, "recovery": recovery,
              "passes": args.passes, "rows": rows, "summary": summary}
    write_json(args.out, result)
    table_md = markdown(summary)
    if args.markdown:
        Path(args.markdown).write_text(table_md + "\n")
    return table_md


def merge(args: argparse.Namespace, files: list[Path], ap: argparse.ArgumentParser) -> str:
    """One result of several runs' JSON: their rows in order (a (model, budget, seed) run twice keeps the last),
    the methods and recovery stages of the first; each file must have run the same methods."""
    results = []
    for f in files:
        try:
            results.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            ap.error(f"--merge {f}: not a bench_methods result ({e})")
    if any(r.get("benchmark") != "methods" or r["methods"] != results[0]["methods"] for r in results):
        ap.error("--merge: every file must be a bench_methods result of the same methods")
    rows = {(r["model"], r["budget"], r["seed"]): r for res in results for r in res["rows"]}
    args.passes = results[0]["passes"]
    return write(args, Path(results[0]["repo"]), results[0]["methods"], results[0]["recovery"], list(rows.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="example,fashion", help="comma-separated: example, fashion (default both)")
    ap.add_argument("--budgets", default="0.5x,0.3x", help="comma-separated --latency values (default 0.5x,0.3x)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--methods", default=None, help="comma-separated method names or prefixes (criterion=, "
                                                    "allocation=itpruner, +comp, ...; default all: see --list)")
    ap.add_argument("--list", action="store_true", help="print the methods of the checkout and exit")
    ap.add_argument("--no-recovery", action="store_true", help="skip the recovery stages (edgeprune finetune)")
    ap.add_argument("--minutes", default="1,5", help="finetune lengths in minutes (default 1,5)")
    ap.add_argument("--stages", default="distill", help="finetune stages (default distill; e.g. distill,csgd)")
    ap.add_argument("--out", default="bench/methods.json", help="JSON results (default bench/methods.json)")
    ap.add_argument("--markdown", default=None, metavar="FILE", help="also write the Markdown table here")
    add_repo_flag(ap)
    ap.add_argument("--passes", type=int, default=5, help="interleaved latency passes (default 5)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep build outputs and logs here")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: join the rows of these results (runs split by --seeds or --budgets) and "
                         "write --out / --markdown from them")
    args = ap.parse_args()
    if args.merge:
        print(merge(args, [Path(f) for f in args.merge], ap))
        return
    repo = checkout(ap, args.repo)
    methods = pick(all_methods(registries(repo)), args.methods, ap)
    if args.list:
        print("\n".join(f"{m}: {' '.join(f)}" for m, f in methods.items()))
        return
    zoo = model_table()
    models = choose(ap, args.models, zoo, "model")
    recovery = [] if args.no_recovery or not has_finetune(repo) else \
        [(s, float(m)) for s in args.stages.split(",") for m in args.minutes.split(",")]

    def prepare(name: str, work: Path) -> tuple[Path, tuple | None]:
        return export_base(repo, zoo[name], work / f"{name}-base"), zoo[name]["test"]() if "test" in zoo[name] else None

    rows: list[dict] = []
    table_md = ""
    for name, (base, test), budget, seed, work in cases(args, models, prepare):
        rows.append(bench_case(repo, name, zoo[name], budget, seed, methods, base, work, args.passes, recovery, test))
        table_md = write(args, repo, methods, recovery, rows)  # after each case: a stopped run keeps it
    print(table_md)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
