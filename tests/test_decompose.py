"""to_dense against an explicit einsum; from_dense (TT-SVD): exactness, tol, max_rank, reported error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import dense_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import tnlayers


def _random_cores(spec: tnlayers.MPOSpec, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in spec.core_shapes]


@pytest.mark.parametrize(
    "spec_args", [((4, 7, 7, 4), (4, 4, 4, 4), 3), ((3,), (5,), 1), ((1, 2, 1), (3, 1, 2), 2), ((13, 7), (2, 3), 5)]
)
def test_to_dense_matches_explicit_einsum(spec_args) -> None:
    cores = _random_cores(tnlayers.MPOSpec(*spec_args))
    np.testing.assert_allclose(tnlayers.to_dense(cores), dense_reference(cores), rtol=1e-12, atol=1e-12)


def test_frobenius_norm_without_dense() -> None:
    cores = _random_cores(tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 5))
    assert tnlayers.decompose.frobenius_norm(cores) == pytest.approx(np.linalg.norm(dense_reference(cores)), rel=1e-12)


@pytest.mark.parametrize("modes", [((4, 7, 7, 4), (4, 4, 4, 4)), ((2, 3, 5), (5, 3, 2)), ((7, 13), (1, 6))])
def test_untruncated_tt_svd_is_exact(modes) -> None:
    rng = np.random.default_rng(5)
    in_modes, out_modes = modes
    matrix = rng.normal(size=(int(np.prod(in_modes)), int(np.prod(out_modes))))
    cores, report = tnlayers.from_dense(matrix, in_modes, out_modes)
    error = np.linalg.norm(dense_reference(cores) - matrix) / np.linalg.norm(matrix)
    assert error < 1e-12
    assert report.relative_error < 1e-12
    assert report.ranks == tnlayers.MPOSpec(in_modes, out_modes, 1).max_ranks  # a random matrix has full TT rank


def test_recovers_the_ranks_of_an_mpo() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), (3, 5, 2))
    cores = _random_cores(spec, 6)
    _, report = tnlayers.from_dense(dense_reference(cores), spec.in_modes, spec.out_modes)
    assert report.ranks == spec.ranks
    assert report.relative_error < 1e-12
    assert report.num_params == spec.num_params and report.compression_ratio == spec.compression_ratio


@pytest.mark.parametrize("tol", [0.5, 0.2, 0.05, 0.01])
def test_tol_bounds_the_error_and_report_equals_measurement(tol: float) -> None:
    rng = np.random.default_rng(7)
    # a matrix with decaying TT spectrum: an MPO plus noise
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 6)
    matrix = dense_reference(_random_cores(spec, 8)) + 0.05 * rng.normal(size=(784, 256))
    cores, report = tnlayers.from_dense(matrix, spec.in_modes, spec.out_modes, tol=tol)
    measured = np.linalg.norm(dense_reference(cores) - matrix) / np.linalg.norm(matrix)
    assert measured <= tol
    assert report.relative_error == pytest.approx(measured, rel=1e-9)


def test_max_rank_caps_bonds() -> None:
    rng = np.random.default_rng(9)
    matrix = rng.normal(size=(784, 256)).astype(np.float32)
    cores, report = tnlayers.from_dense(matrix, (4, 7, 7, 4), (4, 4, 4, 4), max_rank=8)
    assert report.ranks == (1, 8, 8, 8, 1)
    assert all(c.dtype == np.float32 for c in cores)
    measured = np.linalg.norm(dense_reference(cores) - matrix) / np.linalg.norm(matrix)
    assert report.relative_error == pytest.approx(measured, rel=1e-5)
    _, report = tnlayers.from_dense(matrix, (4, 7, 7, 4), (4, 4, 4, 4), max_rank=(2, 30, 4))
    assert report.ranks == (1, 2, 30, 4, 1)


def test_truncation_is_optimal_for_a_single_bond() -> None:
    """With two cores TT-SVD is the truncated SVD of the reshaped matrix: Eckart-Young error."""
    rng = np.random.default_rng(10)
    matrix = rng.normal(size=(12, 20))
    in_modes, out_modes = (3, 4), (4, 5)
    reshaped = matrix.reshape(3, 4, 4, 5).transpose(0, 2, 1, 3).reshape(12, 20)
    singular = np.linalg.svd(reshaped, compute_uv=False)
    for rank in (1, 3, 7):
        _, report = tnlayers.from_dense(matrix, in_modes, out_modes, max_rank=rank)
        optimal = np.sqrt(np.sum(singular[rank:] ** 2)) / np.linalg.norm(matrix)
        assert report.relative_error == pytest.approx(optimal, rel=1e-10)


def test_zero_matrix() -> None:
    cores, report = tnlayers.from_dense(np.zeros((6, 6)), (2, 3), (3, 2))
    assert report.ranks == (1, 1, 1) and report.relative_error == 0.0
    assert np.all(tnlayers.to_dense(cores) == 0)


@settings(max_examples=30, deadline=None)
@given(
    modes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4),
    rank=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_roundtrip_random_specs(modes, rank, seed) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
        spec = tnlayers.MPOSpec([m[0] for m in modes], [m[1] for m in modes], rank)
    matrix = dense_reference(_random_cores(spec, seed))
    cores, report = tnlayers.from_dense(matrix, spec.in_modes, spec.out_modes)
    assert all(r1 <= r2 for r1, r2 in zip(report.ranks, spec.ranks))
    np.testing.assert_allclose(tnlayers.to_dense(cores), matrix, atol=1e-10 * max(1.0, np.abs(matrix).max()))


def test_truncate_drops_redundant_bonds_exactly() -> None:
    """Inflate the bonds with random invertible gauges and zero-padding; truncate recovers the minimal ranks."""
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), (3, 5, 2))
    cores = _random_cores(spec, 11)
    rng = np.random.default_rng(12)
    padded = []
    for k, core in enumerate(cores):
        left = 1 if k == 0 else core.shape[0] + 2
        right = 1 if k == 3 else core.shape[3] + 2
        big = np.zeros((left, *core.shape[1:3], right))
        big[: core.shape[0], :, :, : core.shape[3]] = core
        padded.append(big)
    for k in range(3):  # a gauge G, G^-1 on every inner bond leaves W unchanged
        gauge = rng.normal(size=(padded[k].shape[3],) * 2) + 3 * np.eye(padded[k].shape[3])
        padded[k] = np.tensordot(padded[k], gauge, axes=(3, 0))
        padded[k + 1] = np.tensordot(np.linalg.inv(gauge), padded[k + 1], axes=(1, 0))
    weight = dense_reference(cores)
    np.testing.assert_allclose(dense_reference(padded), weight, atol=1e-9 * np.abs(weight).max())
    truncated, report = tnlayers.truncate(padded)
    assert report.ranks == spec.ranks
    assert report.relative_error < 1e-12
    np.testing.assert_allclose(dense_reference(truncated), weight, atol=1e-9 * np.abs(weight).max())


@pytest.mark.parametrize("options", [{"max_rank": 4}, {"max_rank": (2, 9, 3)}, {"tol": 0.3}, {"tol": 0.05}])
def test_truncate_matches_tt_svd_of_the_dense_matrix(options) -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 12)
    cores = _random_cores(spec, 13)
    weight = dense_reference(cores)
    truncated, report = tnlayers.truncate(cores, **options)
    measured = np.linalg.norm(dense_reference(truncated) - weight) / np.linalg.norm(weight)
    assert report.relative_error == pytest.approx(measured, rel=1e-8)
    if "tol" in options:
        assert measured <= options["tol"]
    _, dense_report = tnlayers.from_dense(weight, spec.in_modes, spec.out_modes, **options)
    assert report.ranks == dense_report.ranks
    assert report.relative_error == pytest.approx(dense_report.relative_error, rel=1e-8)
    assert all(c.dtype == np.float64 for c in truncated)


def test_from_dense_factorises_the_modes_it_is_not_given() -> None:
    matrix = np.random.default_rng(5).normal(size=(784, 256))
    _, report = tnlayers.from_dense(matrix, max_rank=4)
    assert (report.spec.in_modes, report.spec.out_modes) == ((4, 7, 7, 4), (4, 4, 4, 4))
    _, report = tnlayers.from_dense(matrix, (28, 28), max_rank=4)
    assert report.spec.out_modes == (16, 16)
    _, report = tnlayers.from_dense(matrix, out_modes=(4, 8, 8), max_rank=4)
    assert report.spec.in_modes == tnlayers.MPOSpec.auto(784, 256, 3, 4).in_modes
    _, report = tnlayers.from_dense(matrix, n_cores=2, max_rank=4)
    assert report.spec.n_cores == 2
