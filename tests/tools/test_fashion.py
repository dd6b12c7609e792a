"""tools/fashion.py without the Fashion-MNIST dataset: idx parsing, the calibration recipe edgeprune loads, the
missing-weights error, and that the model's coupled structures (residual, concat, depthwise) are all traced."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.inputs.data import load_data
from edgeprune.inputs.recipe import load_recipe
from tests.tools import tool_by_path


@pytest.fixture(scope="module")
def fashion():
    yield from tool_by_path("fashion")


def write_idx(path: Path, a: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + a.astype(np.uint8).tobytes())


def test_read_idx_round_trips_images_and_labels(fashion, tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    write_idx(tmp_path / "x.gz", images)
    write_idx(tmp_path / "y.gz", labels)
    np.testing.assert_array_equal(fashion.read_idx(tmp_path / "x.gz"), images)
    np.testing.assert_array_equal(fashion.read_idx(tmp_path / "y.gz"), labels)


def test_read_idx_refuses_a_truncated_file(fashion, tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28)) + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated"):
        fashion.read_idx(path)


def test_normalise_maps_pixels_with_the_training_mean_and_std(fashion) -> None:
    x = fashion.normalise(np.array([[[0, 255]]], dtype=np.uint8))
    assert x.dtype == np.float32 and x.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(x.ravel(), [-fashion.MEAN / fashion.STD, (1 - fashion.MEAN) / fashion.STD], rtol=1e-6)


def write_samples(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((n, 1, 28, 28)).astype(np.float32)
    y = np.arange(n, dtype=np.int64) % 10
    np.save(folder / "calib_x.npy", x)
    np.save(folder / "calib_y.npy", y)
    return x, y


@pytest.mark.parametrize("absolute", [False, True])
def test_recipe_text_loads_with_its_heldout_count_and_labels(fashion, tmp_path: Path, absolute: bool) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    x, y = write_samples(data_dir, 40)
    recipe_dir = tmp_path / "elsewhere" if absolute else data_dir
    recipe_dir.mkdir(exist_ok=True)
    path = recipe_dir / "r.toml"
    path.write_text(fashion.recipe_text(count=40, heldout=15, seed=3, folder=data_dir if absolute else None))
    recipe = load_recipe(path)
    assert (recipe.kind, recipe.count, recipe.heldout, recipe.batch_size, recipe.seed) == ("npy", 40, 15, 32, 3)
    d = load_data(recipe, fashion.INPUT_SHAPE)
    assert len(d.heldout_x) == 15 and len(d.calib_x) == 25
    # every held-out sample is one of the written samples, with its own label
    rows = {x[i].tobytes(): y[i] for i in range(len(x))}
    assert [rows[s.tobytes()] for s in d.heldout_x] == list(d.heldout_y)


def test_recipe_seed_changes_the_split_but_not_the_samples(fashion, tmp_path: Path) -> None:
    write_samples(tmp_path, 40)
    parts = []
    for seed in (0, 1):
        path = tmp_path / f"r{seed}.toml"
        path.write_text(fashion.recipe_text(count=40, heldout=20, seed=seed))
        d = load_data(load_recipe(path), fashion.INPUT_SHAPE)
        parts.append(({s.tobytes() for s in d.heldout_x}, {s.tobytes() for s in d.calib_x}))
    assert parts[0][0] != parts[1][0]
    assert parts[0][0] | parts[0][1] == parts[1][0] | parts[1][1]
    assert not parts[0][0] & parts[0][1]


def test_make_net_without_weights_says_how_to_train(fashion, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fashion, "WEIGHTS", tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="python -m tools.train_fashion"):
        fashion.make_net()


def test_make_net_loads_the_saved_weights(fashion, tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    net = fashion.FashionNet().eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    monkeypatch.setattr(fashion, "WEIGHTS", tmp_path / "w.pt")
    loaded = fashion.make_net()
    x = torch.randn(2, *fashion.INPUT_SHAPE[1:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert not loaded.training


def test_fashion_net_traces_residual_concat_and_depthwise_groups(fashion) -> None:
    from edgeprune.dependency.graph import trace

    torch.manual_seed(0)
    net = fashion.FashionNet().eval()
    assert 100_000 <= sum(p.numel() for p in net.parameters()) <= 500_000
    groups = {g.name: g for g in trace(net, torch.randn(fashion.INPUT_SHAPE)).groups}
    residual = groups["down1.0"]  # the stream the identity shortcut couples
    assert set(residual.producers) == {"down1.0", "block1.conv2.0"}
    concat = next(g for g in groups.values() if "block2.branch1.0" in g.producers)
    assert set(concat.producers) == {"block2.branch1.0", "block2.branch3.0"} and concat.channels == 128
    assert "block3.depthwise.0" in concat.members + (concat.name,)
    assert all(g.channels % 16 == 0 for g in groups.values())
