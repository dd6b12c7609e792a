"""The `matrix` command: a release manifest of models x targets x budgets built on a pool of devices, embedded or on
Ray (`fleet/matrix_job.py`, `fleet/matrix_ray.py`)."""

from __future__ import annotations

import argparse

from edgeprune.cli.common import Handler, emit_json


def add_matrix(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("matrix", help="build a release matrix (models x targets x budgets) on a pool of devices",
                       description="Build every entry of a manifest (models x targets x budgets, with gates) into "
                                   "OUT/MODEL/TARGET/BUDGET/, measuring on the boards of devices.toml (targets this "
                                   "machine runs, such as cpu, need none: measured here), and write "
                                   "OUT/index.json and OUT/index.md. Entries whose inputs and artifacts are unchanged "
                                   "are skipped. Without --ray entries run one after another here; with --ray they "
                                   "run as Ray tasks and each board is a Ray resource.",
                       epilog="exit codes: 0 every entry met its budget and gates; otherwise the most urgent of the "
                              "entries' codes (1, 5, 2, then 4, 3; index.md lists them); 2 bad manifest or devices "
                              "file, a target with no board that cannot run here, or --out being written by another "
                              "matrix (nothing written); 5 Ray address unreachable")
    p.add_argument("manifest", metavar="MANIFEST.toml", help="the release manifest")
    p.add_argument("--devices", default=None, metavar="devices.toml",
                   help="the device pool: boards by kind (default ./devices.toml if there is one); a target with no "
                        "board there that this machine can run (cpu) is measured here")
    p.add_argument("--out", required=True, metavar="DIR", help="the release folder (new, empty, or a previous matrix's)")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="run on Ray (pip install 'edgeprune[ray]'): auto (a running cluster, else a local one) or a "
                        "head node's HOST:PORT")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="measurement cache folder (default ~/.cache/edgeprune)")
    p.add_argument("--json", action="store_true", help="print index.json instead of the summary")
    return run_matrix_command


def run_matrix_command(args: argparse.Namespace) -> int:
    from edgeprune.fleet.matrix_job import load_manifest, run_matrix
    from edgeprune.fleet.pool import default_pool

    manifest = load_manifest(args.manifest)
    pool = default_pool(args.devices)
    index = run_matrix(manifest, pool, args.out, ray=args.ray, cache_dir=args.cache_dir)
    if args.json:
        emit_json(index)
    else:
        down = f"; boards down: {', '.join(index['down'])}" if index["down"] else ""
        print(f"{index['met']} of {len(index['entries'])} entries met their budget and gates; wrote {args.out}/index.md "
              f"and index.json{down}")
    return int(index["exit_code"])
