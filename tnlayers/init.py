"""Initial cores whose dense matrix has the variance of a standard dense initialiser."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from .decompose import frobenius_norm
from .spec import MPOSpec

__all__ = ["INITIALIZERS", "init_cores", "target_variance"]

INITIALIZERS = ("glorot", "he", "lecun", "normal")


def target_variance(init: str, in_features: int, out_features: int, std: float | None = None) -> float:
    """Variance of the entries of a dense ``(in_features, out_features)`` matrix under ``init``.

    glorot: ``2 / (fan_in + fan_out)``; he: ``2 / fan_in``; lecun: ``1 / fan_in``;
    normal: ``std**2`` (``std`` defaults to 0.02).
    """
    if init == "glorot":
        return 2.0 / (in_features + out_features)
    if init == "he":
        return 2.0 / in_features
    if init == "lecun":
        return 1.0 / in_features
    if init == "normal":
        value = 0.02 if std is None else std
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"std must be a positive finite number, got {std!r}")
        return float(value) ** 2
    raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITIALIZERS)}")


def init_cores(
    spec: MPOSpec,
    init: str = "glorot",
    seed: int | np.random.Generator | None = None,
    dtype: DTypeLike = np.float32,
    *,
    std: float | None = None,
) -> list[NDArray[Any]]:
    """Random cores for ``spec`` such that ``to_dense(cores)`` has the variance of ``init``.

    Each core is drawn i.i.d. normal with the per-core std ``sigma**(1/n) * prod(ranks)**(-1/(2n))``
    (which gives the dense entries the target variance ``sigma**2`` in expectation), then all cores
    are rescaled by one common factor so that ``||W||_F**2 == sigma**2 * in_features * out_features``
    holds exactly for this draw. Without that step the product of ``n`` random cores has a
    log-normal-like spread of scales, so single draws would often be far from the target.
    The norm is computed with transfer matrices; the dense matrix is never formed. (The entries of
    ``W`` are products of Gaussians, so at small bonds they are heavier-tailed than a dense init's.)
    """
    if not isinstance(spec, MPOSpec):
        raise TypeError(f"spec must be an MPOSpec, got {type(spec).__name__}")
    if not isinstance(init, str):
        raise TypeError(f"init must be a string, one of {', '.join(INITIALIZERS)}; got {init!r}")
    out_dtype = np.dtype(dtype)
    if not np.issubdtype(out_dtype, np.floating):
        raise TypeError(f"dtype must be a floating-point type, got {out_dtype}")
    variance = target_variance(init, spec.in_features, spec.out_features, std)
    if not (seed is None or isinstance(seed, np.random.Generator)) and (
        isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
    ):
        raise ValueError(f"seed must be a non-negative int, a numpy Generator or None, got {seed!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    n = spec.n_cores
    core_std = variance ** (1 / (2 * n)) * math.prod(spec.ranks) ** (-1 / (2 * n))
    cores = [rng.normal(0.0, core_std, size=shape) for shape in spec.core_shapes]
    target_norm = math.sqrt(variance * spec.dense_params)
    scale = (target_norm / frobenius_norm(cores)) ** (1 / n)
    return [(core * scale).astype(out_dtype) for core in cores]
