"""Running contraction plans on arrays of any framework, and the functional API ``contract``."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decompose import spec_from_cores
from .plan import ContractionPlan, Pairwise, PlanStep, _pairwise, plan, weight_split
from .spec import MPOSpec

__all__ = ["ArrayOps", "Tape", "backprop", "contract", "dense_weight", "execute", "get_ops", "run_steps"]


@dataclass(frozen=True)
class ArrayOps:
    """The few operations a framework must provide to run a plan."""

    name: str
    pairwise: Callable[[Pairwise, Any, Any], Any]
    """Run one :class:`Pairwise` contraction on two arrays."""
    reshape: Callable[[Any, tuple[int, ...]], Any]
    restore_leading: Callable[[Any, Any, int], Any]
    """``(y2d, x, out_features) -> y`` with the leading dimensions of ``x``."""
    transpose: Callable[[Any, tuple[int, ...]], Any]
    """Reorder the axes (``numpy.transpose``)."""


def _numpy_pairwise(step: Pairwise, a: Any, b: Any) -> Any:
    return np.tensordot(a, b, axes=step.axes).transpose(step.perm)


def _torch_pairwise(torch: Any) -> Callable[[Pairwise, Any, Any], Any]:
    def pairwise(step: Pairwise, a: Any, b: Any) -> Any:
        product = torch.tensordot(a, b, dims=step.axes)
        return product if step.perm == tuple(range(len(step.perm))) else product.permute(step.perm)

    return pairwise


def _einsum_pairwise(einsum: Callable[..., Any]) -> Callable[[Pairwise, Any, Any], Any]:
    return lambda step, a, b: einsum(step.equation, a, b)


def _method_ops(
    name: str, pairwise: Callable[[Pairwise, Any, Any], Any], transpose: Callable[[Any, tuple[int, ...]], Any]
) -> ArrayOps:
    """Ops for arrays with a NumPy-like ``.reshape`` and ``.shape`` (numpy, torch, jax)."""
    return ArrayOps(
        name=name,
        pairwise=pairwise,
        reshape=lambda x, shape: x.reshape(shape),
        restore_leading=lambda y, x, out: y.reshape((*x.shape[:-1], out)),
        transpose=transpose,
    )


def _tensorflow_ops() -> ArrayOps:
    tf = sys.modules["tensorflow"]

    def restore_leading(y: Any, x: Any, out: int) -> Any:
        if x.shape.rank is not None and all(d is not None for d in x.shape[:-1]):
            return tf.reshape(y, (*x.shape[:-1], out))
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [out]], axis=0))

    return ArrayOps(
        name="tensorflow",
        pairwise=lambda step, a, b: tf.transpose(tf.tensordot(a, b, axes=step.axes), step.perm),
        reshape=tf.reshape,
        restore_leading=restore_leading,
        transpose=tf.transpose,
    )


def _make_ops(name: str) -> ArrayOps:
    if name == "numpy":
        return _method_ops("numpy", _numpy_pairwise, np.transpose)
    if name == "torch":  # tensordot + permute: 10-30% faster than einsum at small batch, equal at large
        torch = sys.modules["torch"]
        pairwise = _torch_pairwise(torch)
        return _method_ops("torch", pairwise, lambda x, perm: x.permute(perm))
    if name == "jax":
        jnp = sys.modules["jax"].numpy
        return _method_ops("jax", _einsum_pairwise(jnp.einsum), jnp.transpose)
    return _tensorflow_ops()


_MODULE_TO_BACKEND = {"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax", "jaxlib": "jax"}
_BACKENDS = ("numpy", "torch", "tensorflow", "jax")


@functools.lru_cache(maxsize=64)
def _ops_for(name: str) -> ArrayOps:
    if name != "numpy" and name not in sys.modules:
        raise ValueError(f"backend {name!r} is not imported; import it (or pass its arrays) first")
    return _make_ops(name)


def get_ops(array_or_name: Any) -> ArrayOps:
    """The :class:`ArrayOps` for a backend name or for an array's framework (numpy, torch, tensorflow, jax).

    Frameworks are never imported here: an array of theirs proves they already are.
    An :class:`ArrayOps` passes through, so adapters can bring their own.
    """
    if isinstance(array_or_name, ArrayOps):
        return array_or_name
    if isinstance(array_or_name, str):
        if array_or_name not in _BACKENDS:
            raise ValueError(f"unknown backend {array_or_name!r}; expected one of {', '.join(_BACKENDS)}")
        return _ops_for(array_or_name)
    root = type(array_or_name).__module__.split(".")[0]
    if root not in _MODULE_TO_BACKEND:
        raise TypeError(
            f"expected an array of numpy, torch, tensorflow or jax, got {type(array_or_name).__name__} "
            f"(from module {type(array_or_name).__module__!r})"
        )
    return _ops_for(_MODULE_TO_BACKEND[root])


Tape = list[tuple[tuple[int, int], int, Any, Any]]
"""Per step: ids of its two inputs, id of its output, and the two input arrays."""


def run_steps(steps: Sequence[PlanStep], operands: Sequence[Any], ops: ArrayOps, tape: Tape | None = None) -> Any:
    """Run a plan's pairwise steps on ``operands``; record the inputs of each step on ``tape`` if given."""
    arrays = list(operands)
    ids = list(range(len(arrays)))
    next_id = len(arrays)
    for step in steps:
        i, j = step.positions
        a, id_a = arrays.pop(i), ids.pop(i)
        b, id_b = arrays.pop(j), ids.pop(j)
        arrays.append(ops.pairwise(step.forward, a, b))
        ids.append(next_id)
        if tape is not None:
            tape.append(((id_a, id_b), next_id, a, b))
        next_id += 1
    return arrays[0]


def backprop(steps: Sequence[PlanStep], tape: Tape, grad: Any, ops: ArrayOps, n_operands: int) -> list[Any]:
    """Reverse-mode through the recorded steps: gradients of every operand from ``grad`` of the result.

    The gradient of one operand is the network contracted without it; walking the steps backwards
    shares the partial contractions (the environments) between operands.
    """
    grads = {tape[-1][1]: grad}
    for step, ((id_a, id_b), id_out, a, b) in zip(reversed(steps), reversed(tape)):
        g = grads.pop(id_out)
        grads[id_a] = ops.pairwise(step.grads[0], g, b)
        grads[id_b] = ops.pairwise(step.grads[1], a, g)
    return [grads[k] for k in range(n_operands)]


def execute(
    plan_: ContractionPlan, x: Any, cores: Sequence[Any], bias: Any, ops: ArrayOps, tape: Tape | None = None
) -> Any:
    """``y = x @ W + bias`` by running ``plan_``; no checks (adapters validate once, at build time).

    With a ``tape``, the inputs of every step are recorded for :func:`backprop`.
    """
    spec = plan_.spec
    if plan_.builds_weight and tape is None:  # build W in its cheapest layout, then one product
        y2d = ops.pairwise(_MATMUL, ops.reshape(x, (-1, spec.in_features)), dense_weight(cores, ops))
        y = ops.restore_leading(y2d, x, spec.out_features)
        return y if bias is None else y + bias
    operands = [ops.reshape(x, (-1, *spec.in_modes))]
    operands += [ops.reshape(core, shape) for core, shape in zip(cores, plan_.operand_shapes[1:])]
    y = ops.restore_leading(run_steps(plan_.steps, operands, ops, tape), x, spec.out_features)
    return y if bias is None else y + bias


#: ``(P, r) x (r, i, j, r') -> (P, i, j, r')``: absorb one more core; a plain ``(P, r) @ (r, i*j*r')`` product
#: whose result is already in the order the next step reads (no copy between steps).
_ABSORB_CORE = _pairwise(("Pa", "aijc"), "Pijc")
#: ``(P, K) x (K, N) -> (P, N)``: a plain matrix product (the halves of W, and a materialising plan's product).
_MATMUL = _pairwise(("PK", "KN"), "PN")


def _chain(cores: Sequence[Any], shapes: Sequence[tuple[int, ...]], ops: ArrayOps) -> Any:
    """Consecutive cores contracted over their inner bonds: ``(r_first * i1 j1 ... ik jk, r_last)``,
    the mode indices interleaved in core order (each product writes the order the next one reads)."""
    dense = ops.reshape(cores[0], (-1, shapes[0][3]))
    for core, shape in zip(cores[1:], shapes[1:]):
        dense = ops.reshape(ops.pairwise(_ABSORB_CORE, dense, core), (-1, shape[3]))
    return dense


def _grouped(chain: Any, shapes: Sequence[tuple[int, ...]], ops: ArrayOps, bond_first: bool) -> Any:
    """A chain's mode indices regrouped as (in modes..., out modes...): ``(r, I*J)`` or ``(I*J, r)``."""
    k = len(shapes)
    modes = [d for shape in shapes for d in shape[1:3]]
    if bond_first:
        order = (0, *range(1, 2 * k + 1, 2), *range(2, 2 * k + 1, 2))
        return ops.reshape(ops.transpose(ops.reshape(chain, (shapes[0][0], *modes)), order), (shapes[0][0], -1))
    order = (*range(0, 2 * k, 2), *range(1, 2 * k, 2), 2 * k)
    return ops.reshape(ops.transpose(ops.reshape(chain, (*modes, shapes[-1][3])), order), (-1, shapes[-1][3]))


def dense_weight(cores: Sequence[Any], ops: ArrayOps) -> Any:
    """``W`` of shape ``(in_features, out_features)`` in the cores' framework (differentiable there).

    The framework-neutral twin of :func:`tnlayers.to_dense`, for layers that build ``W``. Built as two
    halves ``L`` (the left cores) and ``R`` (the right ones), each small, then one product ``L @ R``
    over the bond between them and one transpose: ``W``-sized arrays are written twice in the
    forward, and read about three times in the backward, whatever the number of cores.
    """
    shapes = [tuple(core.shape) for core in cores]  # lists, not generators: torch.compile traces this
    rows, cols = math.prod([shape[1] for shape in shapes]), math.prod([shape[2] for shape in shapes])
    if len(shapes) == 1:
        return ops.reshape(cores[0], (rows, cols))
    k = weight_split(shapes)
    left = _grouped(_chain(cores[:k], shapes[:k], ops), shapes[:k], ops, bond_first=False)  # (IL*JL, r)
    right = _grouped(_chain(cores[k:], shapes[k:], ops), shapes[k:], ops, bond_first=True)  # (r, IR*JR)
    in_left, out_left = math.prod([s[1] for s in shapes[:k]]), math.prod([s[2] for s in shapes[:k]])
    in_right, out_right = rows // in_left, cols // out_left
    product = ops.reshape(ops.pairwise(_MATMUL, left, right), (in_left, out_left, in_right, out_right))
    return ops.reshape(ops.transpose(product, (0, 2, 1, 3)), (rows, cols))


def _leading_size(x: Any) -> int | None:
    dims = tuple(x.shape)[:-1]
    if any(not isinstance(d, int) for d in dims):
        return None
    return int(math.prod(dims))


def _check_inputs(x: Any, cores: Sequence[Any], bias: Any, spec: MPOSpec) -> None:
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) == 0:
        raise ValueError(f"x must have at least one dimension (..., {spec.in_features}), got shape {shape}")
    if shape[-1] is not None and shape[-1] != spec.in_features:
        raise ValueError(
            f"x has last dimension {shape[-1]} (shape {shape}) but the cores expect in_features = "
            f"{spec.in_features} = {'x'.join(map(str, spec.in_modes))}"
        )
    kind = get_ops(x).name
    for k, core in enumerate(cores):
        if get_ops(core).name != kind:
            raise TypeError(f"core {k} is a {type(core).__name__} but x is a {type(x).__name__}; use one framework")
    dtypes = {str(core.dtype) for core in cores}
    if len(dtypes) != 1:
        raise TypeError(f"all cores must have one dtype, got {sorted(dtypes)}")
    if str(x.dtype) not in dtypes:
        raise TypeError(
            f"x has dtype {x.dtype} but the cores have dtype {cores[0].dtype}; cast one of them "
            f"(an integer input, e.g. uint8 pixels, must be converted to floats first)"
        )
    if bias is not None:
        if get_ops(bias).name != kind:
            raise TypeError(f"bias is a {type(bias).__name__} but x is a {type(x).__name__}; use one framework")
        if tuple(bias.shape) != (spec.out_features,):
            raise ValueError(f"bias must have shape ({spec.out_features},), got {tuple(bias.shape)}")
        if str(bias.dtype) not in dtypes:
            raise TypeError(f"bias has dtype {bias.dtype} but the cores have dtype {cores[0].dtype}")


def contract(
    x: Any,
    cores: Sequence[Any],
    bias: Any = None,
    strategy: str | Sequence[Sequence[int]] | ContractionPlan | Any = "auto",
    *,
    backend: str | ArrayOps | None = None,
) -> Any:
    """``x @ to_dense(cores) + bias`` without forming the dense matrix.

    ``x`` has shape ``(..., in_features)`` and is a NumPy, torch, TensorFlow or JAX array (cores and
    bias of the same framework and dtype); the result has shape ``(..., out_features)``.
    ``strategy`` is anything :func:`tnlayers.plan` accepts, or a ready :class:`ContractionPlan`.
    """
    spec = spec_from_cores(cores)
    ops = get_ops(backend if backend is not None else x)
    if not isinstance(backend, ArrayOps):  # adapters bring their own ops and validate at build time
        _check_inputs(x, cores, bias, spec)
    if isinstance(strategy, ContractionPlan):
        if strategy.spec.core_shapes != spec.core_shapes:
            raise ValueError(f"the plan was made for {strategy.spec}, but the cores are {spec}")
        chosen = strategy
    else:
        chosen = plan(spec, _leading_size(x), strategy)
    return execute(chosen, x, cores, bias, ops)
