"""Plumbing every stage shares: atomic writes, threads and memory policy, time limits, strict TOML, bundled files,
versions, progress callbacks."""
