"""Fixtures of the bad-input matrix (`../shared/audit/reliability-matrix.md`), made from their descriptions: hostile
model factories, broken files, malformed target files, recipes and latency tables. `make_fixtures(root)` writes them
under `root/fx` and returns the paths the cases use."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

BAD_MODELS = '''
import time

import torch
from torch import nn


class Tiny(nn.Module):
    """3x16x16 input, two prunable groups."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 16, 3, padding=1)
        self.conv_b = nn.Conv2d(16, 16, 3, padding=1)
        self.conv_c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def trunk(self, x):
        return torch.relu(self.conv_a(x))

    def forward(self, x):
        return self.head(torch.relu(self.conv_b(self.trunk(x))).mean((2, 3)))


def tiny():
    torch.manual_seed(0)
    return Tiny()


def raises():
    raise RuntimeError("boom: the factory failed")


def returns_int():
    return 3


def nan_weights():
    m = tiny()
    with torch.no_grad():
        m.conv_a.weight[0, 0, 0, 0] = float("nan")
    return m


class ValueBranch(Tiny):
    """Branches on the input's values: the example input (standard normal) never reaches 8, one sample does."""

    def forward(self, x):
        y = self.trunk(x)
        y = torch.relu(self.conv_c(y)) if x.max() > 8 else torch.relu(self.conv_b(y))
        return self.head(y.mean((2, 3)))


def value_branch():
    torch.manual_seed(0)
    return ValueBranch()


class BatchBranch(Tiny):
    def forward(self, x):
        y = self.trunk(x)
        y = torch.relu(self.conv_c(y)) if x.shape[0] > 1 else torch.relu(self.conv_b(y))
        return self.head(y.mean((2, 3)))


def batch_branch():
    torch.manual_seed(0)
    return BatchBranch()


class Batch1Only(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv_a(x)).reshape(1, -1))


def batch1_only():
    torch.manual_seed(0)
    return Batch1Only()


class NonTensorOut(Tiny):
    """A dict output is fine (several outputs); a leaf that is not a tensor is not."""

    def forward(self, x):
        y = super().forward(x)
        return {"out": y, "label": "cat"}


def non_tensor_out():
    torch.manual_seed(0)
    return NonTensorOut()


class Slow(Tiny):
    """Sleeps in forward: a process is still inside its job when a test signals it."""

    def forward(self, x):
        time.sleep(0.5)
        return super().forward(x)


def slow():
    torch.manual_seed(0)
    return Slow()
'''

FAST_TARGET = """name = "ok"
runtime = "onnxruntime"
channel_multiple = 8
[measure]
warmup = 1
iterations = 5
repeats = 1
final_repeats = 1
"""


class Evil:
    """Pickles to a call of os.system: what `--weights` must refuse to load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return os.system, (f"touch {self.marker}",)


def tiny_onnx_file(path: Path, dynamic_hw: bool = False) -> Path:
    """A conv whose weight is an initializer; with `dynamic_hw` the input's H and W are symbolic."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(4 * 3 * 3 * 3, np.float32).tolist())
    hw = ["H", "W"] if dynamic_hw else [16, 16]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "H2", "W2"] if dynamic_hw else [1, 4, 14, 14])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def external_data_onnx(path: Path, location: str) -> Path:
    """A model whose weight is external data at `location` (outside its folder): refused, never read."""
    model = onnx.load(str(tiny_onnx_file(path)))
    w = model.graph.initializer[0]
    w.ClearField("float_data")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", location
    path.write_bytes(model.SerializeToString())
    return path


def _recipe(file: Path, **keys: object) -> Path:
    file.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items()) + "\n")
    return file


def _spiked(fx: Path, name: str, position: str) -> Path:
    """64 standard-normal 3x16x16 samples, one of them with a value of 10 where `position` says: the first sample
    of the second calibration batch ("calib") or a held-out sample ("heldout") of the recipe's seeded split."""
    x = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32) * 0.5
    perm = np.random.default_rng(0).permutation(64)  # data.load_data's split: held out first, then calibration
    held, batch = 16, 8
    x[perm[held + batch] if position == "calib" else perm[3], 0, 0, 0] = 10.0
    np.save(fx / f"{name}.npy", x)
    return _recipe(fx / f"{name}.toml", kind="npy", path=f"{name}.npy", heldout=held, batch_size=batch)


def _table(path: Path, meta: dict, entries: dict, models: dict) -> Path:
    from edgeprune.latency.table import LUT_FORMAT, entries_digest

    path.write_text(json.dumps({"format": LUT_FORMAT, "meta": {**meta, "digest": entries_digest(entries, models)},
                                "entries": entries, "models": models}))
    return path


def make_fixtures(root: Path) -> dict[str, Path]:
    from edgeprune.export.onnx import export_onnx
    from edgeprune.latency.table import table_meta
    from edgeprune.inputs.targets import load_target_file

    fx = root / "fx"
    fx.mkdir()
    (fx / "bad_models.py").write_text(BAD_MODELS)
    (fx / "t_ok.toml").write_text(FAST_TARGET)
    good = fx / "good.onnx"
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_models_fx", fx / "bad_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    export_onnx(mod.tiny().eval(), torch.randn(1, 3, 16, 16), good, exporter="torchscript")
    tiny_onnx_file(fx / "dyn.onnx", dynamic_hw=True)
    external_data_onnx(fx / "ext_traversal.onnx", "../../../../../../../../etc/hostname")
    external_data_onnx(fx / "ext_abs.onnx", "/etc/hostname")

    measure = "[measure]\n"
    targets = {
        "t_hugeiter": f'name = "t"\n{measure}iterations = 1000000000\nmax_seconds = 0\n',
        "t_nan_maxsec": f'name = "t"\n{measure}max_seconds = nan\n',
        "t_negrepeats": f'name = "t"\n{measure}repeats = -1\n',
        "t_remote_negtimeout": 'name = "t"\n[remote]\nagent = "http://127.0.0.1:8799"\ntimeout_s = -1\n',
        "t_remote_badport": 'name = "t"\n[remote]\nagent = "http://127.0.0.1:notaport"\n',
        "t_long": f'name = "long"\n{measure}warmup = 0\niterations = 100000\nrepeats = 100\n',
    }
    for name, text in targets.items():
        (fx / f"{name}.toml").write_text(text)

    _recipe(fx / "c_rand64.toml", kind="random", count=64, heldout=16, batch_size=16)
    _recipe(fx / "c_negseed.toml", kind="random", count=64, heldout=16, seed=-1)
    _recipe(fx / "c_hugecount.toml", kind="random", count=100_000_000)
    (fx / "notnpy.npy").write_bytes(np.random.default_rng(0).bytes(4096))
    _recipe(fx / "c_notnpy.toml", kind="npy", path="notnpy.npy")
    np.save(fx / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _recipe(fx / "c_objects.toml", kind="npy", path="objects.npy")
    _spiked(fx, "c_spike_calib", "calib")
    _spiked(fx, "c_spike_heldout", "heldout")

    torch.save(mod.tiny().state_dict(), fx / "tiny_sd.pt")
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2))
    torch.save({"conv_a.weight": torch.zeros(8, 3, 3, 3), **{f"x{k}": v for k, v in other.state_dict().items()}},
               fx / "other_model_sd.pt")
    wrong = mod.tiny().state_dict()
    wrong["head.weight"], wrong["head.bias"] = torch.zeros(5, 16), torch.zeros(5)
    torch.save(wrong, fx / "wrongshape_sd.pt")
    (fx / "random.pt").write_bytes(np.random.default_rng(1).bytes(2048))
    (fx / "evil.pt").write_bytes(pickle.dumps(Evil(root / "PWNED")))
    (fx / "token").write_text("a-good-token-0123456789\n")
    (fx / "token_nonutf8").write_bytes(b"\xff\xfe token")

    luts = root / "luts"
    luts.mkdir()
    meta = table_meta(load_target_file(fx / "t_ok.toml"))
    _table(luts / "empty_ok.json", meta, {}, {})
    model = {"offset_ms": 0.0, "scale": 1.0, "base_ms": 1.0, "calibration": []}
    (luts / "trunc.json").write_text(_table(luts / "full.json", meta, {}, {"example": model}).read_text()[:60])
    _table(luts / "edited_digest.json", meta, {}, {"example": {k: v for k, v in model.items() if k != "base_ms"}})
    _table(luts / "edited_digest2.json", meta, {"sig": {"cin": ["8", "16"], "cout": [8], "ms": [[1.0], [2.0]]}}, {})
    return {"fx": fx, "luts": luts, "pwned": root / "PWNED"}
