"""scenes.scenes_first: the proxy's held-back samples are whole scenes (issue 28)."""

from __future__ import annotations

import numpy as np

from edgeprune.inputs.scenes import MIN_SCENES, scenes_first


def crops_of_photos(photos: int, per_photo: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Crops of `photos` synthetic scenes: each scene its own colour layout, each crop a random window of it with
    noise, shuffled; returns the crops and each one's scene."""
    rng = np.random.default_rng(seed)
    scenes = [rng.normal(rng.normal(0, 1, (3, 1, 1)), rng.uniform(0.2, 1.0, (3, 1, 1)), (3, 48, 48)) for _ in
              range(photos)]
    x, label = [], []
    for i in rng.permutation(photos * per_photo):
        s = scenes[i % photos]
        r, c = rng.integers(0, 17, 2)
        x.append(s[:, r:r + 32, c:c + 32] + rng.normal(0, 0.05, (3, 32, 32)))
        label.append(i % photos)
    return np.stack(x).astype(np.float32), np.asarray(label)


def test_held_back_samples_are_whole_scenes_and_the_proxy_sees_several() -> None:
    x, scene = crops_of_photos(16, 30)
    order, held = scenes_first(x, 26, seed=0)
    assert sorted(order.tolist()) == list(range(len(x)))  # a permutation
    assert 26 <= held <= len(x) // 4
    front, rest = scene[order[:held]], scene[order[held:]]
    kept_out = [s for s in set(front.tolist()) if np.sum(front == s) >= 10]
    assert len(kept_out) >= MIN_SCENES
    # a held-back scene's crops are (almost) all held back: the statistics do not see the scenes the proxy grades on
    assert sum(np.sum(rest == s) for s in kept_out) <= 0.1 * sum(np.sum(scene == s) for s in kept_out)
    # the first 26 (what the proxy runs on) cover every held-back scene
    assert set(kept_out) <= set(scene[order[:26]].tolist())
    # a random split would have put crops of almost every scene on both sides
    assert len(set(front.tolist()) & set(rest.tolist())) < len(set(front.tolist()))


def test_deterministic_per_seed() -> None:
    x, _ = crops_of_photos(12, 20)
    a, b = scenes_first(x, 20, seed=3), scenes_first(x, 20, seed=3)
    assert a[1] == b[1] and np.array_equal(a[0], b[0])


def test_vectors_and_small_sets_keep_their_order() -> None:
    vectors = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    order, held = scenes_first(vectors, 20, seed=0)
    assert held == 20 and np.array_equal(order, np.arange(200))
    small, _ = crops_of_photos(2, 5)
    order, held = scenes_first(small, 4, seed=0)
    assert held == 4 and np.array_equal(order, np.arange(10))
