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
from .plan import ContractionPlan, Pairwise, PlanStep, _pairwise, plan
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


def _numpy_pairwise(step: Pairwise, a: Any, b: Any) -> Any:
    return np.tensordot(a, b, axes=step.axes).transpose(step.perm)


def _einsum_pairwise(einsum: Callable[..., Any]) -> Callable[[Pairwise, Any, Any], Any]:
    return lambda step, a, b: einsum(step.equation, a, b)


def _method_ops(name: str, pairwise: Callable[[Pairwise, Any, Any], Any]) -> ArrayOps:
    """Ops for arrays with a NumPy-like ``.reshape`` and ``.shape`` (numpy, torch, jax)."""
    return ArrayOps(
        name=name,
        pairwise=pairwise,
        reshape=lambda x, shape: x.reshape(shape),
        restore_leading=lambda y, x, out: y.reshape((*x.shape[:-1], out)),
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
    )


def _make_ops(name: str) -> ArrayOps:
    if name == "numpy":
        return _method_ops("numpy", _numpy_pairwise)
    if name == "torch":  # tensordot + permute: 10-30% faster than einsum at small batch, equal at large
        torch = sys.modules["torch"]
        return _method_ops("torch", lambda step, a, b: torch.tensordot(a, b, dims=step.axes).permute(step.perm))
    if name == "jax":
        return _method_ops("jax", _einsum_pairwise(sys.modules["jax"].numpy.einsum))
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
    operands = [ops.reshape(x, (-1, *spec.in_modes))]
    operands += [ops.reshape(core, shape) for core, shape in zip(cores, plan_.operand_shapes[1:])]
    y = ops.restore_leading(run_steps(plan_.steps, operands, ops, tape), x, spec.out_features)
    return y if bias is None else y + bias


#: ``(rows, cols, r) x (r, i, j, r') -> (rows, i, cols, j, r')``: absorb one more core into W.
_ABSORB_CORE = _pairwise(("ABa", "aijc"), "AiBjc")


def dense_weight(cores: Sequence[Any], ops: ArrayOps) -> Any:
    """``W`` of shape ``(in_features, out_features)`` in the cores' framework (differentiable there).

    The framework-neutral twin of :func:`tnlayers.to_dense`, for layers that build ``W``.
    """
    shapes = [tuple(core.shape) for core in cores]
    dense = ops.reshape(cores[0], shapes[0][1:])
    rows, cols = shapes[0][1], shapes[0][2]
    for core, (_, i, j, r_next) in zip(cores[1:], shapes[1:]):
        dense = ops.reshape(ops.pairwise(_ABSORB_CORE, dense, core), (rows * i, cols * j, r_next))
        rows, cols = rows * i, cols * j
    return ops.reshape(dense, (rows, cols))


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
