"""to_dense against an explicit einsum; from_dense (TT-SVD): exactness, tol, max_rank, reported error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import assert_at_callers_line, dense_reference
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


# From the mutation run (docs/mutation-survivors.md): the checks, warnings, dtypes and scales of TT-SVD and TT-rounding.


def test_from_dense_rejects_what_is_not_numbers_and_names_it() -> None:
    with pytest.raises(TypeError, match="matrix must hold numbers, got dtype object"):
        tnlayers.from_dense(np.array([[1, 2], [3, 4]], dtype=object))
    with pytest.raises(TypeError, match="matrix must hold numbers, got dtype bool"):
        tnlayers.from_dense(np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"in_modes \(2, 2\) and out_modes \(4,\) must have the same length"):
        tnlayers.from_dense(np.ones((4, 4)), (2, 2), (4,))
    with pytest.raises(ValueError, match=r"^matrix contains NaN or infinite values$"):
        tnlayers.from_dense(np.full((4, 4), np.nan), (2, 2), (2, 2))
    for modes, name in (((2, 0), "in_modes"), ((2, 0), "out_modes")):
        given = (modes, (2, 2)) if name == "in_modes" else ((2, 2), modes)
        with pytest.raises(ValueError, match=rf"^{name}\[1\] must be >= 1, got 0"):
            tnlayers.from_dense(np.ones((4, 4)), *given)


def test_bond_caps_and_tol_are_checked_with_the_value_given() -> None:
    matrix = np.ones((16, 16))
    with pytest.raises(ValueError, match=r"max_rank must be an int or 3 inner bond dimensions, got \(2, 2\)"):
        tnlayers.from_dense(matrix, max_rank=[2, 2])
    with pytest.raises((TypeError, ValueError), match=r"max_rank\[1\]"):
        tnlayers.from_dense(matrix, max_rank=[2, 0, 2])
    for tol in (False, True, "0.1", 1, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"tol must be a relative error in \[0, 1\)"):
            tnlayers.from_dense(matrix, tol=tol)


def test_tol_zero_keeps_a_full_rank_matrix_exactly() -> None:
    matrix = np.random.default_rng(21).normal(size=(16, 16))
    cores, report = tnlayers.from_dense(matrix, (4, 4), (4, 4), tol=0.0)
    assert report.ranks == (1, 16, 1)
    np.testing.assert_allclose(dense_reference(cores), matrix, atol=1e-12)


@pytest.mark.parametrize("tol", [0.02, 0.05, 0.1])
def test_the_error_budget_is_shared_not_refilled(tol: float) -> None:
    """Small entries (the budget ``tol**2 ||W||**2`` well under 1): every bond's cut stays within what is left."""
    rng = np.random.default_rng(22)
    matrix = rng.normal(size=(256, 256)) * 1e-3
    matrix[0, 0] = 1.0  # the sweep runs on W / max|W|
    cores, report = tnlayers.from_dense(matrix, (4, 4, 4, 4), (4, 4, 4, 4), tol=tol)
    measured = np.linalg.norm(dense_reference(cores) - matrix) / np.linalg.norm(matrix)
    assert measured <= tol and report.relative_error == pytest.approx(measured, rel=1e-8)
    truncated, report = tnlayers.truncate(tnlayers.from_dense(matrix, (4, 4, 4, 4), (4, 4, 4, 4))[0], tol=tol)
    measured = np.linalg.norm(dense_reference(truncated) - matrix) / np.linalg.norm(matrix)
    assert measured <= tol and report.relative_error == pytest.approx(measured, rel=1e-8)


def test_from_dense_warns_about_modes_it_chose_that_cannot_compress() -> None:
    with pytest.warns(UserWarning, match=r"7 in features do not factorise into 2 modes") as record:
        tnlayers.from_dense(np.ones((7, 4)), out_modes=(2, 2))
    assert_at_callers_line(record[0], __file__)
    with pytest.warns(UserWarning, match=r"2 in features do not factorise into 2 modes"):
        tnlayers.from_dense(np.ones((2, 4)), n_cores=2)
    with pytest.warns(UserWarning, match=r"7 out features do not factorise into 2 modes"):
        tnlayers.from_dense(np.ones((4, 7)), (2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tnlayers.from_dense(np.ones((1, 4)), n_cores=2)  # one feature: nothing to factorise
        tnlayers.from_dense(np.ones((7, 4)), n_cores=1)  # one core: the dense matrix by request
        tnlayers.from_dense(np.ones((7, 4)), (7, 1), (2, 2))  # modes the caller gave


def test_complex_and_integer_matrices() -> None:
    rng = np.random.default_rng(23)
    spec = tnlayers.MPOSpec((2, 3, 2), (3, 2, 2), 2)
    cores = [rng.normal(size=s) + 1j * rng.normal(size=s) for s in spec.core_shapes]
    matrix = dense_reference(cores)
    found, report = tnlayers.from_dense(matrix, spec.in_modes, spec.out_modes)
    assert all(c.dtype == np.complex128 for c in found) and report.ranks == spec.ranks
    np.testing.assert_allclose(dense_reference(found), matrix, atol=1e-12)
    rounded, report = tnlayers.truncate(cores, max_rank=1)
    assert all(c.dtype == np.complex128 for c in rounded)
    measured = np.linalg.norm(dense_reference(rounded) - matrix) / np.linalg.norm(matrix)
    assert report.relative_error == pytest.approx(measured, rel=1e-8) and measured > 0.01
    integers = np.arange(16).reshape(4, 4)
    found, _ = tnlayers.from_dense(integers, (2, 2), (2, 2))
    assert all(c.dtype == np.float64 for c in found)
    np.testing.assert_allclose(dense_reference(found), integers, atol=1e-12)


def test_truncate_keeps_float32_and_warns_about_nothing() -> None:
    cores = [c.astype(np.float32) for c in _random_cores(tnlayers.MPOSpec((4, 4), (4, 4), 4), 24)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complex detour would warn when cast back
        rounded, _ = tnlayers.truncate(cores, max_rank=2)
    assert all(c.dtype == np.float32 for c in rounded)


def test_truncate_singular_values_are_those_of_the_dense_matrix() -> None:
    """At every cut, the Schmidt values of ``W`` reshaped across it (NumPy's SVD of the dense tensor)."""
    spec = tnlayers.MPOSpec((2, 3, 2), (2, 2, 3), (1, 3, 4, 1))
    for scale in (1e-3, 1.0, 1e3):
        cores = [c * scale for c in _random_cores(spec, 25)]
        weight = dense_reference(cores).reshape(*spec.in_modes, *spec.out_modes).transpose(0, 3, 1, 4, 2, 5)
        _, report = tnlayers.truncate(cores)
        for k, found in enumerate(report.singular_values):
            cut = weight.reshape(int(np.prod(weight.shape[: 2 * (k + 1)])), -1)
            expected = np.linalg.svd(cut, compute_uv=False)[: len(found)]
            np.testing.assert_allclose(found, expected, rtol=1e-9, atol=1e-12 * expected[0])


def test_truncate_reports_zero_for_directions_that_are_zero() -> None:
    spec = tnlayers.MPOSpec((2, 2), (2, 2), 2)
    cores = _random_cores(spec, 26)
    cores[0][..., 1] = 0.0  # the second bond direction carries nothing
    _, report = tnlayers.truncate(cores)
    assert report.singular_values[0][0] > 0 and report.singular_values[0][-1] == 0.0


def test_truncate_reports_the_error_of_a_small_matrix() -> None:
    """Cores whose largest entries do not meet in any product (``W``'s norm well under the cores' scale)."""
    spec = tnlayers.MPOSpec((2, 2), (2, 2), 2)
    cores = [0.1 * c for c in _random_cores(spec, 29)]
    cores[0][0, 0, 0, 0], cores[1][1, 0, 0, 0] = 1.0, 1.0  # on different bond directions
    weight = dense_reference(cores)
    rounded, report = tnlayers.truncate(cores, max_rank=1)
    measured = np.linalg.norm(dense_reference(rounded) - weight) / np.linalg.norm(weight)
    assert measured > 0.01 and report.relative_error == pytest.approx(measured, rel=1e-8)


def test_truncate_rejects_cores_that_are_not_finite() -> None:
    cores = _random_cores(tnlayers.MPOSpec((2, 2), (2, 2), 2), 28)
    cores[1][0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"^cores contain NaN or infinite values$"):
        tnlayers.truncate(cores)


def test_truncate_of_zero_cores() -> None:
    cores = [np.zeros(s) for s in tnlayers.MPOSpec((2, 2), (2, 2), 2).core_shapes]
    rounded, report = tnlayers.truncate(cores, tol=0.1)
    assert report.relative_error == 0.0 and not np.any(dense_reference(rounded))


@pytest.mark.parametrize("scale", [1e-120, 1e120])
def test_truncate_of_cores_far_from_one(scale: float) -> None:
    """Each core's entries near 1e-120 or 1e120 (their product under- or overflows float64): the same result as
    for the unscaled cores, times the scale per core, with no floating-point warning."""
    spec = tnlayers.MPOSpec((2, 3, 2), (2, 2, 3), 3)
    cores = _random_cores(spec, 27)
    rounded, report = tnlayers.truncate(cores, max_rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled, scaled_report = tnlayers.truncate([c * scale for c in cores], max_rank=2)
    share = scale  # every core was scaled by ``scale``: the product by ``scale**3``, given back shared
    for got, expected in zip(scaled, rounded):
        np.testing.assert_allclose(got, expected * share, rtol=1e-9, atol=1e-12 * share * np.abs(expected).max())
    assert scaled_report.relative_error == pytest.approx(report.relative_error, rel=1e-9)


def test_cores_of_rejects_a_single_array() -> None:
    with pytest.raises(TypeError, match="expected an MPO layer or a list of cores"):
        tnlayers.decompose.cores_of(np.zeros((1, 2, 2, 1)))
