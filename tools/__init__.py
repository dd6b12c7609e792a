"""edgeprune's benchmark and training scripts: each runs from the repository root as `python -m tools.NAME`
(`python -m tools.bench_accuracy --help`). The code they share lives in tools/harness.py (running a checkout,
base export, held-out data, interleaved timing, shared flags, Markdown) and tools/zoo.py (the models' building
block). The harness stays out of the edgeprune package: it times other checkouts and must not ship with the code it
judges."""
