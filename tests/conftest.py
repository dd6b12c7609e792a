from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeprune.inputs.targets import MeasureConfig, Target, load_target


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def make_tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real ONNX model (TorchScript exporter: fast)."""
    from edgeprune.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    export_onnx(make_tiny(), torch.randn(1, 3, 32, 32), path, exporter="torchscript")
    return path


@pytest.fixture(scope="session")
def table_env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A latency table of the bundled example on a `cpu` target with few runs, made by `edgeprune lut` with its
    default self-check (once: tests/latency/ and tests/jobs/test_lut_job.py share it)."""
    from edgeprune.cli.commands import main
    from edgeprune.runtimes.remote import target_toml

    root = tmp_path_factory.mktemp("lut")
    few_runs = MeasureConfig(warmup=3, iterations=20, repeats=3, final_repeats=3)
    (root / "cpu.toml").write_text(target_toml(dataclasses.replace(load_target("cpu"), measure=few_runs)))
    code = main(["lut", "--device", str(root / "cpu.toml"), "--out", str(root / "lut.json"), "--json"])
    assert code == 0
    return {"root": root, "target": root / "cpu.toml", "table": root / "lut.json"}


@pytest.fixture(scope="session")
def pruned_example(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The bundled example with half of every group's channels removed (compensated) and its float export: what an
    int8 release quantises (test_quantize.py and test_gates.py share it). The digits recipe cut to 399 samples keeps
    the default recipe's 199 held-out digits (the same seeded permutation, its first 199) and calibrates on 200: the
    statistics take a third of the time."""
    from edgeprune.config import PruneConfig
    from edgeprune.jobs.oracle import export_candidate
    from edgeprune.plan import uniform_widths
    from edgeprune.jobs.session import prepare

    root = tmp_path_factory.mktemp("pruned-example")
    (root / "digits-399.toml").write_text('kind = "digits"\ncount = 399\nheldout = 199\n')
    prep = prepare(PruneConfig(calibration=str(root / "digits-399.toml"), repair="independent"))
    plan = prep.plan(uniform_widths(prep.graph, 0.5, 8), ratio=0.5)
    pruned = prep.prune(plan)
    path = export_candidate(pruned, prep.loaded.example_input, root / "pruned.onnx", "torchscript")
    return {"prep": prep, "pruned": pruned, "plan": plan, "onnx": path, "root": root,
            "recipe": root / "digits-399.toml"}


@pytest.fixture
def fast_cpu() -> Target:
    """The `cpu` target with few runs: tests check behaviour, benchmarks check speed."""
    return dataclasses.replace(load_target("cpu"), measure=MeasureConfig(warmup=2, iterations=10, repeats=2))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRUNE_CACHE_DIR", str(tmp_path / "cache"))
