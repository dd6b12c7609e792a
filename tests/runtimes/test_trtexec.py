"""trtexec backend: command lines per TensorRT version, and parsing of real trtexec logs.

Every log under tests/fixtures/trtexec/ is real trtexec output (sources in each file's header and in README.md there);
the expected numbers below are copied from those logs, never made up.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from edgeprune.errors import DeviceUnreachable, EdgePruneError, ExitCode
from edgeprune.inputs.targets import MeasureConfig, load_target
from edgeprune.runtimes import runtime_for, trtexec
from edgeprune.runtimes.stats import stats_from_repeats

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "trtexec"
TRT86 = "trt-8.6.0_load-engine_verbose.log.gz"
TRT10_14 = "trt-10.14.1_load-engine_no-transfers.log"
TRT10_16 = "trt-10.16.1_onnx-defaults.log"
TRT11 = "trt-11.0.0_load-engine.excerpt.log"
TRT10_FAILED = "trt-10.16.0_failed-plugin.log"
TRT11_UNKNOWN = "trt-11.0.0_unknown-option.excerpt.log"


def fixture_text(name: str) -> str:
    path = FIXTURES / name
    return gzip.open(path, "rt").read() if name.endswith(".gz") else path.read_text()


def jetson_fp16():
    return dataclasses.replace(load_target("jetson"), measure=MeasureConfig(warmup=50, iterations=200, repeats=3))


# ---------------------------------------------------------------- version


@pytest.mark.parametrize("banner, expected", [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8600] # trtexec", (8, 6, 0)),
    ("&&&& PASSED TensorRT.trtexec [TensorRT v9100] # trtexec --onnx=models/dynamic_model.onnx", (9, 1, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100200] # D:\\TensorRT-10.2.0.19\\bin\\trtexec.exe", (10, 2, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v101401] [b48] # trtexec", (10, 14, 1)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110000] [b114] # trtexec", (11, 0, 0)),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b106] # trtexec --help", (11, 1, 0)),
])
def test_parse_version_reads_banner_codes(banner, expected):
    # Banners as printed by trtexec in the fixture logs and in NVIDIA/TensorRT issues #3364 and #4036.
    assert trtexec.parse_version(banner) == expected


@pytest.mark.parametrize("name, expected", [(TRT86, (8, 6, 0)), (TRT10_14, (10, 14, 1)), (TRT10_16, (10, 16, 1)),
                                            (TRT11, (11, 0, 0)), (TRT10_FAILED, (10, 16, 0))])
def test_parse_version_agrees_with_version_line_in_real_logs(name, expected):
    text = fixture_text(name)
    assert trtexec.parse_version(text) == expected
    banner = next(line for line in text.splitlines() if line.startswith("&&&& RUNNING"))
    assert trtexec.parse_version(banner) == expected


# ---------------------------------------------------------------- parsing real logs


def test_parse_output_reads_trt86_summary_and_full_trace():
    r = trtexec.parse_output(fixture_text(TRT86))
    assert r.version == (8, 6, 0)
    assert r.gpu_compute == {"min": 0.041748, "max": 0.609253, "mean": 0.0451127, "median": 0.0439453,
                             "p90": 0.0449219, "p95": 0.045105, "p99": 0.0521851}
    assert r.queries == 63030
    assert r.throughput_qps == 21009.2
    assert r.coeff_var_pct == 44.3558
    assert r.std_ms() == pytest.approx(0.443558 * 0.0451127)
    # 8.6 prints the whole trace: one 10-run average per 10 queries, nothing omitted.
    assert r.trace_runs_per_average == 10 and r.trace_omitted == 0
    assert len(r.trace_gpu_ms) * 10 == r.queries
    # The averages reproduce the reported mean; trtexec sums 63030 floats in float32, hence the 1e-3 tolerance.
    assert np.mean(r.trace_gpu_ms) == pytest.approx(r.gpu_compute["mean"], rel=1e-3)
    assert r.raw_gpu_ms() is None  # averages of 10 are not per-query times


def test_parse_output_reads_trt10_summary_and_accounts_for_omitted_trace():
    r = trtexec.parse_output(fixture_text(TRT10_14))
    assert r.version == (10, 14, 1)
    assert r.gpu_compute == {"min": 0.0285645, "max": 1.43262, "mean": 0.0314152, "median": 0.029541,
                             "p90": 0.0297852, "p95": 0.0297852, "p99": 0.0656738}
    assert r.queries == 91556 and r.throughput_qps == 30518.1 and r.coeff_var_pct == 80.1687
    # From 10 on trtexec prints the first and last 200 averages and says how many timings it left out.
    assert len(r.trace_gpu_ms) == 400 and r.trace_omitted == 87556
    assert len(r.trace_gpu_ms) * 10 + r.trace_omitted == r.queries
    assert r.raw_gpu_ms() is None


def test_parse_output_reads_trt10_onnx_build_log():
    r = trtexec.parse_output(fixture_text(TRT10_16))
    assert r.version == (10, 16, 1)
    assert r.gpu_compute["median"] == 0.0361328 and r.gpu_compute["p90"] == 0.0368652
    assert r.queries == 46125 and r.coeff_var_pct == 6.58751
    assert len(r.trace_gpu_ms) * 10 + r.trace_omitted == r.queries


def test_parse_output_reads_trt11_summary():
    r = trtexec.parse_output(fixture_text(TRT11))
    assert r.version == (11, 0, 0)
    assert r.gpu_compute == {"min": 0.0395508, "max": 0.0682373, "mean": 0.0403384, "median": 0.0402832,
                             "p90": 0.0404663, "p95": 0.0405273, "p99": 0.0413513}
    assert r.queries == 69647 and r.throughput_qps == 23215.0
    # The log's "Total GPU Compute Time: 2.80945 s" is mean x queries: the parsed figures belong together.
    assert r.gpu_compute["mean"] * r.queries / 1000 == pytest.approx(2.80945, rel=1e-5)
    assert r.coeff_var_pct is None and r.std_ms() is None  # below 11's 2.5% threshold trtexec prints no spread


def test_parse_output_finds_no_summary_in_failed_log():
    r = trtexec.parse_output(fixture_text(TRT10_FAILED))
    assert r.version == (10, 16, 0)
    assert r.gpu_compute == {} and r.queries is None


# ---------------------------------------------------------------- statistics


def test_stats_from_reports_single_run_uses_summary_and_printed_spread():
    r = trtexec.parse_output(fixture_text(TRT10_14))
    s = trtexec.stats_from_reports([r], jetson_fp16(), "10.14.1")
    assert (s.median, s.p90, s.min, s.max, s.mean) == (0.029541, 0.0297852, 0.0285645, 1.43262, 0.0314152)
    assert s.n == 91556
    assert s.std == pytest.approx(0.801687 * 0.0314152)
    assert s.repeat_medians == (0.029541,)
    assert (s.runtime, s.runtime_version, s.timing, s.precision, s.target) == \
        ("trtexec", "10.14.1", "gpu_compute", "fp16", "jetson-orin-nano")


def test_stats_from_reports_leaves_std_nan_when_trtexec_printed_none():
    s = trtexec.stats_from_reports([trtexec.parse_output(fixture_text(TRT11))], jetson_fp16(), "11.0.0")
    assert math.isnan(s.std)
    assert s.median == 0.0402832 and s.n == 69647


def test_stats_from_reports_pools_several_runs():
    a = trtexec.parse_output(fixture_text(TRT10_14))
    b = trtexec.parse_output(fixture_text(TRT10_16))
    s = trtexec.stats_from_reports([a, b], jetson_fp16(), "10.x")
    na, nb = 91556, 46125
    ma, mb = 0.0314152, 0.0359588
    sa, sb = 0.801687 * ma, 0.0658751 * mb
    mean = (na * ma + nb * mb) / (na + nb)
    assert s.mean == pytest.approx(mean)
    # Pooled variance: E[x^2] of the union minus its squared mean, with E[x^2] = std^2 + mean^2 per run.
    assert s.std == pytest.approx(math.sqrt((na * (sa**2 + ma**2) + nb * (sb**2 + mb**2)) / (na + nb) - mean**2))
    assert s.n == na + nb
    assert s.min == 0.0285645 and s.max == 1.43262
    assert s.repeat_medians == (0.029541, 0.0361328)
    assert s.median == pytest.approx((0.029541 + 0.0361328) / 2)
    assert s.p90 == pytest.approx((0.0297852 + 0.0368652) / 2)  # median of the runs' p90s


def test_stats_from_reports_uses_every_query_when_trace_is_complete():
    # What --avgRuns=1 gives: one trace value per query. No public log with --avgRuns=1 was found, so the report is
    # built from the real 8.6 trace values (10-run averages) as if each were one query's time.
    values = trtexec.parse_output(fixture_text(TRT86)).trace_gpu_ms
    report = trtexec.TrtexecReport(version=(8, 6, 0), gpu_compute={"median": -1.0}, queries=len(values),
                                   trace_runs_per_average=1, trace_gpu_ms=values)
    assert report.raw_gpu_ms() == values
    s = trtexec.stats_from_reports([report, report], jetson_fp16(), "8.6.0")
    expected = stats_from_repeats([list(values), list(values)], target="jetson-orin-nano", runtime="trtexec",
                                  runtime_version="8.6.0", precision="fp16", timing="gpu_compute")
    assert s == expected
    assert s.n == 2 * len(values) and s.median == pytest.approx(float(np.median(values)))


def test_stats_from_reports_rejects_report_without_summary():
    with pytest.raises(EdgePruneError, match="no GPU Compute Time"):
        trtexec.stats_from_reports([trtexec.parse_output(fixture_text(TRT10_FAILED))], jetson_fp16(), "10.16.0")


# ---------------------------------------------------------------- command lines per version


def build_job(**kw):
    return trtexec.TrtexecJob(onnx="m.onnx", engine="m.engine", timing_cache="t.cache", **kw)


def test_command_for_trt86_fp16():
    cmd = trtexec.command(build_job(workspace_mib=1024), jetson_fp16(), (8, 6, 1))
    assert cmd == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--fp16", "--memPoolSize=workspace:1024",
                   "--timingCacheFile=t.cache", "--warmUp=500", "--iterations=200", "--duration=0", "--avgRuns=1",
                   "--percentile=90,95,99", "--useSpinWait", "--noDataTransfers", "--separateProfileRun"]


def test_command_for_trt80_adds_explicit_batch_workspace_and_single_percentile():
    cmd = trtexec.command(build_job(workspace_mib=1024), jetson_fp16(), (8, 0, 1))
    assert "--explicitBatch" in cmd and "--workspace=1024" in cmd and "--percentile=90" in cmd
    assert not any(c.startswith("--memPoolSize") for c in cmd)


def test_command_for_trt84_uses_mempoolsize_and_single_percentile():
    cmd = trtexec.command(build_job(workspace_mib=256), jetson_fp16(), (8, 4, 3))
    assert "--memPoolSize=workspace:256" in cmd and "--percentile=90" in cmd
    assert "--explicitBatch" not in cmd and "--workspace=256" not in cmd


def test_command_for_trt10_int8_falls_back_to_fp16():
    target = dataclasses.replace(load_target("jetson-int8"), measure=MeasureConfig(warmup=5, iterations=20))
    cmd = trtexec.command(build_job(), target, (10, 3, 0))
    assert cmd[cmd.index("--int8") + 1] == "--fp16"
    assert "--explicitBatch" not in cmd  # an unknown option from 10 on
    assert "--warmUp=200" in cmd and "--iterations=20" in cmd  # 200 ms is trtexec's own minimum warm-up
    assert "--noCudaGraph" not in cmd


def test_command_for_trt11_has_no_precision_flags_and_disables_cuda_graphs():
    for precision in ("fp16", "int8"):
        target = dataclasses.replace(jetson_fp16(), precision=precision)
        cmd = trtexec.command(build_job(), target, (11, 0, 0))
        assert "--noCudaGraph" in cmd
        for flag in ("--useSpinWait", "--noDataTransfers", "--separateProfileRun", "--explicitBatch"):
            assert flag not in cmd  # defaults in 11 (or gone); passing them only prints deprecation warnings
        # TensorRT 11's trtexec rejected these as "Unknown option" (real log): the command must not contain them.
        rejected = {line.split("Unknown option: ")[1].split()[0]
                    for line in fixture_text(TRT11_UNKNOWN).splitlines() if "Unknown option: " in line}
        assert rejected == {"--fp16", "--int8", "--best", "--precisionConstraints"}
        assert not rejected & {c.split("=")[0] for c in cmd}


def test_command_loading_engine_has_no_build_flags():
    job = trtexec.TrtexecJob(engine="m.engine", shapes=(("input", (1, 3, 224, 224)), ("mask", (1, 224))))
    cmd = trtexec.command(job, jetson_fp16(), (10, 3, 0), binary="/opt/trt/bin/trtexec")
    assert cmd[:3] == ["/opt/trt/bin/trtexec", "--loadEngine=m.engine", "--shapes=input:1x3x224x224,mask:1x224"]
    assert not any(c.startswith(("--onnx", "--fp16", "--timingCacheFile", "--saveEngine")) for c in cmd)


def test_command_rejects_trt7():
    with pytest.raises(EdgePruneError, match="too old"):
        trtexec.command(build_job(), jetson_fp16(), (7, 2, 3))


# ---------------------------------------------------------------- running trtexec (subprocess plumbing)


def replay_script(tmp_path: Path, fixture: str, exit_code: int) -> Path:
    """A stand-in `trtexec` that prints a REAL captured trtexec log and exits like the real run did.

    It only exercises the subprocess plumbing and the error path; its numbers belong to the logged run, not to any
    model of these tests, and no test reads them as a measurement of one."""
    log = tmp_path / "replayed.log"
    log.write_text(fixture_text(fixture))
    script = tmp_path / "bin" / "trtexec"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\n# replays a real captured trtexec log\ncat '{log}'\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_run_trtexec_failure_carries_last_log_lines(tmp_path):
    script = replay_script(tmp_path, TRT10_FAILED, 1)
    with pytest.raises(EdgePruneError, match="exit code 1") as info:
        trtexec.run_trtexec([str(script), "--onnx=model-addscalar.onnx"])
    msg = str(info.value)
    tail = msg.split("lines of its log:\n", 1)[1].splitlines()
    assert len(tail) == trtexec.LOG_TAIL_LINES
    assert tail[-1].startswith("&&&& FAILED TensorRT.trtexec [TensorRT v101600]")
    assert "[E] Engine set up failed" in tail[-2]


def test_run_trtexec_names_unknown_options(tmp_path):
    script = replay_script(tmp_path, TRT11_UNKNOWN, 1)
    with pytest.raises(EdgePruneError, match=r"TensorRT 11\.0\.0 does not know --fp16, --int8, --best"):
        trtexec.run_trtexec([str(script), "--fp16"])


def test_run_trtexec_returns_log_and_detects_version(tmp_path):
    script = replay_script(tmp_path, TRT11, 0)
    out = trtexec.run_trtexec([str(script), "--loadEngine=x.engine"])
    assert trtexec.parse_output(out).queries == 69647
    assert trtexec.detect_version(str(script)) == (11, 0, 0)


def test_run_trtexec_times_out(tmp_path):
    script = tmp_path / "trtexec"
    script.write_text("#!/bin/sh\necho '&&&& RUNNING TensorRT.trtexec [TensorRT v100300]'\nexec sleep 10\n")
    script.chmod(0o755)
    with pytest.raises(EdgePruneError, match="did not finish within 1 s"):
        trtexec.run_trtexec([str(script)], timeout_s=1)


def test_measure_reports_trtexec_failure(tmp_path, monkeypatch, tiny_onnx):
    script = replay_script(tmp_path, TRT10_FAILED, 1)
    monkeypatch.setenv(trtexec.BINARY_ENV, str(script))
    monkeypatch.setenv("EDGEPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(EdgePruneError, match="Failed to parse onnx file"):
        trtexec.measure(tiny_onnx, jetson_fp16(), repeats=1)


def test_measure_without_trtexec_is_device_unreachable(tmp_path, monkeypatch, tiny_onnx):
    monkeypatch.delenv(trtexec.BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    if trtexec.find_binary() is not None:
        pytest.skip("JetPack's trtexec is installed here")
    assert trtexec.version() is None
    assert "not on PATH" in trtexec.unavailable_reason()
    with pytest.raises(DeviceUnreachable) as info:
        trtexec.measure(tiny_onnx, jetson_fp16())
    assert info.value.code == ExitCode.DEVICE_UNREACHABLE
    target = dataclasses.replace(load_target("x86-trt"), arch="any")
    with pytest.raises(DeviceUnreachable, match=r"add a \[remote\] table"):
        runtime_for(target)


def test_find_binary_requires_executable_env_path(tmp_path, monkeypatch):
    path = tmp_path / "trtexec"
    path.write_text("not executable")
    monkeypatch.setenv(trtexec.BINARY_ENV, str(path))
    assert trtexec.find_binary() is None
    os.chmod(path, 0o755)
    assert trtexec.find_binary() == str(path)


def int8_target():
    return dataclasses.replace(load_target("x86-trt"), precision="int8", arch="any",
                               measure=MeasureConfig(warmup=50, iterations=200, repeats=1))


def test_measure_says_calibration_data_cannot_reach_trtexec(tmp_path, monkeypatch, tiny_onnx, caplog):
    monkeypatch.setenv(trtexec.BINARY_ENV, str(replay_script(tmp_path, TRT10_14, 0)))
    monkeypatch.setenv("EDGEPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    calib = np.zeros((4, 3, 32, 32), np.float32)
    trtexec.measure(tiny_onnx, int8_target(), calibration=calib)
    assert "trtexec cannot take calibration data" in caplog.text
    caplog.clear()
    trtexec.measure(tiny_onnx, dataclasses.replace(int8_target(), precision="fp16"), calibration=calib)
    assert "calibration" not in caplog.text  # nothing is calibrated at fp16


def test_runtimes_measure_keys_int8_figures_by_their_calibration_data(tmp_path, monkeypatch, tiny_onnx):
    """The dispatcher hands `calibration` to the backend, and a cached int8 figure is reused only for the same data."""
    from edgeprune.runtimes import MeasurementCache, measure

    monkeypatch.setenv(trtexec.BINARY_ENV, str(replay_script(tmp_path, TRT10_14, 0)))
    monkeypatch.setenv("EDGEPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    cache = MeasurementCache(tmp_path / "measurements")
    calib = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    target = int8_target()
    assert measure(tiny_onnx, target, cache=cache, calibration=calib).source == "measured"
    assert measure(tiny_onnx, target, cache=cache, calibration=calib.copy()).source == "cache"
    assert measure(tiny_onnx, target, cache=cache, calibration=calib + 1).source == "measured"
    assert measure(tiny_onnx, target, cache=cache).source == "measured"  # no data: the backend's placeholder
    assert measure(tiny_onnx, target, cache=cache).source == "cache"
