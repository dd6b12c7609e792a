"""`BuildConfig.from_dict`, the one way from plain options to a config (the CLI, the API, a `build --config` file and
a manifest all come through it): values reach their fields, old spellings still read, unknown keys and wrong types
refused with the key and what is known."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgeprune.config import (BUILD_DEFAULTS, EXPORTERS, OPTION_KINDS, PRUNE_DEFAULTS, BuildConfig, PruneConfig,
                              load_options)
from edgeprune.errors import EdgePruneError


def test_from_dict_puts_every_value_in_its_field() -> None:
    c = BuildConfig.from_dict({"model": "torchvision:resnet18", "input_shape": [1, 3, 64, 64], "criterion": "l1",
                               "ignore": ["fc*"], "latency": "10ms", "max_steps": 7, "margin_k": 1.5,
                               "use_cache": False, "output_weights": {"boxes": 2.0}, "channel_multiple": 16})
    assert (c.prune.model, c.prune.input_shape, c.prune.criterion, c.prune.ignore) == \
        ("torchvision:resnet18", (1, 3, 64, 64), "l1", ("fc*",))
    assert (c.latency, c.max_steps, c.margin_k, c.use_cache, c.output_weights, c.prune.channel_multiple) == \
        ("10ms", 7, 1.5, False, (("boxes", 2.0),), 16)
    assert BuildConfig.from_dict({"input_shape": "1,3,32,32"}).prune.input_shape == (1, 3, 32, 32)


def test_from_dict_defaults_are_the_builds_and_prune_keeps_its_own() -> None:
    built = BuildConfig.from_dict({})
    assert built == BuildConfig(prune=PruneConfig(**BUILD_DEFAULTS))
    assert (built.prune.exporter, built.prune.channel_multiple) == ("torchscript", None)
    pruned = PruneConfig.from_dict({})
    assert pruned == PruneConfig() and PRUNE_DEFAULTS == {"exporter": "dynamo", "channel_multiple": 8}
    assert BuildConfig.from_dict({"exporter": "dynamo"}).prune.exporter == "dynamo"


def test_from_dict_reads_the_old_spellings_and_refuses_both_at_once() -> None:
    c = BuildConfig.from_dict({"noise_margin": 0.5, "cache": False})
    assert (c.margin_k, c.use_cache) == (0.5, False)
    with pytest.raises(EdgePruneError, match="noise_margin and margin_k are the same option"):
        BuildConfig.from_dict({"margin_k": 1.0, "noise_margin": 0.5})


def test_from_dict_unknown_key_names_it_and_the_known_ones() -> None:
    with pytest.raises(EdgePruneError) as e:
        BuildConfig.from_dict({"max_step": 8, "latency": "10ms"})
    msg = str(e.value)
    assert "unknown option 'max_step'" in msg and "known options: " in msg
    assert all(k in msg for k in ("max_steps", "margin_k", "criterion")) and "noise_margin for margin_k" in msg
    with pytest.raises(EdgePruneError, match=r"unknown option 'tolerance'; known options: latency$"):
        BuildConfig.from_dict({"tolerance": 0.1}, known=("latency",))
    with pytest.raises(EdgePruneError, match="unknown option 'device'"):
        PruneConfig.from_dict({"device": "cpu"})


def test_from_dict_loads_an_evaluate_spec_and_checks_values() -> None:
    from tests.models import settle

    c = BuildConfig.from_dict({"evaluate": "tests.models:settle", "max_metric_drop": 0.1})
    assert c.evaluate is settle
    with pytest.raises(EdgePruneError, match="--exporter must be dynamo or torchscript, found 'onnx'"):
        BuildConfig.from_dict({"exporter": "onnx"})
    with pytest.raises(EdgePruneError, match="input_shape must be positive integers"):
        BuildConfig.from_dict({"input_shape": [1, 0, 8]})


def test_option_kinds_cover_both_configs_and_the_exporters_are_export_s() -> None:
    from edgeprune.export.onnx import EXPORTERS as EXPORT_EXPORTERS

    fields = {f.name for f in dataclasses.fields(PruneConfig)} | {f.name for f in dataclasses.fields(BuildConfig)}
    assert set(OPTION_KINDS) == fields - {"prune"}
    assert set(EXPORTERS) == set(EXPORT_EXPORTERS)


def test_load_options_checks_keys_and_types_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "build.toml"
    path.write_text('latency = "10ms"\nnoise_margin = 1\nignore = ["head*"]\n[output_weights]\nboxes = 2\n')
    options = load_options(path)
    assert options == {"latency": "10ms", "margin_k": 1.0, "ignore": ["head*"], "output_weights": {"boxes": 2}}
    assert BuildConfig.from_dict(options).margin_k == 1.0
    path.write_text('max_steps = "8"\n')
    with pytest.raises(EdgePruneError, match=r"build config .*build\.toml: key 'max_steps' must be an integer"):
        load_options(path)
    path.write_text('max_step = 8\n')
    with pytest.raises(EdgePruneError, match=r"build\.toml: unknown option 'max_step'; known options: .*max_steps"):
        load_options(path)
