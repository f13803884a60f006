"""Calibrated fits (``tnlayers.calibrate``) against references written here in plain NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest

import tnlayers
from tnlayers import calibrate
from tnlayers.calibrate import Gram, calibrated_fit, low_rank_fit, output_error

IN_MODES, OUT_MODES = (2, 3, 2), (3, 2, 2)
LSTSQ = np.linalg.lstsq


def _dense(cores: list[np.ndarray]) -> np.ndarray:
    """W from cores by one einsum (independent of tnlayers.to_dense)."""
    letters = "abcdefgh"
    terms, rows, cols = [], "", ""
    for k in range(len(cores)):
        terms.append(f"{letters[k]}{'ijk'[k]}{'xyz'[k]}{letters[k + 1]}")
        rows, cols = rows + "ijk"[k], cols + "xyz"[k]
    w = np.einsum(",".join(terms) + f"->{rows}{cols}", *cores)
    return w.reshape(math.prod(c.shape[1] for c in cores), -1)


def _design(x: np.ndarray, cores: list[np.ndarray], k: int) -> np.ndarray:
    """Columns: X W' for each unit entry of core k (the others fixed), built by plain einsum."""
    columns = []
    for index in np.ndindex(cores[k].shape):
        unit = [c.copy() for c in cores]
        unit[k] = np.zeros_like(cores[k])
        unit[k][index] = 1.0
        columns.append((x @ _dense(unit)).ravel())
    return np.stack(columns, axis=1)


def _anisotropic_rows(rng: np.random.Generator, rows: int, features: int) -> np.ndarray:
    """Calibration rows whose feature scales span about three decades, as activations do."""
    return rng.normal(size=(rows, features)) * np.exp(rng.normal(size=features) * 1.5)


@pytest.fixture
def problem() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(7)
    x = _anisotropic_rows(rng, 200, math.prod(IN_MODES))
    w = rng.normal(size=(math.prod(IN_MODES), math.prod(OUT_MODES)))
    ranks = (1, 3, 4, 1)
    cores = [rng.normal(size=(ranks[k], IN_MODES[k], OUT_MODES[k], ranks[k + 1])) for k in range(3)]
    return x, w, cores


def test_gram_adds_batches_into_x_transpose_x() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 10, 6))
    gram = Gram(6)
    gram.add(x[0])
    gram.add(x[1])
    rows = x.reshape(-1, 6)
    np.testing.assert_allclose(gram.matrix, rows.T @ rows, rtol=1e-13)
    assert gram.rows == 20
    with pytest.raises(ValueError, match=r"expected rows of 6 features, got an array of shape \(3, 5\)"):
        gram.add(np.ones((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        gram.add(np.full((1, 6), np.nan))
    with pytest.raises(ValueError, match="features must be a positive int, got 0"):
        Gram(0)


def test_output_error_is_the_relative_error_of_x_times_w(problem) -> None:  # type: ignore[no-untyped-def]
    x, w, cores = problem
    approx = _dense(cores)
    expected = np.linalg.norm(x @ (w - approx)) / np.linalg.norm(x @ w)
    assert output_error(approx, w, x.T @ x) == pytest.approx(expected, rel=1e-10)
    assert output_error(cores, w, x.T @ x) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match=r"gram must be \(12, 12\) .* got \(11, 11\)"):
        output_error(approx, w, np.eye(11))


@pytest.mark.parametrize("solver", ["direct", "conjugate-gradients"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_site_update_is_the_least_squares_minimiser(problem, monkeypatch, solver: str, k: int) -> None:  # type: ignore[no-untyped-def]
    """With the other cores fixed, the update of core k minimises ||X W - X W'|| exactly: compared with
    numpy's lstsq on the design matrix whose columns are X W' for each unit entry of the core."""
    x, w, cores = problem
    monkeypatch.setattr(calibrate, "DIRECT_SOLVE_LIMIT", 10**9 if solver == "direct" else 0)
    monkeypatch.setattr(calibrate, "CG_ITERATIONS", 2000)
    monkeypatch.setattr(calibrate, "CG_TOLERANCE", 1e-12)
    best = np.linalg.lstsq(_design(x, cores, k), (x @ w).ravel(), rcond=None)[0].reshape(cores[k].shape)
    expected = [*cores[:k], best, *cores[k + 1 :]]

    c, cw = x.T @ x, x.T @ x @ w
    site = calibrate._Site(
        c, cw, calibrate._left_env(cores, k), calibrate._right_env(cores, k + 1), IN_MODES[k], OUT_MODES[k]
    )
    start = cores[k].transpose(0, 1, 3, 2)
    solved = site.solve(start, ridge=0.0).transpose(0, 1, 3, 2)
    got = [*cores[:k], solved, *cores[k + 1 :]]
    np.testing.assert_allclose(x @ _dense(got), x @ _dense(expected), rtol=1e-7, atol=1e-7 * np.abs(x @ w).max())


@pytest.mark.parametrize("solver", ["direct", "conjugate-gradients"])
def test_one_site_sweeps_never_raise_the_output_error(problem, monkeypatch, solver: str) -> None:  # type: ignore[no-untyped-def]
    x, w, _ = problem
    monkeypatch.setattr(calibrate, "DIRECT_SOLVE_LIMIT", 10**9 if solver == "direct" else 0)
    cores, report = calibrated_fit(w, x.T @ x, IN_MODES, OUT_MODES, max_rank=3, sweeps=4)
    assert report.sweeps == ("one-site",) * 4 and len(report.errors) == 5
    assert all(b <= a * (1 + 1e-9) for a, b in zip(report.errors, report.errors[1:]))
    assert report.errors[-1] < 0.75 * report.errors[0]  # the fit to the outputs beats TT-SVD's by far here
    measured = np.linalg.norm(x @ (w - _dense(cores))) / np.linalg.norm(x @ w)
    assert report.error == pytest.approx(measured, rel=1e-9)
    assert [c.shape for c in cores] == [(1, 2, 3, 3), (3, 3, 2, 3), (3, 2, 2, 1)]
    assert report.weight_error > 0 and report.svd_error == report.errors[0]


def test_two_site_split_is_optimal_for_kronecker_inputs() -> None:
    """Two cores, inputs whose covariance is C1 (x) C2: the best rank-q MPO in the output metric is the
    truncated SVD of the whitened (i1 j1) x (i2 j2) matrix, written here from scratch."""
    rng = np.random.default_rng(3)
    (i1, i2), (j1, j2), q = (3, 4), (2, 3), 2
    f1, f2 = rng.normal(size=(i1, i1)) * [1, 5, 30], rng.normal(size=(i2, i2)) * [1, 2, 20, 3]
    c = np.kron(f1 @ f1.T, f2 @ f2.T)
    w = rng.normal(size=(i1 * i2, j1 * j2))
    _, report = calibrated_fit(w, c, (i1, i2), (j1, j2), max_rank=q, sweeps=1, two_site=True, ridge=0.0)

    def root(m: np.ndarray) -> np.ndarray:
        values, vectors = np.linalg.eigh(m)
        return (vectors * np.sqrt(values)) @ vectors.T

    t = w.reshape(i1, i2, j1, j2).transpose(0, 2, 1, 3).reshape(i1 * j1, i2 * j2)
    whitened = np.kron(root(f1 @ f1.T), np.eye(j1)) @ t @ np.kron(root(f2 @ f2.T), np.eye(j2))
    s = np.linalg.svd(whitened, compute_uv=False)
    expected = math.sqrt(np.sum(s[q:] ** 2) / np.sum(s**2))
    assert report.sweeps == ("two-site", "one-site")
    assert report.errors[1] == pytest.approx(expected, rel=1e-6)
    assert report.errors[2] <= report.errors[1] * (1 + 1e-9)
    assert report.errors[1] < report.errors[0]  # TT-SVD's Frobenius cut is worse in this metric


def test_two_site_sweeps_choose_bonds_by_tolerance() -> None:
    """An exact MPO of bonds (1, 2, 3, 1), started from bonds of 1: the two-site sweeps grow the bonds to
    what the outputs need and no further (a one-site sweep cannot change a bond)."""
    rng = np.random.default_rng(5)
    ranks = (1, 2, 3, 1)
    cores = [rng.normal(size=(ranks[k], IN_MODES[k], OUT_MODES[k], ranks[k + 1])) for k in range(3)]
    w = _dense(cores)
    x = _anisotropic_rows(rng, 100, 12)
    thin = [rng.normal(size=(1, i, j, 1)) for i, j in zip(IN_MODES, OUT_MODES)]
    fitted, report = calibrated_fit(w, x.T @ x, tol=1e-8, sweeps=2, two_site=True, ridge=0.0, start=thin)
    assert report.errors[0] > 0.5
    assert report.spec.ranks == ranks
    np.testing.assert_allclose(x @ _dense(fitted), x @ w, atol=1e-7 * np.abs(x @ w).max())


def test_low_rank_fit_meets_eckart_young_on_the_outputs() -> None:
    """Whitened: the error of the best rank-q approximation of X W itself (X has full column rank).
    Plain: the best rank-q approximation of W."""
    rng = np.random.default_rng(1)
    x, w = _anisotropic_rows(rng, 300, 20), rng.normal(size=(20, 9))
    for q in (1, 4, 8):
        fit = low_rank_fit(w, q, x.T @ x, ridge=0.0)
        s = np.linalg.svd(x @ w, compute_uv=False)
        assert fit.error == pytest.approx(math.sqrt(np.sum(s[q:] ** 2) / np.sum(s**2)), rel=1e-7)
        np.testing.assert_allclose(np.linalg.norm(x @ (w - fit.first @ fit.second)) / np.linalg.norm(x @ w), fit.error)
        assert fit.first.shape == (20, q) and fit.second.shape == (q, 9) and fit.num_params == q * 29
        np.testing.assert_allclose(np.linalg.norm(fit.first, axis=0), np.linalg.norm(fit.second, axis=1), rtol=1e-9)
        plain = low_rank_fit(w, q)
        sw = np.linalg.svd(w, compute_uv=False)
        assert plain.error == pytest.approx(math.sqrt(np.sum(sw[q:] ** 2) / np.sum(sw**2)), rel=1e-9)
        assert output_error(plain.first @ plain.second, w, x.T @ x) > fit.error
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 9\] .* got 10"):
        low_rank_fit(w, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sweeps": -1}, "sweeps must be a non-negative int, got -1"),
        ({"ridge": 2.0}, r"ridge must be a number in \[0, 1\) .* got 2.0"),
        ({"tol": 1.5}, r"tol must be a relative error in \[0, 1\), got 1.5"),
    ],
)
def test_calibrated_fit_rejects_bad_settings(problem, kwargs: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    x, w, _ = problem
    with pytest.raises(ValueError, match=message):
        calibrated_fit(w, x.T @ x, IN_MODES, OUT_MODES, **kwargs)
    with pytest.raises(ValueError, match=r"gram must be \(12, 12\)"):
        calibrated_fit(w, np.eye(6), IN_MODES, OUT_MODES)
    with pytest.raises(ValueError, match=r"start cores stand for a \(6, 6\) matrix, not the matrix's \(12, 12\)"):
        calibrated_fit(w, x.T @ x, start=[np.ones((1, 2, 2, 1)), np.ones((1, 3, 3, 1))])


def test_allocate_spends_the_budget_where_the_error_falls_fastest() -> None:
    """Against every combination of options (brute force): the greedy choice fits the budget, no single
    further upgrade fits, and here it reaches the smallest total squared error."""
    import itertools

    options = {
        "flat": [(10, 0.9), (20, 0.8), (40, 0.7), (100, 0.0)],  # loses much at every size
        "easy": [(10, 0.3), (20, 0.05), (40, 0.01), (100, 0.0)],  # nearly free to shrink
        "mid": [(10, 0.6), (30, 0.3), (60, 0.1), (100, 0.0)],
    }
    budget = 150
    chosen = calibrate.allocate(options, budget)
    spent = sum(options[n][k][0] for n, k in chosen.items())
    assert spent <= budget
    for name, k in chosen.items():
        assert all(
            spent - options[name][k][0] + params > budget or error >= options[name][k][1]
            for params, error in options[name][k + 1 :]
        )
    best = min(
        (sum(options[n][k][1] ** 2 for n, k in zip(options, ks)), ks)
        for ks in itertools.product(range(4), repeat=3)
        if sum(options[n][k][0] for n, k in zip(options, ks)) <= budget
    )
    assert tuple(chosen[n] for n in options) == best[1]
    assert chosen["easy"] < chosen["flat"]  # the layer that loses least gives most
    with pytest.raises(ValueError, match="the budget of 20 parameters is below the smallest choice of every layer"):
        calibrate.allocate(options, 20)


def test_output_error_with_row_weights_is_the_error_on_one_hot_rows() -> None:
    """Weights per row (an embedding's token counts) are X^T X of one-hot rows: compared with X built here."""
    rng = np.random.default_rng(4)
    table, approx = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    tokens = np.array([0, 3, 3, 6, 6, 6])
    one_hot = np.eye(7)[tokens]
    expected = np.linalg.norm(one_hot @ (table - approx)) / np.linalg.norm(one_hot @ table)
    assert output_error(approx, table, np.bincount(tokens, minlength=7)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("solver", ["direct", "conjugate-gradients"])
@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["unit inputs", "tiny inputs"])
def test_the_ridge_is_the_given_fraction_of_the_normal_matrix_mean_diagonal(
    problem, monkeypatch, solver, scale
) -> None:  # type: ignore[no-untyped-def]
    """With ridge r, the update minimises ||X W - X W'||^2 + r * (tr K / dim K) * ||g||^2: compared with lstsq
    on the design matrix stacked over sqrt(lambda) I (inputs scaled so that tr K is below 1 too)."""
    x, w, cores = problem
    x = x * scale
    monkeypatch.setattr(calibrate, "DIRECT_SOLVE_LIMIT", 10**9 if solver == "direct" else 0)
    monkeypatch.setattr(calibrate, "CG_ITERATIONS", 3000)
    monkeypatch.setattr(calibrate, "CG_TOLERANCE", 1e-13)
    k, ridge = 1, 0.3
    design = _design(x, cores, k)
    a, i, j, c = cores[k].shape
    normal_trace = np.sum(design**2) / j  # tr K: K is the design's Gram matrix, one block per output index
    lam = ridge * normal_trace / (a * i * c)
    stacked = np.vstack([design, np.sqrt(lam) * np.eye(design.shape[1])])
    target = np.concatenate([(x @ w).ravel(), np.zeros(design.shape[1])])
    best = np.linalg.lstsq(stacked, target, rcond=None)[0].reshape(cores[k].shape)
    site = calibrate._Site(
        x.T @ x, x.T @ x @ w, calibrate._left_env(cores, k), calibrate._right_env(cores, k + 1), 3, 2
    )
    solved = site.solve(cores[k].transpose(0, 1, 3, 2), ridge).transpose(0, 1, 3, 2)
    np.testing.assert_allclose(solved, best, rtol=1e-6, atol=1e-8 * np.abs(best).max())


def test_a_singular_site_falls_back_to_the_least_norm_solution(problem, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Inputs that never use some features make K exactly singular; without a ridge the factorisation
    fails and the least-squares solution is taken: its outputs are the best ones (lstsq on the design)."""
    x, w, cores = problem
    x = x.copy()
    x[:, :6] = 0.0  # the first mode's first value never occurs: K's rows for it are exactly zero
    monkeypatch.setattr(calibrate, "DIRECT_SOLVE_LIMIT", 10**9)
    fallbacks = []
    monkeypatch.setattr(np.linalg, "lstsq", lambda *a, **k: fallbacks.append(a) or LSTSQ(*a, **k))
    site = calibrate._Site(x.T @ x, x.T @ x @ w, calibrate._left_env(cores, 0), calibrate._right_env(cores, 1), 2, 3)
    solved = site.solve(cores[0].transpose(0, 1, 3, 2), 0.0).transpose(0, 1, 3, 2)
    assert len(fallbacks) == 1  # the factorisation failed: K is exactly singular
    design = _design(x, cores, 0)
    best = LSTSQ(design, (x @ w).ravel(), rcond=None)[0].reshape(cores[0].shape)
    got = x @ _dense([solved, *cores[1:]])
    np.testing.assert_allclose(got, x @ _dense([best, *cores[1:]]), atol=1e-8 * np.abs(x @ w).max())
    assert np.all(np.isfinite(solved))


def test_calibrated_fit_reports_and_returns_what_it_was_given(problem) -> None:  # type: ignore[no-untyped-def]
    """Dtype, modes, core count, ranks from tol, the ridge, the weight error and the progress calls."""
    x, w, _ = problem
    calls: list[tuple[int, float]] = []
    cores, report = calibrated_fit(
        w.astype(np.float32), x.T @ x, (3, 2, 2), (2, 2, 3), tol=0.5, sweeps=2, ridge=1e-4,
        progress=lambda sweep, error: calls.append((sweep, error)),
    )  # fmt: skip
    assert all(c.dtype == np.float32 for c in cores)
    assert [c.shape[1] for c in cores] == [3, 2, 2] and [c.shape[2] for c in cores] == [2, 2, 3]
    assert report.spec.ranks == tnlayers.from_dense(w, (3, 2, 2), (2, 2, 3), tol=0.5)[1].spec.ranks
    assert report.ridge == 1e-4 and report.sweeps == ("one-site", "one-site")
    assert calls == [(1, report.errors[1]), (2, report.errors[2])]
    dense = _dense([c.astype(np.float64) for c in cores])
    assert report.weight_error == pytest.approx(np.linalg.norm(w - dense) / np.linalg.norm(w), rel=1e-5)
    four, _ = calibrated_fit(w, x.T @ x, sweeps=0)
    three, report3 = calibrated_fit(np.arange(144.0).reshape(12, 12), x.T @ x, n_cores=3, sweeps=0)
    assert len(four) == 4 and len(three) == 3 and report3.errors == (report3.svd_error,)
    integers, _ = calibrated_fit(np.arange(144).reshape(12, 12), x.T @ x, n_cores=2, sweeps=1)
    assert all(c.dtype == np.float64 for c in integers)
    _, zero = calibrated_fit(np.zeros((12, 12)), x.T @ x, n_cores=2, sweeps=1)
    assert zero.weight_error == 0.0 and zero.errors == (0.0, 0.0)
    single, report1 = calibrated_fit(w, x.T @ x, (12,), (12,), sweeps=1, two_site=True)
    assert report1.sweeps == ("one-site",) and len(single) == 1
    with pytest.raises(ValueError, match=r"max_rank must be an int or 2 inner bond dimensions, got \(2, 2, 2\)"):
        calibrated_fit(w, x.T @ x, IN_MODES, OUT_MODES, max_rank=(2, 2, 2))
    with pytest.raises(ValueError, match=r"matrix must be 2-D \(in_features, out_features\), got shape \(12,\)"):
        calibrated_fit(w[0], x.T @ x)
    with pytest.raises(ValueError, match="sweeps must be a non-negative int, got True"):
        calibrated_fit(w, x.T @ x, sweeps=True)


# From the mutation run (docs/mutation-survivors.md).


@pytest.mark.parametrize(
    ("options", "budget", "expected"),
    [
        # the same added parameters: the larger drop of error**2 wins, not of error or error**3 or lower**3
        ({"a": [(10, 0.5), (20, 0.0)], "b": [(10, 0.9), (20, 0.75)]}, 30, {"a": 1, "b": 0}),
        # per added parameter: 0.09 / 10 beats 0.25 / 100
        ({"a": [(10, 0.5), (110, 0.0)], "b": [(10, 0.5), (20, 0.4)]}, 120, {"a": 0, "b": 1}),
        ({"a": [(10, 0.5), (11, 0.0)]}, 11, {"a": 1}),  # one parameter more is still more
        ({"a": [(10, 0.5), (20, 0.5)]}, 100, {"a": 0}),  # nothing gained: nothing spent
        ({"a": [(10, 0.5)], "b": [(10, 0.2)]}, 20, {"a": 0, "b": 0}),  # exactly the budget
        ({"a": [(20, 0.1), (10, 0.5)]}, 10, {"a": 1}),  # options in any order: the smallest first
    ],
)
def test_allocate_by_hand(options: dict, budget: int, expected: dict) -> None:
    assert calibrate.allocate(options, budget) == expected


def test_allocate_takes_options_of_equal_size() -> None:
    chosen = calibrate.allocate({"a": [(10, 0.5), (10, 0.2), (30, 0.0)]}, 100)
    assert chosen == {"a": 2}


def test_gram_objects_vectors_and_matrices_are_one_input(problem) -> None:  # type: ignore[no-untyped-def]
    x, w, _ = problem
    gram = Gram(12)
    gram.add(x)
    fitted, report = calibrated_fit(w, gram, IN_MODES, OUT_MODES, 2)
    same, same_report = calibrated_fit(w, x.T @ x, IN_MODES, OUT_MODES, 2)
    assert report.errors == same_report.errors
    for a, b in zip(fitted, same):
        np.testing.assert_array_equal(a, b)
    assert low_rank_fit(w, 3, gram).error == low_rank_fit(w, 3, x.T @ x).error
    counts = np.arange(1.0, 13.0)  # per-row weights: a diagonal C
    by_vector = calibrated_fit(w, counts, IN_MODES, OUT_MODES, 2)[1].errors
    assert by_vector == pytest.approx(calibrated_fit(w, np.diag(counts), IN_MODES, OUT_MODES, 2)[1].errors, rel=1e-12)
    with pytest.raises(ValueError, match=r"^gram contains NaN or infinite values$"):
        calibrated_fit(w, np.full((12, 12), np.inf), IN_MODES, OUT_MODES)


@pytest.mark.parametrize("ridge", [False, 1, 1.0, -1e-9, "0.1"])
def test_calibrated_fit_rejects_a_ridge_outside_zero_to_one(problem, ridge) -> None:  # type: ignore[no-untyped-def]
    x, w, _ = problem
    with pytest.raises(ValueError, match=r"ridge must be a number in \[0, 1\)"):
        calibrated_fit(w, x.T @ x, IN_MODES, OUT_MODES, ridge=ridge)


@pytest.mark.parametrize("tol", [0.0, 0.1, 0.2, 0.3, 0.45, 0.6])
def test_two_site_tol_cuts_where_the_singular_values_say(tol: float) -> None:
    """Two cores and C = I: the merged site is all of W, so the bond is the smallest r whose tail of squared
    singular values (NumPy's SVD of W regrouped as (i1 j1, i2 j2)) is within tol**2 of the total."""
    rng = np.random.default_rng(8)
    w = rng.normal(size=(12, 12)) @ np.diag(0.7 ** np.arange(12))
    s = np.linalg.svd(w.reshape(3, 4, 3, 4).transpose(0, 2, 1, 3).reshape(9, 16), compute_uv=False)
    tails = np.append(np.cumsum((s**2)[::-1])[::-1], 0.0)
    expected = int(np.nonzero(tails <= tol**2 * np.sum(s**2))[0][0])
    _, report = calibrated_fit(w, np.eye(12), (3, 4), (3, 4), tol=tol, sweeps=1, two_site=True, ridge=0.0)
    assert report.spec.ranks == (1, expected, 1)
    assert expected == 9 if tol == 0.0 else 1 < expected < 9  # the tolerances cut inside the spectrum
    assert report.errors[-1] <= tol + 1e-12


def test_output_error_at_small_scales_and_of_a_zero_matrix() -> None:
    """Against ``||X D|| / ||X W||`` with ``X`` built here, where every squared norm is far below 1."""
    rng = np.random.default_rng(9)
    x, w = 1e-3 * rng.normal(size=(30, 6)), 1e-3 * rng.normal(size=(6, 4))
    approx = w + 1e-4 * rng.normal(size=(6, 4))
    expected = np.linalg.norm(x @ (w - approx)) / np.linalg.norm(x @ w)
    assert output_error(approx, w, x.T @ x) == pytest.approx(expected, rel=1e-10)
    tokens = np.array([0, 1, 1, 5])
    one_hot = 1e-3 * np.eye(6)[tokens]  # rows weighted by 1e-6: C = diag(counts) * 1e-6
    expected = np.linalg.norm(one_hot @ (w - approx)) / np.linalg.norm(one_hot @ w)
    assert output_error(approx, w, 1e-6 * np.bincount(tokens, minlength=6)) == pytest.approx(expected, rel=1e-10)
    zero = np.zeros((6, 4))
    assert output_error(zero, zero, x.T @ x) == 0.0 and output_error(zero, zero, np.ones(6)) == 0.0
    with pytest.raises(ValueError, match=r"^matrix must be 2-D \(in_features, out_features\), got shape \(6,\)$"):
        output_error(zero[:, 0], zero[:, 0], np.ones(6))
    with pytest.raises(ValueError, match=r"^approximation of shape \(4, 6\) does not match the matrix's \(6, 4\)$"):
        output_error(zero.T, zero, np.ones(6))


def test_low_rank_fit_dtypes_ranks_and_scales() -> None:
    rng = np.random.default_rng(10)
    w = rng.normal(size=(8, 5))
    fit = low_rank_fit(w.astype(np.float32), 2)
    assert fit.first.dtype == np.float32 and fit.second.dtype == np.float32
    integers = low_rank_fit(np.arange(40).reshape(8, 5), 2)
    assert integers.first.dtype == np.float64 and integers.error < 1e-12  # an arithmetic table has rank 2
    full = low_rank_fit(w, 5)  # the full rank is allowed, and exact
    np.testing.assert_allclose(full.first @ full.second, w, atol=1e-12)
    tiny = low_rank_fit(1e-3 * w, 2)  # squared norm far below 1
    s = np.linalg.svd(w, compute_uv=False)
    assert tiny.error == pytest.approx(math.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2)), rel=1e-9)
    assert low_rank_fit(np.zeros((8, 5)), 2).error == 0.0
    for rank in (True, 0, 6):
        with pytest.raises(ValueError, match=r"rank must be an int in \[1, 5\]"):
            low_rank_fit(w, rank)
    with pytest.raises(ValueError, match=r"^matrix must be 2-D \(in_features, out_features\), got shape \(8,\)$"):
        low_rank_fit(w[:, 0], 1)


@pytest.mark.parametrize("scale", [1.0, 1e-4], ids=["unit", "trace below 1"])
def test_low_rank_ridge_is_a_shift_of_c(scale: float) -> None:
    """``ridge`` adds ``ridge * mean(diag C)`` to ``C``'s diagonal: the same fit as that ``C`` with no ridge."""
    rng = np.random.default_rng(11)
    x, w = scale * rng.normal(size=(4, 8)), rng.normal(size=(8, 5))  # 4 rows: C is singular
    c = x.T @ x
    ridged = low_rank_fit(w, 2, c, ridge=0.3)
    shifted = low_rank_fit(w, 2, c + 0.3 * np.trace(c) / 8 * np.eye(8), ridge=0.0)
    np.testing.assert_allclose(ridged.first @ ridged.second, shifted.first @ shifted.second, rtol=1e-8, atol=1e-12)


def test_gram_takes_rows_of_any_leading_shape() -> None:
    rng = np.random.default_rng(12)
    rows = rng.normal(size=(2, 3, 4))  # (batch, tokens, features)
    gram = Gram(4)
    gram.add(rows)
    gram.add(rows[0, 0])  # one row, as a vector
    flat = np.concatenate([rows.reshape(6, 4), rows[0, :1]])
    np.testing.assert_allclose(gram.matrix, flat.T @ flat, rtol=1e-12)
    assert gram.rows == 7 and Gram(1).features == 1
    with pytest.raises(ValueError, match=r"^calibration rows contain NaN or infinite values$"):
        gram.add(np.full(4, np.nan))
    for features in (True, 0, 2.0):
        with pytest.raises(ValueError, match="features must be a positive int"):
            Gram(features)


def test_calibrated_fit_types_caps_and_weight_error() -> None:
    rng = np.random.default_rng(13)
    x = rng.normal(size=(50, 12))
    integers = rng.integers(-3, 4, size=(12, 12))
    cores, _ = calibrated_fit(integers, x.T @ x, IN_MODES, OUT_MODES, 2)
    assert all(core.dtype == np.float64 for core in cores)
    start = [np.ones((1, 2, 2, 2), dtype=np.int64), np.ones((2, 3, 3, 2), dtype=np.int64), np.ones((2, 2, 2, 1), int)]
    assert all(core.dtype == np.float64 for core in calibrated_fit(integers, x.T @ x, start=start)[0])
    _, report = calibrated_fit(integers, x.T @ x, IN_MODES, OUT_MODES, (2, 3))  # one cap per bond
    assert report.spec.ranks == (1, 2, 3, 1)
    small = 1e-3 * rng.normal(size=(12, 12))  # ||W|| below 1
    cores, report = calibrated_fit(small, x.T @ x, IN_MODES, OUT_MODES, 2)
    expected = np.linalg.norm(small - _dense(cores)) / np.linalg.norm(small)
    assert report.weight_error == pytest.approx(expected, rel=1e-9) and expected > 0.1
