"""A real `edgeprune agent` process whose ONNX Runtime figures come from a latency model, for the matrix tests.

    python -m tests.matrixagent --port 0 [--die-after N] [--delay S]     # then the agent's own flags

The HTTP server, the protocol and the client are edgeprune's own; only `runtimes.onnxruntime.measure` is replaced, by
a figure proportional to the model's parameter count (plus `--delay` seconds on the board), so that two boards give
the same figure for the same model and plans built on different boards can be compared exactly. `--die-after N`:
the process exits without answering when its (N+1)-th measurement arrives, as a board that dies mid-measurement.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import edgeprune.runtimes.onnxruntime as ort_runtime
from edgeprune.runtimes.stats import stats_from_repeats

MS_PER_PARAM = 1e-4
OFFSET_MS = 0.01


def model_ms(path) -> float:
    import onnx

    model = onnx.load(str(path))
    return OFFSET_MS + MS_PER_PARAM * sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def main(argv: list[str]) -> int:
    die_after, delay = None, 0.0
    if "--die-after" in argv:
        i = argv.index("--die-after")
        die_after = int(argv[i + 1])
        del argv[i:i + 2]
    if "--delay" in argv:
        i = argv.index("--delay")
        delay = float(argv[i + 1])
        del argv[i:i + 2]
    count = {"n": 0}

    def measure(onnx_path, target, repeats=None, progress=None, calibration=None):
        count["n"] += 1
        if die_after is not None and count["n"] > die_after:
            os._exit(3)  # the board dies with a request in flight
        time.sleep(delay)
        ms = model_ms(onnx_path)
        r = repeats or target.measure.repeats
        return stats_from_repeats([[ms] * 5 for _ in range(r)], target=target.name, runtime="onnxruntime",
                                  runtime_version=ort_runtime.version() or "unknown", precision=target.precision,
                                  timing="wall")

    ort_runtime.measure = measure
    import onnx  # noqa: F401 - loaded before the agent says it listens, not on its first request

    from edgeprune.cli.commands import main as cli_main

    return cli_main(["agent", *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
