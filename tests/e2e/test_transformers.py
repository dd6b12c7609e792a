"""Transformer widths end to end (issue 31, item 3): `edgeprune.prune` on tiny timm ViT and Swin with real-looking
calibration images narrows every MLP hidden width and removes whole heads, report.json says so, excludes only the
residual stream, and the exported model.onnx computes what the pruned torch module computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import edgeprune
from tests.vits import images, timm_swin, timm_vit


@pytest.mark.parametrize("build", [timm_vit, timm_swin], ids=["vit", "swin"])
def test_prune_narrows_mlp_widths_and_whole_heads_and_the_onnx_model_matches(build: object, tmp_path: Path) -> None:
    model = build()
    result = edgeprune.prune(model, ratio=0.5, example_input=images(1, seed=0), calibration=images(160, seed=1),
                             channel_multiple=1, out=tmp_path / "out")
    assert result.exit_code == 0, result.message
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    widths = report["widths"]
    heads = {g: w for g, w in widths.items() if g.endswith("attn.qkv")}
    mlps = {g: w for g, w in widths.items() if g.endswith("mlp.fc1")}
    assert heads and len(heads) == len(mlps)
    for w in heads.values():  # half the heads, whole
        assert w["after"] == w["before"] // 2 and w["after"] % w["unit"] == 0
    for w in mlps.values():
        assert w["after"] == w["before"] // 2
    excluded = report["excluded_groups"]
    assert excluded and all("residual stream" in why for why in excluded.values())
    for name, g in heads.items():
        attn = result.module.get_submodule(name.removesuffix(".qkv"))
        assert attn.num_heads * g["unit"] == g["after"]
    x = images(3, seed=5)
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for i in range(len(x)):
            want = result.module(x[i: i + 1]).numpy()
            got = sess.run(None, {sess.get_inputs()[0].name: x[i: i + 1].numpy()})[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
