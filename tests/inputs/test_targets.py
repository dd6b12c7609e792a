from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from edgeprune.errors import EdgePruneError
from edgeprune.inputs.targets import (PRECISIONS, RUNTIME_NAMES, QuantizeConfig, Target, bundled_targets, float_target,
                                      load_target)

SHIPPED = ("cpu", "cpu-2t", "cpu-int8", "rpi5", "rpi5-int8", "jetson-orin-nano", "jetson-agx-orin",
           "jetson-orin-nano-int8", "x86-trt")


def test_bundled_targets_include_design_profiles() -> None:
    targets = bundled_targets()
    assert set(SHIPPED) <= set(targets)
    assert targets["cpu"].runtime == "onnxruntime" and targets["cpu"].threads == 1
    assert targets["cpu-2t"].threads == 2
    assert targets["rpi5"].threads == 4 and targets["rpi5"].arch == "aarch64"
    assert targets["jetson-orin-nano"].precision == "fp16" and targets["jetson-orin-nano"].runtime == "tensorrt"
    assert targets["jetson-orin-nano-int8"].precision == "int8"
    assert targets["x86-trt"].runtime == "trtexec"


def test_load_target_resolves_alias() -> None:
    assert load_target("jetson").name == "jetson-orin-nano"


@pytest.mark.parametrize("name", SHIPPED)
def test_target_dict_round_trip(name: str) -> None:
    t = load_target(name)
    back = Target.from_dict(t.to_dict())
    assert back == Target(**{**back.__dict__, "source": ""}) and back.to_dict() == t.to_dict()
    assert back.fingerprint() == t.fingerprint()


def test_fingerprint_changes_with_measurement_settings() -> None:
    cpu, cpu2 = load_target("cpu"), load_target("cpu-2t")
    assert cpu.fingerprint() != cpu2.fingerprint()


def test_load_target_unknown_lists_targets() -> None:
    with pytest.raises(EdgePruneError, match="unknown device 'nosuch'.*cpu.*jetson-orin-nano"):
        load_target("nosuch")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(text)
    return p


def test_load_target_file_misspelt_key_names_key_and_file(tmp_path: Path) -> None:
    p = write(tmp_path, 'name = "x"\nruntime = "onnxruntime"\nchanel_multiple = 8\n')
    with pytest.raises(EdgePruneError, match=r"t\.toml.*unknown key 'chanel_multiple'.*channel_multiple"):
        load_target(str(p))


def test_load_target_file_misspelt_measure_key(tmp_path: Path) -> None:
    p = write(tmp_path, 'name = "x"\n[measure]\niteration = 5\n')
    with pytest.raises(EdgePruneError, match=r"\[measure\].*unknown key 'iteration'"):
        load_target(str(p))


def test_load_target_file_wrong_type(tmp_path: Path) -> None:
    p = write(tmp_path, 'name = "x"\nthreads = "four"\n')
    with pytest.raises(EdgePruneError, match="'threads' must be an integer, found str"):
        load_target(str(p))


@pytest.mark.parametrize("key,allowed", [("runtime", RUNTIME_NAMES), ("precision", PRECISIONS)])
def test_load_target_file_unknown_choice_lists_allowed(tmp_path: Path, key: str, allowed: tuple) -> None:
    p = write(tmp_path, f'name = "x"\n{key} = "nope"\n')
    with pytest.raises(EdgePruneError, match=f"'{key}' is 'nope'; allowed values are: {', '.join(allowed)}"):
        load_target(str(p))


def test_load_target_file_not_toml(tmp_path: Path) -> None:
    p = write(tmp_path, "name = \n")
    with pytest.raises(EdgePruneError, match="not valid TOML"):
        load_target(str(p))


def test_load_target_file_remote_needs_one_address(tmp_path: Path) -> None:
    p = write(tmp_path, 'name = "x"\n[remote]\ntimeout_s = 3\n')
    with pytest.raises(EdgePruneError, match="exactly one of 'agent'"):
        load_target(str(p))


def test_int8_targets_carry_their_quantisation_settings_and_fall_back_to_float() -> None:
    cpu, pi, jetson = load_target("cpu-int8"), load_target("rpi5-int8"), load_target("jetson-orin-nano-int8")
    assert cpu.runtime == pi.runtime == "onnxruntime" and cpu.precision == pi.precision == "int8"
    assert cpu.quantization == QuantizeConfig(activations="uint8", reduce_range=True)  # AVX2: u8 x s8, 7-bit weights
    assert pi.quantization.activations == "int8" and not pi.quantization.reduce_range and pi.threads == 4
    # TensorRT's Q/DQ layers: symmetric int8 (no [quantization] table in its file: the runtime's defaults)
    assert jetson.quantization == QuantizeConfig(activations="int8", symmetric=True)
    assert load_target("cpu").quantization is None
    assert float_target(cpu).precision == "fp32" and float_target(cpu).quantization is None
    assert float_target(jetson).precision == "fp16" and float_target(load_target("cpu")) == load_target("cpu")


def test_quantisation_settings_change_the_fingerprint(tmp_path: Path) -> None:
    base = 'name = "x"\nprecision = "int8"\n'
    plain = load_target(str(write(tmp_path, base)))
    entropy = load_target(str(write(tmp_path, base + '[quantization]\nmethod = "entropy"\n')))
    assert plain.quantization.method == "minmax" and entropy.quantization.method == "entropy"
    assert plain.fingerprint() != entropy.fingerprint()
    assert Target.from_dict(entropy.to_dict()) == dataclasses.replace(entropy, source="")


@pytest.mark.parametrize("table,match", [
    ('[quantization]\nmethod = "kl"\n', "'method' is 'kl'; allowed values are: minmax, entropy, percentile"),
    ('[quantization]\nactivation = "int8"\n', "unknown key 'activation'"),
    ('[quantization]\npercentile = 20.0\n', r"percentile must be in \(50, 100\], found 20.0"),
    ('[quantization]\nsamples = 0\n', "samples must be in 1..100000, found 0"),
])
def test_load_target_file_bad_quantization_table(tmp_path: Path, table: str, match: str) -> None:
    p = write(tmp_path, 'name = "x"\nprecision = "int8"\n' + table)
    with pytest.raises(EdgePruneError, match=match):
        load_target(str(p))


def test_quantization_table_on_a_float_target_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, 'name = "x"\nprecision = "fp32"\n[quantization]\nmethod = "entropy"\n')
    with pytest.raises(EdgePruneError, match=r"\[quantization\]: applies to precision = \"int8\" only"):
        load_target(str(p))


def test_tensorrt_int8_target_needs_symmetric_int8_activations(tmp_path: Path) -> None:
    p = write(tmp_path, 'name = "x"\nruntime = "tensorrt"\nprecision = "int8"\n[quantization]\nactivations = "uint8"\n')
    with pytest.raises(EdgePruneError, match="TensorRT runs Q/DQ layers of symmetric int8 only"):
        load_target(str(p))


@pytest.mark.parametrize("name", ["../../../escaped", "", ".", "..", "a/b", "a\\b", ".hidden", " cpu"])
def test_a_target_name_that_is_not_one_folder_name_is_refused(tmp_path: Path, name: str) -> None:
    """A target's name becomes a folder of a release (matrix: OUT/MODEL/TARGET/BUDGET)."""
    path = tmp_path / "t.toml"
    path.write_text(f'name = {json.dumps(name)}\nruntime = "onnxruntime"\n')
    want = rf"target file {re.escape(str(path))}: target name .* must be one plain folder name"
    with pytest.raises(EdgePruneError, match=want):
        load_target(path)


def test_warm_up_of_a_slow_model_stops_after_half_of_max_seconds_with_three_runs_at_least() -> None:
    from edgeprune.inputs.targets import MeasureConfig

    cfg = MeasureConfig(warmup=10, max_seconds=0.5)
    assert not cfg.warmup_done(2, 5.0) and cfg.warmup_done(3, 0.26) and not cfg.warmup_done(3, 0.2)
    assert cfg.warmup_done(10, 0.01)  # a fast model: its `warmup` runs, as before
    assert not MeasureConfig(warmup=10, max_seconds=0.0).warmup_done(9, 100.0)  # no cap: every warm-up run
