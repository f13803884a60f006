"""Running contraction plans on arrays of any framework, and the functional API ``contract``."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np

from .decompose import spec_from_cores
from .plan import BATCHED_MIN_WORK, ContractionPlan, Pairwise, PlanStep, _pairwise, plan, weight_split
from .spec import MPOSpec

__all__ = [
    "ArrayOps",
    "Tape",
    "backprop",
    "backward_reads",
    "contract",
    "dense_weight",
    "dense_weight_backward",
    "execute",
    "get_ops",
    "intermediate_sizes",
    "keep_within",
    "planned_backward",
    "recomputed_ids",
    "replay",
    "run_keeping",
    "run_steps",
    "plan_operands",
    "step_ids",
    "tensordot_pairwise",
    "weight_from_halves",
    "weight_halves",
]


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
    matmul: Callable[[Any, Any], Any] | None = None
    """The product of two matrices (``a @ b``; operands may be transposed views); ``None``: by ``pairwise``.
    The products that build ``W`` and its gradients call it directly, without a step's bookkeeping."""
    affine: Callable[[Any, Any, Any], Any] | None = None
    """``(x, w, bias) -> x @ w + bias`` for matrices in one fused product (torch ``addmm``); ``None``:
    :attr:`matmul`, then the sum."""
    batched_matmul: Callable[[Any, Any], Any] | None = None
    """Products of stacks of matrices, broadcasting a single matrix over the stack (``numpy.matmul``);
    with :attr:`sum_leading`, the planned backward reads a step's strided input in place (as its
    forward did, see :class:`_MatmulRoute`); ``None``: it copies that input to a matrix, as ``tensordot``."""
    sum_leading: Callable[[Any], Any] | None = None
    """The sum over the first axis (``x.sum(0)``)."""
    interleave: Callable[[Any, Any, tuple[int, int, int, int]], Any] | None = None
    """``(L, R, (IL, JL, IR, JR)) -> W``: ``W`` from its halves (:func:`weight_halves`) written in its own
    layout by one batched product, ``IL * IR`` blocks ``(JL, r) @ (r, JR)`` (NumPy reads the broadcast
    batch dimensions in place), or ``None`` for halves it leaves to the default: ``L @ R``, then a
    transposing copy of the ``W``-sized product (also the route when this field is ``None``)."""


class _MatmulRoute(NamedTuple):
    """How one :class:`Pairwise` runs as a single (batched) matrix product, copying no large operand.

    ``a`` is read as ``(P, K, Q)``: its contracted axes form one block ``lo .. lo+k`` with ``P`` before it
    and ``Q`` after it; ``b`` as ``(K, N)`` (its contracted axes moved to the front in ``a``'s order:
    a view when they already lead or trail it, else a copy of ``b``). The product ``(P, Q, N)`` holds
    ``a``'s free indices, then ``b``'s, as ``tensordot`` orders them. With ``P`` and ``Q`` both present
    it is a batched product over ``P`` of ``(Q, K) @ (K, N)`` on a strided view of ``a`` (the copy
    ``tensordot`` would make of a large ``a`` is skipped)."""

    lo: int
    hi: int
    b_order: tuple[int, ...]


@functools.lru_cache(maxsize=4096)
def _matmul_route(step: Pairwise, ndim_a: int, ndim_b: int) -> _MatmulRoute | None:
    """The :class:`_MatmulRoute` of ``step``, or ``None`` when ``a``'s contracted axes are not one block."""
    axes_a, axes_b = step.axes
    lo, hi = min(axes_a, default=0), max(axes_a, default=-1) + 1
    if not axes_a or hi - lo != len(axes_a):
        return None
    in_block_order = tuple(axes_b[axes_a.index(d)] for d in range(lo, hi))
    return _MatmulRoute(lo, hi, in_block_order + tuple(d for d in range(ndim_b) if d not in axes_b))


class _MatmulShapes(NamedTuple):
    """How :func:`_run_matmul` runs one step on inputs of given shapes (by ``matmul``, NumPy/torch semantics:
    batched over leading dimensions, strided operands read in place); see :class:`_MatmulRoute`."""

    b_order: tuple[int, ...] | None  # b as (contracted, free); None: as it is
    b_matrix: tuple[int, int]
    a_shape: tuple[int, ...]  # a as (P, K), (K, Q) or (P, K, Q)
    a_swap: tuple[int, ...] | None  # (K, Q) is read transposed, (P, K, Q) as P matrices (Q, K)
    product: tuple[int, ...]  # (*P, *Q, *free b)
    perm: tuple[int, ...] | None

    @property
    def batched(self) -> bool:
        """Whether ``a`` is read as ``P`` strided matrices (its contracted block neither leads nor trails it)."""
        return len(self.a_shape) == 3


def _folded_order(step: Pairwise, ndim_a: int, b_order: tuple[int, ...], n_summed: int) -> tuple[tuple[int, ...], bool]:
    """``b_order`` (``b``'s contracted axes, then its free ones) with the step's output permutation folded
    into ``b``'s free axes where that permutation only reorders them: ``b`` (small: a core or a product
    of cores, which plans reorder so that the next step reads the output in place) is transposed, not
    the product. Returns the order and whether the product then needs no permutation."""
    m = ndim_a - n_summed
    if step.perm[:m] != tuple(range(m)):
        return b_order, False
    free = b_order[n_summed:]
    return b_order[:n_summed] + tuple(free[t - m] for t in step.perm[m:]), True


@functools.lru_cache(maxsize=4096)
def _tensordot_call(
    step: Pairwise, ndim_a: int, ndim_b: int
) -> tuple[tuple[int, ...] | None, Any, tuple[int, ...] | None]:
    """``(b's order or None, axes, output permutation or None)`` of one step run as ``tensordot``, with
    a reordering of ``b``'s free indices applied to ``b`` (see :func:`_folded_order`)."""
    axes_a, axes_b = _tensordot_axes(step, ndim_a, ndim_b)
    free_b = tuple(d for d in range(ndim_b) if d not in axes_b)
    order, folded = _folded_order(step, ndim_a, (*axes_b, *free_b), len(axes_b))
    if not folded:
        return None, (axes_a, axes_b), _unless_identity(step.perm)
    b_order = _unless_identity(order)
    return b_order, (axes_a, tuple(range(len(axes_b))) if b_order is not None else axes_b), None


@functools.lru_cache(maxsize=4096)
def _matmul_shapes(step: Pairwise, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> _MatmulShapes | None:
    route = _matmul_route(step, len(shape_a), len(shape_b))
    if route is None:
        return None
    lo, hi = route.lo, route.hi
    b_order, folded = _folded_order(step, len(shape_a), route.b_order, hi - lo)
    k = math.prod(shape_a[lo:hi])
    free_b = [shape_b[d] for d in b_order[hi - lo :]]
    p, q = shape_a[:lo], shape_a[hi:]
    if p and q and math.prod(q) * k * math.prod(free_b) < BATCHED_MIN_WORK:
        return None  # tiny matrices: a batched product runs far below one product of a copy (tensordot)
    a_shape: tuple[int, ...]
    a_swap: tuple[int, ...] | None
    if not q:
        a_shape, a_swap = (math.prod(p), k), None
    elif not p:
        a_shape, a_swap = (k, math.prod(q)), (1, 0)
    else:
        a_shape, a_swap = (math.prod(p), k, math.prod(q)), (0, 2, 1)
    return _MatmulShapes(
        b_order=_unless_identity(b_order),
        b_matrix=(k, math.prod(free_b)),
        a_shape=a_shape,
        a_swap=a_swap,
        product=(*p, *q, *free_b),
        perm=None if folded else _unless_identity(step.perm),
    )


def _run_matmul(
    r: _MatmulShapes,
    a: Any,
    b: Any,
    matmul: Callable[[Any, Any], Any],
    transpose: Callable[[Any, tuple[int, ...]], Any],
) -> Any:
    b_matrix = (b if r.b_order is None else transpose(b, r.b_order)).reshape(r.b_matrix)
    a_matrix = a.reshape(r.a_shape)
    if r.a_swap is not None:  # (K, Q) read transposed; (P, K, Q) as P products (Q, K) @ (K, N)
        a_matrix = transpose(a_matrix, r.a_swap)
    product = matmul(a_matrix, b_matrix).reshape(r.product)
    return product if r.perm is None else transpose(product, r.perm)


@functools.lru_cache(maxsize=4096)
def _tensordot_axes(step: Pairwise, ndim_a: int, ndim_b: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The contracted axis pairs for ``tensordot``: as planned, but sorted by ``b``'s axes when ``a``'s
    are not one block (``tensordot`` copies such an ``a`` anyway, and so reads a ``b`` whose axes lead
    or trail it in place)."""
    if _matmul_route(step, ndim_a, ndim_b) is not None:
        return step.axes
    pairs = sorted(zip(*step.axes), key=lambda pair: pair[1])
    return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


def _numpy_pairwise(step: Pairwise, a: Any, b: Any) -> Any:
    r = _matmul_shapes(step, a.shape, b.shape)
    if r is None:  # a's contracted axes are not one block: tensordot copies it
        return tensordot_pairwise(np.tensordot, np.transpose, step, a, b)
    return _run_matmul(r, a, b, np.matmul, np.transpose)


#: The largest bond at which NumPy builds ``W`` blockwise (:attr:`ArrayOps.interleave`): measured on this
#: project's grid, 1.3-12x faster than ``L @ R`` and its transposing copy up to bond 32, slower at 64
#: (larger blocks run below BLAS's rate in NumPy's batched loop).
_INTERLEAVE_MAX_BOND = 32


def _numpy_interleave(left: Any, right: Any, dims: tuple[int, int, int, int]) -> Any:
    in_left, out_left, in_right, out_right = dims
    bond = left.shape[1]
    if bond > _INTERLEAVE_MAX_BOND:
        return None
    blocks = np.ascontiguousarray(right.reshape(bond, in_right, out_right).transpose(1, 0, 2))  # (IR, r, JR): small
    weight = np.matmul(left.reshape(in_left, 1, out_left, bond), blocks)  # (IL, IR, JL, JR): W's own layout
    return weight.reshape(in_left * in_right, out_left * out_right)


def _permute(x: Any, perm: tuple[int, ...]) -> Any:
    return x.permute(perm)


def _torch_pairwise(step: Pairwise, a: Any, b: Any) -> Any:
    torch = sys.modules["torch"]
    r = _matmul_shapes(step, tuple(a.shape), tuple(b.shape))
    # Under autograd a strided batched product's backward copies more than tensordot's; a plain matrix
    # product (``a``'s contracted block leads or trails it) is what tensordot runs, without its wrapper
    # and, for a leading block, without its copy of ``a``.
    if r is not None and (not r.batched or not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))):
        return _run_matmul(r, a, b, torch.matmul, _permute)
    return tensordot_pairwise(_torch_tensordot, _permute, step, a, b)


def _torch_tensordot(a: Any, b: Any, axes: Any) -> Any:
    return sys.modules["torch"].tensordot(a, b, dims=axes)


def _torch_affine(x: Any, w: Any, bias: Any) -> Any:
    return sys.modules["torch"].addmm(bias, x, w)


def tensordot_pairwise(
    tensordot: Callable[..., Any], transpose: Callable[[Any, Any], Any], step: Pairwise, a: Any, b: Any
) -> Any:
    """One step by a framework's ``tensordot(a, b, axes)`` and ``transpose(x, perm)`` (TensorFlow, Keras)."""
    b_order, (axes_a, axes_b), perm = _tensordot_call(step, len(a.shape), len(b.shape))
    product = tensordot(a, b if b_order is None else transpose(b, b_order), axes=[list(axes_a), list(axes_b)])
    return product if perm is None else transpose(product, perm)


def _einsum_pairwise(einsum: Callable[..., Any]) -> Callable[[Pairwise, Any, Any], Any]:
    return lambda step, a, b: einsum(step.equation, a, b)


def _sum_leading(x: Any) -> Any:
    return x.sum(0)


def _reshape(x: Any, shape: tuple[int, ...]) -> Any:
    return x.reshape(shape)


def _restore_leading(y: Any, x: Any, out: int) -> Any:
    return y.reshape((*x.shape[:-1], out))


def _method_ops(
    name: str,
    pairwise: Callable[[Pairwise, Any, Any], Any],
    transpose: Callable[[Any, tuple[int, ...]], Any],
    matmul: Callable[[Any, Any], Any] | None = None,
    affine: Callable[[Any, Any, Any], Any] | None = None,
    interleave: Callable[[Any, Any, tuple[int, int, int, int]], Any] | None = None,
    batched_matmul: Callable[[Any, Any], Any] | None = None,
) -> ArrayOps:
    """Ops for arrays with a NumPy-like ``.reshape`` and ``.shape`` (numpy, torch, jax); module-level
    functions, not closures, so that each call runs the code as it is now (mutation testing swaps it)."""
    return ArrayOps(
        name=name,
        pairwise=pairwise,
        reshape=_reshape,
        restore_leading=_restore_leading,
        transpose=transpose,
        matmul=matmul,
        affine=affine,
        interleave=interleave,
        batched_matmul=batched_matmul,
        sum_leading=None if batched_matmul is None else _sum_leading,
    )


def _tensorflow_ops() -> ArrayOps:
    tf = sys.modules["tensorflow"]

    def restore_leading(y: Any, x: Any, out: int) -> Any:
        if x.shape.rank is not None and all(d is not None for d in x.shape[:-1]):
            return tf.reshape(y, (*x.shape[:-1], out))
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [out]], axis=0))

    return ArrayOps(
        name="tensorflow",
        pairwise=functools.partial(tensordot_pairwise, tf.tensordot, tf.transpose),
        reshape=tf.reshape,
        restore_leading=restore_leading,
        transpose=tf.transpose,
        matmul=tf.linalg.matmul,
    )


def _make_ops(name: str) -> ArrayOps:
    if name == "numpy":
        return _method_ops(
            "numpy", _numpy_pairwise, np.transpose, np.matmul, interleave=_numpy_interleave, batched_matmul=np.matmul
        )
    if name == "torch":  # tensordot + permute: 10-30% faster than einsum at small batch, equal at large
        torch = sys.modules["torch"]
        return _method_ops("torch", _torch_pairwise, _permute, torch.mm, _torch_affine, batched_matmul=torch.matmul)
    if name == "jax":
        jnp = sys.modules["jax"].numpy
        return _method_ops("jax", _einsum_pairwise(jnp.einsum), jnp.transpose, jnp.matmul)
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
    return _run(steps, operands, ops, tape, frozenset())[0]


def _run(
    steps: Sequence[PlanStep], operands: Sequence[Any], ops: ArrayOps, tape: Tape | None, keep: frozenset[int]
) -> tuple[Any, dict[int, Any]]:
    """The one forward loop: the result, and the step outputs whose ids (see :func:`step_ids`) are in ``keep``."""
    arrays, kept = dict(enumerate(operands)), {}
    for step, (id_a, id_b, id_out) in zip(steps, step_ids(steps, len(operands))):
        a, b = arrays.pop(id_a), arrays.pop(id_b)
        arrays[id_out] = ops.pairwise(step.forward, a, b)
        if tape is not None:
            tape.append(((id_a, id_b), id_out, a, b))
        if id_out in keep:
            kept[id_out] = arrays[id_out]
    (result,) = arrays.values()
    return result, kept


def plan_operands(plan_: ContractionPlan, x: Any, cores: Sequence[Any], ops: ArrayOps) -> list[Any]:
    """``x`` as ``(rows, *in_modes)`` and the cores with their outer bonds squeezed: what the steps read."""
    operands = [ops.reshape(x, (-1, *plan_.spec.in_modes))]
    return operands + [ops.reshape(core, shape) for core, shape in zip(cores, plan_.operand_shapes[1:])]


def backprop(
    steps: Sequence[PlanStep],
    tape: Tape,
    grad: Any,
    ops: ArrayOps,
    n_operands: int,
    needs: Sequence[bool] | None = None,
) -> list[Any]:
    """Reverse-mode through the recorded steps: gradients of every operand from ``grad`` of the result.

    The gradient of one operand is the network contracted without it; walking the steps backwards
    shares the partial contractions (the environments) between operands. With ``needs`` (per operand),
    only the products that lead to a needed gradient are made; the others come back as ``None``.
    """
    wanted = _wanted(steps, n_operands, needs)
    grads = {tape[-1][1]: grad}
    for step, ((id_a, id_b), id_out, a, b) in zip(reversed(steps), reversed(tape)):
        g = grads.pop(id_out, None)
        if g is None:
            continue
        grad_a, grad_b = _step_backward(step.forward, a, b, g, ops, wanted[id_a], wanted[id_b])
        if grad_a is not None:
            grads[id_a] = grad_a
        if grad_b is not None:
            grads[id_b] = grad_b
    return [grads.get(k) for k in range(n_operands)]


def _inverse(order: Sequence[int]) -> tuple[int, ...]:
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return tuple(inverse)


class _StepBackward(NamedTuple):
    """The static part of :func:`_step_backward` for one step and input shapes: the orders and shapes
    it reads and writes (``None`` for an order that keeps the axes as they are: no transpose is run)."""

    unpermute: tuple[int, ...] | None  # the forward's output back to (free a, free b)
    m: int
    k: int
    n: int
    b_order: tuple[int, ...] | None  # b as (contracted, free)
    a_grouped: tuple[int, ...]  # dA's shape as (free a, contracted)
    a_restore: tuple[int, ...] | None  # ... back to a's order
    a_order: tuple[int, ...] | None  # a as (free, contracted)
    b_grouped: tuple[int, ...]  # dB's shape as (contracted, free b)
    b_restore: tuple[int, ...] | None  # ... back to b's order


def _unless_identity(order: Sequence[int]) -> tuple[int, ...] | None:
    return None if tuple(order) == tuple(range(len(order))) else tuple(order)


@functools.lru_cache(maxsize=4096)
def _step_backward_recipe(step: Pairwise, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> _StepBackward:
    axes_a, axes_b = _tensordot_axes(step, len(shape_a), len(shape_b))  # a copied as the forward copied it
    free_a = [d for d in range(len(shape_a)) if d not in axes_a]
    free_b = [d for d in range(len(shape_b)) if d not in axes_b]
    order_a, order_b = (*free_a, *axes_a), (*axes_b, *free_b)
    return _StepBackward(
        unpermute=_unless_identity(_inverse(step.perm)),
        m=math.prod([shape_a[d] for d in free_a]),
        k=math.prod([shape_a[d] for d in axes_a]),
        n=math.prod([shape_b[d] for d in free_b]),
        b_order=_unless_identity(order_b),
        a_grouped=tuple(shape_a[d] for d in order_a),
        a_restore=_unless_identity(_inverse(order_a)),
        a_order=_unless_identity(order_a),
        b_grouped=tuple(shape_b[d] for d in order_b),
        b_restore=_unless_identity(_inverse(order_b)),
    )


def _step_backward(
    step: Pairwise, a: Any, b: Any, grad: Any, ops: ArrayOps, need_a: bool, need_b: bool
) -> tuple[Any, Any]:
    """The gradients of one step's inputs as the two matrix products of its forward ``(M, K) @ (K, N)``.

    The forward read ``a`` as ``(M, K)`` and ``b`` as ``(K, N)``; the backward reads them the same way
    (``dA = G Bᵀ``, ``dB = Aᵀ G``, transposes as strides, not copies) and hands each gradient back in
    its input's index order as a view. A big input laid out for the forward product (see the plans'
    layout search) is so never copied again in the backward.
    """
    shape_a, shape_b = tuple(a.shape), tuple(b.shape)
    route = _matmul_shapes(step, shape_a, shape_b) if ops.batched_matmul is not None else None
    if route is not None:
        return _in_place_backward(route, shape_a, shape_b, a, b, grad, ops, need_a, need_b)
    r = _step_backward_recipe(step, shape_a, shape_b)
    g = ops.reshape(grad if r.unpermute is None else ops.transpose(grad, r.unpermute), (r.m, r.n))
    grad_a = grad_b = None
    if need_a:
        b_matrix = ops.reshape(b if r.b_order is None else ops.transpose(b, r.b_order), (r.k, r.n))
        grad_a = ops.reshape(_matmul_bt(ops, g, b_matrix), r.a_grouped)  # (M, K)
        grad_a = grad_a if r.a_restore is None else ops.transpose(grad_a, r.a_restore)
    if need_b:
        a_matrix = ops.reshape(a if r.a_order is None else ops.transpose(a, r.a_order), (r.m, r.k))
        grad_b = ops.reshape(_matmul_at(ops, a_matrix, g), r.b_grouped)  # (K, N)
        grad_b = grad_b if r.b_restore is None else ops.transpose(grad_b, r.b_restore)
    return grad_a, grad_b


#: :func:`_in_place_backward` writes ``dA`` by one full product and a transpose of ``a``'s size (not ``P``
#: thin batched products) where ``a`` is this many times smaller than ``g`` (``K`` this many times below ``N``).
_SMALL_NEXT_TO = 4


def _in_place_backward(
    r: _MatmulShapes,
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    a: Any,
    b: Any,
    grad: Any,
    ops: ArrayOps,
    need_a: bool,
    need_b: bool,
) -> tuple[Any, Any]:
    """:func:`_step_backward` of a step whose forward read ``a`` in place as ``(P, K, Q)`` (``P`` products
    ``(Q, K) @ (K, N)``, see :class:`_MatmulShapes`; ``P`` or ``Q`` may be 1): ``dA_p = B G_pᵀ`` is written
    in ``a``'s own layout, and ``dB = sum_p A_p G_p`` is one batched product and a sum (or, where its
    ``(P, K, N)`` stack would be larger than ``a``, one product with ``a`` copied to ``(K, P Q)``)."""
    batched_matmul, sum_leading = cast(Callable[[Any, Any], Any], ops.batched_matmul), ops.sum_leading
    if len(r.a_shape) == 3:
        p, k, q = r.a_shape
    else:
        (p, k), q = (r.a_shape, 1) if r.a_swap is None else ((1, r.a_shape[0]), r.a_shape[1])
    n = r.b_matrix[1]
    g = ops.reshape(grad if r.perm is None else ops.transpose(grad, _inverse(r.perm)), (p, q, n))
    a_by_rows = need_a and (q == 1 or _SMALL_NEXT_TO * k < n)  # a small next to g: one full product
    b_batched = need_b and p > 1 and q > 1 and n <= q and sum_leading is not None
    g_rows = ops.reshape(g, (p * q, n)) if a_by_rows or (need_b and not b_batched) else None  # one copy at most
    grad_a = grad_b = None
    if need_a:
        b_matrix = ops.reshape(b if r.b_order is None else ops.transpose(b, r.b_order), r.b_matrix)
        if a_by_rows:  # (P Q, K), then a transpose of a's (small) size
            grad_a = ops.transpose(ops.reshape(_matmul_bt(ops, g_rows, b_matrix), (p, q, k)), (0, 2, 1))
        else:
            grad_a = batched_matmul(b_matrix, ops.transpose(g, (0, 2, 1)))  # (P, K, Q): a's layout
        grad_a = ops.reshape(grad_a, shape_a)
    if need_b:
        a3 = ops.reshape(a, (p, k, q))
        if b_batched:
            grad_b = cast(Callable[[Any], Any], sum_leading)(batched_matmul(a3, g))
        elif q == 1:
            grad_b = _matmul_at(ops, ops.reshape(a3, (p, k)), g_rows)
        elif p == 1:
            grad_b = _matmul(ops, ops.reshape(a3, (k, q)), g_rows)
        else:
            grad_b = _matmul(ops, ops.reshape(ops.transpose(a3, (1, 0, 2)), (k, p * q)), g_rows)
        if r.b_order is None:
            grad_b = ops.reshape(grad_b, shape_b)
        else:
            grouped = tuple(shape_b[d] for d in r.b_order)
            grad_b = ops.transpose(ops.reshape(grad_b, grouped), _inverse(r.b_order))
    return grad_a, grad_b


def step_ids(steps: Sequence[PlanStep], n_operands: int) -> list[tuple[int, int, int]]:
    """Per step, the ids ``(a, b, out)`` of its inputs and output: operands are ``0 .. n_operands-1``
    (0 is ``x``), step ``k``'s output is ``n_operands + k`` (as :func:`run_steps` numbers them)."""
    ids, result = list(range(n_operands)), []
    for k, step in enumerate(steps):
        i, j = step.positions
        id_a = ids.pop(i)
        id_b = ids.pop(j)
        ids.append(n_operands + k)
        result.append((id_a, id_b, n_operands + k))
    return result


def _wanted(steps: Sequence[PlanStep], n_operands: int, needs: Sequence[bool] | None) -> list[bool]:
    """Per id, whether its gradient leads to a needed operand gradient (all, without ``needs``)."""
    wanted = [True if needs is None else bool(needs[k]) for k in range(n_operands)]
    for id_a, id_b, _ in step_ids(steps, n_operands):
        wanted.append(wanted[id_a] or wanted[id_b])
    return wanted


def backward_reads(steps: Sequence[PlanStep], n_operands: int, needs: Sequence[bool]) -> frozenset[int]:
    """The ids of the arrays :func:`backprop` reads for the gradients ``needs`` asks for: a step's input
    ``a`` when ``b`` leads to a needed gradient, and ``b`` when ``a`` does."""
    wanted = _wanted(steps, n_operands, needs)
    reads = set()
    for id_a, id_b, _ in step_ids(steps, n_operands):
        if wanted[id_b]:
            reads.add(id_a)
        if wanted[id_a]:
            reads.add(id_b)
    return frozenset(reads)


def _pairwise_shape(step: Pairwise, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    kept = [d for k, d in enumerate(a) if k not in step.axes[0]] + [d for k, d in enumerate(b) if k not in step.axes[1]]
    return tuple(kept[k] for k in step.perm)


def intermediate_sizes(plan_: ContractionPlan, rows: int) -> dict[int, int]:
    """Elements of every step's output (by id, see :func:`step_ids`) when ``x`` has ``rows`` rows."""
    shapes = [(rows, *plan_.spec.in_modes), *plan_.operand_shapes[1:]]
    sizes = {}
    for step, (id_a, id_b, id_out) in zip(plan_.steps, step_ids(plan_.steps, len(shapes))):
        shapes.append(_pairwise_shape(step.forward, shapes[id_a], shapes[id_b]))
        sizes[id_out] = math.prod(shapes[-1])
    return sizes


def keep_within(plan_: ContractionPlan, rows: int, needs: Sequence[bool], budget: int | None) -> frozenset[int]:
    """The intermediates a planned backward keeps from the forward: of those the backward reads, the
    smallest first while their elements total at most ``budget`` (all of them for ``None``). The others
    are recomputed in the backward from ``x``, the cores and the kept ones."""
    n_operands = len(plan_.operand_shapes)
    sizes = intermediate_sizes(plan_, rows)
    read = sorted((sizes[k], k) for k in backward_reads(plan_.steps, n_operands, needs) if k >= n_operands)
    if budget is None:
        return frozenset(k for _, k in read)
    kept, total = set(), 0
    for size, k in read:
        if total + size > budget:
            break
        kept.add(k)
        total += size
    return frozenset(kept)


def run_keeping(
    steps: Sequence[PlanStep], operands: Sequence[Any], ops: ArrayOps, keep: frozenset[int]
) -> tuple[Any, list[Any]]:
    """Run the steps; return the result and the intermediates whose ids are in ``keep`` (in id order)."""
    result, kept = _run(steps, operands, ops, None, keep)
    return result, [kept[k] for k in sorted(kept)]


class Absent(NamedTuple):
    """A step input the backward does not read: only its shape is recorded."""

    shape: tuple[int, ...]


def recomputed_ids(
    steps: Sequence[PlanStep], n_operands: int, kept: Collection[int], reads: Collection[int]
) -> frozenset[int]:
    """The step outputs (by id, see :func:`step_ids`) a backward that reads ``reads`` makes again when the
    forward kept only ``kept``: the reads not kept, and what they are made from, back to the kept ones."""
    needed = set(reads)
    again = set()
    for id_a, id_b, id_out in reversed(step_ids(steps, n_operands)):
        if id_out in needed and id_out not in kept:
            needed.update((id_a, id_b))
            again.add(id_out)
    return frozenset(again)


def replay(
    steps: Sequence[PlanStep], operands: Sequence[Any], ops: ArrayOps, kept: dict[int, Any], reads: frozenset[int]
) -> Tape:
    """The tape of the steps' inputs for :func:`backprop`, recomputing the intermediates in ``reads`` that
    were not kept (and what they depend on); an input nobody reads is recorded as its :class:`Absent` shape."""
    n_operands = len(operands)
    graph = step_ids(steps, n_operands)
    again = recomputed_ids(steps, n_operands, kept, reads)
    arrays: dict[int, Any] = dict(enumerate(operands))
    shapes = {k: tuple(array.shape) for k, array in arrays.items()}
    tape: Tape = []
    for step, (id_a, id_b, id_out) in zip(steps, graph):
        shapes[id_out] = _pairwise_shape(step.forward, shapes[id_a], shapes[id_b])
        if id_out in kept:
            arrays[id_out] = kept[id_out]
        elif id_out in again:
            arrays[id_out] = ops.pairwise(step.forward, arrays[id_a], arrays[id_b])
        a = arrays[id_a] if id_a in reads else Absent(shapes[id_a])
        b = arrays[id_b] if id_b in reads else Absent(shapes[id_b])
        tape.append(((id_a, id_b), id_out, a, b))
    return tape


def execute(
    plan_: ContractionPlan, x: Any, cores: Sequence[Any], bias: Any, ops: ArrayOps, tape: Tape | None = None
) -> Any:
    """``y = x @ W + bias`` by running ``plan_``; no checks (adapters validate once, at build time).

    With a ``tape``, the inputs of every step are recorded for :func:`backprop`.
    """
    spec = plan_.spec
    if plan_.builds_weight and tape is None:  # build W in its cheapest layout, then one product
        x2d, weight = ops.reshape(x, (-1, spec.in_features)), dense_weight(cores, ops)
        if bias is not None and ops.affine is not None:  # one fused product: y is written once
            return ops.restore_leading(ops.affine(x2d, weight, bias), x, spec.out_features)
        y = ops.restore_leading(_matmul(ops, x2d, weight), x, spec.out_features)
        return y if bias is None else y + bias
    operands = plan_operands(plan_, x, cores, ops)
    y = ops.restore_leading(run_steps(plan_.steps, operands, ops, tape), x, spec.out_features)
    return y if bias is None else y + bias


#: ``(P, K) x (K, N) -> (P, N)``: a plain matrix product (the halves of W, and a materialising plan's product).
_MATMUL = _pairwise(("PK", "KN"), "PN")
#: ``(M, N) x (K, N) -> (M, K)`` and ``(M, K) x (M, N) -> (K, N)``: the backward's products.
_MATMUL_BT = _pairwise(("MN", "KN"), "MK")
_MATMUL_AT = _pairwise(("MK", "MN"), "KN")


def _matmul(ops: ArrayOps, a: Any, b: Any) -> Any:
    """``a @ b`` for matrices."""
    return ops.pairwise(_MATMUL, a, b) if ops.matmul is None else ops.matmul(a, b)


def _matmul_bt(ops: ArrayOps, a: Any, b: Any) -> Any:
    """``a @ bᵀ`` for matrices."""
    return ops.pairwise(_MATMUL_BT, a, b) if ops.matmul is None else ops.matmul(a, ops.transpose(b, (1, 0)))


def _matmul_at(ops: ArrayOps, a: Any, b: Any) -> Any:
    """``aᵀ @ b`` for matrices."""
    return ops.pairwise(_MATMUL_AT, a, b) if ops.matmul is None else ops.matmul(ops.transpose(a, (1, 0)), b)


def _prefixes(cores: Sequence[Any], shapes: Sequence[tuple[int, ...]], ops: ArrayOps) -> list[Any]:
    """The first 1, 2, ... cores contracted over their inner bonds: ``(r_first * i1 j1 ... ik jk, r_k)``,
    the mode indices interleaved in core order (each product writes the order the next one reads)."""
    prefixes = [ops.reshape(core, (-1, shape[3])) for core, shape in zip(cores[:1], shapes[:1])]  # [] for no cores
    for core, shape in zip(cores[1:], shapes[1:]):
        prefixes.append(ops.reshape(_matmul(ops, prefixes[-1], ops.reshape(core, (shape[0], -1))), (-1, shape[3])))
    return prefixes


def _chain(cores: Sequence[Any], shapes: Sequence[tuple[int, ...]], ops: ArrayOps) -> Any:
    """All of ``cores`` contracted over their inner bonds (the last of :func:`_prefixes`)."""
    return _prefixes(cores, shapes, ops)[-1]


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
    over the bond between them and one transpose (NumPy: one blockwise product that writes ``W`` in place,
    :attr:`ArrayOps.interleave`): ``W``-sized arrays are written twice in the forward, and read about three
    times in the backward, whatever the number of cores.
    """
    return weight_from_halves(cores, weight_halves(cores, ops), ops)


def weight_halves(cores: Sequence[Any], ops: ArrayOps, split: int | None = None) -> tuple[Any, ...]:
    """``(L, R)`` of :func:`dense_weight`: the left cores as ``(IL*JL, r)`` and the right ones as ``(r, IR*JR)``
    (``()`` for one core). Small (about ``sqrt(W)`` times the bond), so a planned backward may keep them.
    ``split``: the first core of the right half (default :func:`tnlayers.plan.weight_split`'s)."""
    shapes = [tuple(core.shape) for core in cores]  # lists, not generators: torch.compile traces this
    if len(shapes) == 1:
        return ()
    k = weight_split(shapes) if split is None else split
    left = _grouped(_chain(cores[:k], shapes[:k], ops), shapes[:k], ops, bond_first=False)  # (IL*JL, r)
    right = _grouped(_chain(cores[k:], shapes[k:], ops), shapes[k:], ops, bond_first=True)  # (r, IR*JR)
    return left, right


def weight_from_halves(cores: Sequence[Any], halves: Sequence[Any], ops: ArrayOps) -> Any:
    """``W`` from the :func:`weight_halves` of ``cores`` (only their shapes are read, unless there is one core)."""
    shapes = [tuple(core.shape) for core in cores]
    rows, cols = math.prod([shape[1] for shape in shapes]), math.prod([shape[2] for shape in shapes])
    if len(shapes) == 1:
        return ops.reshape(cores[0], (rows, cols))
    k = weight_split(shapes)
    in_left, out_left = math.prod([s[1] for s in shapes[:k]]), math.prod([s[2] for s in shapes[:k]])
    in_right, out_right = rows // in_left, cols // out_left
    if ops.interleave is not None:
        left, right = halves
        weight = ops.interleave(left, right, (in_left, out_left, in_right, out_right))
        if weight is not None:
            return weight
    product = ops.reshape(_matmul(ops, *halves), (in_left, out_left, in_right, out_right))
    return ops.reshape(ops.transpose(product, (0, 2, 1, 3)), (rows, cols))


def _chain_backward(cores: Sequence[Any], shapes: Sequence[tuple[int, ...]], grad: Any, ops: ArrayOps) -> list[Any]:
    """The cores' gradients from ``grad`` of :func:`_chain`'s result (its products rebuilt: they are small)."""
    prefixes = _prefixes(cores[:-1], shapes[:-1], ops)
    grads = []
    for core, shape, prefix in zip(reversed(cores[1:]), reversed(shapes[1:]), reversed(prefixes)):
        g = ops.reshape(grad, (-1, shape[1] * shape[2] * shape[3]))  # (P, i*j*c): the product's matrix form
        core_matrix = ops.reshape(core, (shape[0], -1))
        grads.append(ops.reshape(_matmul_at(ops, prefix, g), shape))  # prefixᵀ @ g
        grad = _matmul_bt(ops, g, core_matrix)  # g @ coreᵀ: (P, r)
    grads.append(ops.reshape(grad, shapes[0]))
    return grads[::-1]


def _ungrouped(grad: Any, shapes: Sequence[tuple[int, ...]], ops: ArrayOps, bond_first: bool) -> Any:
    """The inverse of :func:`_grouped`, for gradients: ``(r, I*J)`` or ``(I*J, r)`` back to the chain's layout."""
    k = len(shapes)
    ins, outs = [s[1] for s in shapes], [s[2] for s in shapes]
    if bond_first:
        order = (0, *range(1, 2 * k + 1, 2), *range(2, 2 * k + 1, 2))
        grouped = ops.reshape(grad, (shapes[0][0], *ins, *outs))
        return ops.reshape(ops.transpose(grouped, _inverse(order)), (-1, shapes[-1][3]))
    order = (*range(0, 2 * k, 2), *range(1, 2 * k, 2), 2 * k)
    grouped = ops.reshape(grad, (*ins, *outs, shapes[-1][3]))
    return ops.reshape(ops.transpose(grouped, _inverse(order)), (-1, shapes[-1][3]))


def dense_weight_backward(
    cores: Sequence[Any], grad: Any, ops: ArrayOps, halves: Sequence[Any] | None = None
) -> list[Any]:
    """The cores' gradients from ``grad`` (shape ``(in_features, out_features)``) of :func:`dense_weight`.

    Plain array products (no autograd), so a framework's custom backward can use it and still be
    differentiated again: the two halves (:func:`weight_halves`, rebuilt unless given) give
    ``dL = dP Rᵀ`` and ``dR = Lᵀ dP``, then each half's chain is walked back.
    """
    shapes = [tuple(core.shape) for core in cores]
    if len(shapes) == 1:
        return [ops.reshape(grad, shapes[0])]
    rows, cols = math.prod([shape[1] for shape in shapes]), math.prod([shape[2] for shape in shapes])
    k = weight_split(shapes)
    left, right = weight_halves(cores, ops) if halves is None else halves
    in_left, out_left = math.prod([s[1] for s in shapes[:k]]), math.prod([s[2] for s in shapes[:k]])
    in_right, out_right = rows // in_left, cols // out_left
    grad_product = ops.transpose(ops.reshape(grad, (in_left, in_right, out_left, out_right)), (0, 2, 1, 3))
    grad_product = ops.reshape(grad_product, (in_left * out_left, in_right * out_right))
    grad_left = _ungrouped(_matmul_bt(ops, grad_product, right), shapes[:k], ops, bond_first=False)
    grad_right = _ungrouped(_matmul_at(ops, left, grad_product), shapes[k:], ops, bond_first=True)
    return _chain_backward(cores[:k], shapes[:k], grad_left, ops) + _chain_backward(
        cores[k:], shapes[k:], grad_right, ops
    )


def planned_backward(
    plan_: ContractionPlan,
    x: Any,
    cores: Sequence[Any],
    grad: Any,
    ops: ArrayOps,
    needs: Sequence[bool],
    kept: dict[int, Any] | None,
    weight: Any = None,
    halves: Sequence[Any] | None = None,
) -> list[Any]:
    """The gradients of ``x`` (``(rows, in_features)``) and of the cores from ``grad`` (``(rows, out_features)``)
    of ``x @ W`` run by ``plan_``, in their shapes; ``None`` where ``needs`` (per operand) asks for none.

    ``kept`` holds the intermediates the forward kept (by id, see :func:`step_ids`); the others the
    backward reads are recomputed from ``x`` and the cores. ``None``: the plan builds ``W``, which is
    ``weight`` if kept, else built again, from ``halves`` (:func:`weight_halves`) if kept, and only when
    ``x``'s gradient is asked for (``dx = g Wᵀ``, ``dW = xᵀ g``, then :func:`dense_weight_backward`).
    Plain array products: a framework's custom backward made of them can be differentiated again.
    """
    n_operands = plan_.spec.n_cores + 1
    if kept is None:
        grad_x = None
        if needs[0]:
            if weight is None:
                weight = dense_weight(cores, ops) if halves is None else weight_from_halves(cores, halves, ops)
            grad_x = _matmul_bt(ops, grad, weight)
        found: list[Any] = [None] * len(cores)
        if any(needs[1:]):
            found = dense_weight_backward(cores, _matmul_at(ops, x, grad), ops, halves)
        return [grad_x, *(g if need else None for g, need in zip(found, needs[1:]))]
    reads = backward_reads(plan_.steps, n_operands, needs)
    tape = replay(plan_.steps, plan_operands(plan_, x, cores, ops), ops, kept, reads)
    grads = backprop(plan_.steps, tape, ops.reshape(grad, (-1, *plan_.spec.out_modes)), ops, n_operands, needs)
    shapes = [tuple(x.shape), *(tuple(core.shape) for core in cores)]
    return [None if g is None else ops.reshape(g, shape) for g, shape in zip(grads, shapes)]


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
