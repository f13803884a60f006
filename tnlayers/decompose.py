"""Dense <-> MPO: ``to_dense``, ``from_dense`` (TT-SVD) and checks on core lists."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .spec import MPOSpec, _as_modes, _as_positive_int, factorize_balanced

__all__ = [
    "DecompositionReport",
    "EntanglementReport",
    "cores_of",
    "entanglement",
    "from_dense",
    "frobenius_norm",
    "spec_from_cores",
    "to_dense",
    "truncate",
]


def spec_from_cores(cores: Sequence[Any]) -> MPOSpec:
    """The :class:`MPOSpec` of a list of cores of shape ``(r[k], in_modes[k], out_modes[k], r[k+1])``.

    Works on arrays of any framework (only ``.shape`` is read). Raises ``TypeError``/``ValueError``
    naming the offending core when the list is not a chain of 4-D cores with end bonds 1.
    """
    if isinstance(cores, (str, bytes)) or not isinstance(cores, Sequence) or hasattr(cores, "shape"):
        raise TypeError(f"cores must be a list or tuple of 4-D arrays (r, in, out, r'), got {type(cores).__name__}")
    if len(cores) == 0:
        raise ValueError("cores must hold at least one core, got an empty sequence")
    shapes = []
    for k, core in enumerate(cores):
        shape = getattr(core, "shape", None)
        if shape is None:
            raise TypeError(f"core {k} must be an array with a .shape, got {type(core).__name__}")
        shape = tuple(shape)
        if len(shape) != 4:
            raise ValueError(f"core {k} must be 4-D (r, in, out, r'), got shape {shape}")
        if any(not isinstance(d, numbers.Integral) for d in shape):
            raise ValueError(f"core {k} must have a fully known shape, got {shape}")
        shapes.append(tuple(int(d) for d in shape))
    if shapes[0][0] != 1 or shapes[-1][3] != 1:
        raise ValueError(
            f"the first core must start and the last core must end with a bond of 1, "
            f"got shapes {shapes[0]} ... {shapes[-1]}"
        )
    for k in range(len(shapes) - 1):
        if shapes[k][3] != shapes[k + 1][0]:
            raise ValueError(
                f"cores {k} and {k + 1} do not chain: core {k} has shape {shapes[k]} (right bond "
                f"{shapes[k][3]}) but core {k + 1} has shape {shapes[k + 1]} (left bond {shapes[k + 1][0]})"
            )
    for k, shape in enumerate(shapes):
        if 0 in shape:
            raise ValueError(f"core {k} has a zero-size dimension: shape {shape}")
    ranks = (1, *(s[3] for s in shapes[:-1]), 1)
    return MPOSpec([s[1] for s in shapes], [s[2] for s in shapes], ranks, clip=False)


def _numpy_cores(cores: Sequence[Any]) -> tuple[MPOSpec, list[NDArray[Any]]]:
    """Checked NumPy views (or copies, for tensors) of cores given as arrays, tensors or a layer."""
    if hasattr(cores, "cores") or hasattr(cores, "numpy_weights"):
        cores = cores_of(cores)
    spec = spec_from_cores(cores)
    arrays = [np.asarray(_host_array(core)) for core in cores]
    for k, array in enumerate(arrays):
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating)):
            raise TypeError(f"core {k} must hold floating-point numbers, got dtype {array.dtype}")
    return spec, arrays


def to_dense(cores: Sequence[Any]) -> NDArray[Any]:
    """The dense matrix ``W`` of shape ``(in_features, out_features)`` that the cores stand for.

    ``W[(i1..in), (j1..jn)] = sum over bonds of core1[1, i1, j1, a1] core2[a1, i2, j2, a2] ...``
    with row index ``i1`` most significant (C order), as in ``W.reshape(*in_modes, *out_modes)``.
    """
    spec, arrays = _numpy_cores(cores)
    dense = arrays[0].reshape(spec.in_modes[0], spec.out_modes[0], spec.ranks[1])
    for core in arrays[1:]:
        rows, cols, _ = dense.shape
        _, i, j, r_next = core.shape
        dense = np.einsum("ABa,aijc->AiBjc", dense, core).reshape(rows * i, cols * j, r_next)
    return dense[:, :, 0]


def frobenius_norm(cores: Sequence[Any]) -> float:
    """``||to_dense(cores)||_F`` computed with transfer matrices, never forming the dense matrix."""
    _, arrays = _numpy_cores(cores)
    env = np.ones((1, 1))
    for core in arrays:
        env = np.einsum("ab,aijc,bijd->cd", env, core, core.conj(), optimize=True)
    return float(math.sqrt(max(float(np.real(env[0, 0])), 0.0)))


@dataclass(frozen=True)
class DecompositionReport:
    """What :func:`from_dense` kept and how far the result is from the dense matrix."""

    spec: MPOSpec
    relative_error: float
    """``||W - to_dense(cores)||_F / ||W||_F``, measured on the returned cores (0 for a zero ``W``)."""
    singular_values: tuple[NDArray[np.float64], ...]
    """Singular values found at each inner bond by the sequential SVD, before truncation."""

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.spec.ranks

    @property
    def num_params(self) -> int:
        return self.spec.num_params

    @property
    def dense_params(self) -> int:
        return self.spec.dense_params

    @property
    def compression_ratio(self) -> float:
        return self.spec.compression_ratio


def _bond_caps(max_rank: int | Sequence[int] | None, n_bonds: int) -> tuple[int | None, ...]:
    if max_rank is None:
        return (None,) * n_bonds
    if isinstance(max_rank, Sequence) and not isinstance(max_rank, (str, bytes)):
        if len(max_rank) != n_bonds:
            raise ValueError(f"max_rank must be an int or {n_bonds} inner bond dimensions, got {tuple(max_rank)}")
        return tuple(_as_positive_int(r, f"max_rank[{k}]") for k, r in enumerate(max_rank))
    return (_as_positive_int(max_rank, "max_rank"),) * n_bonds


def _check_tol(tol: Any) -> None:
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= float(tol) < 1):
        raise ValueError(f"tol must be a relative error in [0, 1), got {tol!r}")


def _truncated_svd(
    matrix: NDArray[Any], allowed: float | None, cap: int | None
) -> tuple[NDArray[Any], NDArray[Any], NDArray[np.float64], float]:
    """One cut of a left-to-right SVD sweep: ``matrix ~ u @ svh``.

    Keeps the numerical rank, lowered to fit the squared error ``allowed`` and the cap ``cap``
    (at least one value). Returns ``u``, ``svh`` (singular values folded in), all singular values,
    and the squared error of the cut.
    """
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    # numerical rank, with room for the rounding earlier cuts of the sweep left in this matrix
    keep = int(np.count_nonzero(s > s[0] * max(matrix.shape) * 16 * np.finfo(np.float64).eps))
    if allowed is not None:
        tail_sq = np.append(np.cumsum((s**2)[::-1])[::-1], 0.0)  # tail_sq[r]: squared error of keeping r
        keep = min(keep, int(np.nonzero(tail_sq <= allowed)[0][0]))
    if cap is not None:
        keep = min(keep, cap)
    keep = max(1, keep)
    return u[:, :keep], s[:keep, None] * vh[:keep], s, float(np.sum(s[keep:] ** 2))


def trivial_modes(in_modes: Sequence[int], out_modes: Sequence[int]) -> str | None:
    """Why these modes cannot compress: one side's features sit in a single mode (a prime count, say),
    so the cores hold the dense matrix; ``None`` otherwise."""
    for side, modes in (("in", tuple(in_modes)), ("out", tuple(out_modes))):
        if len(modes) > 1 and sum(m > 1 for m in modes) <= 1 and math.prod(modes) > 1:
            return (
                f"{math.prod(modes)} {side} features do not factorise into {len(modes)} modes (modes {modes}), "
                f"so the MPO cannot be smaller than the matrix; give modes of a padded size or another split"
            )
    return None


def from_dense(
    matrix: Any,
    in_modes: Sequence[int] | None = None,
    out_modes: Sequence[int] | None = None,
    max_rank: int | Sequence[int] | None = None,
    tol: float | None = None,
    *,
    n_cores: int = 4,
) -> tuple[list[NDArray[Any]], DecompositionReport]:
    """Cores of an MPO approximating ``matrix`` (shape ``(in_features, out_features)``) by TT-SVD.

    Sequential SVDs from the first core to the last (Oseledets 2011). ``max_rank`` caps every inner
    bond (an int or one cap per bond); ``tol`` bounds the relative Frobenius error: the squared
    error budget ``tol**2 * ||W||**2`` is shared among the bonds still to cut, so the result has
    ``relative_error <= tol``. With neither, only numerically zero singular values are dropped (as in
    ``np.linalg.matrix_rank``), so bonds come out at the matrix's exact TT ranks and the error is at
    rounding level. Modes not given are balanced factorisations (:func:`factorize_balanced`) over
    ``n_cores`` cores, or as many cores as the modes that are given.
    The SVDs run in float64 (complex128 for complex input); cores come back in the input's
    floating dtype.
    """
    dense = np.asarray(matrix)
    if dense.ndim != 2:
        raise ValueError(f"matrix must be 2-D (in_features, out_features), got shape {dense.shape}")
    if not (np.issubdtype(dense.dtype, np.number) and not np.issubdtype(dense.dtype, np.bool_)):
        raise TypeError(f"matrix must hold numbers, got dtype {dense.dtype}")
    chosen_here = in_modes is None or out_modes is None
    if in_modes is None:
        in_modes = factorize_balanced(dense.shape[0], n_cores if out_modes is None else len(out_modes))
    if out_modes is None:
        out_modes = factorize_balanced(dense.shape[1], len(in_modes))
    ins, outs = _as_modes(in_modes, "in_modes"), _as_modes(out_modes, "out_modes")
    trivial = trivial_modes(ins, outs) if chosen_here else None
    if trivial is not None:  # e.g. a prime size: the "MPO" would be the dense matrix, uncompressed
        warnings.warn(f"from_dense: {trivial}", UserWarning, stacklevel=2)
    if len(ins) != len(outs):
        raise ValueError(f"in_modes {ins} and out_modes {outs} must have the same length")
    if (math.prod(ins), math.prod(outs)) != dense.shape:
        raise ValueError(
            f"matrix of shape {dense.shape} does not match in_modes {ins} (product {math.prod(ins)}) "
            f"and out_modes {outs} (product {math.prod(outs)})"
        )
    _check_tol(tol)
    n = len(ins)
    caps = _bond_caps(max_rank, n - 1)
    is_complex = np.issubdtype(dense.dtype, np.complexfloating)
    work_dtype = np.complex128 if is_complex else np.float64
    out_dtype = dense.dtype if np.issubdtype(dense.dtype, np.inexact) else np.dtype(np.float64)
    work = dense.astype(work_dtype)
    if not np.all(np.isfinite(work)):
        raise ValueError("matrix contains NaN or infinite values")
    # The sweep runs on W / max|W|: entries near 1e-170 or 1e170 would under- or overflow ||W||**2.
    scale = float(np.max(np.abs(work), initial=0.0)) or 1.0
    work = work / scale
    norm_sq = float(np.linalg.norm(work) ** 2)
    budget = (tol**2) * norm_sq if tol is not None else 0.0

    # W[i1..in, j1..jn] -> T[(i1 j1), (i2 j2), ...]
    tensor = work.reshape(*ins, *outs).transpose([p for k in range(n) for p in (k, n + k)])
    remainder = tensor.reshape(ins[0] * outs[0], -1)
    cores: list[NDArray[Any]] = []
    spectra: list[NDArray[np.float64]] = []
    rank = 1
    for k in range(n - 1):
        u, svh, s, lost = _truncated_svd(remainder, None if tol is None else budget / (n - 1 - k), caps[k])
        spectra.append(s)
        budget = max(budget - lost, 0.0)
        rank = u.shape[1]
        cores.append(u.reshape(-1, ins[k], outs[k], rank))
        remainder = svh.reshape(rank * ins[k + 1] * outs[k + 1], -1)
    cores.append(remainder.reshape(rank, ins[-1], outs[-1], 1))
    spec = MPOSpec(ins, outs, [1, *(c.shape[3] for c in cores[:-1]), 1], clip=False)
    error = float(np.linalg.norm(work - to_dense(cores)))  # relative errors do not depend on the scale
    relative = error / math.sqrt(norm_sq) if norm_sq > 0 else 0.0
    share = scale ** (1 / n)  # the scale back, shared by the cores so that none of them over- or underflows
    cores = [np.ascontiguousarray((c * share).astype(out_dtype, copy=False)) for c in cores]
    spectra = [s * scale for s in spectra]
    return cores, DecompositionReport(spec=spec, relative_error=relative, singular_values=tuple(spectra))


def truncate(
    cores: Sequence[Any], max_rank: int | Sequence[int] | None = None, tol: float | None = None
) -> tuple[list[NDArray[Any]], DecompositionReport]:
    """Lower the bonds of existing cores (TT-rounding), never forming the dense matrix.

    The cores are first right-orthogonalised (QR from the last core to the first), then swept
    left to right with SVDs, so each truncation sees the true singular values of its cut. ``max_rank``
    and ``tol`` act as in :func:`from_dense`; with neither, only redundant (numerically zero)
    directions are dropped. ``relative_error`` is ``sqrt(sum of discarded s**2) / ||W||``, exact
    because the discarded parts are orthogonal. ``singular_values`` are those of each cut.
    """
    spec, arrays = _numpy_cores(cores)
    _check_tol(tol)
    n = spec.n_cores
    caps = _bond_caps(max_rank, n - 1)
    is_complex = any(np.issubdtype(a.dtype, np.complexfloating) for a in arrays)
    work = [a.astype(np.complex128 if is_complex else np.float64) for a in arrays]
    if not all(np.all(np.isfinite(a)) for a in work):
        raise ValueError("cores contain NaN or infinite values")
    # Each core divided by its largest entry for the sweep (products of cores near 1e40 overflow), the
    # product of those scales given back at the end, shared by the cores.
    scales = [float(np.max(np.abs(a), initial=0.0)) or 1.0 for a in work]
    work = [a / s for a, s in zip(work, scales)]
    for k in range(n - 1, 0, -1):  # right-orthogonalise: core k = R^T Q^T with orthonormal rows in Q^T
        r_left, i, j, r_right = work[k].shape
        q, r = np.linalg.qr(work[k].reshape(r_left, -1).T)
        work[k] = q.T.reshape(-1, i, j, r_right)
        work[k - 1] = np.tensordot(work[k - 1], r.T, axes=(3, 0))
    norm_sq = float(np.linalg.norm(work[0]) ** 2)
    budget = (tol**2) * norm_sq if tol is not None else 0.0
    discarded, spectra = 0.0, []
    for k in range(n - 1):
        r_left, i, j, r_right = work[k].shape
        allowed = None if tol is None else budget / (n - 1 - k)
        u, svh, s, lost = _truncated_svd(work[k].reshape(r_left * i * j, r_right), allowed, caps[k])
        spectra.append(s)
        budget, discarded = max(budget - lost, 0.0), discarded + lost
        work[k] = u.reshape(r_left, i, j, -1)
        work[k + 1] = np.tensordot(svh, work[k + 1], axes=(1, 0))
    out_dtype = np.result_type(*arrays)
    log_scale = sum(math.log(s) for s in scales)
    share = math.exp(log_scale / n)
    with np.errstate(over="ignore"):  # singular values beyond float64's range are reported as inf
        factor = np.exp(log_scale)
        spectra = [np.where(s > 0, s * factor, 0.0) for s in spectra]
    result = [np.ascontiguousarray((c * share).astype(out_dtype, copy=False)) for c in work]
    relative = math.sqrt(discarded / norm_sq) if norm_sq > 0 else 0.0
    return result, DecompositionReport(spec_from_cores(result), relative_error=relative, singular_values=tuple(spectra))


def cores_of(source: Any) -> list[NDArray[Any]]:
    """NumPy copies of the cores of a layer of any backend, or of a sequence of arrays or tensors."""
    if hasattr(source, "numpy_weights"):  # Keras layers
        return [np.array(c) for c in source.numpy_weights()[0]]
    if hasattr(source, "cores"):  # NumPy and torch layers
        source = source.cores
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable) or hasattr(source, "shape"):
        raise TypeError(
            f"expected an MPO layer or a list of cores (4-D arrays (r, in, out, r')), "
            f"got {type(source).__name__} {source!r:.60}"
        )
    return [np.array(_host_array(core)) for core in source]


def _host_array(array: Any) -> Any:
    """A NumPy-convertible view of a framework's array (a torch tensor may require grad)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
        return (array.float() if str(array.dtype) == "torch.bfloat16" else array).numpy()  # NumPy has no bf16
    if not isinstance(array, np.ndarray) and callable(getattr(array, "numpy", None)):  # TF tensors, Keras variables
        return array.numpy()
    return array


@dataclass(frozen=True)
class EntanglementReport:
    """Singular values and entanglement entropy of the MPO's dense matrix cut at each inner bond."""

    singular_values: tuple[NDArray[np.float64], ...]
    """At bond ``k`` (between core ``k`` and ``k+1``): the Schmidt values of ``W`` across that cut."""
    entropies: tuple[float, ...]
    """``S = -sum p log p`` with ``p = s**2 / sum(s**2)`` (natural log, as in Gao et al.)."""
    bond_dimensions: tuple[int, ...]
    """The inner bonds of the cores; ``log(bond)`` bounds the entropy at that bond."""

    @property
    def max_entropies(self) -> tuple[float, ...]:
        return tuple(math.log(d) for d in self.bond_dimensions)

    def __str__(self) -> str:
        lines = ["bond | dimension | entropy | bound log(D) | largest singular values"]
        for k, (s, entropy, dim) in enumerate(zip(self.singular_values, self.entropies, self.bond_dimensions)):
            top = ", ".join(f"{v:.3g}" for v in s[:4]) + (", ..." if len(s) > 4 else "")
            lines.append(f"{k + 1:>4} | {dim:>9} | {entropy:>7.4f} | {math.log(dim):>12.4f} | {top}")
        return "\n".join(lines)


def _entropy(singular_values: NDArray[np.float64]) -> float:
    weights = singular_values**2
    total = float(np.sum(weights))
    if total == 0.0:
        return 0.0
    p = weights[weights > 0] / total
    return float(-np.sum(p * np.log(p)))


def entanglement(source: Any) -> EntanglementReport:
    """Entanglement across every bond of an MPO (cores, or a layer of any backend).

    The cores are brought to canonical form (QR sweep from the right, then SVDs from the left, as
    in :func:`truncate` with no truncation), so the singular values at each bond are those of the
    dense matrix reshaped across that cut, without ever forming it.
    """
    spec, arrays = _numpy_cores(source)
    _, report = truncate(arrays)
    spectra = tuple(np.asarray(s, dtype=np.float64) for s in report.singular_values)
    return EntanglementReport(spectra, tuple(_entropy(s) for s in spectra), spec.ranks[1:-1])
