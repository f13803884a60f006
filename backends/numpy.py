"""NumPy MPO layer with its own backward pass, and SGD/Adam, for NumPy-only users and for teaching.

>>> import numpy as np
>>> from tnlayers.backends.numpy import MPOLinear
>>> layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), rank=8, seed=0)
>>> layer(np.zeros((2, 784), np.float32)).shape
(2, 256)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

import tnlayers
from tnlayers import layer as kit
from tnlayers.contract import (
    Tape,
    backprop,
    dense_weight,
    execute,
    get_ops,
    plan_operands,
    planned_backward,
    run_keeping,
)
from tnlayers.decompose import DecompositionReport, spec_from_cores
from tnlayers.plan import ContractionPlan, in_place_layout

__all__ = ["SGD", "Adam", "MPOEmbedding", "MPOLinear"]

_OPS = get_ops("numpy")
Array = NDArray[Any]


class MPOLinear(kit.MPOLayerMixin):
    """``y = x @ W + b`` with ``W`` (shape ``(in_features, out_features)``) stored as MPO cores.

    The first two arguments are feature counts (``MPOLinear(784, 256, rank=8)``, modes balanced over
    ``n_cores``) or mode lists (``MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 8)``).
    ``forward`` (or calling the layer) takes ``x`` of shape ``(..., in_features)``; in training mode
    it keeps what ``backward`` needs. ``backward(grad_out)`` returns the gradient for ``x`` and
    stores the gradients of every core and of the bias (read them with :meth:`grads`; each call
    replaces them).
    """

    def __init__(
        self,
        in_modes: int | Sequence[int],
        out_modes: int | Sequence[int],
        rank: int | Sequence[int] = 8,
        bias: bool = True,
        init: str = "glorot",
        seed: int | np.random.Generator | None = None,
        strategy: Any = "auto",
        dtype: DTypeLike = np.float32,
        *,
        n_cores: int | None = None,
        saved_budget: float | None = kit.DEFAULT_SAVED_BUDGET,
    ) -> None:
        spec = kit.spec_of_arguments(in_modes, out_modes, rank, n_cores)
        cores = tnlayers.init_cores(spec, kit.check_init(init), seed, dtype)
        self._setup(cores, np.zeros(spec.out_features, dtype=cores[0].dtype) if bias else None, strategy)
        self.saved_budget = saved_budget

    def _setup(self, cores: Sequence[Array], bias: Array | None, strategy: Any) -> None:
        self.spec = spec_from_cores(cores)
        self.cores: list[Array] = [np.ascontiguousarray(c) for c in cores]
        self.bias: Array | None = None if bias is None else np.ascontiguousarray(bias)
        self.dtype = self.cores[0].dtype
        if not np.issubdtype(self.dtype, np.floating):
            raise TypeError(f"cores must hold floating-point numbers, got dtype {self.dtype}")
        if self.bias is not None and self.bias.shape != (self.spec.out_features,):
            raise ValueError(f"bias must have shape ({self.spec.out_features},), got {self.bias.shape}")
        if any(c.dtype != self.dtype for c in self.cores) or (self.bias is not None and self.bias.dtype != self.dtype):
            given = [str(c.dtype) for c in self.cores] + ([] if self.bias is None else [f"bias {self.bias.dtype}"])
            raise TypeError(f"cores and bias must share one dtype, got {given}")
        self.planner = kit.LayerPlanner.make(self.spec, strategy, "numpy")  # an optimiser searches once, now
        self.training = True
        self.decomposition: DecompositionReport | None = None
        """The TT-SVD report when the layer was made by :meth:`from_dense`."""
        self.core_grads: list[Array | None] = [None] * self.spec.n_cores
        self.frozen_cores: frozenset[int] = frozenset()
        self.bias_frozen = False
        self.bias_grad: Array | None = None
        self._saved: tuple[ContractionPlan, Array, dict[int, Array], tuple[bool, ...]] | None = None
        self._cached_weight: tuple[list[Array], Array] | None = None  # copies of the cores W was built from, W

    @classmethod
    def from_cores(cls, cores: Sequence[Any], bias: Any = None, strategy: Any = "auto") -> MPOLinear:
        """A layer holding copies of the given cores (and bias) as NumPy arrays."""
        layer = cls.__new__(cls)
        layer._setup([np.array(c) for c in cores], None if bias is None else np.array(bias), strategy)
        return layer

    @classmethod
    def from_dense(
        cls,
        matrix: Any,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        bias: Any = None,
        max_rank: int | Sequence[int] | None = None,
        tol: float | None = None,
        n_cores: int = 4,
        strategy: Any = "auto",
    ) -> MPOLinear:
        """TT-SVD of a dense ``(in_features, out_features)`` matrix; the report is in ``.decomposition``."""
        cores, report = tnlayers.from_dense(matrix, in_modes, out_modes, max_rank, tol, n_cores=n_cores)
        layer = cls.from_cores(cores, bias, strategy)
        layer.decomposition = report
        return layer

    def save(self, path: str | os.PathLike[str], name: str = "mpo") -> None:
        tnlayers.save(path, self.cores, self.bias, name=name)

    @property
    def strategy(self) -> Any:
        return self.planner.strategy

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    def train(self) -> MPOLinear:
        self.training = True
        return self

    def eval(self) -> MPOLinear:
        """Inference mode: ``forward`` keeps nothing for ``backward``."""
        self.training = False
        self._saved = None
        return self

    def forward(self, x: Array) -> Array:
        """``x @ W + b`` for ``x`` of shape ``(..., in_features)``."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
        kit.check_input(x.shape, self.in_features, "MPOLinear")
        if x.dtype != self.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the layer has dtype {self.dtype}; use x.astype(np.{self.dtype})"
            )
        gradients = "all" if self.training else "none"  # backward returns the input's gradient too
        key = kit.tune_key("numpy", "cpu", str(self.dtype), gradients) if self.planner.autotunes else ()
        timer = self._timer(x, gradients) if self.planner.autotunes else None
        rows = int(np.prod(x.shape[:-1]))
        plan = self.planner.plan(rows, gradients, key, timer)
        if not self.training:
            if self.planner.reuses_weight(plan):  # one product with W kept between calls (see reuses_weight)
                product = (x.reshape(rows, self.in_features) @ self._inference_weight()).reshape(*x.shape[:-1], -1)
                return product if self.bias is None else product + self.bias
            return execute(plan, x, self.cores, self.bias, _OPS)  # type: ignore[no-any-return]
        needs = (True, *(k not in self.frozen_cores for k in range(self.spec.n_cores)))  # x's gradient: always
        keep = None if self.saved_budget is None else kit.kept_for_backward(plan, rows, needs, self.saved_budget)
        if keep is None:  # everything the backward reads
            keep = kit.backward_intermediates(plan, needs)
        plan = in_place_layout(plan)  # its own backward reads the steps' inputs in place, as the forward does
        y2d, kept = run_keeping(plan.steps, plan_operands(plan, x, self.cores, _OPS), _OPS, keep)
        self._saved = (plan, x, dict(zip(sorted(keep), kept)), needs)
        y: Array = y2d.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    __call__ = forward

    def _inference_weight(self) -> Array:
        """``W``, built once and reused while the cores hold the values it was built from (compared with
        copies on every call, so an optimiser's in-place update or a replaced core is always seen)."""
        cached = self._cached_weight
        if (
            cached is not None
            and len(cached[0]) == len(self.cores)
            and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(self.cores, cached[0]))
        ):
            return cached[1]
        weight: Array = dense_weight(self.cores, _OPS)
        self._cached_weight = ([c.copy() for c in self.cores], weight)
        return weight

    def _timer(self, x: Array, gradients: str) -> Any:
        """Plan -> a call running it on ``x`` (with the backward pass when training), for autotune.

        Nothing is allocated until a candidate is timed: after the first call, a tuned layer only looks up."""

        def make_run(candidate: ContractionPlan) -> Any:
            grad = np.ones((int(np.prod(x.shape[:-1])), *self.spec.out_modes), self.dtype)

            def run() -> object:
                tape: Tape | None = [] if gradients != "none" else None
                y = execute(candidate, x, self.cores, None, _OPS, tape)
                if tape is not None:
                    backprop(candidate.steps, tape, grad, _OPS, self.spec.n_cores + 1)
                return y

            return run

        return make_run

    def backward(self, grad_out: Array) -> Array:
        """Gradient for the last ``forward``'s input; stores the core and bias gradients."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward call in training mode first (see train())")
        plan, x, kept, needs = self._saved
        x_shape = x.shape
        expected = (*x_shape[:-1], self.out_features)
        if not isinstance(grad_out, np.ndarray) or grad_out.shape != expected:
            raise ValueError(
                f"grad_out must be an array of shape {expected}, got {getattr(grad_out, 'shape', grad_out)}"
            )
        grad = np.asarray(grad_out, dtype=self.dtype).reshape(-1, self.out_features)
        rows = x.reshape(-1, self.in_features)
        grads = planned_backward(plan, rows, self.cores, grad, _OPS, needs, kept)  # recomputes what was not kept
        self.core_grads = grads[1:]
        if self.bias is not None:
            self.bias_grad = grad_out.reshape(-1, self.out_features).sum(axis=0)
        self._saved = None
        return grads[0].reshape(x_shape)  # type: ignore[no-any-return]

    def _set_trainable(self, per_core: Sequence[bool], bias: bool) -> None:
        """:meth:`parameters` and :meth:`grads` leave frozen ones out, so optimisers never touch them."""
        self.frozen_cores = frozenset(k for k, trainable in enumerate(per_core) if not trainable)
        self.bias_frozen = not bias

    def _trainable(self) -> list[int]:
        return [k for k in range(self.spec.n_cores) if k not in self.frozen_cores]

    def parameters(self) -> list[Array]:
        """Trainable cores then bias: the arrays an optimiser updates in place (frozen ones left out)."""
        bias = [] if self.bias is None or self.bias_frozen else [self.bias]
        return [*(self.cores[k] for k in self._trainable()), *bias]

    def grads(self) -> list[Array]:
        """Gradients in the order of :meth:`parameters`, from the last ``backward``."""
        bias = [] if self.bias is None or self.bias_frozen else [self.bias_grad]
        grads = [*(self.core_grads[k] for k in self._trainable()), *bias]
        if any(g is None for g in grads):
            raise RuntimeError("no gradients yet: call forward and backward first")
        return grads  # type: ignore[return-value]

    def to_dense(self) -> Array:
        """The dense ``(in_features, out_features)`` matrix of the cores."""
        return tnlayers.to_dense(self.cores)

    def __repr__(self) -> str:
        return f"MPOLinear({self.spec}, bias={self.bias is not None}, dtype={self.dtype}, strategy={self.strategy!r})"


class MPOEmbedding:
    """A ``(num_embeddings, embedding_dim)`` embedding table held as an MPO: ``(*) -> (*, embedding_dim)``.

    Looks rows up by contracting only their slices of the cores (the table is never formed); rows are
    padded to factorable modes (:func:`tnlayers.layer.embedding_spec`) and the padded rows are never
    returned. Forward only (train it in torch or Keras; the cores are portable). A count-weighted table
    (``from_dense(..., counts=)``) also holds ``row_order`` and ``row_scale``: row ``t`` is
    ``row_scale[t] * mpo_row(row_order[t])`` (:func:`tnlayers.layer.weighted_embedding_cores`).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int | Sequence[int] = 8,
        n_cores: int = 4,
        row_modes: Sequence[int] | None = None,
        dim_modes: Sequence[int] | None = None,
        std: float = 1.0,
        seed: int | None = None,
        dtype: DTypeLike = np.float32,
    ) -> None:
        self.spec = kit.embedding_spec(num_embeddings, embedding_dim, rank, n_cores, row_modes, dim_modes)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.cores = tnlayers.init_cores(self.spec, "normal", seed, dtype, std=std)
        self.row_order: Array | None = None
        self.row_scale: Array | None = None
        self.decomposition: DecompositionReport | None = None

    @classmethod
    def from_cores(
        cls, cores: Sequence[Any], num_embeddings: int | None = None, row_order: Any = None, row_scale: Any = None
    ) -> MPOEmbedding:
        """A layer holding copies of the cores (rows: the "in" side); ``num_embeddings`` defaults to all rows.
        ``row_order`` and ``row_scale`` (see the class) are copied too where given."""
        arrays = [np.array(c) for c in cores]
        spec = spec_from_cores(arrays)
        rows = spec.in_features if num_embeddings is None else num_embeddings
        layer = cls(rows, spec.out_features, spec.ranks, row_modes=spec.in_modes, dim_modes=spec.out_modes)
        layer.cores = arrays
        kit.check_row_weights(row_order, row_scale, rows, spec.in_features)
        layer.row_order = None if row_order is None else np.array(row_order, dtype=np.int64)
        layer.row_scale = None if row_scale is None else np.array(row_scale, dtype=arrays[0].dtype)
        return layer

    @classmethod
    def from_dense(
        cls,
        table: Any,
        max_rank: int | Sequence[int] | None = None,
        tol: float | None = None,
        n_cores: int = 4,
        row_modes: Sequence[int] | None = None,
        dim_modes: Sequence[int] | None = None,
        counts: Any = None,
        smoothing: float = kit.DEFAULT_SMOOTHING,
    ) -> MPOEmbedding:
        """TT-SVD of a ``(num_embeddings, embedding_dim)`` table (rows padded); the report is in ``.decomposition``.
        With ``counts`` (lookups per row), the count-weighted fit of :func:`tnlayers.layer.weighted_embedding_cores`
        (the report then holds the weighted table's spectra and the plain ``||E - E'|| / ||E||``)."""
        if counts is None:
            cores, report = kit.embedding_cores(table, max_rank, tol, n_cores, row_modes, dim_modes)
            layer = cls.from_cores(cores, np.shape(table)[0])
        else:
            fit = kit.weighted_embedding_cores(table, counts, max_rank, tol, n_cores, row_modes, dim_modes, smoothing)
            cores, report = fit.cores, kit.weighted_embedding_report(table, fit)
            layer = cls.from_cores(cores, np.shape(table)[0], fit.row_order, fit.row_scale)
        layer.decomposition = report
        return layer

    def __call__(self, indices: Any) -> Array:
        return self.forward(indices)

    def forward(self, indices: Any) -> Array:
        values = np.asarray(indices)
        kit.check_indices(values, self.num_embeddings)
        flat = values.reshape(-1)
        positions = flat if self.row_order is None else self.row_order[flat]
        distinct, repeated = np.unique(positions, return_inverse=True)  # each distinct row once
        rows = np.asarray(kit.embedding_rows(self.cores, distinct, self.spec.in_modes, _gather_rows, _OPS))
        rows = rows[repeated.reshape(-1)]
        if self.row_scale is not None:
            rows = rows * self.row_scale[flat, None]
        return rows.reshape(*values.shape, self.embedding_dim)

    def to_dense(self) -> Array:
        """The ``(num_embeddings, embedding_dim)`` table."""
        table = tnlayers.to_dense(self.cores)
        table = table[: self.num_embeddings] if self.row_order is None else table[self.row_order]
        return table if self.row_scale is None else table * self.row_scale[:, None]

    def save(self, path: str | os.PathLike[str], name: str = "mpo") -> None:
        """Write the cores to a :func:`tnlayers.save` checkpoint; a count-weighted table (``row_order``,
        ``row_scale``) is refused, since the format holds cores and a bias only."""
        if self.row_order is not None or self.row_scale is not None:
            raise ValueError(
                "this MPOEmbedding has row_order/row_scale (a count-weighted fit), which the tnlayers.save format "
                "does not hold; keep them beside the cores (np.save with allow_pickle=False)"
            )
        tnlayers.save(path, self.cores, None, name=name)

    def __repr__(self) -> str:
        return f"MPOEmbedding({self.num_embeddings}, {self.embedding_dim}, {kit.describe(self.spec, False)})"


def _gather_rows(core: Array, digits: Array) -> Array:
    return core.transpose(1, 0, 2, 3)[digits]


def _check_params(params: Sequence[Array]) -> list[Array]:
    params = list(params)
    for k, p in enumerate(params):
        if not isinstance(p, np.ndarray):
            raise TypeError(f"parameter {k} must be a numpy.ndarray (updated in place), got {type(p).__name__}")
    return params


def _check_grads(params: Sequence[Array], grads: Sequence[Array]) -> None:
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    for k, (p, g) in enumerate(zip(params, grads)):
        if np.shape(g) != p.shape:
            raise ValueError(f"gradient {k} has shape {np.shape(g)}, parameter {k} has shape {p.shape}")


class SGD:
    """Stochastic gradient descent with optional momentum and weight decay; updates arrays in place."""

    def __init__(self, params: Sequence[Array], lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = _check_params(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.velocity = [np.zeros_like(p) for p in self.params]

    def step(self, grads: Sequence[Array]) -> None:
        _check_grads(self.params, grads)
        for p, g, v in zip(self.params, grads, self.velocity):
            g = g + self.weight_decay * p if self.weight_decay else g
            if self.momentum:
                v *= self.momentum
                v += g
                g = v
            p -= (self.lr * g).astype(p.dtype, copy=False)


class Adam:
    """Adam (Kingma and Ba, 2015), with decoupled weight decay if ``weight_decay`` > 0 (AdamW)."""

    def __init__(
        self,
        params: Sequence[Array],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.params = _check_params(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads: Sequence[Array]) -> None:
        _check_grads(self.params, grads)
        self.t += 1
        beta1, beta2 = self.betas
        scale = self.lr * np.sqrt(1 - beta2**self.t) / (1 - beta1**self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * g * g
            if self.weight_decay:
                p -= (self.lr * self.weight_decay * p).astype(p.dtype, copy=False)
            p -= (scale * m / (np.sqrt(v) + self.eps)).astype(p.dtype, copy=False)
