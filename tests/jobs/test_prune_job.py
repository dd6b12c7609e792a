"""jobs/prune_job.py: a pruned model whose outputs are not finite returns exit code 4 (as a build or a release that
fails a gate does), its artifacts in OUT.failed; the CLI says it in one line, the API returns it."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgeprune
from edgeprune.cli.commands import main
from edgeprune.jobs.session import Prepared
from edgeprune.quality.fidelity import Fidelity
from tests.cli.test_commands import assert_one_line_error
from tests.jobs.test_build_job import MODELS_PY, write_recipe


@pytest.fixture
def broken_fidelity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pruned model gives NaN on 3 of its 8 held-out samples."""
    monkeypatch.setattr(Prepared, "fidelity", lambda self, pruned: Fidelity(0.5, float("nan"), None, None, samples=8,
                                                                              nonfinite=3))


def test_non_finite_outputs_return_exit_4(broken_fidelity: None, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "netdefs.py").write_text(MODELS_PY)
    recipe = write_recipe(tmp_path / "rnd.toml", kind="random", count=72, heldout=8, batch_size=32)
    args = ["prune", "--model", f"{tmp_path / 'netdefs.py'}:small", "--input-shape", "1,3,16,16", "--calibration",
            str(recipe), "--ratio", "0.5", "--exporter", "torchscript"]
    assert main([*args, "--out", str(tmp_path / "cli"), "--json"]) == 4
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_error(err, "the pruned model's outputs are not finite (NaN or infinity) on 3 of 8 held-out "
                               f"samples; its artifacts are in {tmp_path / 'cli.failed'}/ for inspection")
    assert not (tmp_path / "cli").exists() and (tmp_path / "cli.failed" / "report.json").is_file()
    r = edgeprune.prune(f"{tmp_path / 'netdefs.py'}:small", input_shape=(1, 3, 16, 16), calibration=str(recipe),
                        ratio=0.5, exporter="torchscript", out=tmp_path / "api")
    assert r.exit_code == 4 and "not finite" in (r.message or "") and r.out == tmp_path / "api.failed"
    assert r.fidelity.nonfinite == 3 and not (tmp_path / "api").exists()


def test_channel_multiple_none_is_the_targets_and_prune_needs_one(tmp_path: Path) -> None:
    from edgeprune.config import PruneConfig
    from edgeprune.errors import EdgePruneError
    from edgeprune.jobs.prune_job import prune_job

    assert PruneConfig(channel_multiple=0).channel_multiple is None  # the CLI's and a manifest's "0": the target's
    assert PruneConfig(channel_multiple=None).channel_multiple is None and PruneConfig().channel_multiple == 8
    with pytest.raises(EdgePruneError, match="--channel-multiple must be at least 1, found -1"):
        PruneConfig(channel_multiple=-1)
    with pytest.raises(EdgePruneError, match="must be at least 1 for prune, which has no target") as e:
        prune_job(PruneConfig(channel_multiple=0), tmp_path / "out", ratio=0.5)
    assert e.value.code == 2 and not (tmp_path / "out").exists()
