"""On-disk cache of measurements, so the same model is never measured twice on the same target.

Keyed by the ONNX file's SHA-256, the target's fingerprint (everything that changes a figure) and the runtime's
version. A figure served from here says so (`source = "cache"`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from edgeprune.common.atomic import atomic_write_text
from edgeprune.runtimes.stats import LatencyStats

ENV_VAR = "EDGEPRUNE_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$EDGEPRUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/edgeprune`, else `~/.cache/edgeprune`."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeprune"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(model_sha256: str, target_fingerprint: str, runtime: str, runtime_version: str) -> str:
    raw = f"{model_sha256}|{target_fingerprint}|{runtime}|{runtime_version}"
    return hashlib.sha256(raw.encode()).hexdigest()


class MeasurementCache:
    """A folder of small JSON files, one per (model, target, runtime version)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir() / "measurements"

    @classmethod
    def under(cls, cache_dir: str | Path | None) -> MeasurementCache:
        """The cache in `cache_dir` (`--cache-dir`: the measurements folder inside it), or the default one."""
        return cls(Path(cache_dir) / "measurements" if cache_dir else None)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> LatencyStats | None:
        try:
            d = json.loads(self._path(key).read_text())
            return dataclasses.replace(LatencyStats.from_dict(d), source="cache")
        except (OSError, ValueError, TypeError, KeyError):
            return None  # absent or unreadable: measure again

    def put(self, key: str, stats: LatencyStats) -> None:
        path = self._path(key)
        try:
            atomic_write_text(path, json.dumps(dataclasses.replace(stats, source="measured").to_dict()))
        except OSError:
            pass  # a read-only cache must not fail a measurement
