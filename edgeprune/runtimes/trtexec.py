"""trtexec backend (issue 6 builds the command and parser; this probe says whether it can run here)."""

from __future__ import annotations

import shutil

from edgeprune.errors import DeviceUnreachable


def version() -> str | None:
    return "unknown" if shutil.which("trtexec") else None


def unavailable_reason() -> str | None:
    return None if shutil.which("trtexec") else "trtexec is not on PATH"


def measure(onnx_path, target, repeats=None, progress=None):
    raise DeviceUnreachable("the trtexec backend is not built yet")
