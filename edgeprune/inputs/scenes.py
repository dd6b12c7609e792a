"""Held-back scenes: which calibration samples the fidelity proxy grades on, chosen as whole clusters of similar
images rather than at random.

Calibration sets are often crops of a few photos (or frames of a few videos). A repair fitted on some crops of a
photo and graded on other crops of the same photo looks far better than it is on a photo it never saw: on
EfficientNet-Lite0 calibrated on crops of 16 photos, the last block's expansion pruned to half had output KL 0.02
on its own photos' crops and 0.28 on other photos' (issue 28), so the search cut the late, class-specific layers
first. Holding back whole clusters grades the proxy on scenes the statistics never saw.

Clusters: k-means (scikit-learn) on per-channel intensity histograms, which put crops of one photo together (on the
16-photo set above, 94% of a photo's crops in one cluster of 16). Written here because no library picks "whole
near-duplicate groups" for a hold-out; the clustering itself is scikit-learn's.
"""

from __future__ import annotations

import numpy as np

BINS = 8
STRIDE = 16  # every 16th value of a channel: 3136 of a 224x224 image
KS = (6, 8, 11, 16, 23, 32)  # numbers of clusters tried
MIN_SCENES = 3  # held-back clusters: the proxy's error on one scene alone is that scene's, not unseen scenes'


def scene_features(x: np.ndarray, seed: int) -> np.ndarray:
    """Per sample, the histogram of each channel's values in BINS bins whose edges are that channel's quantiles over
    the whole set (so any input scaling works), on every STRIDE-th value."""
    flat = x.reshape(len(x), x.shape[1], -1)[:, :, ::STRIDE]
    rng = np.random.default_rng(seed)
    feats = []
    for c in range(flat.shape[1]):
        sample = flat[rng.integers(0, len(x), min(len(x), 64)), c].ravel()
        edges = np.quantile(sample, np.linspace(0, 1, BINS + 1)[1:-1])
        idx = np.searchsorted(edges, flat[:, c]) + BINS * np.arange(len(x))[:, None]
        feats.append(np.bincount(idx.ravel(), minlength=BINS * len(x)).reshape(len(x), BINS) / flat.shape[2])
    return np.concatenate(feats, axis=1)


def scene_labels(features: np.ndarray, seed: int) -> np.ndarray:
    """k-means labels with k from KS (at most a cluster per 8 samples) by the best silhouette: too many clusters
    split a scene in two, one part held back and the other in the statistics; too few merge scenes."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    best: tuple[float, np.ndarray] | None = None
    for k in [k for k in KS if k <= len(features) // 8] or [KS[0]]:
        labels = KMeans(k, n_init=2, random_state=seed).fit_predict(features)
        score = silhouette_score(features, labels, random_state=seed) if len(set(labels)) > 1 else -1.0
        if best is None or score > best[0]:
            best = (score, labels)
    assert best is not None
    return best[1]


def scenes_first(x: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, int]:
    """A permutation of the samples that puts whole held-back scenes first, and how many samples those scenes hold.

    The first `n` of the permutation take the held-back scenes in turn (round-robin), so a proxy on the first `n`
    sees every held-back scene; the scenes hold at least `n` samples and at least MIN_SCENES clusters, and at most a
    quarter of the set (fewer scenes where clusters are large). Samples that are not images (fewer than 2 spatial
    dimensions) or sets too small to cluster: the first `n` in their own order, as before."""
    count = len(x)
    if x.ndim < 4 or count < 8 * MIN_SCENES or n < 1:
        return np.arange(count), min(n, count)
    labels = scene_labels(scene_features(x, seed), seed)
    k = int(labels.max()) + 1
    members = [np.flatnonzero(labels == c) for c in np.random.default_rng(seed).permutation(k)]
    chosen: list[np.ndarray] = []
    for m in members:
        held = sum(len(c) for c in chosen)
        if held >= n and len(chosen) >= MIN_SCENES:
            break
        if len(m) and held + len(m) <= count // 4:
            chosen.append(m)
    held = sum(len(c) for c in chosen)
    if held < n:  # clusters too large for a quarter of the set: fall back to the first n
        return np.arange(count), n
    front = [int(c[i]) for i in range(max(len(c) for c in chosen)) for c in chosen if i < len(c)]
    rest = np.setdiff1d(np.arange(count), front)
    return np.concatenate([np.asarray(front), rest]), held
