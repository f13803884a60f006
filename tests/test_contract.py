"""The functional API on every backend, every strategy and several shapes, against the dense reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import assert_close, dense_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tnlayers

# Uneven modes, primes, size-1 modes, one core, and the paper's FC2 layer.
SPECS = {
    "fc2-784-256": ((4, 7, 7, 4), (4, 4, 4, 4), 3),
    "primes": ((7, 13), (3, 5), 4),
    "size-one": ((1, 6, 1), (5, 1, 2), 2),
    "one-core": ((12,), (10,), 1),
    "uneven": ((2, 3, 5, 2), (3, 2, 2, 5), (2, 5, 3)),
}
STRATEGIES = ["auto", "zipper", "reverse-zipper", "materialize", "greedy", "dp", "optimal", "branch-2", "auto-hq"]
LEADING = [(5,), (2, 3), (1,), ()]


def _cores(spec: tnlayers.MPOSpec, dtype: Any, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(dtype) for shape in spec.core_shapes]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(SPECS))
def test_forward_matches_dense(harness: Any, name: str, strategy: str, dtype: Any) -> None:
    spec = tnlayers.MPOSpec(*SPECS[name])
    cores = _cores(spec, dtype)
    rng = np.random.default_rng(1)
    weight = dense_reference(cores)
    bias = rng.normal(size=spec.out_features).astype(dtype)
    for leading in LEADING:
        x = rng.normal(size=(*leading, spec.in_features)).astype(dtype)
        y = tnlayers.contract(
            harness.asarray(x), [harness.asarray(c) for c in cores], harness.asarray(bias), strategy=strategy
        )
        assert tuple(y.shape) == (*leading, spec.out_features)
        assert_close(harness.to_numpy(y), x.astype(np.float64) @ weight + bias, dtype)


@pytest.mark.parametrize("strategy", ["zipper", "materialize", "greedy", "dp", "auto"])
def test_gradients_match_dense(harness: Any, strategy: str) -> None:
    """Gradients of sum(g * y) for x and every core, against the dense reference.

    W is linear in each core, so <dL/dcore_k, e> = sum(g * (x @ W(cores with e at k))) exactly;
    building that for every basis element e gives the reference gradient of core k.
    """
    spec = tnlayers.MPOSpec((2, 3, 2), (3, 1, 2), (2, 3))
    cores = _cores(spec, np.float64)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, spec.in_features))
    g = rng.normal(size=(4, 3, spec.out_features))
    gx, gcores = harness.grads(harness.asarray(x), [harness.asarray(c) for c in cores], g, strategy)
    assert_close(harness.to_numpy(gx), g @ dense_reference(cores).T, np.float64)
    x2, g2 = x.reshape(-1, spec.in_features), g.reshape(-1, spec.out_features)
    for k, core in enumerate(cores):
        expected = np.zeros(core.size)
        for flat in range(core.size):
            basis = np.zeros(core.size)
            basis[flat] = 1.0
            replaced = [*cores[:k], basis.reshape(core.shape), *cores[k + 1 :]]
            expected[flat] = np.sum(g2 * (x2 @ dense_reference(replaced)))
        assert_close(harness.to_numpy(gcores[k]), expected.reshape(core.shape), np.float64)


def test_plan_for_one_batch_size_is_right_at_others(harness: Any) -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 4)
    cores = _cores(spec, np.float64)
    weight = dense_reference(cores)
    rng = np.random.default_rng(3)
    for planned_at in (1, 8, 1024):
        fixed = tnlayers.plan(spec, planned_at, "auto")
        for batch in (1, 3, 37):
            x = rng.normal(size=(batch, spec.in_features))
            y = tnlayers.contract(harness.asarray(x), [harness.asarray(c) for c in cores], strategy=fixed)
            assert_close(harness.to_numpy(y), x @ weight, np.float64)


def test_empty_batch(harness: Any) -> None:
    spec = tnlayers.MPOSpec((2, 3), (3, 2), 2)
    cores = _cores(spec, np.float64)
    y = tnlayers.contract(harness.asarray(np.zeros((0, 6))), [harness.asarray(c) for c in cores])
    assert tuple(y.shape) == (0, 6)


def test_explicit_path_and_path_optimizer_objects() -> None:
    import opt_einsum

    spec = tnlayers.MPOSpec((2, 3, 4), (4, 3, 2), 3)
    cores = _cores(spec, np.float64)
    x = np.random.default_rng(4).normal(size=(6, spec.in_features))
    expected = x @ dense_reference(cores)
    # operand 0 is x, then the cores: contract cores 2 and 3 first, then core 1 with x, then the rest
    explicit = [(2, 3), (0, 1), (0, 1)]
    plan = tnlayers.plan(spec, 6, explicit)
    assert plan.strategy == "path"
    assert plan.path == tuple(explicit)
    assert_close(tnlayers.contract(x, cores, strategy=explicit), expected, np.float64)
    optimizer = opt_einsum.DynamicProgramming(minimize="size")
    by_object = tnlayers.plan(spec, 6, optimizer)
    assert by_object.method == "DynamicProgramming"
    assert_close(tnlayers.contract(x, cores, strategy=optimizer), expected, np.float64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    modes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
    rank=st.integers(1, 5),
    batch=st.integers(0, 9),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 2**16),
)
def test_random_specs_numpy(modes: list[tuple[int, int]], rank: int, batch: int, strategy: str, seed: int) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
        spec = tnlayers.MPOSpec([m[0] for m in modes], [m[1] for m in modes], rank)
    cores = _cores(spec, np.float64, seed)
    x = np.random.default_rng(seed + 1).normal(size=(batch, spec.in_features))
    assert_close(tnlayers.contract(x, cores, strategy=strategy), x @ dense_reference(cores), np.float64)
