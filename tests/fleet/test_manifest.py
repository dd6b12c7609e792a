"""A manifest's [build] table goes through `BuildConfig.from_dict`: its keys are the config's options, the old
spellings (`noise_margin`, `cache`) still read, and a bad key or value is refused at load time naming the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeprune.errors import EdgePruneError
from edgeprune.fleet.manifest import digest, entry_inputs, load_manifest


def manifest(tmp_path: Path, build: str) -> Path:
    path = tmp_path / "release.toml"
    path.write_text(f'targets = ["cpu"]\nbudgets = ["0.5x"]\n[build]\n{build}\n'
                    '[gates]\nevaluate = "tests.models:settle"\n[[models]]\nname = "a"\nmodel = "example"\n')
    return path


@pytest.mark.parametrize("build", ["noise_margin = 1\ncache = false", "margin_k = 1.0\nuse_cache = false"])
def test_build_table_reads_old_and_new_spellings(tmp_path: Path, build: str) -> None:
    config = load_manifest(manifest(tmp_path, build)).entries[0].config("cache")
    assert (config.margin_k, config.use_cache, config.cache_dir) == (1.0, False, "cache")
    assert (config.prune.exporter, config.prune.channel_multiple, config.max_steps) == ("torchscript", None, 12)
    from tests.models import settle

    assert config.evaluate is settle


def test_build_table_takes_the_configs_options(tmp_path: Path) -> None:
    build = 'criterion = "l1"\nignore = ["fc"]\nsearch = "evolution"\nrecover = 2\n[build.output_weights]\nlogits = 2'
    entry = load_manifest(manifest(tmp_path, build)).entries[0]
    c = entry.config()
    assert (c.prune.criterion, c.prune.ignore, c.search, c.recover, c.output_weights) == \
        ("l1", ("fc",), "evolution", 2.0, (("logits", 2),))
    assert digest(entry_inputs(entry)) == digest(entry_inputs(entry))  # an entry with a list and a table digests


def test_old_spellings_keep_their_digest(tmp_path: Path) -> None:
    """An entry's build settings are digested as written: a manifest from before keeps its releases (no rerun)."""
    entry = load_manifest(manifest(tmp_path, "noise_margin = 1.0\ncache = false\nmax_steps = 4")).entries[0]
    assert dict(entry.build) == {"noise_margin": 1.0, "cache": False, "max_steps": 4}


@pytest.mark.parametrize("build, words", [
    ("max_step = 4", (r"\[build\]: unknown option 'max_step'; known options: .*max_steps.*\(old spellings: "
                      r"noise_margin for margin_k, cache for use_cache\)")),
    ("noise_margin = 1.0\nmargin_k = 2.0", r"\[build\]: noise_margin and margin_k are the same option"),
    ("cache = 1", r"\[build\]: key 'cache' must be a boolean"),
    ("lut = \"t.json\"", r"unknown option 'lut'"),
    ("min_agreement = 0.5", r"unknown option 'min_agreement'"),  # a gate: [gates]
])
def test_bad_build_table_is_refused_at_load_time(tmp_path: Path, build: str, words: str) -> None:
    with pytest.raises(EdgePruneError, match=words):
        load_manifest(manifest(tmp_path, build))
