"""Fits to a layer's outputs on calibration inputs: MPO cores by DMRG-style sweeps, and the low-rank baseline.

A weight-space fit (:func:`tnlayers.from_dense`) treats every direction of the input space alike. On real
inputs the directions are far from alike, so these fits minimise the error of the layer's *output*:

    f(W') = ||X (W - W')||_F**2 = tr((W - W')^T C (W - W')),   C = X^T X   (N x N, float64)

``X`` (calibration rows) is never kept: :class:`Gram` adds ``x^T x`` batch by batch. The relative output
error is ``sqrt(f(W') / tr(W^T C W))``.

**One-site update.** ``W'`` is linear in one core ``G[a, i, j, c]`` when the others are fixed:
``W'[(r, i, t), (s, j, u)] = sum L[r, s, a] G[a, i, j, c] R[c, t, u]`` with ``L`` the product of the cores
to the left (rows ``r``, columns ``s``) and ``R`` of those to the right. The normal equations are
block-diagonal in the output index ``j``: one matrix

    K[(a, i, c), (a', i', c')] = sum P[a, a', r, r'] Q[c, c', t, t'] C[(r, i, t), (r', i', t')]
    P = sum_s L[r, s, a] L[r', s, a'],   Q = sum_u R[c, t, u] R[c', t', u]

serves every ``j``, with right-hand sides ``B[(a, i, c), j] = sum L[r, s, a] R[c, t, u] (C W)[(r, i, t), (s, j, u)]``.
One solve of ``(K + ridge) g = B`` gives the exact minimiser over that core. **Two-site update**: the same
solve for two neighbouring cores merged into one site, then a truncated SVD splits it back, choosing the
bond between them (DMRG); the truncation is optimal in the Frobenius metric, not in ``K``'s, so a one-site
sweep follows to re-fit. The cores left of the site are kept left-orthonormal and those right of it
right-orthonormal (QR), as in DMRG, so that ``K`` is as well conditioned as ``C`` allows.

Cost per update: ``C W`` once per layer (``N**2 M``); per site, contracting ``C`` with ``P`` and ``Q``
(about ``min(a, c)**2 N**2`` multiply-adds) and one ``(a i c)**3`` factorisation. The calibration set's
size enters only through ``C``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import opt_einsum
from numpy.typing import NDArray

from .decompose import _bond_caps, _check_tol, _truncated_svd, from_dense, spec_from_cores, to_dense
from .spec import MPOSpec

__all__ = ["CalibratedFit", "Gram", "LowRankFit", "allocate", "calibrated_fit", "low_rank_fit", "output_error"]

Array = NDArray[Any]


class Gram:
    """The running ``C = X^T X`` (float64) of a layer's input rows, added batch by batch.

    ``gram.add(x)`` takes ``x`` of shape ``(..., features)`` (any leading dimensions are rows); ``gram.matrix``
    is ``C`` of shape ``(features, features)``; ``gram.rows`` counts the rows seen.
    """

    def __init__(self, features: int) -> None:
        if isinstance(features, bool) or not isinstance(features, numbers.Integral) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        self.features: int = int(features)
        self.matrix: Array = np.zeros((self.features, self.features))
        self.rows: int = 0

    def add(self, x: Any) -> None:
        batch = np.asarray(x, dtype=np.float64)
        if batch.ndim == 0 or batch.shape[-1] != self.features:
            raise ValueError(f"expected rows of {self.features} features, got an array of shape {batch.shape}")
        batch = batch.reshape(-1, self.features)
        if not np.all(np.isfinite(batch)):
            raise ValueError("calibration rows contain NaN or infinite values")
        self.matrix += batch.T @ batch
        self.rows += int(batch.shape[0])

    def __repr__(self) -> str:
        return f"Gram(features={self.features}, rows={self.rows})"


def _check_gram(gram: Any, features: int) -> Array:
    matrix = np.asarray(gram.matrix if isinstance(gram, Gram) else gram, dtype=np.float64)
    if matrix.shape == (features,):  # per-row weights (an embedding's token counts): a diagonal C
        matrix = np.diag(matrix)
    if matrix.shape != (features, features):
        raise ValueError(f"gram must be ({features}, {features}) for a matrix of {features} rows, got {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("gram contains NaN or infinite values")
    return (matrix + matrix.T) / 2


def _check_weights(gram: Any, features: int) -> Array:
    """Per-row weights (a diagonal ``C``), checked: finite and non-negative."""
    weights = np.asarray(gram.matrix if isinstance(gram, Gram) else gram, dtype=np.float64)
    if weights.shape != (features,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"per-row weights must be {features} finite numbers >= 0, got shape {weights.shape}")
    return weights


def output_error(approximation: Any, matrix: Any, gram: Any) -> float:
    """``sqrt(tr(D^T C D) / tr(W^T C W))`` with ``D = W - approximation``: the relative error of the layer's
    outputs on the calibration rows (``approximation`` a dense matrix or a list of cores). ``gram`` may be
    a vector of per-row weights, a diagonal ``C``: an embedding's token counts (one-hot inputs)."""
    dense = np.asarray(matrix, dtype=np.float64)
    if dense.ndim != 2:
        raise ValueError(f"matrix must be 2-D (in_features, out_features), got shape {dense.shape}")
    if isinstance(approximation, (list, tuple)):
        approximation = to_dense(approximation)
    approx = np.asarray(approximation, dtype=np.float64)
    if approx.shape != dense.shape:
        raise ValueError(f"approximation of shape {approx.shape} does not match the matrix's {dense.shape}")
    diff = dense - approx
    weights = np.asarray(gram.matrix if isinstance(gram, Gram) else gram, dtype=np.float64)
    if weights.shape == (dense.shape[0],):  # diagonal C: never formed
        reference = float(np.sum(weights[:, None] * dense**2))
        lost = float(np.sum(weights[:, None] * diff**2))
        return math.sqrt(max(lost, 0.0) / reference) if reference > 0 else 0.0
    c = _check_gram(gram, dense.shape[0])
    reference = float(np.sum(dense * (c @ dense)))
    return math.sqrt(max(float(np.sum(diff * (c @ diff))), 0.0) / reference) if reference > 0 else 0.0


@dataclass(frozen=True)
class CalibratedFit:
    """What :func:`calibrated_fit` did: the spec it ended with and the output error along the way."""

    spec: MPOSpec
    errors: tuple[float, ...]
    """Relative output error of the TT-SVD start, then after each sweep (a sweep: left to right and back)."""
    sweeps: tuple[str, ...]
    """``"two-site"`` or ``"one-site"`` for each entry of ``errors`` after the first."""
    ridge: float
    weight_error: float
    """``||W - W'||_F / ||W||_F`` of the result: larger than TT-SVD's, by design."""
    svd_error: float = field(default=math.nan)
    """The TT-SVD start's relative output error (``errors[0]``)."""

    @property
    def error(self) -> float:
        return self.errors[-1]


def _left_env(cores: Sequence[Array], k: int) -> Array:
    """``L[r, s, a]``: the cores before ``k`` contracted, ``r`` their rows, ``s`` their columns."""
    env = np.ones((1, 1, 1))
    for core in cores[:k]:
        rows, cols, _ = env.shape
        env = np.einsum("rsa,aijc->risjc", env, core).reshape(rows * core.shape[1], cols * core.shape[2], -1)
    return env


def _right_env(cores: Sequence[Array], k: int) -> Array:
    """``R[c, t, u]``: the cores from ``k`` on contracted, ``t`` their rows, ``u`` their columns."""
    env = np.ones((1, 1, 1))
    for core in reversed(cores[k:]):
        _, rows, cols = env.shape
        env = np.einsum("aijc,ctu->aitju", core, env).reshape(-1, core.shape[1] * rows, core.shape[2] * cols)
    return env


DIRECT_SOLVE_LIMIT = 1536
"""Sites with at most this many unknowns per output index (``a * I * c``) are solved by forming ``K`` and
factorising it; larger ones by conjugate gradients, which never form ``K``."""
CG_ITERATIONS = 200
CG_TOLERANCE = 1e-4
"""Conjugate gradients stop once the residual is this fraction of the right-hand side (on a 1536 x 384 layer at
bond 32, 1e-4 fitted to the same error as 1e-7 to four digits, in 60% of the iterations)."""


class _Site:
    """The least-squares problem of one site (one core, or two merged) with the cores outside it fixed:
    ``left`` = ``L[r, s, a]`` and ``right`` = ``R[c, t, u]`` their environments; unknowns ``g[a, I, c, J]``."""

    def __init__(self, c: Array, cw: Array, left: Array, right: Array, site_in: int, site_out: int) -> None:
        self.left, self.right = left, right
        n_left, n_right = left.shape[0], right.shape[1]
        self.shape = (left.shape[2], site_in, right.shape[0], site_out)
        self.c6 = c.reshape(n_left, site_in, n_right, n_left, site_in, n_right)
        self.c = c
        self.cw6 = cw.reshape(n_left, site_in, n_right, left.shape[1], site_out, right.shape[2])

    @functools.cached_property
    def p(self) -> Array:
        """``P[a, a', r, r'] = sum_s L[r, s, a] L[r', s, a']`` (one matrix product; ``(a r)**2`` entries, so
        formed only where ``K`` or its partial traces are)."""
        return np.tensordot(self.left, self.left, axes=([1], [1])).transpose(1, 3, 0, 2)

    @functools.cached_property
    def q(self) -> Array:
        """``Q[c, c', t, t'] = sum_u R[c, t, u] R[c', t', u]``."""
        return np.tensordot(self.right, self.right, axes=([2], [2])).transpose(0, 2, 1, 3)

    def rhs(self) -> Array:
        """``B[a, I, c, J] = sum L[r, s, a] R[c, t, u] (C W)[(r, I, t), (s, J, u)]``."""
        return np.asarray(
            opt_einsum.contract("rsa,ctu,ritsju->aicj", self.left, self.right, self.cw6, optimize="greedy")
        )

    def normal(self) -> Array:
        """``K[(a, I, c), (a', I', c')]``, formed (``(a I c)**2`` entries)."""
        a, i, c, _ = self.shape
        k = opt_einsum.contract("aArR,cCtT,ritRIT->aicAIC", self.p, self.q, self.c6, optimize="greedy")
        return np.asarray(k).reshape(a * i * c, a * i * c)

    def apply(self, g: Array) -> Array:
        """``K g`` for every output index at once, never forming ``K``: ``g`` is spread to the
        ``(N, M)`` matrix it stands for, multiplied by ``C``, and projected back (about ``N**2 M``)."""
        spread = opt_einsum.contract("Rsa,aicj,cTu->RiTsju", self.left, g, self.right, optimize="greedy")
        product = (self.c @ spread.reshape(self.c.shape[0], -1)).reshape(spread.shape)
        return np.asarray(
            opt_einsum.contract("rsa,ritsju,ctu->aicj", self.left, product, self.right, optimize="greedy")
        )

    def diagonal(self) -> Array:
        """``K``'s diagonal ``[a, I, c]``."""
        p_diag = np.matmul(self.left.transpose(2, 0, 1), self.left.transpose(2, 1, 0))  # P[a, a, r, r']
        q_diag = np.matmul(self.right, self.right.transpose(0, 2, 1))  # Q[c, c, t, t']
        c_diag = np.einsum("ritRiT->irtRT", self.c6)
        return np.asarray(opt_einsum.contract("arR,ctT,irtRT->aic", p_diag, q_diag, c_diag, optimize="greedy"))

    def partial_traces(self, i1: int, i2: int) -> tuple[Array, Array]:
        """``K`` summed over its right half's diagonal ``(i2, c)`` and over its left half's ``(a, i1)``,
        for a site of two cores with ``I = (i1, i2)``: the two Kronecker factors of the split's metric."""
        n_left, _, n_right, *_ = self.c6.shape
        a, _, b, _ = self.shape
        c8 = self.c6.reshape(n_left, i1, i2, n_right, n_left, i1, i2, n_right)
        q_trace = np.tensordot(self.right, self.right, axes=([0, 2], [0, 2]))  # sum_c Q[c, c, t, t']
        p_trace = np.tensordot(self.left, self.left, axes=([1, 2], [1, 2]))  # sum_a P[a, a, r, r']
        left = opt_einsum.contract("aArR,tT,rxytRXyT->axAX", self.p, q_trace, c8, optimize="greedy")
        right = opt_einsum.contract("rR,cCtT,rxytRxYT->ycYC", p_trace, self.q, c8, optimize="greedy")
        return left.reshape(a * i1, a * i1), right.reshape(i2 * b, i2 * b)

    def solve(self, start: Array, ridge: float) -> Array:
        """The minimiser ``g[a, I, c, J]`` (ridge: a fraction of ``K``'s mean diagonal): a factorisation
        for small sites; for large ones conjugate gradients from ``start`` (each iteration lowers the
        error, so a sweep never raises it), Jacobi-preconditioned."""
        a, i, c, j = self.shape
        rhs = self.rhs()
        if a * i * c <= DIRECT_SOLVE_LIMIT:
            k = self.normal()
            k[np.diag_indices_from(k)] += ridge * max(float(np.trace(k)), 0.0) / k.shape[0]
            try:
                return np.linalg.solve(k, rhs.reshape(-1, j)).reshape(self.shape)
            except np.linalg.LinAlgError:  # singular even with the ridge: the least-norm solution
                return np.linalg.lstsq(k, rhs.reshape(-1, j), rcond=None)[0].reshape(self.shape)
        diagonal = self.diagonal()
        shift = ridge * max(float(diagonal.mean()), 0.0) + _TINY
        inverse = 1.0 / np.maximum(diagonal + shift, _TINY)[..., None]
        x = start
        residual = rhs - self.apply(x) - shift * x
        z = inverse * residual
        direction, rz = z, float(np.sum(residual * z))
        stop = CG_TOLERANCE**2 * float(np.sum(rhs * rhs))
        for _ in range(CG_ITERATIONS):
            if float(np.sum(residual * residual)) <= stop:
                break
            k_direction = self.apply(direction) + shift * direction
            curvature = float(np.sum(direction * k_direction))
            if curvature <= 0:
                break
            step = rz / curvature
            x = x + step * direction
            residual = residual - step * k_direction
            z = inverse * residual
            rz, previous = float(np.sum(residual * z)), rz
            direction = z + (rz / previous) * direction
        return x


_TINY = float(np.finfo(np.float64).tiny)


def _orthonormalise(cores: list[Array], k: int, to_right: bool) -> None:
    """Move the gauge across the bond of core ``k``: QR it and push the triangle into its neighbour."""
    a, i, j, c = cores[k].shape
    if to_right:
        q, r = np.linalg.qr(cores[k].reshape(a * i * j, c))
        cores[k] = q.reshape(a, i, j, -1)
        cores[k + 1] = np.einsum("xc,cijd->xijd", r, cores[k + 1])
    else:
        q, r = np.linalg.qr(cores[k].reshape(a, i * j * c).T)
        cores[k] = q.T.reshape(-1, i, j, c)
        cores[k - 1] = np.einsum("aijc,xc->aijx", cores[k - 1], r)


def _root_and_inverse(gram: Array) -> tuple[Array, Array]:
    """``G**(1/2)`` and ``G**(-1/2)`` of a symmetric positive semi-definite matrix (tiny eigenvalues lifted)."""
    values, vectors = np.linalg.eigh(gram)
    values = np.maximum(values, max(float(values[-1]), np.finfo(np.float64).tiny) * 1e-12)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


def _split(
    site: Array,
    factors: tuple[Array, Array],
    shapes: tuple[tuple[int, int], tuple[int, int]],
    cap: int | None,
    tol: float | None,
) -> tuple[Array, Array]:
    """A two-site tensor ``T[a, (i1 i2), (j1 j2), c]`` back into two cores by a truncated SVD, taken in the
    metric of the site's normal matrix ``K`` (approximated by the Kronecker product of its two partial
    traces, one per side of the bond), not in the Frobenius metric that ignores the inputs."""
    (i1, j1), (i2, j2) = shapes
    a, _, _, c = site.shape
    root_left, inverse_left = _root_and_inverse(factors[0])
    root_right, inverse_right = _root_and_inverse(factors[1])
    tensor = site.reshape(a, i1, i2, j1, j2, c).transpose(0, 1, 3, 4, 2, 5).reshape(a * i1, j1, j2, i2 * c)
    whitened = np.einsum("pq,qxyr,rs->pxys", root_left, tensor, root_right, optimize=True)  # pairwise, by BLAS
    whitened = whitened.reshape(a * i1 * j1, j2 * i2 * c)
    allowed = None if tol is None else tol**2 * float(np.sum(whitened**2))
    u, svh, _, _ = _truncated_svd(whitened, allowed, cap)  # the cut TT-SVD makes, in the whitened metric
    keep = u.shape[1]
    left = np.einsum("qp,pxk->qxk", inverse_left, u.reshape(a * i1, j1, keep))
    right = np.einsum("kys,sr->kyr", svh.reshape(keep, j2, i2 * c), inverse_right)
    return left.reshape(a, i1, j1, keep), right.reshape(keep, j2, i2, c).transpose(0, 2, 1, 3)


def _sweep(
    cores: list[Array],
    c: Array,
    cw: Array,
    two_site: bool,
    caps: tuple[int | None, ...],
    tol: float | None,
    ridge: float,
) -> None:
    """One sweep, left to right and back, updating ``cores`` in place. On entry cores 1.. are
    right-orthonormal; on exit too."""
    n = len(cores)
    width = 2 if two_site and n > 1 else 1
    sites = list(range(n - width + 1))
    order = [(k, True) for k in sites] + [(k, False) for k in reversed(sites)]
    for k, to_right in order:  # the end site is solved twice: the second moves the gauge back
        ins = [core.shape[1] for core in cores[k : k + width]]
        outs = [core.shape[2] for core in cores[k : k + width]]
        problem = _Site(c, cw, _left_env(cores, k), _right_env(cores, k + width), math.prod(ins), math.prod(outs))
        current = cores[k] if width == 1 else np.einsum("aijc,cxyd->aixjyd", cores[k], cores[k + 1])
        a, b = current.shape[0], current.shape[-1]
        start = current.reshape(a, math.prod(ins), math.prod(outs), b).transpose(0, 1, 3, 2)
        site = problem.solve(start, ridge).transpose(0, 1, 3, 2)  # [a, I, J, c]
        if width == 2:
            factors = problem.partial_traces(ins[0], ins[1])
            cores[k], cores[k + 1] = _split(site, factors, ((ins[0], outs[0]), (ins[1], outs[1])), caps[k], tol)
            _orthonormalise(cores, k if to_right else k + 1, to_right=to_right)
            continue
        cores[k] = site
        if to_right and k < n - 1:
            _orthonormalise(cores, k, to_right=True)
        elif not to_right and k > 0:
            _orthonormalise(cores, k, to_right=False)


def _check_ridge(ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not 0 <= float(ridge) < 1:
        raise ValueError(f"ridge must be a number in [0, 1) (a fraction of K's mean diagonal), got {ridge!r}")
    return float(ridge)


def calibrated_fit(
    matrix: Any,
    gram: Any,
    in_modes: Sequence[int] | None = None,
    out_modes: Sequence[int] | None = None,
    max_rank: int | Sequence[int] | None = None,
    tol: float | None = None,
    *,
    n_cores: int = 4,
    sweeps: int = 2,
    two_site: bool = False,
    ridge: float = 1e-6,
    start: Sequence[Any] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[list[NDArray[Any]], CalibratedFit]:
    """Cores of an MPO fitted to ``matrix``'s outputs on calibration rows whose Gram matrix is ``gram``.

    Starts from :func:`tnlayers.from_dense` (TT-SVD, same ``in_modes``/``out_modes``/``max_rank``/``tol``),
    then runs ``sweeps`` one-site sweeps (left to right and back; each update exact for its core, so the
    error never rises), or, with ``two_site=True``, ``sweeps`` two-site sweeps (bonds re-chosen by an SVD
    under ``max_rank``/``tol``, ``tol`` here relative to each site: the ranks adapt) and one one-site
    sweep to re-fit. At fixed bond caps one-site sweeps fitted better in every case measured
    (docs/transformer.md). ``ridge`` is added
    to each site's normal matrix as a fraction of its mean diagonal (``C`` is singular with fewer rows
    than features). ``start`` replaces the TT-SVD start by given cores (a layer's, a previous fit's; their
    modes are used). ``progress(sweep, error)`` is called after each sweep. Cores come back in the
    matrix's floating dtype; the report has the output error before and after every sweep.

    ``matrix``: ``(in_features, out_features)``; ``gram``: :class:`Gram` or an ``(in_features, in_features)``
    array ``X^T X``.
    """
    dense = np.asarray(matrix)
    if dense.ndim != 2:
        raise ValueError(f"matrix must be 2-D (in_features, out_features), got shape {dense.shape}")
    if isinstance(sweeps, bool) or not isinstance(sweeps, numbers.Integral) or sweeps < 0:
        raise ValueError(f"sweeps must be a non-negative int, got {sweeps!r}")
    ridge = _check_ridge(ridge)
    _check_tol(tol)
    c = _check_gram(gram, dense.shape[0])
    if start is None:
        initial, _ = from_dense(dense, in_modes, out_modes, max_rank, tol, n_cores=n_cores)
    else:
        initial = [np.asarray(core) for core in start]
        given = spec_from_cores(initial)
        if (given.in_features, given.out_features) != dense.shape:
            raise ValueError(
                f"start cores stand for a ({given.in_features}, {given.out_features}) matrix, "
                f"not the matrix's {dense.shape}"
            )
    out_dtype = initial[0].dtype if np.issubdtype(initial[0].dtype, np.floating) else np.dtype(np.float64)
    work = dense.astype(np.float64)
    cores = [core.astype(np.float64) for core in initial]
    caps = _bond_caps(max_rank, len(cores) - 1)
    for k in range(len(cores) - 1, 0, -1):  # right-orthonormal right of the first site
        _orthonormalise(cores, k, to_right=False)
    cw = c @ work
    errors, kinds = [output_error(cores, work, c)], []
    schedule = ["two-site" if two_site and len(cores) > 1 else "one-site"] * sweeps
    if two_site and sweeps and len(cores) > 1:
        schedule.append("one-site")
    for number, kind in enumerate(schedule, start=1):
        _sweep(cores, c, cw, kind == "two-site", caps, tol, ridge)
        errors.append(output_error(cores, work, c))
        kinds.append(kind)
        if progress is not None:
            progress(number, errors[-1])
    result = [np.ascontiguousarray(core.astype(out_dtype)) for core in cores]
    norm = float(np.linalg.norm(work))
    weight_error = float(np.linalg.norm(work - to_dense(cores))) / norm if norm > 0 else 0.0
    report = CalibratedFit(
        spec=spec_from_cores(result),
        errors=tuple(errors),
        sweeps=tuple(kinds),
        ridge=ridge,
        weight_error=weight_error,
        svd_error=errors[0],
    )
    return result, report


@dataclass(frozen=True)
class LowRankFit:
    """The rank-``q`` pair ``W' = first @ second`` of :func:`low_rank_fit` and its output error."""

    first: NDArray[Any]
    """``(in_features, rank)``"""
    second: NDArray[Any]
    """``(rank, out_features)``"""
    error: float
    """Relative output error on the calibration rows (relative weight error without them)."""

    @property
    def rank(self) -> int:
        return int(self.first.shape[1])

    @property
    def num_params(self) -> int:
        return int(self.first.size + self.second.size)


def low_rank_fit(matrix: Any, rank: int, gram: Any = None, ridge: float = 1e-6) -> LowRankFit:
    """The best rank-``rank`` ``W' = first @ second`` for ``matrix`` (``(N, M)``): truncated SVD of ``W``
    (``gram=None``), or, given ``C = X^T X``, the minimiser of ``||X (W - W')||_F`` (activation-whitened,
    the SVD-LLM/ASVD family): with ``C + ridge = S S^T``, ``W' = S^-T U_q Sigma_q V_q^T`` from the SVD of
    ``S^T W``. ``gram`` may also be a vector of per-row weights (a diagonal ``C``: an embedding's lookup
    counts), then ``S = sqrt(C)`` and no ``N x N`` matrix is formed. It costs ``rank * (N + M)``
    parameters, as two ``nn.Linear`` layers would. The two factors are balanced: each rank component's
    column of ``first`` and row of ``second`` have the same norm, so that training changes both alike."""
    dense = np.asarray(matrix, dtype=np.float64)
    if dense.ndim != 2:
        raise ValueError(f"matrix must be 2-D (in_features, out_features), got shape {dense.shape}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= min(dense.shape):
        raise ValueError(
            f"rank must be an int in [1, {min(dense.shape)}] for a matrix of shape {dense.shape}, got {rank!r}"
        )
    ridge = _check_ridge(ridge)
    dtype = np.asarray(matrix).dtype if np.issubdtype(np.asarray(matrix).dtype, np.floating) else np.float64
    if gram is None:
        u, s, vh = np.linalg.svd(dense, full_matrices=False)
        first, second = u[:, :rank] * s[:rank], vh[:rank]
        norm = float(np.linalg.norm(dense))
        error = float(np.linalg.norm(dense - first @ second)) / norm if norm > 0 else 0.0
    elif np.shape(gram.matrix if isinstance(gram, Gram) else gram) == (dense.shape[0],):
        weights = _check_weights(gram, dense.shape[0])  # a diagonal C (an embedding's lookup counts): S = sqrt(C)
        root = np.sqrt(weights + ridge * float(weights.mean()) + np.finfo(np.float64).tiny)
        u, s, vh = np.linalg.svd(root[:, None] * dense, full_matrices=False)
        first, second = u[:, :rank] / root[:, None], s[:rank, None] * vh[:rank]
        error = output_error(first @ second, dense, weights)
    else:
        c = _check_gram(gram, dense.shape[0])
        c = c + (ridge * max(float(np.trace(c)), 0.0) / c.shape[0] + np.finfo(np.float64).tiny) * np.eye(c.shape[0])
        s_factor = np.linalg.cholesky(c)  # C = S S^T, S lower triangular
        u, s, vh = np.linalg.svd(s_factor.T @ dense, full_matrices=False)
        first = np.linalg.solve(s_factor.T, u[:, :rank])  # S^-T U_q
        second = s[:rank, None] * vh[:rank]
        error = output_error(first @ second, dense, gram)
    first, second = _balanced(first, second)
    return LowRankFit(first=first.astype(dtype), second=second.astype(dtype), error=error)


def _balanced(first: NDArray[np.float64], second: NDArray[np.float64]) -> tuple[NDArray[Any], NDArray[Any]]:
    """The same product with each rank component's column of ``first`` and row of ``second`` of one norm.

    A whitened or count-weighted fit puts its scales on one side (``S^-T U`` against ``Sigma V^T``: entries
    of 1e-3 against 1e3 for MiniLM's embedding), and a gradient step of a given size then changes the small
    side's entries by a large fraction: recovery at lr 3e-4 drove the unbalanced pair's loss up from the
    first steps."""
    left, right = np.linalg.norm(first, axis=0), np.linalg.norm(second, axis=1)
    usable = (left > 0) & (right > 0)
    scale = np.sqrt(np.divide(right, left, out=np.ones_like(right), where=usable))
    return first * scale, second / scale[:, None]


RANK_LADDER = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
"""The bond caps :func:`allocate` chooses among, per layer, when a whole model gets one budget."""


def allocate(options: Mapping[str, Sequence[tuple[int, float]]], budget: int) -> dict[str, int]:
    """One option per layer, the total parameters within ``budget``, spent where the error falls fastest.

    ``options[name]`` lists ``(params, relative_error)`` pairs (a layer's choices: bond caps, or dense at
    error 0). Every layer starts at its smallest option; then, one step at a time, the upgrade with the
    largest drop of ``error**2`` per added parameter that still fits is taken, so the layers that lose
    least by shrinking give most. Returns the chosen index per layer. A ``ValueError`` when even the
    smallest options exceed the budget.
    """
    chosen = {name: min(range(len(pairs)), key=lambda k: pairs[k][0]) for name, pairs in options.items()}
    spent = sum(options[name][k][0] for name, k in chosen.items())
    if spent > budget:
        raise ValueError(f"the budget of {budget:,} parameters is below the smallest choice of every layer ({spent:,})")
    while True:
        best: tuple[float, str, int] | None = None
        for name, pairs in options.items():
            params, error = pairs[chosen[name]]
            for k, (more, lower) in enumerate(pairs):
                added = more - params
                if added <= 0 or spent + added > budget or lower >= error:
                    continue
                gain = (error**2 - lower**2) / added
                if best is None or gain > best[0]:
                    best = (gain, name, k)
        if best is None:
            return chosen
        _, name, k = best
        spent += options[name][k][0] - options[name][chosen[name]][0]
        chosen[name] = k
