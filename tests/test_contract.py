"""The functional API on every backend, every strategy and several shapes, against the dense reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import assert_close, dense_reference, reference_core_gradients
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tnlayers
from tnlayers.contract import dense_weight, get_ops
from tnlayers.layer import conv_route
from tnlayers.plan import dense_cost, in_place_layout

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
    """Gradients of sum(g * y) for x and every core, against the dense reference."""
    spec = tnlayers.MPOSpec((2, 3, 2), (3, 1, 2), (2, 3))
    cores = _cores(spec, np.float64)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, spec.in_features))
    g = rng.normal(size=(4, 3, spec.out_features))
    gx, gcores = harness.grads(harness.asarray(x), [harness.asarray(c) for c in cores], g, strategy)
    assert_close(harness.to_numpy(gx), g @ dense_reference(cores).T, np.float64)
    for actual, expected in zip(gcores, reference_core_gradients(cores, x, g)):
        assert_close(harness.to_numpy(actual), expected, np.float64)


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


def test_jax_jit_sees_plain_ops() -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 4)
    cores = _cores(spec, np.float64)
    plan = tnlayers.plan(spec, 16, "auto")
    x = np.random.default_rng(5).normal(size=(16, spec.in_features))

    @jax.jit
    def forward(x: Any, cores: list[Any]) -> Any:
        return tnlayers.contract(x, cores, strategy=plan)

    y = forward(jax.numpy.asarray(x), [jax.numpy.asarray(c) for c in cores])
    assert_close(np.asarray(y), x @ dense_reference(cores), np.float64)


def test_tf_function_with_unknown_batch_dimension() -> None:
    tf = pytest.importorskip("tensorflow")
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 4)
    cores = [tf.constant(c) for c in _cores(spec, np.float32)]

    @tf.function(input_signature=[tf.TensorSpec([None, None, spec.in_features], tf.float32)])
    def forward(x: Any) -> Any:
        return tnlayers.contract(x, cores)

    x = np.random.default_rng(6).normal(size=(3, 5, spec.in_features)).astype(np.float32)
    y = forward(tf.constant(x))
    assert tuple(y.shape) == (3, 5, spec.out_features)
    assert_close(y.numpy(), x.astype(np.float64) @ dense_reference([c.numpy() for c in cores]), np.float32)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dense_weight_in_every_framework(harness: Any, dtype: Any) -> None:
    specs = [tnlayers.MPOSpec((2, 3, 4), (3, 1, 2), (2, 3)), tnlayers.MPOSpec((5,), (7,), 1)]
    # NumPy builds W blockwise up to bond 32 and by L @ R above it
    specs += [tnlayers.MPOSpec((2, 3, 2, 5), (3, 2, 1, 2), 3), tnlayers.MPOSpec((8, 8), (8, 8), 64)]
    for spec in specs:
        cores = tnlayers.init_cores(spec, seed=3, dtype=dtype)
        weight = dense_weight([harness.asarray(c) for c in cores], get_ops(harness.name))
        assert_close(harness.to_numpy(weight), dense_reference(cores), dtype)


def test_dense_cost_grows_with_rows_and_conv_route_respects_explicit_strategies() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    assert dense_cost(spec, 1) < dense_cost(spec, 1024) < dense_cost(spec, 1 << 16)
    for strategy in ("zipper", "reverse-zipper", [(0, 1), (0, 1), (0, 1), (0, 1)]):
        plan, build_kernel = conv_route(spec, 1 << 16, strategy)
        assert not build_kernel and plan.strategy != "auto"
    for strategy in ("materialize", [(1, 2), (1, 2), (1, 2), (0, 1)]):  # plans that build W first
        assert conv_route(spec, 1, strategy)[1]
    greedy, build_kernel = conv_route(spec, 1 << 16, "greedy")
    assert build_kernel == greedy.builds_weight


# --- the executor's pairwise products ------------------------------------------------------------------------

#: Steps of every layout the matmul route must read: ``a``'s contracted block at its start, middle and end
#: (or split, which falls back to tensordot), ``b``'s at its start or end in ``a``'s order or not, or split;
#: a permuted output; zero-size dimensions.
PAIRWISE_CASES = [
    ("abcd", "cde", "abe"),  # a's block trailing, b's leading: one plain product
    ("abcd", "bcf", "adf"),  # a's block in the middle: batched over a, read in place
    ("abcd", "fcb", "adf"),  # ... b's block trailing, in the other order
    ("abcd", "bfc", "fad"),  # ... b's block split: b is copied; the output permuted
    ("abcd", "abe", "ecd"),  # a's block leading: a read as a transposed matrix
    ("abcd", "dbe", "ace"),  # a's block split: the tensordot fallback, axes in b's order
    ("abcdef", "cdx", "abefx"),
    ("abcd", "bcfx", "adxf"),  # a read in place, b's free indices reordered (b transposed, not the product)
    ("abcd", "cdfx", "abxf"),  # ... with a plain product
]

#: Sizes that send a step's backward down each of its routes: ``N <= Q`` (the cores' gradient as one
#: batched product and a sum) and ``N`` far above ``K`` (the input's gradient as one full product).
BACKWARD_SIZES = {  # each batch of matrices big enough for the batched products (BATCHED_MIN_WORK)
    "N below Q": {"a": 3, "b": 4, "c": 4, "d": 64, "e": 8, "f": 4, "x": 2},
    "N far above K": {"a": 3, "b": 1, "c": 2, "d": 16, "e": 2, "f": 128, "x": 4},
}


@pytest.mark.parametrize(("a", "b", "out"), [*PAIRWISE_CASES, ("ab", "bc", "ac")])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("zero", [False, True], ids=["sizes 2-4", "a zero size"])
def test_pairwise_products_match_einsum(a: str, b: str, out: str, backend: str, zero: bool) -> None:
    from tnlayers.plan import _pairwise

    step = _pairwise((a, b), out)
    rng = np.random.default_rng(0)
    sizes = {ch: int(k) for ch, k in zip("abcdefx", rng.integers(2, 5, size=7))}
    if zero:
        sizes[a[0]] = 0
    left = rng.normal(size=[sizes[ch] for ch in a])
    right = rng.normal(size=[sizes[ch] for ch in b])
    expected = np.einsum(f"{a},{b}->{out}", left, right)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        got = get_ops("torch").pairwise(step, torch.from_numpy(left), torch.from_numpy(right)).numpy()
    else:
        got = get_ops("numpy").pairwise(step, left, right)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("a", "b", "out"), PAIRWISE_CASES)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("sizes", list(BACKWARD_SIZES))
@pytest.mark.parametrize("in_place", [True, False], ids=["batched products", "copies"])
def test_step_backward_matches_einsum(a: str, b: str, out: str, backend: str, sizes: str, in_place: bool) -> None:
    """One step's two gradients, by the batched products that read ``a`` in place and by the copying
    fallback (ops without ``batched_matmul``), against the einsums of the two gradients."""
    import dataclasses
    import importlib

    from tnlayers.plan import _pairwise

    core_contract = importlib.import_module("tnlayers.contract")
    step = _pairwise((a, b), out)
    rng = np.random.default_rng(1)
    size = BACKWARD_SIZES[sizes]
    left, right, grad = (rng.normal(size=[size[ch] for ch in term]) for term in (a, b, out))
    if backend == "torch":
        torch = pytest.importorskip("torch")  # before get_ops, which never imports a framework
        arrays = [torch.from_numpy(v) for v in (left, right, grad)]
    else:
        arrays = [left, right, grad]
    ops = get_ops(backend)
    if not in_place:
        ops = dataclasses.replace(ops, batched_matmul=None, sum_leading=None)
    route = core_contract._matmul_shapes(step, left.shape, right.shape)
    summed = [k for k, ch in enumerate(a) if ch in b]
    middle = summed == list(range(summed[0], summed[-1] + 1)) and summed[0] > 0 and summed[-1] < len(a) - 1
    assert (route is not None and route.batched) == middle  # the batched products really run where they can
    grad_a, grad_b = core_contract._step_backward(step, *arrays[:2], arrays[2], ops, True, True)
    np.testing.assert_allclose(np.asarray(grad_a), np.einsum(f"{out},{b}->{a}", grad, right), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grad_b), np.einsum(f"{a},{out}->{b}", left, grad), rtol=1e-12, atol=1e-12)
    only_a, none_b = core_contract._step_backward(step, *arrays[:2], arrays[2], ops, True, False)
    assert none_b is None
    np.testing.assert_allclose(np.asarray(only_a), np.asarray(grad_a), rtol=1e-12, atol=1e-12)


def test_forward_plans_read_large_intermediates_in_place_as_batches_of_matrices() -> None:
    from tnlayers.contract import _matmul_route

    spec = tnlayers.MPOSpec((8, 8, 8, 8), (8, 8, 8, 8), 8)
    forward = tnlayers.plan(spec, 256, "greedy")
    last = forward.steps[-1].forward
    route = _matmul_route(last, len(last.equation.split(",")[0]), len(last.equation.split(",")[1].split("-")[0]))
    assert route is not None and route.lo > 0  # a block in the middle of the big operand: nothing copied
    training = tnlayers.plan(spec, 256, "greedy", gradients="cores")
    assert sum(size[3] for size in forward.step_sizes) < sum(size[3] for size in training.step_sizes)
    # the training plan's layout is autograd's (tensordot steps, which copy such operands); its planned
    # backward runs the forward's layout, with the same intermediates
    assert in_place_layout(training).steps == forward.steps
    x = np.random.default_rng(0).normal(size=(256, spec.in_features))
    cores = tnlayers.init_cores(spec, "glorot", 0, np.float64)
    assert_close(tnlayers.contract(x, cores, strategy="greedy"), x @ dense_reference(cores), np.float64)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("strategy", ["zipper", "materialize", "dp"])
def test_array_ops_built_afresh_run_a_plan_and_their_own_reshapes(backend: str, strategy: str) -> None:
    """``_make_ops`` itself (``get_ops`` caches its result, and the adapters keep it from import): a
    fresh set of ops per backend runs plans to the dense reference, and its reshape, transpose and
    restore_leading act as NumPy's do."""
    import importlib

    core_contract = importlib.import_module("tnlayers.contract")  # the module (tnlayers.contract is a function)
    module = pytest.importorskip(backend)
    if backend == "torch":

        def to_array(a: np.ndarray) -> Any:
            return module.from_numpy(np.ascontiguousarray(a))
    else:
        to_array = module.numpy.asarray if backend == "jax" else np.asarray
    ops = core_contract._make_ops(backend)
    assert ops.name == backend
    spec = tnlayers.MPOSpec((2, 3, 2), (3, 2, 2), 2)
    rng = np.random.default_rng(0)
    cores = [rng.normal(size=s) for s in spec.core_shapes]
    x = rng.normal(size=(2, 3, spec.in_features))
    plan = tnlayers.plan(spec, 6, strategy)
    y = core_contract.execute(plan, to_array(x), [to_array(c) for c in cores], None, ops)
    tolerance = 1e-5 if backend == "jax" else 1e-10  # JAX computes in float32 unless x64 is enabled
    np.testing.assert_allclose(np.asarray(y), x @ dense_reference(cores), rtol=tolerance, atol=tolerance)
    a = rng.normal(size=(2, 3, 4))
    np.testing.assert_allclose(np.asarray(ops.transpose(to_array(a), (2, 0, 1))), a.transpose(2, 0, 1), rtol=tolerance)
    np.testing.assert_allclose(np.asarray(ops.reshape(to_array(a), (6, 4))), a.reshape(6, 4), rtol=tolerance)
    restored = ops.restore_leading(to_array(a.reshape(6, 4)), to_array(a), 4)
    np.testing.assert_allclose(np.asarray(restored), a, rtol=tolerance)


def test_get_ops_names_every_backend_and_reads_a_subclass_module() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'cupy'; expected one of numpy, torch, tensorflow, jax$"):
        get_ops("cupy")
    with pytest.raises(TypeError, match=r"got list \(from module 'builtins'\)"):
        get_ops([1.0])
    torch = pytest.importorskip("torch")
    assert get_ops(torch.nn.Parameter(torch.zeros(2))).name == "torch"  # type from module torch.nn.parameter


def test_contract_errors_name_the_shape_and_dtypes_given() -> None:
    spec = tnlayers.MPOSpec((2, 2), (2, 2), 2)
    cores = tnlayers.init_cores(spec, seed=0, dtype=np.float64)
    with pytest.raises(ValueError, match=r"x has last dimension 5 \(shape \(2, 3, 5\)\) but the cores expect"):
        tnlayers.contract(np.zeros((2, 3, 5)), cores)
    with pytest.raises(TypeError, match="bias has dtype float32 but the cores have dtype float64"):
        tnlayers.contract(np.zeros((1, 4)), cores, np.zeros(4, np.float32))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="bias is a Tensor but x is a ndarray; use one framework"):
        tnlayers.contract(np.zeros((1, 4)), cores, torch.zeros(4, dtype=torch.float64))
