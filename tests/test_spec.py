"""MPOSpec: counts against the paper's own figures, clipping, auto-factorisation."""

from __future__ import annotations

import math
from typing import Any

import pytest

import tnlayers
from tnlayers.spec import factorize_balanced


def paper_param_count(in_modes: tuple[int, ...], out_modes: tuple[int, ...], d: int) -> int:
    """Eq. (6) of Gao et al. 2020 for a uniform bond D (no clipping)."""
    sizes = [i * o for i, o in zip(in_modes, out_modes)]
    return sizes[0] * d + sum(s * d * d for s in sizes[1:-1]) + sizes[-1] * d


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "rank", "paper_params"),
    [
        ((4, 7, 7, 4), (4, 4, 4, 4), 2, 1024 - 736),  # FC2 at D=2: 1,024 params with the 736 of layer 2
        ((4, 4, 4, 4), (1, 1, 10, 1), 4, 736),
        ((2, 10, 10, 2), (2, 5, 6, 2), 4, 1792),  # LeNet-5
        ((2, 5, 6, 2), (2, 3, 7, 2), 4, 944),
        ((2, 3, 7, 2), (1, 5, 2, 1), 2, 124),
    ],
)
def test_param_counts_match_the_paper(in_modes, out_modes, rank, paper_params) -> None:
    spec = tnlayers.MPOSpec(in_modes, out_modes, rank)
    assert spec.num_params == paper_params == paper_param_count(in_modes, out_modes, rank)
    assert spec.dense_params == math.prod(in_modes) * math.prod(out_modes)
    assert spec.compression_ratio == pytest.approx(paper_params / spec.dense_params)


def test_lenet_rho_is_the_papers() -> None:
    layers = [
        tnlayers.MPOSpec((2, 10, 10, 2), (2, 5, 6, 2), 4),
        tnlayers.MPOSpec((2, 5, 6, 2), (2, 3, 7, 2), 4),
        tnlayers.MPOSpec((2, 3, 7, 2), (1, 5, 2, 1), 2),
    ]
    rho = sum(s.num_params for s in layers) / sum(s.dense_params for s in layers)
    assert rho == pytest.approx(2860 / 58920)


def test_shapes_and_properties() -> None:
    spec = tnlayers.MPOSpec([4, 7, 7, 4], [4, 4, 4, 4], (3, 5, 2))
    assert spec.n_cores == 4
    assert (spec.in_features, spec.out_features) == (784, 256)
    assert spec.ranks == (1, 3, 5, 2, 1)
    assert spec.core_shapes == ((1, 4, 4, 3), (3, 7, 4, 5), (5, 7, 4, 2), (2, 4, 4, 1))
    assert spec.num_params == sum(math.prod(s) for s in spec.core_shapes)
    assert spec.max_ranks == (1, 16, 448, 16, 1)
    assert tnlayers.MPOSpec((4, 7), (4, 4), (1, 6, 1)).ranks == (1, 6, 1)  # full form accepted
    assert "4x7x7x4 -> 4x4x4x4" in str(spec)


def test_frozen_and_hashable() -> None:
    a = tnlayers.MPOSpec((2, 3), (3, 2), 2)
    b = tnlayers.MPOSpec([2, 3], [3, 2], [2])
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.ranks = (1, 1, 1)  # type: ignore[misc]


def test_bonds_above_the_exact_maximum_are_clipped_with_a_warning() -> None:
    with pytest.warns(tnlayers.RankClippedWarning, match=r"exceed the exact maximum \(16, 448, 16\)"):
        spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 22)
    assert spec.ranks == (1, 16, 22, 16, 1)
    # the paper's FC2 curve at D = 22 (both layers) has rho 0.1031 with these clipped bonds
    layer2 = tnlayers.MPOSpec((4, 4, 4, 4), (1, 1, 10, 1), 4)
    rho = (spec.num_params + layer2.num_params) / (spec.dense_params + layer2.dense_params)
    assert rho == pytest.approx(0.1031, abs=5e-5)
    kept = tnlayers.MPOSpec((2, 2), (2, 2), 9, clip=False)
    assert kept.ranks == (1, 9, 1)


@pytest.mark.parametrize(
    ("n", "parts", "expected"),
    [(784, 4, (4, 7, 7, 4)), (256, 4, (4, 4, 4, 4)), (4096, 3, (16, 16, 16)), (13, 3, (1, 13, 1)), (1, 2, (1, 1))],
)
def test_factorize_balanced(n: int, parts: int, expected: tuple[int, ...]) -> None:
    assert factorize_balanced(n, parts) == expected


def _all_factorisations(n: int, parts: int) -> list[tuple[int, ...]]:
    if parts == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in _all_factorisations(n // d, parts - 1)]


@pytest.mark.parametrize("n", [1, 2, 10, 84, 120, 400, 784, 1000, 2048, 4096, 997])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_factorize_balanced_is_the_most_balanced_factorisation(n: int, parts: int) -> None:
    modes = factorize_balanced(n, parts)
    assert len(modes) == parts and math.prod(modes) == n
    best = min(sum(math.log(m) ** 2 for m in f) for f in _all_factorisations(n, parts))
    assert sum(math.log(m) ** 2 for m in modes) == pytest.approx(best)
    assert list(modes[: (parts + 1) // 2]) == sorted(modes[: (parts + 1) // 2])  # small modes at the ends


def test_factorize_balanced_large_numbers_are_fast_and_exact() -> None:
    for n, parts in [(1_000_000, 6), (2**20, 8), (999_983, 3)]:
        modes = factorize_balanced(n, parts)
        assert math.prod(modes) == n and len(modes) == parts


def test_auto() -> None:
    spec = tnlayers.MPOSpec.auto(784, 256, 4, 8)
    assert spec.in_modes == (4, 7, 7, 4) and spec.out_modes == (4, 4, 4, 4) and spec.ranks == (1, 8, 8, 8, 1)
    spec = tnlayers.MPOSpec.auto(4096, 10, 5, 4)
    assert math.prod(spec.in_modes) == 4096 and math.prod(spec.out_modes) == 10 and spec.n_cores == 5


@pytest.mark.parametrize("n_cores", [0, -1, 2.5, True])
def test_auto_names_n_cores_when_it_is_not_a_positive_int(n_cores: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=r"^n_cores must be"):
        tnlayers.MPOSpec.auto(784, 256, n_cores, 8)
