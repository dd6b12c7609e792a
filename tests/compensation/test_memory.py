"""The statistics' memory, estimated before they are allocated: a job whose covariances cannot fit exits 2 naming
the need and the --ignore that lowers it (deeplabv3_resnet50 grew to 24 GB and was killed by the kernel), and the
suggested command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeprune.compensation.memory import GiB, MEMORY_SHARE, StatisticsNeed, check_statistics_memory, consumer_dims
from edgeprune.compensation.statistics import MAX_POSITIONS
from edgeprune.dependency.graph import trace
from edgeprune.errors import EdgePruneError
from tests.models import ZOO

WIDE = '''import torch
from torch import nn


def make():
    """c2's 32 channels of 64 x 64 reach a Linear: a consumer of 131072 dimensions, its covariance 128 GiB."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 64 * 64, 10))
'''


def test_consumer_dims_and_need_follow_each_consumers_input_squared() -> None:
    entry = ZOO["flatten_head"]
    model = entry.build()
    graph = trace(model, entry.example_input())
    dims = consumer_dims(model, graph)
    modules = dict(model.named_modules())
    assert set(dims) == set(graph.consumer_modules())
    for name, d in dims.items():
        m = modules[name]
        assert d == (m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] ** 2)
    need = StatisticsNeed(dims, batch_size=16, batches=4)
    big = max(dims.values())
    assert need.bytes == 16 * sum(d * d for d in dims.values()) + 16 * big * big + \
        16 * MAX_POSITIONS * sum(dims.values()) * 4
    # after more than FLUSH batches each consumer holds a float64 running sum too
    assert StatisticsNeed(dims, 16, 9).bytes - need.bytes == 8 * sum(d * d for d in dims.values())


def test_statistics_beyond_the_memory_share_are_refused_naming_the_group_to_leave_whole() -> None:
    entry = ZOO["flatten_head"]
    model = entry.build()
    graph = trace(model, entry.example_input())
    dims = consumer_dims(model, graph)
    widest = max(dims, key=dims.get)
    feeding = [g.name for g in graph.groups if any(c.module == widest for c in g.consumers)]
    need = StatisticsNeed(dims, 16, 4)
    assert check_statistics_memory(model, graph, 16, 64, available=int(need.bytes / MEMORY_SHARE) + 1) == need
    with pytest.raises(EdgePruneError) as info:
        check_statistics_memory(model, graph, 16, 64, available=int(need.bytes / MEMORY_SHARE) - 1)
    msg = str(info.value)
    assert f"the statistics of {len(dims)} layers need about" in msg and f"{widest} ({dims[widest]}-dimensional" in msg
    assert " ".join(f"--ignore {g}" for g in feeding) in msg and "(then about " in msg
    assert "--criterion l1 --no-compensation" in msg and info.value.code == 2


def test_a_model_whose_covariance_cannot_fit_exits_2_before_allocating_and_the_suggested_ignore_runs(
        tmp_path: Path) -> None:
    """A real `edgeprune prune` of a model whose Linear reads 131072 features (a 128 GiB covariance): exit 2 within
    the memory of loading it, naming the need and --ignore 2 (the conv that feeds the Linear); with --ignore 2 it
    prunes the first conv and keeps the Linear's input whole."""
    (tmp_path / "wide.py").write_text(WIDE)
    cmd = [sys.executable, "-m", "edgeprune", "prune", "--model", "wide.py:make", "--input-shape", "1,3,64,64",
           "--calibration", "random", "--criterion", "cap", "--ratio", "0.5", "--exporter", "torchscript", "--json"]
    # its peak resident memory, from a parent of its own (this process's children are every test's subprocess)
    peak = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print('peak KiB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", peak, *cmd, "--out", "p"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    *_, line, kib = r.stderr.strip().splitlines()
    assert line.startswith("edgeprune: error: the statistics of 2 layers need about ") and "GiB" in line
    assert "5 (131072-dimensional input, 128.0 GiB per matrix)" in line and "--ignore 2 (then about 0.0 GiB)" in line
    assert int(kib.split()[-1]) < 2 * 2**20  # under 2 GiB: loading and tracing, no statistics allocated
    assert not (tmp_path / "p").exists()

    r = subprocess.run([*cmd, "--ignore", "2", "--out", "p"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    kept = json.loads((tmp_path / "p" / "plan.json").read_text())["kept"]
    assert set(kept) == {"0"} and len(kept["0"]) == 8 and report["parity"]["rel_error"] < 1e-4


@pytest.mark.slow
def test_deeplabv3_resnet50_is_refused_where_its_statistics_need_more_than_half_the_memory() -> None:
    """The issue's case at torchvision's default input size: its three atrous ASPP convs read 18432 coordinates."""
    from edgeprune.inputs.models import load_model

    loaded = load_model("torchvision:deeplabv3_resnet50")
    graph = trace(loaded.module, loaded.example_input)
    with pytest.raises(EdgePruneError, match=r"need about 2\d\.\d GiB .* classifier\.0\.convs\.\d\.0 \(18432-dim.*"
                                             r"--ignore backbone\.layer4\.0\.downsample\.0 \(then about \d\.\d GiB\)"):
        check_statistics_memory(loaded.module, graph, 16, 48, available=24 * GiB)
    assert torch.is_grad_enabled()
