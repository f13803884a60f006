"""``MPOSpec``: the shape of a matrix product operator (modes and bond dimensions)."""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MPOSpec", "RankClippedWarning", "factorize_balanced"]


class RankClippedWarning(UserWarning):
    """A requested bond dimension was larger than the exact maximum and was lowered."""


def _as_positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an integer, got {value!r} of type {type(value).__name__}")
    number = operator.index(value)
    if number < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {number}")
    return number


def _as_modes(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a sequence of positive integers, got {value!r}")
    if len(value) == 0:
        raise ValueError(f"{what} must hold at least one mode, got {tuple(value)!r}")
    return tuple(_as_positive_int(m, f"{what}[{k}]") for k, m in enumerate(value))


def _max_bonds(in_modes: tuple[int, ...], out_modes: tuple[int, ...]) -> tuple[int, ...]:
    """Exact maximal bond dimension of each inner bond: min(size left of the cut, size right of it)."""
    sizes = [i * o for i, o in zip(in_modes, out_modes)]
    total = math.prod(sizes)
    bonds = []
    left = 1
    for size in sizes[:-1]:
        left *= size
        bonds.append(min(left, total // left))
    return tuple(bonds)


@dataclass(frozen=True, init=False)
class MPOSpec:
    """The shape of an MPO mapping ``prod(in_modes)`` features to ``prod(out_modes)`` features.

    Core ``k`` has shape ``(ranks[k], in_modes[k], out_modes[k], ranks[k + 1])`` with
    ``ranks[0] == ranks[-1] == 1``; the cores stand for the dense matrix ``W`` of shape
    ``(in_features, out_features)``, used as ``y = x @ W + b``.

    ``ranks`` may be given as one int (every inner bond), as ``n_cores - 1`` inner bonds, or as
    the full ``n_cores + 1`` bonds starting and ending with 1. Bonds above the exact maximum
    ``min(prod of in*out modes left of the bond, prod right of it)`` are clipped with a
    :class:`RankClippedWarning` (``clip=False`` keeps them, e.g. to describe existing cores).

    Examples
    --------
    >>> spec = MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    >>> spec.ranks, spec.num_params
    ((1, 8, 8, 8, 1), 3840)
    """

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    ranks: tuple[int, ...]

    def __init__(
        self, in_modes: Sequence[int], out_modes: Sequence[int], ranks: int | Sequence[int], *, clip: bool = True
    ) -> None:
        ins = _as_modes(in_modes, "in_modes")
        outs = _as_modes(out_modes, "out_modes")
        if len(ins) != len(outs):
            raise ValueError(
                f"in_modes and out_modes must have the same length (one pair per core), "
                f"got {len(ins)} in_modes {ins} and {len(outs)} out_modes {outs}"
            )
        n = len(ins)
        if isinstance(ranks, Sequence) and not isinstance(ranks, (str, bytes)):
            given = tuple(_as_positive_int(r, f"ranks[{k}]") for k, r in enumerate(ranks))
            if len(given) == n - 1:
                inner = given
            elif len(given) == n + 1 and given[0] == 1 and given[-1] == 1:
                inner = given[1:-1]
            else:
                raise ValueError(
                    f"ranks must be an int, {n - 1} inner bond dimensions, or {n + 1} bonds starting and "
                    f"ending with 1 for {n} cores; got {given}"
                )
        else:
            inner = (_as_positive_int(ranks, "ranks"),) * (n - 1)
        limits = _max_bonds(ins, outs)
        clipped = tuple(min(r, m) for r, m in zip(inner, limits)) if clip else inner
        if clipped != inner:
            warnings.warn(
                f"bond dimensions {inner} exceed the exact maximum {limits} for in_modes {ins} and "
                f"out_modes {outs}; clipped to {clipped}",
                RankClippedWarning,
                stacklevel=2,
            )
        object.__setattr__(self, "in_modes", ins)
        object.__setattr__(self, "out_modes", outs)
        object.__setattr__(self, "ranks", (1, *clipped, 1))

    @classmethod
    def auto(cls, in_features: int, out_features: int, n_cores: int, rank: int | Sequence[int]) -> MPOSpec:
        """Factorise the feature counts into ``n_cores`` balanced modes (size-1 modes allowed).

        Larger modes go to the middle of the chain, where bonds can be largest.

        >>> MPOSpec.auto(784, 256, 4, 8).in_modes
        (4, 7, 7, 4)
        """
        n = _as_positive_int(n_cores, "n_cores")
        return cls(factorize_balanced(in_features, n), factorize_balanced(out_features, n), rank)

    @property
    def n_cores(self) -> int:
        return len(self.in_modes)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    @property
    def max_ranks(self) -> tuple[int, ...]:
        """The exact maximal bonds (full, with the 1s): a spec with these ranks represents any matrix."""
        return (1, *_max_bonds(self.in_modes, self.out_modes), 1)

    @property
    def core_shapes(self) -> tuple[tuple[int, int, int, int], ...]:
        r = self.ranks
        return tuple((r[k], i, o, r[k + 1]) for k, (i, o) in enumerate(zip(self.in_modes, self.out_modes)))

    @property
    def central_core(self) -> int:
        """Index of the core with the most parameters (the "central tensor" of Liu et al., ACL 2021)."""
        sizes = [math.prod(shape) for shape in self.core_shapes]
        return sizes.index(max(sizes))

    def select_cores(self, cores: str | Iterable[int]) -> frozenset[int]:
        """Core indices named by ``"central"``, ``"auxiliary"`` (all but the central one), ``"all"`` or indices."""
        n = self.n_cores
        if isinstance(cores, str):
            named = {"central": {self.central_core}, "auxiliary": set(range(n)) - {self.central_core},
                     "all": set(range(n))}  # fmt: skip
            if cores not in named:
                raise ValueError(f"cores must be 'central', 'auxiliary', 'all' or core indices, got {cores!r}")
            return frozenset(named[cores])
        chosen = set()
        for index in cores:
            if not isinstance(index, int) or isinstance(index, bool) or not -n <= index < n:
                raise ValueError(f"a core index must be an int in [{-n}, {n - 1}] for {n} cores, got {index!r}")
            chosen.add(index % n)
        return frozenset(chosen)

    @property
    def num_params(self) -> int:
        """Parameters in the cores (no bias)."""
        return sum(math.prod(shape) for shape in self.core_shapes)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense ``(in_features, out_features)`` matrix the cores stand for."""
        return self.in_features * self.out_features

    @property
    def compression_ratio(self) -> float:
        """``num_params / dense_params``: the paper's rho (smaller means more compression)."""
        return self.num_params / self.dense_params

    def __str__(self) -> str:
        return (
            f"MPOSpec({'x'.join(map(str, self.in_modes))} -> {'x'.join(map(str, self.out_modes))}, "
            f"ranks={self.ranks}, params={self.num_params}, rho={self.compression_ratio:.4g})"
        )


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


@functools.lru_cache(maxsize=256)
def _factorizations(n: int, parts: int, largest: int) -> tuple[tuple[int, ...], ...]:
    """All non-increasing tuples of ``parts`` factors (each <= ``largest``) whose product is ``n``."""
    if parts == 1:
        return ((n,),) if n <= largest else ()
    found: list[tuple[int, ...]] = []
    for factor in _divisors(n):
        if factor <= largest and factor**parts >= n:
            found.extend((factor, *rest) for rest in _factorizations(n // factor, parts - 1, factor))
    return tuple(found)


def factorize_balanced(n: int, parts: int) -> tuple[int, ...]:
    """Split ``n`` into ``parts`` factors as equal as possible, larger factors in the middle.

    "Balanced" minimises the spread of ``log(factor)``; a prime ``n`` gives ``(n, 1, ..., 1)``
    reordered. Example: ``factorize_balanced(784, 4) == (4, 7, 7, 4)``.
    """
    n = _as_positive_int(n, "number of features")
    parts = _as_positive_int(parts, "number of cores")
    best = min(_factorizations(n, parts, n), key=lambda fs: (sum(math.log(f) ** 2 for f in fs), fs))
    ascending = sorted(best)
    left: list[int] = []
    right: list[int] = []
    for k, factor in enumerate(ascending):
        (left if k % 2 == 0 else right).append(factor)
    return (*left, *reversed(right))


def padded_size(n: int, parts: int) -> int:
    """The smallest count ``>= n`` whose balanced factorisation into ``parts`` has no factor above twice
    the ``parts``-th root (so no core holds a large prime's worth of rows).

    An embedding of 30,522 rows (2 * 3 * 5087) over 4 cores is padded to 30,576 = 12 * 14 * 14 * 13
    (``padded_size(30522, 4)``); the padded rows are never looked up.
    """
    n = _as_positive_int(n, "number of rows")
    parts = _as_positive_int(parts, "number of cores")
    m = n
    while max(factorize_balanced(m, parts)) > 2 * math.ceil(m ** (1 / parts)):
        m += 1
    return m
