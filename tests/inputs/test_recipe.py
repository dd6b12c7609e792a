"""Calibration recipes: the bundled ones, round trips through dicts and TOML files, and refused tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.errors import EdgePruneError
from edgeprune.inputs.recipe import IMAGENET_MEAN, IMAGENET_STD, KINDS, Recipe, bundled_recipes, load_recipe


def write_toml(path: Path, table: dict) -> Path:
    """Flat tables only: JSON scalars and lists are valid TOML values."""
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    return path


def recipe_file(tmp_path: Path, **table: object) -> Path:
    return write_toml(tmp_path / "recipe.toml", table)


def test_bundled_recipes_cover_every_kind() -> None:
    recipes = {name: load_recipe(name) for name in bundled_recipes()}
    assert {"digits", "random", "imagefolder", "npy"} <= set(recipes)
    assert {r.kind for r in recipes.values()} == set(KINDS)
    rnd = recipes["random"]
    assert (rnd.count, rnd.heldout, rnd.batch_size) == (64, 16, 16)
    img = recipes["imagefolder"]
    assert (img.resize, img.crop, img.mean, img.std) == (256, 224, IMAGENET_MEAN, IMAGENET_STD)
    # relative `path` resolves against the recipe file's folder
    assert Path(img.path) == Path(img.source).resolve().parent / "images"


@pytest.mark.parametrize("name", ["digits", "random", "imagefolder", "npy"])
def test_recipe_dict_round_trip(name: str) -> None:
    r = load_recipe(name)
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


def test_recipe_toml_file_round_trip(tmp_path: Path) -> None:
    r = Recipe(kind="imagefolder", name="mine", path=str(tmp_path / "imgs"), resize=40, crop=32, mean=(0.5, 0.5, 0.5),
               std=(0.25, 0.5, 1.0), count=10, heldout=3, batch_size=4, seed=7)
    back = load_recipe(write_toml(tmp_path / "mine.toml", r.to_dict()))
    assert back == r
    assert back.heldout == 3 and isinstance(back.heldout, int)
    assert back.std == (0.25, 0.5, 1.0)


def test_load_recipe_file_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, kind="random", cuont=10)
    with pytest.raises(EdgePruneError, match=r"recipe\.toml.*unknown key 'cuont'.*count"):
        load_recipe(p)


def test_load_recipe_file_key_of_other_kind_rejected(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, kind="digits", resize=32)
    with pytest.raises(EdgePruneError, match=r"kind 'digits'.*unknown key 'resize'"):
        load_recipe(p)


def test_load_recipe_file_unknown_kind_lists_kinds(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, kind="webdataset")
    with pytest.raises(EdgePruneError, match=r"recipe\.toml.*'kind' is 'webdataset'.*digits, imagefolder, npy, random"):
        load_recipe(p)


def test_load_recipe_file_wrong_type_names_key(tmp_path: Path) -> None:
    p = recipe_file(tmp_path, kind="random", count="many")
    with pytest.raises(EdgePruneError, match=r"recipe\.toml.*'count' must be an integer, found str"):
        load_recipe(p)


@pytest.mark.parametrize("heldout", [0.0, 1.0, 1.5, 0, -3])
def test_recipe_bad_heldout_rejected(heldout: float) -> None:
    with pytest.raises(EdgePruneError, match="heldout"):
        Recipe.from_dict({"kind": "random", "heldout": heldout})


def test_load_recipe_unknown_name_lists_bundled() -> None:
    with pytest.raises(EdgePruneError, match="unknown calibration recipe 'nosuch'.*digits.*random"):
        load_recipe("nosuch")
