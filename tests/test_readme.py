"""The README's Python API blocks run as written (collected from README.md, not copied): a user who pastes them gets
what the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_api_blocks() -> None:
    blocks = python_blocks()
    assert blocks and any("edgeprune.build(" in b for b in blocks)


def test_readme_python_api_blocks_run(tmp_path: Path) -> None:
    """Run in a fresh interpreter in an empty folder, with a measurement cache of its own. The blocks assert what
    they claim (the budget met, the metric kept); this test checks they ran and left the artifacts they name."""
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(python_blocks()))
    env = {**__import__("os").environ, "EDGEPRUNE_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for d in ("out/digits", "out/digits-finetuned"):
        assert {"model.onnx", "pruned.pt", "plan.json", "report.json"} <= {f.name for f in (tmp_path / d).iterdir()}
