"""Training memory: what a layer keeps for its backward, and the planned backward that keeps it bounded.

References: gradients from dense matrices built by plain NumPy (``conftest``), and the bytes ``nn.Linear``
keeps for the same input (its input), counted with ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from conftest import BOUNDED_MODEL, dense_reference, reference_core_gradients

import tnlayers
from benchmarks.records import torch_saved_bytes
from tnlayers.contract import (
    backprop,
    backward_reads,
    dense_weight_backward,
    get_ops,
    intermediate_sizes,
    keep_within,
    replay,
    run_keeping,
)
from tnlayers.plan import in_place_layout

NUMPY = get_ops("numpy")
SMALL_SPECS = [
    tnlayers.MPOSpec((2, 3, 2), (3, 2, 2), (1, 3, 2, 1)),
    tnlayers.MPOSpec((3, 2), (2, 4), 2),
    tnlayers.MPOSpec((4,), (3,), 1),
]
STRATEGIES = ["zipper", "reverse-zipper", "materialize", "greedy", "dp"]
NEEDS = {"all": None, "cores only": "cores", "input only": "input", "first core only": "first"}


def _needs(kind: str | None, n_cores: int) -> tuple[bool, ...]:
    if kind is None:
        return (True,) * (n_cores + 1)
    if kind == "cores":
        return (False, *(True,) * n_cores)
    if kind == "input":
        return (True, *(False,) * n_cores)
    return (False, True, *(False,) * (n_cores - 1))


def _operands(plan: tnlayers.ContractionPlan, x: np.ndarray, cores: list[np.ndarray]) -> list[np.ndarray]:
    return [x.reshape(-1, *plan.spec.in_modes), *(c.reshape(s) for c, s in zip(cores, plan.operand_shapes[1:]))]


@pytest.mark.parametrize("spec", SMALL_SPECS, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("needs_kind", NEEDS.values(), ids=NEEDS.keys())
@pytest.mark.parametrize("budget", [0, 40, None], ids=["keep nothing", "keep some", "keep all"])
def test_the_planned_backward_matches_dense_gradients_whatever_it_kept(
    spec: tnlayers.MPOSpec, strategy: str, needs_kind: str | None, budget: int | None
) -> None:
    rng = np.random.default_rng(0)
    cores = [rng.normal(size=shape) for shape in spec.core_shapes]
    x = rng.normal(size=(5, spec.in_features))
    grad_out = rng.normal(size=(5, spec.out_features))
    plan = tnlayers.plan(spec, 5, strategy)
    needs = _needs(needs_kind, spec.n_cores)
    keep = keep_within(plan, 5, needs, budget)
    y, kept = run_keeping(plan.steps, _operands(plan, x, cores), NUMPY, keep)
    np.testing.assert_allclose(y.reshape(5, -1), x @ dense_reference(cores), rtol=1e-10, atol=1e-12)
    reads = backward_reads(plan.steps, spec.n_cores + 1, needs)
    tape = replay(plan.steps, _operands(plan, x, cores), NUMPY, dict(zip(sorted(keep), kept)), reads)
    grads = backprop(plan.steps, tape, grad_out.reshape(5, *spec.out_modes), NUMPY, spec.n_cores + 1, needs)
    expected = [grad_out @ dense_reference(cores).T, *reference_core_gradients(cores, x, grad_out)]
    for need, got, want in zip(needs, grads, expected):
        if need:
            np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-9, atol=1e-11)
        else:
            assert got is None  # nobody asked: never computed


def test_keep_within_keeps_the_smallest_reads_that_fit_the_budget() -> None:
    spec = tnlayers.MPOSpec((4, 4, 4), (4, 4, 4), 3)
    plan = tnlayers.plan(spec, 8, "zipper")  # x, then one core at a time: every intermediate holds the batch
    needs = (True, True, True, True)
    sizes = intermediate_sizes(plan, 8)
    reads = sorted(k for k in backward_reads(plan.steps, 4, needs) if k >= 4)
    assert sorted(keep_within(plan, 8, needs, None)) == reads
    assert keep_within(plan, 8, needs, 0) == frozenset()
    smallest = min(reads, key=lambda k: sizes[k])
    assert keep_within(plan, 8, needs, sizes[smallest]) == {smallest}
    # the shapes the plan's steps really produce, counted by running them
    x = np.zeros((8, spec.in_features))
    _, kept = run_keeping(plan.steps, _operands(plan, x, tnlayers.init_cores(spec, seed=0)), NUMPY, frozenset(reads))
    assert [array.size for array in kept] == [sizes[k] for k in reads]


@pytest.mark.parametrize("spec", [*SMALL_SPECS, tnlayers.MPOSpec((2,) * 6, (2,) * 6, 3)], ids=str)
def test_dense_weight_backward_matches_the_dense_gradient(spec: tnlayers.MPOSpec) -> None:
    """The gradient of ``sum(G * W)`` per core: ``x = I`` in the dense reference makes ``x @ W = W``."""
    rng = np.random.default_rng(1)
    cores = [rng.normal(size=shape) for shape in spec.core_shapes]
    grad_w = rng.normal(size=(spec.in_features, spec.out_features))
    got = dense_weight_backward(cores, grad_w, NUMPY)
    expected = reference_core_gradients(cores, np.eye(spec.in_features), grad_w)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


# --- torch ------------------------------------------------------------------------------------------------

#: The issue's table (layers 784->256, 4096^2 as 8^4 and 16^3, 1296^2 as 6^4, 1024^2 as 2^10) and a conv-sized
#: case, each at a batch >= 32.
MEMORY_CASES = [
    ((4, 7, 7, 4), (4, 4, 4, 4), 16, 1024),
    ((8, 8, 8, 8), (8, 8, 8, 8), 8, 256),
    ((16, 16, 16), (16, 16, 16), 8, 256),
    ((6, 6, 6, 6), (6, 6, 6, 6), 12, 256),
    ((2,) * 10, (2,) * 10, 16, 128),
    ((4, 4, 4), (4, 4, 4), 4, 32),
]


@pytest.mark.parametrize("input_grad", [False, True], ids=["first layer", "hidden layer"])
@pytest.mark.parametrize(("in_modes", "out_modes", "rank", "batch"), MEMORY_CASES, ids=lambda v: str(v))
def test_a_torch_layer_keeps_at_most_one_and_a_half_times_what_nn_linear_keeps(
    in_modes: Any, out_modes: Any, rank: int, batch: int, input_grad: bool
) -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
        layer = MPOLinear(in_modes, out_modes, rank)
    dense = layer.to_linear()
    x = torch.randn(batch, layer.in_features, requires_grad=input_grad)
    dense_bytes = torch_saved_bytes(lambda: dense(x), list(dense.parameters()))
    assert dense_bytes == x.nbytes  # what nn.Linear keeps: its input
    outputs = {}

    def run() -> None:
        outputs["y"] = layer(x)

    assert torch_saved_bytes(run, list(layer.parameters())) <= 1.5 * dense_bytes
    y = outputs["y"]
    grad_out = torch.randn_like(y)
    wanted = [x, *layer.cores] if input_grad else list(layer.cores)
    got = torch.autograd.grad(y, wanted, grad_out)
    reference = dense(x)
    expected = torch.autograd.grad(reference, [x, dense.weight] if input_grad else [dense.weight], grad_out)
    torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-4)
    if input_grad:
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    # the cores' gradients against dL/dW of nn.Linear: W is linear in each core, so on a direction d,
    # <dL/dcores, d> = sum_k <dL/dW, W(cores with core k replaced by d_k)> exactly
    grad_w = expected[-1].double().numpy().T
    cores = [c.detach().double().numpy() for c in layer.cores]
    direction = [np.random.default_rng(k).normal(size=c.shape) for k, c in enumerate(cores)]
    exact = sum(
        float(np.sum(grad_w * dense_reference([*cores[:k], d, *cores[k + 1 :]]))) for k, d in enumerate(direction)
    )
    core_grads = got[-layer.spec.n_cores :]
    measured = sum(float(np.sum(g.double().numpy() * d)) for g, d in zip(core_grads, direction))
    assert measured == pytest.approx(exact, rel=1e-3, abs=1e-3)


def test_the_bound_starts_at_32_rows_where_small_batches_keep_little() -> None:
    from tnlayers import layer as kit

    plan = tnlayers.plan(tnlayers.MPOSpec((8, 8, 8, 8), (8, 8, 8, 8), 8), 16, "zipper")
    needs = (False, True, True, True, True)
    assert kit.kept_for_backward(plan, 31, needs, 1.5) is None  # autograd's backward, no recomputation
    assert kit.kept_for_backward(plan, 32, needs, 1.5) == frozenset()  # every intermediate is 8x the input


def test_saved_budget_none_keeps_what_autograd_keeps_and_the_default_recomputes() -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear

    layer = MPOLinear((8, 8, 8, 8), (8, 8, 8, 8), 8)
    x = torch.randn(256, 4096)
    bounded = torch_saved_bytes(lambda: layer(x), list(layer.parameters()))
    layer.saved_budget = None
    unbounded = torch_saved_bytes(lambda: layer(x), list(layer.parameters()))
    assert bounded <= 1.5 * x.nbytes < 8 * x.nbytes <= unbounded  # every intermediate is 8x the input


@pytest.fixture
def bound_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply the bound from one row up (by default it starts at 32), so small checks reach the planned backward."""
    from tnlayers import layer as kit

    monkeypatch.setattr(kit, "MIN_BOUNDED_ROWS", 1)


@pytest.mark.parametrize("strategy", ["zipper", "greedy", "materialize"])
@pytest.mark.parametrize("budget", [1.0, 1.5, None])
def test_the_planned_backward_passes_gradcheck_and_gradgradcheck(
    strategy: str, budget: float | None, bound_every_batch: None
) -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import run_plan

    spec = tnlayers.MPOSpec((3, 4, 2), (2, 3, 4), 3)
    plan = tnlayers.plan(spec, 4, strategy)
    cores = [torch.from_numpy(c).requires_grad_() for c in tnlayers.init_cores(spec, seed=0, dtype=np.float64)]
    x = torch.randn(4, spec.in_features, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(spec.out_features, dtype=torch.float64, requires_grad=True)  # added inside the planned forward

    def f(x: Any, bias: Any, *cores: Any) -> Any:
        return run_plan(plan, x, cores, bias, budget)

    assert torch.autograd.gradcheck(f, (x, bias, *cores))
    assert torch.autograd.gradgradcheck(f, (x, bias, *cores))


@pytest.mark.parametrize("strategy", ["greedy", "materialize"])
def test_the_planned_backward_works_under_torch_func_and_compile(strategy: str, bound_every_batch: None) -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear
    from torch.func import functional_call, grad, vmap

    layer = MPOLinear((8, 8, 8), (8, 8, 8), 4, strategy=strategy, dtype=torch.float64, saved_budget=1.0)
    x = torch.randn(64, 512, dtype=torch.float64)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    loss = lambda p, x: functional_call(layer, p, (x,)).pow(2).sum()  # noqa: E731
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x[:3, None])
    weight = dense_reference([c.detach().numpy() for c in layer.cores])
    for k in range(3):  # d/dbias of sum(y^2) = 2 y, one sample at a time
        y = x[k].numpy() @ weight + layer.bias.detach().numpy()
        np.testing.assert_allclose(per_sample["bias"][k].numpy(), 2 * y, rtol=1e-9, atol=1e-9)
    step = torch.compile(lambda x: layer(x).pow(2).mean(), fullgraph=True, backend="aot_eager")
    grads_compiled = torch.autograd.grad(step(x), list(layer.parameters()))
    grads_eager = torch.autograd.grad(layer(x).pow(2).mean(), list(layer.parameters()))
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_planned_forward_vmaps_over_the_bias_alone(bound_every_batch: None) -> None:
    """The planned forward adds the bias; under ``vmap`` over the bias only, the bias is batched and the
    product is not (an in-place add would fail there)."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear
    from torch.func import functional_call, grad, vmap

    from tnlayers import layer as kit

    layer = MPOLinear((8, 8, 8), (8, 8, 8), 4, dtype=torch.float64, saved_budget=1.0)
    x = torch.randn(64, 512, dtype=torch.float64, requires_grad=True)
    params = dict(layer.named_parameters())  # cores that need gradients: the plan's backward must recompute
    assert kit.kept_for_backward(layer._plan(x, 64, list(params.values())[:3]), 64, (True,) * 4, 1.0) is not None
    biases = torch.randn(3, 512, dtype=torch.float64)

    def total(bias: Any) -> Any:
        return functional_call(layer, {**params, "bias": bias}, (x,)).sum()

    weight = dense_reference([c.detach().numpy() for c in layer.cores])
    expected = (x.detach().numpy() @ weight).sum() + 64 * biases.numpy().sum(axis=1)
    np.testing.assert_allclose(vmap(total)(biases).detach().numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(vmap(grad(total))(biases).numpy(), np.full((3, 512), 64.0), rtol=1e-12)


def test_the_planned_backward_follows_autocast_as_nn_linear_does() -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear

    layer = MPOLinear((8, 8, 8), (8, 8, 8), 4, saved_budget=1.0)
    dense = layer.to_linear()
    x = torch.randn(64, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, reference = layer(x), dense(x)
    assert y.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.float(), rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert all(c.grad is not None and c.grad.dtype == torch.float32 for c in layer.cores)


@pytest.mark.parametrize("value", [0.5, 0, -1, "1.5", True, float("nan")])
def test_saved_budget_must_be_none_or_at_least_one(value: Any) -> None:
    from tnlayers.backends.numpy import MPOLinear

    with pytest.raises(ValueError, match=r"saved_budget must be None or a number >= 1.*got"):
        MPOLinear((2, 3), (3, 2), 2, saved_budget=value)


# --- NumPy ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_modes", "out_modes", "rank", "batch"), MEMORY_CASES[1:3] + MEMORY_CASES[5:], ids=str)
def test_the_numpy_layer_keeps_at_most_one_and_a_half_times_its_input(
    in_modes: Any, out_modes: Any, rank: int, batch: int
) -> None:
    from tnlayers.backends.numpy import MPOLinear

    layer = MPOLinear(in_modes, out_modes, rank, seed=0, dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(batch, layer.in_features))
    y = layer(x)
    _, saved_x, kept, _ = layer._saved  # what forward left for backward besides the cores
    assert saved_x is x and sum(a.nbytes for a in kept.values()) <= 0.5 * x.nbytes
    grad_out = np.random.default_rng(1).normal(size=y.shape)
    weight = dense_reference(layer.cores)
    np.testing.assert_allclose(y, x @ weight + layer.bias, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.backward(grad_out), grad_out @ weight.T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("budget", "keeps_halves"), [(1.5, True), (1.0, False)])
def test_a_weight_building_plan_keeps_the_two_halves_of_w_where_they_fit(
    budget: float, keeps_halves: bool, bound_every_batch: None
) -> None:
    """A hidden layer (the input's gradient too) whose W does not fit the budget: the planned backward
    keeps x (for the cores) and, where they fit beside it, W's two small halves, not W itself."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import run_plan

    from tnlayers import layer as kit
    from tnlayers.contract import get_ops, weight_halves

    spec = tnlayers.MPOSpec((4, 4, 4), (4, 4, 4), 2)
    plan = tnlayers.plan(spec, 32, "materialize")
    numpy_cores = tnlayers.init_cores(spec, seed=0, dtype=np.float64)
    cores = [torch.from_numpy(c).requires_grad_() for c in numpy_cores]
    x = torch.randn(32, spec.in_features, dtype=torch.float64, requires_grad=True)
    needs = (True, *([True] * spec.n_cores))
    assert kit.kept_for_backward(plan, 32, needs, budget) == frozenset()  # W itself does not fit
    assert kit.keeps_weight_halves(plan, 32, needs, budget) == keeps_halves
    owned = {c.untyped_storage().data_ptr() for c in cores}
    halves = weight_halves([c.detach() for c in cores], get_ops("torch"))
    new_storage = [h for h in halves if h.untyped_storage().data_ptr() not in owned]  # a one-core half is a view
    assert new_storage
    outputs = {}

    def run() -> None:
        outputs["y"] = run_plan(plan, x, cores, None, budget)

    saved = torch_saved_bytes(run, cores)
    assert saved == x.nbytes + (sum(h.nbytes for h in new_storage) if keeps_halves else 0)
    assert saved <= budget * x.nbytes
    grad_out = torch.randn(32, spec.out_features, dtype=torch.float64)
    got = torch.autograd.grad(outputs["y"], [x, *cores], grad_out)
    weight = dense_reference(numpy_cores)
    np.testing.assert_allclose(outputs["y"].detach().numpy(), x.detach().numpy() @ weight, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[0].numpy(), grad_out.numpy() @ weight.T, rtol=1e-12, atol=1e-12)
    expected = reference_core_gradients(numpy_cores, x.detach().numpy(), grad_out.numpy())
    for g, e in zip(got[1:], expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-10, atol=1e-12)

    def f(x: Any, *cores: Any) -> Any:
        return run_plan(plan, x, cores, None, budget)

    assert torch.autograd.gradgradcheck(f, (x, *cores), fast_mode=True)  # the halves are not reused there


@pytest.mark.parametrize("spec", [*SMALL_SPECS, tnlayers.MPOSpec((2, 3, 4), (5, 2, 3), 2)], ids=str)
@pytest.mark.parametrize("needs_kind", NEEDS.values(), ids=NEEDS.keys())
@pytest.mark.parametrize("with_halves", [False, True], ids=["halves rebuilt", "halves kept"])
def test_the_backward_of_a_weight_building_plan_gives_exactly_the_gradients_asked(
    spec: tnlayers.MPOSpec, needs_kind: str | None, with_halves: bool
) -> None:
    """``kept=None`` (the plan builds W): each asked gradient equals the dense reference, the others are
    ``None``; a spec with in_features != out_features and uneven halves included."""
    from tnlayers.contract import planned_backward, weight_halves

    rng = np.random.default_rng(2)
    cores = [rng.normal(size=shape) for shape in spec.core_shapes]
    x, grad_out = rng.normal(size=(4, spec.in_features)), rng.normal(size=(4, spec.out_features))
    needs = _needs(needs_kind, spec.n_cores)
    halves = weight_halves(cores, NUMPY) if with_halves and spec.n_cores > 1 else None
    plan = tnlayers.plan(spec, 4, "materialize")
    grads = planned_backward(plan, x, cores, grad_out, NUMPY, needs, None, halves=halves)
    expected = [grad_out @ dense_reference(cores).T, *reference_core_gradients(cores, x, grad_out)]
    assert len(grads) == spec.n_cores + 1
    for need, got, want in zip(needs, grads, expected):
        if need:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
        else:
            assert got is None


def test_backprop_walks_past_a_step_that_needs_no_gradient() -> None:
    """Path (x c1), (c2 c3), (s1 s2) with only x's gradient asked: walking back, the (c2 c3) step gets no
    gradient, and the step before it must still run."""
    spec = tnlayers.MPOSpec((2, 3, 2), (3, 2, 2), 2)
    plan = tnlayers.plan(spec, 5, [(0, 1), (0, 1), (0, 1)])
    rng = np.random.default_rng(3)
    cores = [rng.normal(size=shape) for shape in spec.core_shapes]
    x, grad_out = rng.normal(size=(5, spec.in_features)), rng.normal(size=(5, spec.out_features))
    needs = (True, False, False, False)
    reads = backward_reads(plan.steps, 4, needs)
    tape = replay(plan.steps, _operands(plan, x, cores), NUMPY, {}, reads)
    grads = backprop(plan.steps, tape, grad_out.reshape(5, *spec.out_modes), NUMPY, 4, needs)
    np.testing.assert_allclose(grads[0].reshape(5, -1), grad_out @ dense_reference(cores).T, rtol=1e-10)
    assert grads[1:] == [None, None, None]
    # x's gradient reads c1 and the (c2 c3) product, not the (x c1) one: keep only what x's path reads
    assert keep_within(plan, 5, needs, None) == {5}
    assert keep_within(plan, 5, (True,) * 4, None) == {4, 5}


def test_keep_within_adds_up_what_it_keeps() -> None:
    """Four intermediates read (zipper over four cores): a budget one short of the three smallest keeps two."""
    spec = tnlayers.MPOSpec((2, 2, 2, 2), (2, 2, 2, 2), 2)
    plan = tnlayers.plan(spec, 8, "zipper")
    needs = (True,) * 5
    sizes = intermediate_sizes(plan, 8)
    reads = sorted((k for k in backward_reads(plan.steps, 5, needs) if k >= 5), key=lambda k: sizes[k])
    assert len(reads) >= 3
    budget = sum(sizes[k] for k in reads[:3]) - 1
    assert keep_within(plan, 8, needs, budget) == set(reads[:2])
    assert keep_within(plan, 8, (True, False, False, False, False), None) == frozenset()  # x's path reads cores only


def test_a_torch_layer_plans_training_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """LeNet's 120 -> 84 layer at batch 32: the layer trains by a plan whose backward needs no recomputation
    under its budget (autograd's own backward, no planned one), and its gradients are the dense layer's."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear

    from tnlayers import layer as kit

    monkeypatch.setattr(kit, "cost_model_for", lambda backend: BOUNDED_MODEL)
    layer = MPOLinear((2, 5, 6, 2), (2, 3, 7, 2), 4).double()
    x = torch.randn(32, 120, dtype=torch.float64)
    plan = layer._plan(x, 32, layer._core_tensors())
    assert kit.kept_for_backward(plan, 32, (False, True, True, True, True), layer.saved_budget) is None
    y = layer(x)
    assert "_PlannedContraction" not in type(y.grad_fn).__name__ + str(y.grad_fn.next_functions)
    grad_out = torch.randn_like(y)
    core_grads = torch.autograd.grad(y, list(layer.cores), grad_out)
    dense = layer.to_linear()
    torch.testing.assert_close(y, dense(x), rtol=1e-10, atol=1e-10)
    (grad_w,) = torch.autograd.grad(dense(x), [dense.weight], grad_out)
    cores = [c.detach().numpy() for c in layer.cores]
    direction = [np.random.default_rng(k).normal(size=c.shape) for k, c in enumerate(cores)]
    exact = sum(
        float(np.sum(grad_w.numpy().T * dense_reference([*cores[:k], d, *cores[k + 1 :]])))
        for k, d in enumerate(direction)
    )
    measured = sum(float(np.sum(g.numpy() * d)) for g, d in zip(core_grads, direction))
    assert measured == pytest.approx(exact, rel=1e-9)
    layer.saved_budget = None  # no bound: the plain choice, which would recompute under one
    plain = layer._plan(x, 32, layer._core_tensors())
    assert kit.kept_for_backward(plain, 32, (False, True, True, True, True), 1.5) is not None


#: The path `auto` takes for VGG's 512 -> 4096 layer at batch 256: the cores in three groups, then ``x`` with
#: the first three, then that (the largest intermediate) with the last two.
EXPANDING_PATH = [(4, 5), (1, 2), (1, 3), (0, 2), (0, 1)]


@pytest.mark.parametrize("budget", [1.0, None])
def test_a_planned_backward_reading_its_intermediates_in_place_gives_the_dense_gradients(
    budget: float | None, bound_every_batch: None
) -> None:
    """The planned backward runs a training plan in its forward layout (``in_place_layout``), where big
    operands are read in place as batches of matrices (the first cores' product writes its bond where the
    next step reads it), and reads them the same way in the backward. Its gradients against dense
    matrices, and gradcheck / gradgradcheck."""
    import importlib

    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import run_plan

    core_contract = importlib.import_module("tnlayers.contract")
    spec = tnlayers.MPOSpec((4, 4, 4, 4, 2), (2, 4, 4, 4, 2), 2)
    plan = tnlayers.plan(spec, 2, EXPANDING_PATH, gradients="all")

    def read_in_place(steps: Any) -> list[bool]:
        shapes = [(2, *spec.in_modes), *plan.operand_shapes[1:]]
        batched = []
        for step, (id_a, id_b, _) in zip(steps, core_contract.step_ids(steps, len(shapes))):
            shapes.append(core_contract._pairwise_shape(step.forward, shapes[id_a], shapes[id_b]))
            route = core_contract._matmul_shapes(step.forward, shapes[id_a], shapes[id_b])
            batched.append(route is not None and route.batched and route.perm is None)
        return batched[-2:]

    assert read_in_place(plan.steps) != [True, True]  # laid out for autograd, whose products copy such operands
    assert read_in_place(in_place_layout(plan).steps) == [True, True]  # x and the big intermediate: not copied

    rng = np.random.default_rng(0)
    cores_np = [rng.normal(size=s) for s in spec.core_shapes]
    x_np, g_np = rng.normal(size=(2, spec.in_features)), rng.normal(size=(2, spec.out_features))
    cores = [torch.from_numpy(c).requires_grad_() for c in cores_np]
    x = torch.from_numpy(x_np).requires_grad_()
    run_plan(plan, x, cores, None, budget).backward(torch.from_numpy(g_np))
    weight = dense_reference(cores_np)
    np.testing.assert_allclose(x.grad.numpy(), g_np @ weight.T, rtol=1e-10, atol=1e-10)
    for core, expected in zip(cores, reference_core_gradients(cores_np, x_np, g_np)):
        np.testing.assert_allclose(core.grad.numpy(), expected, rtol=1e-10, atol=1e-10)

    # with a bias, and the gradient of ``y.sum()``: an expanded view whose every stride is 0
    bias_np = rng.normal(size=spec.out_features)
    bias = torch.from_numpy(bias_np).requires_grad_()
    for tensor in (x, *cores):
        tensor.grad = None
    y = run_plan(plan, x, cores, bias, budget)
    np.testing.assert_allclose(y.detach().numpy(), x_np @ weight + bias_np, rtol=1e-10, atol=1e-10)
    y.sum().backward()
    ones = np.ones((2, spec.out_features))
    np.testing.assert_allclose(bias.grad.numpy(), ones.sum(0), rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), ones @ weight.T, rtol=1e-10, atol=1e-10)
    for core, expected in zip(cores, reference_core_gradients(cores_np, x_np, ones)):
        np.testing.assert_allclose(core.grad.numpy(), expected, rtol=1e-10, atol=1e-10)

    if budget is None:  # autograd's own backward: checked above
        return

    def f(x: Any, *cores: Any) -> Any:
        return run_plan(plan, x, cores, None, budget)

    inputs = (x.detach().requires_grad_(), *(c.detach().requires_grad_() for c in cores))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
