"""Where the bundled target profiles and calibration recipes live, and how an optional extra is installed.

In a source checkout they are the top-level `targets/` and `calibration/` folders (DESIGN.md §2); a wheel maps the
same folders into `edgeprune.data_files` (see pyproject.toml), so both layouts resolve to real files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # edgeprune/ (this module is edgeprune/common/resources.py)
_CHECKOUT = _PACKAGE.parent


def bundled_dir(kind: str) -> Path:
    """Folder of bundled `kind` files ("targets" or "calibration")."""
    local = _CHECKOUT / kind
    if local.is_dir() and any(local.glob("*.toml")):
        return local
    return Path(str(resources.files(f"edgeprune.data_files.{kind}")))


def asset(name: str) -> Path:
    """A file shipped inside the package (`edgeprune/assets/`), such as the example's weights."""
    return _PACKAGE / "assets" / name


def install_hint(extra: str) -> str:
    """The command that installs the optional extra `extra` (pyproject.toml's [project.optional-dependencies]), for
    an installed edgeprune and for a checkout: what an error about a missing optional package tells the user to run."""
    return f"pip install 'edgeprune[{extra}]' (or pip install -e '.[{extra}]' in a checkout)"
