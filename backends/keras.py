"""Keras 3 MPO layers, written with ``keras.ops``: they run on the TensorFlow, JAX and torch backends.

>>> import numpy as np
>>> from tnlayers.backends.keras import MPODense
>>> layer = MPODense((4, 7, 7, 4), (4, 4, 4, 4), rank=8)
>>> tuple(layer(np.zeros((2, 784), "float32")).shape)
(2, 256)

The cores are Keras weights made with ``add_weight`` (``core_0 .. core_{n-1}``, layout
``(r, in, out, r')``, then ``bias``), so Keras tracks, trains, saves and distributes them. The
contraction is the core's plan for the batch-size bucket, run as a few ``keras.ops.tensordot`` (on
TensorFlow) or ``keras.ops.einsum`` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import keras
import numpy as np
from keras import ops

import tnlayers
from tnlayers import layer as kit
from tnlayers.contract import (
    ArrayOps,
    dense_weight,
    execute,
    plan_operands,
    planned_backward,
    run_keeping,
    run_steps,
    tensordot_pairwise,
)
from tnlayers.decompose import DecompositionReport, spec_from_cores
from tnlayers.plan import DEFAULT_BATCH, ContractionPlan, Pairwise

__all__ = ["MPOConv2D", "MPODense", "MPOEmbedding", "compress"]

_BACKEND = keras.backend.backend()


def _tensordot_pairwise(step: Pairwise, a: Any, b: Any) -> Any:
    return tensordot_pairwise(ops.tensordot, ops.transpose, step, a, b)


def _einsum_pairwise(step: Pairwise, a: Any, b: Any) -> Any:
    return ops.einsum(step.equation, a, b)


def _restore_leading(y: Any, x: Any, out: int) -> Any:
    leading = tuple(x.shape[:-1])
    if any(d is None for d in leading):
        dynamic = ops.shape(x)
        leading = tuple(dynamic[k] if d is None else d for k, d in enumerate(leading))
    return ops.reshape(y, (*leading, out))


# tensordot on TensorFlow: 3x faster than einsum there at batch 512 (the same at batch 1). Elsewhere
# einsum: keras.ops.tensordot computes float64 in float32 on the torch backend (Keras 3.15).
_OPS = ArrayOps(
    name="keras",
    pairwise=_tensordot_pairwise if _BACKEND == "tensorflow" else _einsum_pairwise,
    reshape=ops.reshape,
    restore_leading=_restore_leading,
    transpose=ops.transpose,
    # W's halves, W and its gradients as plain matrix products; not on torch, where keras.ops.matmul
    # computes float64 in float32 (Keras 3.15), nor on JAX (einsum there, as for the steps)
    matmul=ops.matmul if _BACKEND == "tensorflow" else None,
)


def _static_rows(shape: Sequence[int | None]) -> int | None:
    """The product of the given dimensions, or ``None`` when one is unknown (a traced batch)."""
    if any(not isinstance(d, (int, np.integer)) or isinstance(d, bool) for d in shape):
        return None  # unknown or symbolic (jax.export shape polymorphism): the default bucket
    return math.prod(shape)  # type: ignore[arg-type]


@functools.cache
def _default_device() -> str:
    """The device Keras places new tensors on: part of the autotune key, readable inside compiled calls."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    if _BACKEND == "jax":
        import jax

        return str(jax.default_backend())
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _concrete(x: Any) -> bool:
    """Whether ``x`` holds values now (an eager call), so candidate plans can be timed on it."""
    if keras.backend.is_keras_tensor(x) or any(d is None for d in x.shape):
        return False
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        return bool(tf.executing_eagerly())
    if _BACKEND == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    import torch

    return not torch.compiler.is_compiling() and x.device.type != "meta"


def _timer(x: Any, cores: Sequence[Any], gradients: str) -> Callable[[ContractionPlan], Callable[[], object]]:
    """Plan -> a call running it on ``x`` (forward, with the backward pass when training), for autotune.

    Nothing is converted until a candidate is timed: after the first call, a tuned layer only looks up."""

    def make_run(candidate: ContractionPlan) -> Callable[[], object]:
        data = ops.convert_to_tensor(x)
        values = [ops.convert_to_tensor(ops.convert_to_numpy(core)) for core in cores]  # plain tensors

        def loss(x: Any, *cores: Any) -> Any:
            return ops.sum(execute(candidate, x, list(cores), None, _OPS))

        if gradients == "none":
            return lambda: ops.convert_to_numpy(loss(data, *values))
        return lambda: [ops.convert_to_numpy(g) for g in _gradients_of(loss, data, values)]

    return make_run


def _gradients_of(loss: Callable[..., Any], x: Any, values: Sequence[Any]) -> list[Any]:
    """Gradients of ``loss(x, *values)`` with respect to all its arguments, by the backend's autodiff."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch([x, *values])
            result = loss(x, *values)
        return list(tape.gradient(result, [x, *values]))
    if _BACKEND == "jax":
        import jax

        return list(jax.grad(loss, argnums=tuple(range(len(values) + 1)))(x, *values))
    leaves = [v.detach().requires_grad_(True) for v in (x, *values)]
    loss(*leaves).backward()
    return [leaf.grad for leaf in leaves]


def _tape_may_record() -> bool:
    """Whether a TensorFlow tape may record the backward now (a gradient of a gradient); ``True`` if unknown."""
    try:
        from tensorflow.python.eager import record

        return bool(record.could_possibly_record())
    except (ImportError, AttributeError):  # the private module moved: recompute, right for any order
        return True


def _bounded_tensorflow(
    plan: ContractionPlan,
    x: Any,
    cores: Sequence[Any],
    bias: Any,
    needs: tuple[bool, ...],
    keep: frozenset[int] | None,
) -> Any:
    """``x @ W + bias`` (``x`` of shape ``(..., in_features)``) whose backward is the core's planned backward.

    The forward runs on ``tf.stop_gradient`` copies of the inputs, so no tape holds its intermediates,
    and keeps only ``keep`` (``None``: all the backward reads, ``W`` for a plan that builds it). The
    backward recomputes the rest from ``x`` and the cores; under an outer tape (a second derivative) it
    recomputes everything, so the gradients' own graph reaches ``x`` and the cores. The bias is added
    inside: a tape keeps a custom gradient's output, which is so the layer's output, not one more array.
    """
    import tensorflow as tf

    weight_only = plan.builds_weight and keep is not None and not keep
    if keep is None:
        keep = kit.backward_intermediates(plan, needs)

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def run(x: Any, *weights: Any) -> Any:
        cores = weights[: plan.spec.n_cores]
        x_held = ops.reshape(tf.stop_gradient(x), (-1, plan.spec.in_features))
        cores_held = [tf.stop_gradient(core) for core in cores]
        weight = None
        if plan.builds_weight:
            weight = dense_weight(cores_held, _OPS)
            y, kept = ops.matmul(x_held, weight), {}
            if weight_only:
                weight = None  # not held by the backward's closure: built again there
        else:
            y, values = run_keeping(plan.steps, plan_operands(plan, x_held, cores_held, _OPS), _OPS, keep)
            kept = dict(zip(sorted(keep), values))

        def backward(grad: Any) -> list[Any]:
            again = _tape_may_record()
            held = None if again else weight
            rows, grad = ops.reshape(x, (-1, plan.spec.in_features)), ops.reshape(grad, (-1, plan.spec.out_features))
            kept_now = None if plan.builds_weight else {} if again else kept
            grad_x, *grads = planned_backward(plan, rows, cores, grad, _OPS, needs, kept_now, held)
            grad_x = tf.reshape(grad_x, tf.shape(x))  # the input's shape, so the tape holds no reshape
            grad_bias = [] if bias is None else [ops.sum(grad, axis=0)]
            return [grad_x, *(ops.zeros_like(c) if g is None else g for g, c in zip(grads, cores)), *grad_bias]

        y = _restore_leading(y, x, plan.spec.out_features)
        return (y if bias is None else y + tf.stop_gradient(weights[-1])), backward

    weights = [tf.convert_to_tensor(w) for w in (*cores, *([] if bias is None else [bias]))]  # read here: no variables
    return run(x, *weights)


def _bounded_jax(
    plan: ContractionPlan, x: Any, cores: Sequence[Any], needs: tuple[bool, ...], keep: frozenset[int] | None
) -> Any:
    """``x @ W`` (``x`` of shape ``(..., in_features)``) under ``jax.checkpoint``, whose policy saves only
    ``keep`` (``None``: all the backward reads, ``W`` for a plan that builds it) besides the inputs."""
    import jax
    from jax.ad_checkpoint import checkpoint_name

    n_operands = plan.spec.n_cores + 1
    if plan.builds_weight:
        saved = ["tnlayers_weight"] if keep is None else []

        def forward(x: Any, *cores: Any) -> Any:
            weight = checkpoint_name(dense_weight(cores, _OPS), "tnlayers_weight")  # type: ignore[no-untyped-call]
            return ops.matmul(x, weight)

    else:
        saved = [f"tnlayers_{k}" for k in sorted(kit.backward_intermediates(plan, needs) if keep is None else keep)]

        def forward(x: Any, *cores: Any) -> Any:
            ids = itertools.count(n_operands)  # step k's output has id n_operands + k (contract.step_ids)

            def named(step: Pairwise, a: Any, b: Any) -> Any:
                return checkpoint_name(_OPS.pairwise(step, a, b), f"tnlayers_{next(ids)}")  # type: ignore[no-untyped-call]

            steps_ops = dataclasses.replace(_OPS, pairwise=named)
            y = run_steps(plan.steps, plan_operands(plan, x, cores, steps_ops), steps_ops)
            return _restore_leading(y, x, plan.spec.out_features)

    policy = jax.checkpoint_policies.save_only_these_names(*saved)
    return jax.checkpoint(forward, policy=policy)(x, *cores)


class _MPOLayer(kit.MPOLayerMixin, keras.layers.Layer):  # type: ignore[misc]
    """Shared by the dense and conv layers: weights, config, init, planning and the portable checkpoint."""

    def __init__(
        self,
        in_modes: Sequence[int] | None,
        out_modes: Sequence[int] | None,
        rank: int | Sequence[int],
        n_cores: int | None,
        use_bias: bool,
        activation: Any,
        kernel_init: str,
        strategy: Any,
        seed: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kernel_init = kit.check_init(kernel_init, "kernel_init")
        self.in_modes = kit.modes_or_none(in_modes, "in_modes")
        self.out_modes = kit.modes_or_none(out_modes, "out_modes")
        self.rank = rank if isinstance(rank, int) else tuple(rank)
        self.n_cores = n_cores
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.strategy = strategy
        self.seed = seed
        self.spec: tnlayers.MPOSpec | None = None
        self.planner: kit.LayerPlanner | None = None
        self.decomposition: DecompositionReport | None = None

    def _make_weights(self, in_features: int, out_features: int, what: str, out_what: str) -> None:
        spec = kit.layer_spec(
            in_features, out_features, self.in_modes, self.out_modes, self.rank, self.n_cores, what, out_what
        )
        self.spec, self.in_modes, self.out_modes, self.rank = spec, spec.in_modes, spec.out_modes, spec.ranks
        self.planner = kit.LayerPlanner.make(spec, self.strategy, _BACKEND)
        seed = kit.draw_seed(self.seed, lambda high: np.random.randint(0, high))  # noqa: NPY002 (keras seeds it)
        values = tnlayers.init_cores(spec, self.kernel_init, seed, np.float64)
        self.cores = [
            self.add_weight(name=f"core_{k}", shape=value.shape, initializer=_constant(value))
            for k, value in enumerate(values)
        ]
        self.bias = self.add_weight(name="bias", shape=(out_features,), initializer="zeros") if self.use_bias else None

    def _plan(self, x: Any, rows: int | None, training: bool | None) -> ContractionPlan:
        """The plan for this call (see :class:`tnlayers.layer.LayerPlanner` for the autotune policy).

        Keras says whether gradients will be taken by ``training``: a train step passes ``True``."""
        planner = self._built_planner
        cores = self._checked_cores()
        trainable = any(core.trainable for core in cores) and self.trainable
        gradients = kit.gradients_needed(bool(training), trainable, True)
        if not planner.autotunes:
            return planner.plan(rows, gradients)
        key = kit.tune_key("keras-" + _BACKEND, _default_device(), str(self.compute_dtype), gradients)
        timer = _timer(x, cores, gradients) if _concrete(x) else None
        return planner.plan(rows, gradients, key, timer)

    def _contract(self, plan: ContractionPlan, x: Any, rows: int | None, training: bool | None) -> Any:
        """``x @ W + bias`` by ``plan``. In training, what is kept for the backward stays within
        ``saved_budget`` times the bytes of ``x``: the core's planned backward recomputes the rest (from
        :data:`tnlayers.layer.MIN_BOUNDED_ROWS` rows; an unknown batch is bounded as the default bucket)."""
        cores, bias, budget = list(self.cores), self.bias, self.saved_budget
        bounded_rows = DEFAULT_BATCH if rows is None else rows
        if not training or budget is None or bounded_rows < kit.MIN_BOUNDED_ROWS:
            return execute(plan, x, cores, bias, _OPS)
        values = [ops.convert_to_tensor(core) for core in cores]  # a Keras autocast scope casts them here
        if _BACKEND == "torch":  # torch's own planned backward (autograd.Function)
            from tnlayers.backends.torch import run_plan

            # the bias as a tensor too: the planned forward adds it, and autograd tracks only tensor inputs
            return run_plan(plan, x, values, None if bias is None else ops.convert_to_tensor(bias), budget)
        needs = (True, *(self.trainable and bool(core.trainable) for core in cores))  # x's: not known here
        keep = kit.kept_for_backward(plan, bounded_rows, needs, budget)
        if _BACKEND == "tensorflow":
            return _bounded_tensorflow(plan, x, values, bias, needs, keep)
        y = _bounded_jax(plan, x, values, needs, keep)
        return y if bias is None else y + bias

    def _finish(self, y: Any) -> Any:
        return y if self.activation is None else self.activation(y)

    def weight_matrix(self) -> Any:
        """``W`` of shape ``(in_features, out_features)`` (like ``Dense.kernel``), differentiable."""
        return dense_weight(self._checked_cores(), _OPS)

    def _checked_cores(self) -> list[Any]:
        self.built_spec  # noqa: B018  (raises if not built)
        return list(self.cores)

    def numpy_weights(self) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The cores and bias as NumPy arrays."""
        cores = [ops.convert_to_numpy(c) for c in self._checked_cores()]
        return cores, None if self.bias is None else ops.convert_to_numpy(self.bias)

    def set_numpy_weights(self, cores: Sequence[Any], bias: Any = None) -> None:
        """Assign cores (and bias) of this layer's shapes, e.g. from another framework."""
        own = self._checked_cores()
        shapes = [tuple(c.shape) for c in own]
        given = [tuple(np.shape(c)) for c in cores]
        if given != shapes:
            raise ValueError(f"cores of shapes {given} do not fit this layer's cores {shapes}")
        for variable, value in zip(own, cores):
            variable.assign(np.asarray(value, dtype=variable.dtype))
        if (bias is None) != (self.bias is None):
            raise ValueError(
                f"the layer has use_bias={self.use_bias}, but a bias was{' not' if bias is None else ''} given"
            )
        if self.bias is not None:
            self.bias.assign(np.asarray(bias, dtype=self.bias.dtype))

    def _set_trainable(self, per_core: Sequence[bool], bias: bool) -> None:
        for core, trainable in zip(self.cores, per_core):
            core.trainable = trainable
        if self.bias is not None:
            self.bias.trainable = bias

    def save(self, path: str | os.PathLike[str], name: str = "mpo") -> None:
        """Write the cores and bias to a portable :func:`tnlayers.save` checkpoint."""
        cores, bias = self.numpy_weights()
        tnlayers.save(path, cores, bias, name=name)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            in_modes=None if self.in_modes is None else list(self.in_modes),
            out_modes=None if self.out_modes is None else list(self.out_modes),
            rank=self.rank if isinstance(self.rank, int) else list(self.rank),
            n_cores=self.n_cores,
            use_bias=self.use_bias,
            activation=keras.activations.serialize(self.activation) if self.activation is not None else None,
            kernel_init=self.kernel_init,
            strategy=self._strategy_config(),
            seed=self.seed,
            saved_budget=self.saved_budget,
        )
        return config

    def _strategy_config(self) -> Any:
        key = self.planner.strategy if self.planner is not None else self.strategy
        return [list(pair) for pair in key] if isinstance(key, tuple) else key

    @property
    def _built_planner(self) -> kit.LayerPlanner:
        self.built_spec  # noqa: B018  (raises if not built)
        return cast(kit.LayerPlanner, self.planner)  # set together with spec


def _constant(value: np.ndarray) -> Any:
    def initializer(shape: Any, dtype: Any = None) -> Any:
        return ops.convert_to_tensor(value.reshape(shape), dtype=dtype)

    return initializer


@keras.saving.register_keras_serializable(package="tnlayers")
class MPODense(_MPOLayer):
    """``keras.layers.Dense`` with its ``(in, units)`` kernel stored as MPO cores: ``y = activation(x @ W + b)``.

    Give ``units`` (first, as for ``Dense``: ``MPODense(256, activation="relu")``) or ``out_modes``,
    or both; missing modes are balanced factorisations over ``n_cores`` cores (4 by default, or as many
    as the modes given). Inputs have any leading shape.
    """

    def __init__(
        self,
        in_modes: int | Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        rank: int | Sequence[int] = 8,
        units: int | None = None,
        n_cores: int | None = None,
        use_bias: bool = True,
        activation: Any = None,
        kernel_init: str = "glorot",
        strategy: Any = "auto",
        seed: int | None = None,
        saved_budget: float | None = kit.DEFAULT_SAVED_BUDGET,
        **kwargs: Any,
    ) -> None:
        if isinstance(in_modes, int) and not isinstance(in_modes, bool):  # MPODense(256): Dense's units first
            if units is not None and units != in_modes:
                raise ValueError(f"MPODense got units twice: {in_modes} (first argument) and units={units}")
            units, in_modes = in_modes, None
        modes = cast(Sequence[int] | None, in_modes)
        super().__init__(modes, out_modes, rank, n_cores, use_bias, activation, kernel_init, strategy, seed, **kwargs)
        self.saved_budget = saved_budget
        if units is None and self.out_modes is None:
            raise ValueError("MPODense needs units or out_modes, got neither")
        if units is not None and (not isinstance(units, int) or isinstance(units, bool) or units < 1):
            raise ValueError(f"units must be a positive int, got {units!r}")
        if units is not None and self.out_modes is not None and math.prod(self.out_modes) != units:
            raise ValueError(f"out_modes {self.out_modes} multiply to {math.prod(self.out_modes)}, not units={units}")
        self.units = units if units is not None else math.prod(self.out_modes)  # type: ignore[arg-type]

    def build(self, input_shape: Sequence[int | None]) -> None:
        if input_shape[-1] is None:
            raise ValueError(f"MPODense needs a known last input dimension, got input shape {tuple(input_shape)}")
        self._make_weights(int(input_shape[-1]), self.units, "the last input dimension", "units")

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        kit.check_input(tuple(inputs.shape), self.built_spec.in_features, "MPODense")
        rows = _static_rows(inputs.shape[:-1])
        plan = self._plan(inputs, rows, training)
        return self._finish(self._contract(plan, inputs, rows, training))

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return (*input_shape[:-1], self.units)

    def to_dense(self) -> Any:
        """The ``(in_features, units)`` matrix ``Dense.kernel`` would hold (a backend tensor)."""
        return self.weight_matrix()

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": self.units}

    @classmethod
    def from_cores(cls, cores: Sequence[Any], bias: Any = None, **kwargs: Any) -> MPODense:
        """A built layer holding the given cores (any framework's arrays) and bias."""
        arrays = [np.asarray(c) for c in cores]
        spec = spec_from_cores(arrays)
        layer = cls(spec.in_modes, spec.out_modes, spec.ranks, use_bias=bias is not None, **kwargs)
        layer.build((None, spec.in_features))
        layer.set_numpy_weights(arrays, None if bias is None else np.asarray(bias))
        return layer

    @classmethod
    def from_dense(
        cls,
        dense: Any,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        max_rank: int | Sequence[int] | None = None,
        tol: float | None = None,
        n_cores: int = 4,
        strategy: Any = "auto",
        **kwargs: Any,
    ) -> MPODense:
        """TT-SVD of a trained ``keras.layers.Dense`` (bias and activation copied); report in ``.decomposition``.
        ``kwargs`` go to the layer (``name=``, for one)."""
        if not isinstance(dense, keras.layers.Dense) or not dense.built:
            raise TypeError(f"from_dense expects a built keras.layers.Dense, got {type(dense).__name__}")
        matrix = np.asarray(ops.convert_to_numpy(dense.kernel), dtype=np.float64)
        cores, report = tnlayers.from_dense(matrix, in_modes, out_modes, max_rank, tol, n_cores=n_cores)
        bias = ops.convert_to_numpy(dense.bias) if dense.use_bias else None
        kwargs.setdefault("dtype", dense.dtype_policy)
        layer = cls.from_cores(cores, bias, activation=dense.activation, strategy=strategy, **kwargs)
        layer.decomposition = report
        return layer


@keras.saving.register_keras_serializable(package="tnlayers")
class MPOConv2D(_MPOLayer):
    """``keras.layers.Conv2D`` (channels last) whose kernel, as a ``(channels*kh*kw, filters)`` matrix, is an MPO.

    The rows are ordered ``(channel, kernel row, kernel column)``, as in the PyTorch ``MPOConv2d``,
    so one checkpoint serves both. Per input size the cost model picks between building the kernel
    and calling ``keras.ops.conv``, and contracting the cores with the extracted patches.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | Sequence[int],
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        rank: int | Sequence[int] = 8,
        strides: int | Sequence[int] = 1,
        padding: str = "valid",
        dilation_rate: int | Sequence[int] = 1,
        n_cores: int | None = None,
        use_bias: bool = True,
        activation: Any = None,
        kernel_init: str = "glorot",
        strategy: Any = "auto",
        seed: int | None = None,
        saved_budget: float | None = kit.DEFAULT_SAVED_BUDGET,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_modes, out_modes, rank, n_cores, use_bias, activation, kernel_init, strategy, seed, **kwargs
        )
        self.saved_budget = saved_budget
        if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
            raise ValueError(f"filters must be a positive int, got {filters!r}")
        self.filters = filters
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding.lower()
        self.geometry = kit.ConvGeometry.make(kernel_size, strides, self.padding, dilation_rate)
        self.kernel_size, self.strides = self.geometry.kernel_size, self.geometry.stride
        self.dilation_rate = self.geometry.dilation
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(f"strides {self.strides} and dilation_rate {self.dilation_rate} cannot both exceed 1")

    def build(self, input_shape: Sequence[int | None]) -> None:
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                f"MPOConv2D expects inputs (batch, height, width, channels), got shape {tuple(input_shape)}"
            )
        self.channels = int(input_shape[-1])
        kh, kw = self.kernel_size
        self._make_weights(
            self.channels * kh * kw, self.filters, f"channels*kh*kw = {self.channels}*{kh}*{kw}", "filters"
        )

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        _, height, width, _ = input_shape
        extent = self.geometry.extent
        rows, cols = self.geometry.output_size(height or extent[0], width or extent[1])
        return (input_shape[0], None if height is None else rows, None if width is None else cols, self.filters)

    @classmethod
    def from_cores(
        cls, cores: Sequence[Any], bias: Any = None, *, kernel_size: int | Sequence[int], **kwargs: Any
    ) -> MPOConv2D:
        """A built conv holding the given cores (of the ``(channels*kh*kw, filters)`` matrix, any framework's
        arrays, e.g. from a PyTorch ``MPOConv2d``) and bias; ``kernel_size`` is needed, ``strides``,
        ``padding`` and the rest may follow. ``MPOConv2D.load(path, kernel_size=3)`` reads a checkpoint."""
        arrays = [np.asarray(c) for c in cores]
        spec = spec_from_cores(arrays)
        kernel, channels = kit.conv_channels(spec, kernel_size)
        layer = cls(
            spec.out_features, kernel, spec.in_modes, spec.out_modes, spec.ranks, use_bias=bias is not None, **kwargs
        )
        layer.build((None, None, None, channels))
        layer.set_numpy_weights(arrays, None if bias is None else np.asarray(bias))
        return layer

    def kernel(self) -> Any:
        """The ``(kh, kw, channels, filters)`` kernel ``Conv2D.kernel`` would hold (differentiable)."""
        kh, kw = self.kernel_size
        matrix = ops.reshape(self.weight_matrix(), (self.channels, kh, kw, self.filters))
        return ops.transpose(matrix, (1, 2, 0, 3))

    def to_dense(self) -> Any:
        """Same as :meth:`kernel`."""
        return self.kernel()

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        _, height, width, _ = self.compute_output_shape(tuple(inputs.shape))
        spec = self.built_spec
        rows = _static_rows((inputs.shape[0], height, width))
        plan, build_kernel = self._built_planner.conv_route(rows)
        if build_kernel:
            y = ops.conv(inputs, self.kernel(), self.strides, self.padding, dilation_rate=self.dilation_rate)
            return self._finish(y if self.bias is None else y + self.bias)
        kh, kw = self.kernel_size
        patches = ops.image.extract_patches(
            inputs, (kh, kw), self.strides, self.dilation_rate, self.padding, data_format="channels_last"
        )
        shape = ops.shape(patches)[:3]
        # patches come as (kh, kw, channels); the MPO's rows are (channels, kh, kw)
        patches = ops.reshape(patches, (*shape, kh, kw, self.channels))
        patches = ops.reshape(ops.transpose(patches, (0, 1, 2, 5, 3, 4)), (*shape, spec.in_features))
        return self._finish(self._contract(plan, patches, rows, training))

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": list(self.kernel_size),
            "strides": list(self.strides),
            "padding": self.padding,
            "dilation_rate": list(self.dilation_rate),
        }


@keras.saving.register_keras_serializable(package="tnlayers")
class MPOEmbedding(keras.layers.Layer):  # type: ignore[misc]
    """``keras.layers.Embedding`` whose ``(input_dim, output_dim)`` table is an MPO: ``(*) -> (*, output_dim)``.

    A lookup contracts only the looked-up rows' slices of the cores (the table is never formed). Rows are
    padded to factorable modes (:func:`tnlayers.layer.embedding_spec`); the padded rows are never
    returned, and an index outside ``[0, input_dim)`` is a ``ValueError`` in eager calls. Entries start
    with variance ``std**2``. A count-weighted table (``from_dense(..., counts=)``, ``weighted_rows=True``)
    also holds the weights ``row_order`` (int32, not trained) and ``row_scale``: row ``t`` is
    ``row_scale[t] * mpo_row(row_order[t])`` (:func:`tnlayers.layer.weighted_embedding_cores`).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        rank: int | Sequence[int] = 8,
        n_cores: int = 4,
        row_modes: Sequence[int] | None = None,
        dim_modes: Sequence[int] | None = None,
        std: float = 0.05,
        seed: int | None = None,
        weighted_rows: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = kit.embedding_spec(input_dim, output_dim, rank, n_cores, row_modes, dim_modes)
        self.input_dim, self.output_dim, self.std, self.seed = int(input_dim), int(output_dim), std, seed
        seed_value = kit.draw_seed(seed, lambda high: np.random.randint(0, high))  # noqa: NPY002 (keras seeds it)
        values = tnlayers.init_cores(self.spec, "normal", seed_value, np.float64, std=std)
        self.cores = [
            self.add_weight(name=f"core_{k}", shape=value.shape, initializer=_constant(value))
            for k, value in enumerate(values)
        ]
        self.row_order: Any = None
        self.row_scale: Any = None
        if weighted_rows:  # identity order and unit scales until set (a loaded model's values replace them)
            self.row_order = self.add_weight(
                name="row_order", shape=(self.input_dim,), dtype="int32", trainable=False,
                initializer=_constant(np.arange(self.input_dim, dtype=np.int32)),
            )  # fmt: skip
            self.row_scale = self.add_weight(name="row_scale", shape=(self.input_dim,), initializer="ones")
        self.decomposition: tnlayers.decompose.DecompositionReport | None = None

    def call(self, inputs: Any) -> Any:
        if _concrete(inputs):
            kit.check_indices(ops.convert_to_numpy(inputs), self.input_dim)
        indices = ops.cast(inputs, "int32")
        flat = ops.reshape(indices, (-1,))
        positions = flat if self.row_order is None else ops.take(self.row_order, flat)
        rows = kit.embedding_rows(self.cores, positions, self.spec.in_modes, _gather_rows, _OPS)
        if self.row_scale is not None:
            rows = rows * ops.expand_dims(ops.take(self.row_scale, flat), -1)
        return ops.reshape(rows, (*ops.shape(indices), self.output_dim))

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return (*input_shape, self.output_dim)

    def to_dense(self) -> Any:
        """The ``(input_dim, output_dim)`` table (a backend tensor)."""
        table = dense_weight(list(self.cores), _OPS)
        table = table[: self.input_dim] if self.row_order is None else ops.take(table, self.row_order, axis=0)
        return table if self.row_scale is None else table * ops.expand_dims(self.row_scale, -1)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "rank": list(self.spec.ranks[1:-1]),
            "row_modes": list(self.spec.in_modes),
            "dim_modes": list(self.spec.out_modes),
            "std": self.std,
            "seed": self.seed,
            "weighted_rows": self.row_order is not None,
        }

    @classmethod
    def from_cores(
        cls,
        cores: Sequence[Any],
        input_dim: int | None = None,
        row_order: Any = None,
        row_scale: Any = None,
        **kwargs: Any,
    ) -> MPOEmbedding:
        """A layer holding the given cores (rows: the "in" side); ``input_dim`` defaults to all rows.
        ``row_order`` and ``row_scale`` (both or neither; see the class) make a count-weighted table."""
        arrays = [np.asarray(c) for c in cores]
        spec = spec_from_cores(arrays)
        rows = spec.in_features if input_dim is None else input_dim
        if (row_order is None) != (row_scale is None):
            raise ValueError("the Keras MPOEmbedding takes row_order and row_scale together (or neither)")
        kit.check_row_weights(row_order, row_scale, rows, spec.in_features)
        layer = cls(
            rows, spec.out_features, spec.ranks[1:-1], row_modes=spec.in_modes, dim_modes=spec.out_modes,
            weighted_rows=row_order is not None, **kwargs,
        )  # fmt: skip
        for core, array in zip(layer.cores, arrays):
            core.assign(array.astype(np.float32 if core.dtype == "float32" else array.dtype))
        if row_order is not None:
            layer.row_order.assign(np.asarray(row_order).astype(np.int32))
            layer.row_scale.assign(np.asarray(row_scale).astype(layer.row_scale.dtype))
        return layer

    @classmethod
    def from_dense(
        cls,
        embedding: Any,
        max_rank: int | Sequence[int] | None = None,
        tol: float | None = None,
        n_cores: int = 4,
        row_modes: Sequence[int] | None = None,
        dim_modes: Sequence[int] | None = None,
        counts: Any = None,
        smoothing: float = kit.DEFAULT_SMOOTHING,
        **kwargs: Any,
    ) -> MPOEmbedding:
        """TT-SVD of a built ``keras.layers.Embedding``'s table (rows padded); the report in ``.decomposition``.
        With ``counts`` (lookups per row), the count-weighted fit of :func:`tnlayers.layer.weighted_embedding_cores`
        (the report then holds the weighted table's spectra and the plain
        ``||E - E'|| / ||E||``). ``kwargs`` go to the layer (``name=``, for one)."""
        if not isinstance(embedding, keras.layers.Embedding) or not embedding.built:
            raise TypeError(f"from_dense expects a built keras.layers.Embedding, got {type(embedding).__name__}")
        table = np.asarray(ops.convert_to_numpy(embedding.embeddings), dtype=np.float64)
        kwargs.setdefault("dtype", embedding.dtype_policy)
        if counts is None:
            cores, report = kit.embedding_cores(table, max_rank, tol, n_cores, row_modes, dim_modes)
            layer = cls.from_cores(cores, table.shape[0], **kwargs)
        else:
            fit = kit.weighted_embedding_cores(table, counts, max_rank, tol, n_cores, row_modes, dim_modes, smoothing)
            cores, report = fit.cores, kit.weighted_embedding_report(table, fit)
            layer = cls.from_cores(cores, table.shape[0], fit.row_order, fit.row_scale, **kwargs)
        layer.decomposition = report
        return layer


def _gather_rows(core: Any, digits: Any) -> Any:
    return ops.transpose(ops.take(core, digits, axis=1), (1, 0, 2, 3))


def _conv_from_keras(
    conv: Any, max_rank: int | Sequence[int] | None, tol: float | None, n_cores: int
) -> tuple[MPOConv2D, DecompositionReport]:
    """TT-SVD of a built ``keras.layers.Conv2D`` kernel (rows ordered channel, kernel row, kernel column)."""
    kernel = np.asarray(ops.convert_to_numpy(conv.kernel), dtype=np.float64)  # (kh, kw, channels, filters)
    kh, kw, channels, filters = kernel.shape
    matrix = kernel.transpose(2, 0, 1, 3).reshape(channels * kh * kw, filters)
    cores, report = tnlayers.from_dense(matrix, None, None, max_rank, tol, n_cores=n_cores)
    bias = ops.convert_to_numpy(conv.bias) if conv.use_bias else None
    layer = MPOConv2D.from_cores(
        cores, bias, kernel_size=(kh, kw), strides=conv.strides, padding=conv.padding,
        dilation_rate=conv.dilation_rate, activation=conv.activation, dtype=conv.dtype_policy, name=conv.name,
    )  # fmt: skip
    layer.decomposition = report
    return layer, report


def collect_grams(model: Any, batches: Any, names: Sequence[str]) -> dict[str, Any]:
    """``X^T X`` (float64) of the inputs of the named ``Dense`` layers of a built Sequential or functional
    model over one pass of ``batches`` (each what ``model(batch)`` takes); for a named ``Embedding``, how
    often each row is looked up. What the PyTorch ``collect_grams`` gives, from a model that returns the
    layers' inputs; ``X`` itself is never kept."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"collect_grams expects a keras.Model, got {type(model).__name__}")
    layers = [model.get_layer(name) for name in names]
    for layer in layers:
        if not isinstance(layer, (keras.layers.Dense, keras.layers.Embedding)):
            raise TypeError(
                f"collect_grams reads Dense and Embedding inputs; {layer.name!r} is a {type(layer).__name__}"
            )
    if not layers:
        return {}
    try:
        probe = keras.Model(model.input, [layer.input for layer in layers])
    except (AttributeError, ValueError) as error:  # a subclassed model has no graph to read inputs from
        raise ValueError(
            f"calibration reads the layers' inputs from the model's graph; {model.name!r} has none that gives "
            f"them (a Sequential or functional model, each layer called once): {error}"
        ) from error
    grams: dict[str, Any] = {}
    for batch in batches:
        found = probe(batch)
        for layer, value in zip(layers, found if isinstance(found, (list, tuple)) else [found]):
            array = ops.convert_to_numpy(value)
            if isinstance(layer, keras.layers.Embedding):
                counts = np.bincount(array.reshape(-1).astype(np.int64), minlength=layer.input_dim).astype(np.float64)
                grams[layer.name] = grams[layer.name] + counts if layer.name in grams else counts
            else:
                grams.setdefault(layer.name, tnlayers.calibrate.Gram(int(array.shape[-1]))).add(array)
    if not grams:
        raise ValueError("the calibration batches reached none of the layers to compress (was it empty?)")
    return grams


def _kernel_matrix(layer: Any) -> np.ndarray:
    """The float64 ``(in, out)`` matrix an MPO of a ``Dense``, ``Conv2D`` (rows: channel, kernel row, kernel
    column) or ``Embedding`` (its table) stands for."""
    if isinstance(layer, keras.layers.Embedding):
        return np.asarray(ops.convert_to_numpy(layer.embeddings), dtype=np.float64)
    kernel = np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float64)
    if kernel.ndim == 4:  # (kh, kw, channels, filters)
        return kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1])
    return kernel


def _fitted_keras(
    layer: Any, gram: Any, cap: Any, tol: float | None, n_cores: int, sweeps: int, two_site: bool, ridge: float
) -> tuple[Any, DecompositionReport, float | None]:
    """The MPO layer for ``layer``, its decomposition report and (calibrated) relative output error."""
    if isinstance(layer, keras.layers.Embedding):
        embedding = MPOEmbedding.from_dense(layer, cap, tol, n_cores, counts=gram, name=layer.name)
        report = cast(DecompositionReport, embedding.decomposition)
        if gram is None:
            return embedding, report, None
        table = np.asarray(ops.convert_to_numpy(embedding.to_dense()), dtype=np.float64)
        return embedding, report, tnlayers.calibrate.output_error(table, _kernel_matrix(layer), gram)
    if isinstance(layer, keras.layers.Conv2D):
        return (*_conv_from_keras(layer, cap, tol, n_cores), None)
    if gram is None:
        dense = MPODense.from_dense(layer, max_rank=cap, tol=tol, n_cores=n_cores, name=layer.name)
        return dense, cast(DecompositionReport, dense.decomposition), None
    matrix = _kernel_matrix(layer)
    cores, fit = tnlayers.calibrated_fit(
        matrix, gram, None, None, cap, tol, n_cores=n_cores, sweeps=sweeps, two_site=two_site, ridge=ridge
    )
    bias = ops.convert_to_numpy(layer.bias) if layer.use_bias else None
    dense = MPODense.from_cores(cores, bias, activation=layer.activation, dtype=layer.dtype_policy, name=layer.name)
    report = DecompositionReport(fit.spec, fit.weight_error, ())
    dense.decomposition = report
    return dense, report, fit.error


def _candidate_shape(layer: Any, skipped: list[tuple[str, str]]) -> tuple[int, int] | None:
    """``(in, out)`` of the matrix an MPO of ``layer`` would stand for, or ``None`` (not one ``compress``
    replaces; a reason joins ``skipped`` where it is a kind it replaces in other settings)."""
    if isinstance(layer, keras.layers.Dense) and not isinstance(layer, _MPOLayer):
        return int(layer.kernel.shape[0]), int(layer.kernel.shape[1])
    if isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D:
        if layer.data_format != "channels_last" or layer.groups != 1:
            skipped.append((layer.name, f"data_format={layer.data_format!r}, groups={layer.groups} not supported"))
            return None
        kh, kw, channels, filters = (int(d) for d in layer.kernel.shape)
        return channels * kh * kw, filters
    if type(layer) is keras.layers.Embedding:
        if layer.mask_zero:
            skipped.append((layer.name, "mask_zero=True is not supported by MPOEmbedding"))
            return None
        return int(layer.input_dim), int(layer.output_dim)
    return None


_ROW_VALUES = 2
"""Values ``count_params`` counts per row of a count-weighted ``MPOEmbedding`` beside its cores: order, scale."""


def compress(
    model: Any,
    rank: int | Sequence[int] | None = None,
    tol: float | None = None,
    min_features: int = kit.DEFAULT_MIN_FEATURES,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    n_cores: int = 4,
    *,
    budget: float | None = None,
    calibration: Any = None,
    sweeps: int = 2,
    two_site: bool = False,
    ridge: float = 1e-6,
    sensitivity: Any = None,
) -> tuple[Any, tnlayers.reports.CompressionReport]:
    """A copy of a built Keras model (Sequential or functional) whose ``Dense``, ``Conv2D`` and ``Embedding``
    layers are MPOs (:class:`MPODense`, :class:`MPOConv2D`, :class:`MPOEmbedding`).

    The rules and the report are those of the PyTorch ``compress`` (:func:`tnlayers.layer.compress_choice`:
    the smaller side has at least ``min_features``, names matched by the ``include``/``exclude`` globs;
    TT-SVD with bond cap ``rank`` and/or relative error ``tol``; a layer that would not shrink stays dense
    and is listed in ``skipped``). Keras models cannot swap layers in place, so a new model comes back,
    built with ``keras.models.clone_model``: the layers left alone are shared with ``model``.

    - ``calibration``: batches of the model's inputs (each what ``model(batch)`` takes), or the Gram
      matrices :func:`collect_grams` gave, by layer name. Each candidate ``Dense`` is then fitted to its
      outputs on them (:func:`tnlayers.calibrated_fit`: TT-SVD, then ``sweeps`` DMRG-style sweeps) and each
      ``Embedding`` to its lookup counts (:func:`tnlayers.layer.weighted_embedding_cores`); the report gives
      their relative output errors. Convs use TT-SVD.
    - ``budget``: the whole model's parameters after (``count_params``: a count-weighted embedding's row
      order and scales count), as a fraction of before; each layer's bond cap is chosen by
      :func:`tnlayers.layer.budget_caps` (the layers that lose least give most), optionally weighted by
      ``sensitivity`` (layer name -> number).

    Returns ``(compressed_model, report)``.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"compress expects a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"compress needs a built model (call it on an input first); {model.name!r} is not built")
    kit.check_compress_options(rank, tol, budget, sensitivity)
    skipped: list[tuple[str, str]] = []
    candidates: dict[str, tuple[Any, tuple[int, int]]] = {}
    for layer in model.layers:
        shape = _candidate_shape(layer, skipped)
        if shape is not None and kit.compress_choice(layer.name, *shape, include, exclude, min_features):
            candidates[layer.name] = (layer, shape)
    observed = [name for name, (layer, _) in candidates.items() if not isinstance(layer, keras.layers.Conv2D)]
    if isinstance(calibration, dict):  # Gram matrices collected before (collect_grams), by layer name
        grams = {name: calibration[name] for name in observed if name in calibration}
    else:
        grams = collect_grams(model, calibration, observed) if calibration is not None else {}
    params_before = int(model.count_params())
    if budget is None:
        caps: dict[str, Any] = {name: rank for name in candidates}
    else:
        weights = kit.check_sensitivity(sensitivity, list(candidates))
        described = [
            kit.BudgetCandidate(name, shape, isinstance(layer, keras.layers.Embedding), None, None,
                                functools.partial(_kernel_matrix, layer))
            for name, (layer, shape) in candidates.items()
        ]  # fmt: skip
        target = math.floor(budget * params_before)
        caps = kit.budget_caps(described, grams, target, params_before, rank, tol, n_cores, weights, _ROW_VALUES)
    rows: list[Any] = []

    def replace(layer: Any) -> Any:
        if layer.name not in candidates:
            return layer
        if layer.name not in caps:
            skipped.append((layer.name, "the budget keeps it dense"))
            return layer
        mpo, report, output_error = _fitted_keras(
            layer, grams.get(layer.name), caps[layer.name], tol, n_cores, sweeps, two_site, ridge
        )
        extra = 0 if getattr(mpo, "row_scale", None) is None else _ROW_VALUES * int(mpo.row_scale.shape[0])
        reason = kit.no_saving(report, extra)
        if reason is not None:
            skipped.append((layer.name, reason))
            return layer
        rows.append(kit.layer_report(layer.name, type(layer).__name__, report, output_error, extra))
        return mpo

    compressed = keras.models.clone_model(model, clone_function=replace)
    report = tnlayers.reports.CompressionReport(tuple(rows), params_before, compressed.count_params(), tuple(skipped))
    return compressed, report
