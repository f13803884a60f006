"""Hypothesis properties of the decomposition over random specs, bond caps and scales (1e-150 to 1e150).

The reference is the dense matrix built by plain NumPy (``conftest.dense_reference``) and the error
measured on it, never the library's own report.
"""

from __future__ import annotations

import warnings

import numpy as np
from conftest import dense_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tnlayers

MODES = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=2, max_size=4)
SCALES = st.sampled_from([1e-150, 1e-40, 1e-8, 1.0, 1e8, 1e40, 1e150])


def _matrix(modes: list[tuple[int, int]], seed: int, scale: float) -> np.ndarray:
    rows = int(np.prod([m[0] for m in modes]))
    cols = int(np.prod([m[1] for m in modes]))
    return np.random.default_rng(seed).normal(size=(rows, cols)) * scale


def _measured_error(matrix: np.ndarray, cores: list[np.ndarray]) -> float:
    """``||W - W'|| / ||W||`` computed on matrices rescaled by ``max|W|`` (so no norm under- or overflows)."""
    unit = np.abs(matrix).max()
    return float(np.linalg.norm(matrix / unit - dense_reference(cores) / unit) / np.linalg.norm(matrix / unit))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modes=MODES, rank=st.integers(1, 5), seed=st.integers(0, 10_000), scale=SCALES)
def test_from_dense_reports_the_error_it_makes(modes, rank, seed, scale) -> None:
    matrix = _matrix(modes, seed, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
        cores, report = tnlayers.from_dense(matrix, [m[0] for m in modes], [m[1] for m in modes], max_rank=rank)
    assert all(np.isfinite(c).all() for c in cores)
    assert abs(report.relative_error - _measured_error(matrix, cores)) <= 1e-9


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modes=MODES, rank=st.integers(1, 5), seed=st.integers(0, 10_000), scale=SCALES)
def test_truncate_of_exact_cores_agrees_with_from_dense(modes, rank, seed, scale) -> None:
    """TT-rounding the exact cores of ``W`` to ``rank`` makes the same error as TT-SVD of ``W`` at ``rank``
    (both truncate the same singular values at each cut), and reports it truthfully."""
    matrix = _matrix(modes, seed, scale)
    in_modes, out_modes = [m[0] for m in modes], [m[1] for m in modes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
        exact, _ = tnlayers.from_dense(matrix, in_modes, out_modes)
        _, direct_report = tnlayers.from_dense(matrix, in_modes, out_modes, max_rank=rank)
        rounded, rounded_report = tnlayers.truncate(exact, max_rank=rank)
    assert rounded_report.ranks == direct_report.ranks
    assert abs(rounded_report.relative_error - _measured_error(matrix, rounded)) <= 1e-9
    assert abs(rounded_report.relative_error - direct_report.relative_error) <= 1e-7
