"""Initialisation: the dense matrix the cores form has the variance of the named dense initialiser."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import dense_reference

import tnlayers

SHAPES = [
    ((4, 7, 7, 4), (4, 4, 4, 4)),
    ((2, 10, 10, 2), (2, 5, 6, 2)),
    ((16, 16, 16), (16, 16, 16)),
    ((4, 4, 4, 4, 4, 4), (2, 2, 2, 2, 2, 2)),
    ((13,), (7,)),
    ((1, 9, 1), (3, 1, 3)),
]
TARGETS = {
    "glorot": lambda fin, fout: 2 / (fin + fout),
    "he": lambda fin, fout: 2 / fin,
    "lecun": lambda fin, fout: 1 / fin,
    "normal": lambda fin, fout: 0.02**2,
}


@pytest.mark.parametrize("init", list(TARGETS))
@pytest.mark.parametrize("rank", [1, 2, 8, 32])
@pytest.mark.parametrize("modes", SHAPES)
def test_dense_variance_is_the_target(modes, rank: int, init: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
        spec = tnlayers.MPOSpec(*modes, rank)
    for seed in range(3):
        cores = tnlayers.init_cores(spec, init, seed=seed, dtype=np.float64)
        variance = np.var(dense_reference(cores))
        assert variance == pytest.approx(TARGETS[init](spec.in_features, spec.out_features), rel=0.15)


def test_normal_std_and_dtype_and_seed() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    cores = tnlayers.init_cores(spec, "normal", seed=1, std=0.1)
    assert all(c.dtype == np.float32 and c.shape == s for c, s in zip(cores, spec.core_shapes))
    assert np.var(dense_reference(cores)) == pytest.approx(0.01, rel=0.15)
    again = tnlayers.init_cores(spec, "normal", seed=1, std=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(cores, again))
    other = tnlayers.init_cores(spec, "normal", seed=2, std=0.1)
    assert not np.array_equal(cores[1], other[1])


def test_deep_stack_keeps_the_signal_scale_with_he_init() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 784))
    specs = [tnlayers.MPOSpec((4, 7, 7, 4), (4, 7, 7, 4), 8)] * 8
    for k, spec in enumerate(specs):
        x = x @ dense_reference(tnlayers.init_cores(spec, "he", seed=k, dtype=np.float64))
        if k < len(specs) - 1:
            x = np.maximum(x, 0.0)
    assert 0.5 <= x.std() <= 2.0
