"""The runtime protocol every backend implements, and the calibration inputs a measurement carries."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from edgeprune.runtimes import RUNTIMES, runtime_module
from edgeprune.runtimes.base import Runtime, calibration_digest, calibration_list


@pytest.mark.parametrize("name", list(RUNTIMES))
@pytest.mark.parametrize("function", ["version", "unavailable_reason", "measure"])
def test_every_backend_implements_the_runtime_protocol(name, function):
    """Each backend module has the protocol's parameters first, in order, with the same defaults; its own extras
    (tensorrt's `cache_dir`) come after them and have defaults."""
    wanted = list(inspect.signature(getattr(Runtime, function)).parameters.values())[1:]  # without self
    given = list(inspect.signature(getattr(runtime_module(name), function)).parameters.values())
    assert [(p.name, p.default) for p in given[:len(wanted)]] == [(p.name, p.default) for p in wanted]
    assert all(p.default is not inspect.Parameter.empty for p in given[len(wanted):])


def test_calibration_list_takes_one_stacked_array_or_batches():
    x = np.zeros((4, 3, 8, 8), np.float32)
    assert calibration_list(None) is None
    assert len(calibration_list(x)) == 1 and calibration_list(x)[0] is x
    assert len(calibration_list([x[:2], x[2:]])) == 2
    assert len(calibration_list(iter([{"input": x}]))) == 1


def test_calibration_digest_follows_the_data():
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    assert calibration_digest(a) == calibration_digest([x.copy() for x in a])
    b = [a[0], a[1] + np.float32(1e-3)]
    assert calibration_digest(a) != calibration_digest(b)
    assert calibration_digest(a[0]) == calibration_digest([a[0]])  # one stacked array is one batch of it
    assert calibration_digest(None) == "random"
