"""Bundled files and the install commands of the optional extras: every error about a missing optional package names
the extra that brings it, as the README installs it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from edgeprune.common.resources import bundled_dir, install_hint

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
CORE = {re.split(r"[<>=\[ ]", d)[0] for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        ["dependencies"]}


def test_bundled_dir_finds_the_profiles_and_recipes() -> None:
    assert (bundled_dir("targets") / "cpu.toml").is_file() and (bundled_dir("calibration") / "random.toml").is_file()


def test_install_hint_names_the_extra_for_an_install_and_a_checkout() -> None:
    assert install_hint("yolo") == "pip install 'edgeprune[yolo]' (or pip install -e '.[yolo]' in a checkout)"


def test_every_pip_install_in_the_package_names_an_extra_or_a_core_dependency() -> None:
    """A message may only say `pip install X` for a dependency of edgeprune itself (reinstalling brings it); an
    optional package is named through install_hint, whose extras must exist in pyproject.toml."""
    for path in (ROOT / "edgeprune").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"pip install (?!'edgeprune\[)(?!-e )([A-Za-z0-9_.-]+)", text):
            assert m.group(1) in CORE, f"{path.name}: 'pip install {m.group(1)}' names no extra"
        for extra in re.findall(r"install_hint\(['\"]([a-z0-9-]+)['\"]\)", text):
            assert extra in EXTRAS, f"{path.name}: install_hint({extra!r}) names no extra of pyproject.toml"
