from __future__ import annotations

import subprocess
import sys


def test_import_edgeprune_is_lean() -> None:
    """`import edgeprune` (and the target and runtime registries) must not pull in onnxsim, tensorrt or CUDA."""
    code = (
        "import sys, edgeprune, edgeprune.inputs.targets, edgeprune.runtimes, edgeprune.errors\n"
        "heavy = [m for m in ('onnxsim', 'tensorrt', 'torch', 'onnxruntime') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
