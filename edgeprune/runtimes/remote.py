"""Remote measurement through an agent or SSH (issue 6)."""

from __future__ import annotations

from edgeprune.errors import DeviceUnreachable


def version() -> str | None:
    return None


def unavailable_reason() -> str | None:
    return "remote measurement is not built yet"


def measure(onnx_path, target, repeats=None, progress=None):
    raise DeviceUnreachable("remote measurement is not built yet")
