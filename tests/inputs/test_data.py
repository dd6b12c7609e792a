"""Loading a recipe's samples: every kind of source, the seeded calibration / held-out split, and refused data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.errors import EdgePruneError
from edgeprune.inputs.data import CalibrationData, load_data, min_samples_error
from edgeprune.inputs.example import INPUT_SHAPE, TRAIN_COUNT, digits_32
from edgeprune.inputs.recipe import IMAGENET_MEAN, IMAGENET_STD, Recipe, load_recipe
from tests.inputs.test_recipe import recipe_file

RED, BLUE = (255, 0, 0), (0, 128, 255)


def save_png(path: Path, color: tuple[int, ...], size: tuple[int, int] = (8, 6), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


@pytest.fixture
def labelled_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for i in range(3):
        save_png(root / "cat" / f"c{i}.png", RED)
        save_png(root / "dog" / f"d{i}.png", BLUE)
    return root


def rows(x: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in x)


# --- digits -------------------------------------------------------------------------------------------------------


def test_load_data_digits_draws_only_untrained_digits_disjointly() -> None:
    x, y, perm = digits_32()
    pool = perm[TRAIN_COUNT:]
    data = load_data(load_recipe("digits"), INPUT_SHAPE)
    assert data.labelled
    assert len(data.calib_x) + len(data.heldout_x) == len(pool) == 797
    assert len(data.heldout_x) == round(0.25 * 797)
    # calibration and held-out parts together are exactly the untrained pool: so they are disjoint and untrained
    got = np.concatenate([data.calib_x, data.heldout_x])
    assert rows(got) == rows(x[pool])
    # and every label goes with its image
    by_image = {x[i].tobytes(): int(y[i]) for i in pool}
    labels = np.concatenate([data.calib_y, data.heldout_y])
    assert all(by_image[s.tobytes()] == int(lab) for s, lab in zip(got, labels))


def test_load_data_digits_count_subset_is_seeded(tmp_path: Path) -> None:
    x, _, perm = digits_32()
    untrained = {x[i].tobytes() for i in perm[TRAIN_COUNT:]}
    a = load_data(load_recipe(recipe_file(tmp_path, kind="digits", count=40, heldout=10, seed=3)), INPUT_SHAPE)
    b = load_data(load_recipe(recipe_file(tmp_path, kind="digits", count=40, heldout=10, seed=3)), INPUT_SHAPE)
    c = load_data(load_recipe(recipe_file(tmp_path, kind="digits", count=40, heldout=10, seed=4)), INPUT_SHAPE)
    assert (len(a.calib_x), len(a.heldout_x)) == (30, 10)
    assert np.array_equal(a.calib_x, b.calib_x) and np.array_equal(a.heldout_y, b.heldout_y)
    assert not np.array_equal(a.calib_x, c.calib_x)
    calib, held = {s.tobytes() for s in a.calib_x}, {s.tobytes() for s in a.heldout_x}
    assert calib <= untrained and held <= untrained and not calib & held


def test_load_data_digits_wrong_model_shape_says_what_to_use() -> None:
    with pytest.raises(EdgePruneError, match=r"wants samples of 3×224×224.*gives 1×32×32.*imagefolder"):
        load_data(load_recipe("digits"), (1, 3, 224, 224))


# --- imagefolder --------------------------------------------------------------------------------------------------


def test_load_data_imagefolder_labelled_normalised(tmp_path: Path, labelled_folder: Path) -> None:
    r = Recipe(kind="imagefolder", name="t", path=str(labelled_folder), heldout=2, batch_size=2)
    data = load_data(r, (1, 3, 6, 8))
    assert data.labelled
    assert data.calib_x.shape == (4, 3, 6, 8) and data.heldout_x.shape == (2, 3, 6, 8)
    x = np.concatenate([data.calib_x, data.heldout_x])
    y = np.concatenate([data.calib_y, data.heldout_y])
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]  # cat -> 0, dog -> 1 (sorted folder names)
    red = (np.array(RED) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    blue = (np.array(BLUE) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for sample, label in zip(x, y):
        expected = red if label == 0 else blue
        np.testing.assert_allclose(sample[:, 3, 4], expected, rtol=1e-6, atol=1e-6)
        assert np.ptp(sample, axis=(1, 2)).max() == 0  # a constant image stays constant
    assert float(x[y == 0][0, 0, 0, 0]) == pytest.approx((1.0 - 0.485) / 0.229)


def test_load_data_imagefolder_unlabelled_resize_crop(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i in range(5):
        save_png(root / f"{i}.png", (i * 50, 100, 200), size=(12, 8))
    (root / "notes.txt").write_text("not an image")
    r = Recipe(kind="imagefolder", name="t", path=str(root), resize=4, crop=4, heldout=1, mean=(0.5, 0.5, 0.5),
               std=(0.5, 0.5, 0.5))
    data = load_data(r, (1, 3, 4, 4))
    assert not data.labelled and data.calib_y is None and data.heldout_y is None
    assert data.calib_x.shape == (4, 3, 4, 4) and data.heldout_x.shape == (1, 3, 4, 4)
    firsts = sorted(round(float(s[0, 0, 0]), 5) for s in np.concatenate([data.calib_x, data.heldout_x]))
    assert firsts == pytest.approx([(i * 50 / 255 - 0.5) / 0.5 for i in range(5)], abs=1e-5)
    np.testing.assert_allclose(data.calib_x[:, 2], (200 / 255 - 0.5) / 0.5, rtol=1e-6)


def test_load_data_imagefolder_grayscale(tmp_path: Path) -> None:
    root = tmp_path / "gray"
    for i in range(4):
        save_png(root / f"{i}.png", (128,), mode="L")
    r = Recipe(kind="imagefolder", name="t", path=str(root), grayscale=True, heldout=1)
    data = load_data(r, (1, 1, 6, 8))
    np.testing.assert_allclose(data.calib_x, (128 / 255 - 0.449) / 0.226, rtol=1e-6)


def test_load_data_imagefolder_wrong_size_says_resize_crop(labelled_folder: Path) -> None:
    r = Recipe(kind="imagefolder", name="t", path=str(labelled_folder))
    want = r"wants samples of 3×224×224.*gives 3×6×8.*resize = 224 and crop = 224"
    with pytest.raises(EdgePruneError, match=want):
        load_data(r, (1, 3, 224, 224))


def test_load_data_imagefolder_wrong_channels_says_grayscale(labelled_folder: Path) -> None:
    r = Recipe(kind="imagefolder", name="t", path=str(labelled_folder))
    with pytest.raises(EdgePruneError, match=r"wants samples of 1×6×8.*gives 3×6×8.*grayscale = true"):
        load_data(r, (1, 1, 6, 8))


def test_load_data_imagefolder_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = Recipe(kind="imagefolder", name="t", path=str(tmp_path / "empty"))
    with pytest.raises(EdgePruneError, match=r"image folder .*empty holds no images"):
        load_data(r, (1, 3, 6, 8))


def test_load_data_imagefolder_missing_path_relative_to_recipe(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, kind="imagefolder", path="nowhere")
    with pytest.raises(EdgePruneError, match=rf"{tmp_path / 'nowhere'} does not exist.*recipe\.toml.*'path'"):
        load_data(load_recipe(p), (1, 3, 6, 8))


def test_load_data_count_above_available(labelled_folder: Path) -> None:
    r = Recipe(kind="imagefolder", name="t", path=str(labelled_folder), count=10)
    with pytest.raises(EdgePruneError, match=r"count = 10 but folder .* has only 6 samples"):
        load_data(r, (1, 3, 6, 8))


def test_load_data_empty_heldout_part(tmp_path: Path) -> None:
    for i in range(3):
        save_png(tmp_path / "three" / f"{i}.png", RED)
    r = Recipe(kind="imagefolder", name="t", path=str(tmp_path / "three"), heldout=0.1)
    with pytest.raises(EdgePruneError, match=r"heldout = 0.1 of 3 samples leaves the held-out part empty"):
        load_data(r, (1, 3, 6, 8))


# --- npy ----------------------------------------------------------------------------------------------------------


def test_load_data_empty_calibration_part(tmp_path: Path) -> None:
    save_png(tmp_path / "one" / "0.png", RED)
    r = Recipe(kind="imagefolder", name="t", path=str(tmp_path / "one"), heldout=1)
    with pytest.raises(EdgePruneError, match=r"heldout = 1 of 1 samples leaves the calibration part empty"):
        load_data(r, (1, 3, 6, 8))


def test_load_data_npy_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 2, 5, 5)).astype(np.float32)
    y = np.arange(20, dtype=np.int64) % 4
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    p = recipe_file(tmp_path, kind="npy", path="x.npy", labels="y.npy", heldout=5, batch_size=6)
    data = load_data(load_recipe(p), (1, 2, 5, 5))
    assert data.labelled and len(data.calib_x) == 15 and len(data.heldout_x) == 5
    got = np.concatenate([data.calib_x, data.heldout_x])
    assert rows(got) == rows(x)
    index = {s.tobytes(): i for i, s in enumerate(x)}
    for s, lab in zip(got, np.concatenate([data.calib_y, data.heldout_y])):
        assert y[index[s.tobytes()]] == lab
    batches = list(data.calib_batches())
    assert [len(b) for b in batches] == [6, 6, 3]
    assert torch.equal(torch.cat(batches), torch.from_numpy(data.calib_x))
    held = list(data.heldout_batches(batch_size=2))
    assert [len(b) for b, _ in held] == [2, 2, 1]
    assert torch.equal(torch.cat([lab for _, lab in held]), torch.from_numpy(data.heldout_y))


def test_load_data_npy_nan_names_count_and_sample(tmp_path: Path) -> None:
    x = np.zeros((8, 1, 4, 4), np.float32)
    x[3, 0, 1, 1] = np.nan
    x[3, 0, 2, 2] = np.nan
    x[6, 0, 0, 0] = np.inf
    np.save(tmp_path / "x.npy", x)
    r = Recipe(kind="npy", name="t", path=str(tmp_path / "x.npy"))
    want = r"2 NaN and 1 infinite values in 2 sample\(s\).*sample index [36] of .*x\.npy"
    with pytest.raises(EdgePruneError, match=want):
        load_data(r, (1, 1, 4, 4))


def test_load_data_npy_label_count_mismatch(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((8, 1, 4, 4), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(7, np.int64))
    r = Recipe(kind="npy", name="t", path=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"))
    with pytest.raises(EdgePruneError, match=r"y\.npy has 7 labels but .*x\.npy has 8 samples"):
        load_data(r, (1, 1, 4, 4))


def test_load_data_npy_wrong_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((8, 1, 4, 4), np.float32))
    r = Recipe(kind="npy", name="t", path=str(tmp_path / "x.npy"))
    want = r"wants samples of 3×4×4.*gives 1×4×4.*re-save the array as N×3×4×4"
    with pytest.raises(EdgePruneError, match=want):
        load_data(r, (1, 3, 4, 4))


# --- random -------------------------------------------------------------------------------------------------------


def test_load_data_random_deterministic_per_seed() -> None:
    r = load_recipe("random")
    a, b = load_data(r, (1, 3, 8, 8)), load_data(r, (1, 3, 8, 8))
    c = load_data(Recipe.from_dict({**r.to_dict(), "seed": 1}), (1, 3, 8, 8))
    assert a.calib_x.shape == (48, 3, 8, 8) and a.heldout_x.shape == (16, 3, 8, 8) and not a.labelled
    assert np.array_equal(a.calib_x, b.calib_x) and np.array_equal(a.heldout_x, b.heldout_x)
    assert not np.allclose(a.calib_x[:4], c.calib_x[:4])
    assert abs(float(a.calib_x.mean())) < 0.05 and float(a.calib_x.std()) == pytest.approx(1.0, abs=0.05)


def test_load_data_random_shape_mismatch() -> None:
    r = Recipe(kind="random", shape=(3, 16, 16), count=8, heldout=2)
    with pytest.raises(EdgePruneError, match=r"wants samples of 3×8×8.*gives 3×16×16.*remove 'shape'"):
        load_data(r, (1, 3, 8, 8))


# --- helpers ------------------------------------------------------------------------------------------------------


def test_min_samples_error_says_layer_counts_and_fix() -> None:
    e = min_samples_error("block1.conv2", 577, 120)
    assert isinstance(e, EdgePruneError)
    assert "layer block1.conv2 needs at least 577 calibration samples (patches)" in str(e)
    assert "the recipe gives 120" in str(e) and "raise `count`" in str(e)


def test_calibration_data_batches_copy_samples() -> None:
    data = load_data(Recipe(kind="random", count=4, heldout=1), (1, 1, 2, 2))
    assert isinstance(data, CalibrationData)
    before = data.calib_x.copy()
    for b in data.calib_batches():
        b.relu_()  # a model working in place on its input
    assert np.array_equal(data.calib_x, before)
