"""The flags that are a config's options: `build --config FILE` with flags over it, one declaration of the flags
`prune` and `build` share, and their defaults taken from `config.py` (release and finetune export as build does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeprune.cli.commands import build_parser, main
from edgeprune.cli.options import given_options
from edgeprune.config import BUILD_DEFAULTS, PRUNE_DEFAULTS, BuildConfig, PruneConfig
from edgeprune.errors import EdgePruneError


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list:
    """The configs the commands hand to the job (which then stops: exit 2, nothing run)."""
    configs: list = []

    def stop(config, out, **kw):
        configs.append(config)
        raise EdgePruneError("stopped by the test")

    monkeypatch.setattr("edgeprune.api.run_build", stop)
    return configs


def test_build_config_file_values_reach_the_config_and_flags_override_them(tmp_path: Path, seen: list,
                                                                           capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "build.toml"
    path.write_text('model = "torchvision:resnet18"\nlatency = "10ms"\nmax_steps = 5\nnoise_margin = 1.0\n'
                    'cache = false\ncriterion = "l1"\nignore = ["fc"]\n[output_weights]\nlogits = 2.0\n')
    assert main(["build", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    c = seen[-1]
    assert (c.prune.model, c.latency, c.max_steps, c.margin_k, c.use_cache, c.prune.criterion, c.prune.ignore,
            c.output_weights) == ("torchvision:resnet18", "10ms", 5, 1.0, False, "l1", ("fc",), (("logits", 2.0),))
    assert (c.prune.exporter, c.prune.channel_multiple, c.tolerance) == ("torchscript", None, 0.05)  # defaults
    assert main(["build", "--config", str(path), "--latency", "0.7x", "--max-steps", "12", "--noise-margin", "2",
                 "--criterion", "cap", "--exporter", "dynamo", "--out", str(tmp_path / "o")]) == 2
    c = seen[-1]
    # a flag given wins, even at the default's value; the file's other values stay
    assert (c.latency, c.max_steps, c.margin_k, c.prune.criterion, c.prune.exporter) == \
        ("0.7x", 12, 2.0, "cap", "dynamo")
    assert (c.prune.model, c.use_cache, c.prune.ignore) == ("torchvision:resnet18", False, ("fc",))
    capsys.readouterr()


def test_build_config_file_with_an_unknown_key_exits_2_naming_it(tmp_path: Path, seen: list,
                                                                capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "build.toml"
    path.write_text('latency = "10ms"\nmax_step = 5\n')
    assert main(["build", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeprune: error: build config ")
    assert "unknown option 'max_step'; known options: " in err[0] and "max_steps" in err[0]
    assert not seen
    assert main(["build", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml does not exist" in capsys.readouterr().err


def test_prune_and_build_flags_default_to_config_py() -> None:
    parser, _ = build_parser()
    for command, extra, defaults in (("prune", ["--ratio", "0.5", "--out", "o"], PRUNE_DEFAULTS),
                                     ("build", [], BUILD_DEFAULTS)):
        given = given_options(parser.parse_args([command, *extra]))
        assert given == {}  # no flag given, no value: config.py's defaults stand
        config = PruneConfig.from_dict(given) if command == "prune" else BuildConfig.from_dict(given).prune
        assert {k: getattr(config, k) for k in defaults} == defaults
    args = parser.parse_args(["build", "--no-compensation", "--no-cache", "--channel-multiple", "0", "--seed", "3"])
    assert given_options(args) == {"compensation": False, "use_cache": False, "channel_multiple": 0, "seed": 3}


@pytest.mark.parametrize("command", ["release", "finetune"])
def test_release_and_finetune_export_as_build_does(command: str) -> None:
    parser, _ = build_parser()
    first = ["release", "--model", "p.pt"] if command == "release" else ["finetune", "src", "--out", "o"]
    assert BuildConfig.from_dict(given_options(parser.parse_args(first), skip=("model",))).prune.exporter == \
        BUILD_DEFAULTS["exporter"]
    given = given_options(parser.parse_args([*first, "--exporter", "dynamo"]), skip=("model",))
    assert BuildConfig.from_dict(given).prune.exporter == "dynamo"
    with pytest.raises(SystemExit):
        parser.parse_args([*first, "--exporter", "onnx"])


def test_the_parser_reads_config_defaults_without_loading_torch() -> None:
    """`edgeprune agent` runs on boards without torch (docs/remote.md): the flags' defaults come from config.py,
    which loads torch only where a config is checked."""
    import subprocess
    import sys

    code = ("import sys\nfrom edgeprune.cli.commands import build_parser\nbuild_parser()\n"
            "print([m for m in ('torch', 'onnxruntime') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
