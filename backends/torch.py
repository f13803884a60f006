"""PyTorch MPO layers: ``MPOLinear``, ``MPOConv2d`` and ``compress`` for trained models.

>>> import torch
>>> from tnlayers.backends.torch import MPOLinear
>>> layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), rank=8)
>>> layer(torch.zeros(2, 784)).shape
torch.Size([2, 256])

The layers hold the cores as parameters and run the core's plans with ``torch.tensordot``; the plan
for an input is looked up by batch-size bucket in a function ``torch.compile`` treats as a
constant, so compiled graphs hold only tensor ops (no graph breaks).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tnlayers
from tnlayers import layer as kit
from tnlayers.contract import (
    dense_weight,
    execute,
    get_ops,
    plan_operands,
    planned_backward,
    run_keeping,
    weight_from_halves,
    weight_halves,
)
from tnlayers.plan import ContractionPlan, batch_bucket, in_place_layout
from tnlayers.reports import CompressionReport

__all__ = [
    "MPOConv2d",
    "MPOEmbedding",
    "MPOLinear",
    "collect_grams",
    "compress",
    "freeze_cores",
    "output_sensitivity",
    "restructure",
]

_OPS = get_ops("torch")


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _compiled_plan(
    planner: kit.LayerPlanner, bucket: int, gradients: str, key: tuple[str, ...], saved_budget: float | None
) -> ContractionPlan:
    """The plan lookup as a constant of compiled graphs (nothing is timed under torch.compile)."""
    return planner.plan(bucket, gradients, key, saved_budget=saved_budget)


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _compiled_conv_route(planner: kit.LayerPlanner, bucket: int) -> tuple[ContractionPlan, bool]:
    return planner.conv_route(bucket)


def _bucket(rows: Any) -> int:
    """The batch bucket of ``rows``; while ``torch.export`` traces a symbolic batch, the default bucket for
    every size (one plan, no guards narrowing the batch's range). ``torch.compile`` keeps per-bucket guards."""
    if not isinstance(rows, int) and torch.compiler.is_exporting():
        return batch_bucket(None)
    return batch_bucket(rows)


def _gradients(x: torch.Tensor, cores: Iterable[torch.Tensor]) -> str:
    return kit.gradients_needed(torch.is_grad_enabled(), any(c.requires_grad for c in cores), x.requires_grad)


def _timer(
    rows: torch.Tensor, cores: Sequence[torch.Tensor], gradients: str, saved_budget: float | None
) -> Callable[[ContractionPlan], Any]:
    """Plan -> a call running it on these rows (forward, and backward when training), for autotune.

    Nothing is copied until a candidate is timed: after the first call, a tuned layer only looks up."""

    def make_run(candidate: ContractionPlan) -> Callable[[], object]:
        data = rows.detach().requires_grad_(gradients == "all")
        trial = [core.detach().requires_grad_(gradients != "none") for core in cores]  # leaves of their own

        def run() -> object:
            with torch.set_grad_enabled(gradients != "none"):
                y = run_plan(candidate, data, trial, None, saved_budget)
                if gradients != "none":
                    y.backward(torch.ones_like(y))  # type: ignore[no-untyped-call]
            if data.is_cuda:
                torch.cuda.synchronize(data.device)
            return y

        return run

    return make_run


#: How many distinct calls (input shape, dtype, grad mode ...) a layer remembers before it forgets them all.
_KNOWN_CALLS = 64

#: In a weight-building plan's ``keep``: the forward keeps ``W``'s two halves (no step has a negative id).
_HALVES = -1


class _PlannedContraction(torch.autograd.Function):
    """``x @ W + bias`` by a plan's steps, with the plan's own backward (:func:`tnlayers.contract.backprop`).

    The forward keeps only the intermediates in ``keep`` (returned as extra, non-differentiable
    outputs so that ``torch.func`` sees them); the backward recomputes the others it reads from ``x``
    and the cores, and makes only the products that lead to a requested gradient. Under
    ``create_graph`` (double backward) everything is recomputed from the saved inputs, so the
    gradients' own graph reaches ``x`` and the cores. The backward is plain torch ops: it vmaps,
    compiles and differentiates again.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, plan: ContractionPlan, keep: frozenset[int], bias: torch.Tensor | None, *cores: torch.Tensor
    ) -> Any:
        if plan.builds_weight:  # W from its two halves, then one product; ``keep`` may hold the halves
            halves = weight_halves(cores, _OPS)
            weight = weight_from_halves(cores, halves, _OPS)
            y = x @ weight if bias is None else torch.addmm(bias, x, weight)
            return (y, *(halves if _HALVES in keep else ()))
        y, kept = run_keeping(plan.steps, plan_operands(plan, x, cores, _OPS), _OPS, keep)
        y = y.reshape(x.shape[0], plan.spec.out_features)
        # not in place: under torch.func.vmap over the bias alone, the bias is batched and the product is not
        return (y if bias is None else y + bias, *kept)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        x, plan, keep, _, *cores = inputs
        ctx.plan, ctx.keep = plan, sorted(keep)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, *cores, *output[1:])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        plan: ContractionPlan = ctx.plan
        x, *rest = ctx.saved_tensors
        n = plan.spec.n_cores
        nothing: tuple[None, ...] = (None,) * (n + 4)
        if grad is None:
            return nothing
        # ``y.sum()``'s gradient is an expanded view (every stride 0): torch's batched products would copy it
        # matrix by matrix, so it is made one array here, once
        grad = grad.contiguous()
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[4:])
        grad_bias = grad.sum(0) if ctx.needs_input_grad[3] else None
        cores = rest[:n]
        again = torch.is_grad_enabled()  # double backward: recompute everything from x and the cores
        if plan.builds_weight:  # W is built again (from the kept halves if any) only for x's gradient
            halves = rest[n:] if rest[n:] and not again else None
            grads = planned_backward(plan, x, cores, grad, _OPS, needs, None, halves=halves)
        else:
            kept = {} if again else dict(zip(ctx.keep, rest[n:]))
            grads = planned_backward(plan, x, cores, grad, _OPS, needs, kept)
        return (grads[0], None, None, grad_bias, *grads[1:])


# ``Function.apply`` binds its arguments to ``forward``'s signature on every call (because the Function defines
# ``setup_context``, which torch.func needs); the signature is built once here instead (about 9 us a call).
_PlannedContraction.forward.__signature__ = inspect.signature(_PlannedContraction.forward)  # type: ignore[attr-defined]


def run_plan(
    plan: ContractionPlan,
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    saved_budget: float | None = kit.DEFAULT_SAVED_BUDGET,
) -> torch.Tensor:
    """``x @ W + bias`` by ``plan``. In training, what is kept for the backward stays within
    ``saved_budget`` times the bytes of ``x`` (what ``nn.Linear`` keeps; ``None``: no limit): where
    autograd would keep more, the planned backward (:class:`_PlannedContraction`) keeps the smallest
    intermediates that fit and recomputes the others."""
    needs = (x.requires_grad, *(c.requires_grad for c in cores))
    rows = x.numel() // plan.spec.in_features
    if saved_budget is None or not torch.is_grad_enabled() or not any(needs) or not isinstance(rows, int):
        return execute(plan, x, cores, bias, _OPS)  # type: ignore[no-any-return]  # (a symbolic batch: as traced)
    keep = kit.kept_for_backward(plan, rows, needs, saved_budget)
    if keep is None:  # all the backward reads fits: autograd's own backward, the fastest
        return execute(plan, x, cores, bias, _OPS)  # type: ignore[no-any-return]
    if kit.keeps_weight_halves(plan, rows, needs, saved_budget):
        keep = frozenset({_HALVES})
    if not torch.compiler.is_compiling():  # (compiled graphs keep the plan's own layout: planning is not traced)
        plan = in_place_layout(plan)
    y, *_ = _PlannedContraction.apply(x.reshape(rows, plan.spec.in_features), plan, keep, bias, *cores)  # type: ignore[no-untyped-call]
    return cast(torch.Tensor, y).reshape(*x.shape[:-1], plan.spec.out_features)


def _check_tensor(x: Any, dtype: torch.dtype, device: torch.device, what: str) -> torch.dtype | None:
    """The dtype to compute in under ``torch.autocast`` (``None`` outside it); a clear error for a bad input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(
            f"{what} has its weights on {device} but the input is on {x.device}; use x.to({str(device)!r})"
        )
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)  # as nn.Linear: compute in it, parameters stay as they are
    if x.dtype != dtype:
        raise TypeError(f"{what} has dtype {dtype} but the input has dtype {x.dtype}; use x.to({dtype})")
    return None


class _MPOModule(kit.MPOLayerMixin, nn.Module):
    """Cores as parameters ``cores.0 .. cores.{n-1}`` (layout ``(r, in, out, r')``) and an optional bias."""

    spec: tnlayers.MPOSpec
    decomposition: tnlayers.decompose.DecompositionReport | None

    def _setup(
        self,
        spec: tnlayers.MPOSpec,
        bias: bool,
        init: str,
        strategy: Any,
        device: Any,
        dtype: Any,
        seed: int | None,
        saved_budget: float | None = kit.DEFAULT_SAVED_BUDGET,
    ) -> None:
        self.init = kit.check_init(init)
        self.spec = spec
        self.planner = kit.LayerPlanner.make(spec, strategy, "torch")
        self.decomposition = None
        """The TT-SVD report when the layer was made from a trained dense layer."""
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        if not isinstance(factory["dtype"], torch.dtype) or not factory["dtype"].is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
        self.cores = nn.ParameterList([nn.Parameter(torch.empty(shape, **factory)) for shape in spec.core_shapes])
        if bias:
            self.bias = nn.Parameter(torch.empty(spec.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._cached_weight: tuple[tuple[Any, ...], list[torch.Tensor], torch.Tensor] | None = None
        self._serves_weight: dict[tuple[kit.LayerPlanner, int], bool] = {}  # per planner and bucket
        self._known_calls: dict[tuple[Any, ...], tuple[ContractionPlan | None, bool]] = {}  # see _call_key
        self.saved_budget = saved_budget
        self.reset_parameters(seed)

    @property
    def strategy(self) -> Any:
        """The strategy as the layer keeps it: a name, or an explicit path."""
        return self.planner.strategy

    def reset_parameters(self, seed: int | None = None) -> None:
        """Cores drawn so that ``W`` has the ``init`` variance (exactly in norm); zero bias.

        Without ``seed``, one is drawn from torch's generator, so ``torch.manual_seed`` governs init."""
        seed = kit.draw_seed(seed, lambda high: int(torch.randint(0, high, ()).item()))
        fresh = tnlayers.init_cores(self.spec, self.init, seed, np.float64)
        with torch.no_grad():
            for core, values in zip(self.cores, fresh):
                core.copy_(torch.from_numpy(values))
            if self.bias is not None:
                self.bias.zero_()

    def _load_cores(self, cores: Sequence[np.ndarray], bias: np.ndarray | None) -> None:
        with torch.no_grad():
            for core, values in zip(self.cores, cores):
                core.copy_(torch.as_tensor(np.asarray(values)))
            if self.bias is not None and bias is not None:
                self.bias.copy_(torch.as_tensor(np.asarray(bias)))

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.spec.ranks

    def _set_trainable(self, per_core: Sequence[bool], bias: bool) -> None:
        for core, trainable in zip(self.cores, per_core):
            core.requires_grad_(trainable)
        if self.bias is not None:
            self.bias.requires_grad_(bias)

    @property
    def frozen_cores(self) -> tuple[int, ...]:
        return tuple(k for k, core in enumerate(self.cores) if not core.requires_grad)

    def weight_matrix(self) -> torch.Tensor:
        """``W`` of shape ``(in_features, out_features)``, the core layout's orientation (differentiable)."""
        return dense_weight(list(self.cores), _OPS)  # type: ignore[no-any-return]

    def _inference_weight(self) -> torch.Tensor:
        """``W``, built once and reused while the cores hold the values it was built from.

        The check compares the cores with copies kept beside ``W``: it sees every change, also edits
        through ``.data`` (an EMA update), which torch's version counter does not. The cores are small,
        so comparing them costs a fraction of building ``W`` (their elements, against ``W``'s times D).
        """
        cores = self._core_tensors()
        key = (cores[0].dtype, cores[0].device)  # one for all cores (a core of another dtype fails to build W)
        cached = self._cached_weight
        if cached is not None and cached[0] == key and all(map(torch.equal, cores, cached[1])):
            return cached[2]
        self._cached_weight = (key, [core.detach().clone() for core in cores], self.weight_matrix())
        return self._cached_weight[2]

    def _serve_cached(self) -> bool:
        return not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _serves_kept_weight(self, x: torch.Tensor, rows: int, cores: list[torch.Tensor]) -> bool:
        """Whether this inference call runs as one product with the kept ``W`` (:meth:`LayerPlanner.reuses_weight`
        of the call's plan), decided once per batch bucket: a small batch's call then skips the plan lookup."""
        key = (self.planner, _bucket(rows))
        serves = self._serves_weight.get(key)
        if serves is None:
            serves = self._serves_weight[key] = self.planner.reuses_weight(self._plan(x, rows, cores))
        return serves

    def _call_key(self, x: Any, cores: list[torch.Tensor]) -> tuple[Any, ...] | None:
        """Everything a call's checks, plan and route depend on (the cores' dtype and device too: ``to()``
        or a replaced core), so that a call like an earlier one skips them (about 30 us of Python at small
        batches); ``None`` where calls are not remembered: while compiling or exporting, under autocast,
        and for tensor subclasses."""
        if type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return None
        device, first = x.device, cores[0]
        if device != first.device or torch.is_autocast_enabled(device.type):  # (a wrong device: the full check)
            return None
        trainable = any(core.requires_grad for core in cores)
        return (x.shape, x.dtype, device, first.dtype, torch.is_grad_enabled(), x.requires_grad, trainable,
                self.training, self._saved_budget)  # fmt: skip

    def _core_tensors(self) -> list[torch.Tensor]:
        """``list(self.cores)`` without ``ParameterList``'s lookup per item (microseconds a call at batch 1)."""
        return list(self.cores._parameters.values())  # type: ignore[arg-type]

    def _operands(
        self, x: torch.Tensor, autocast: torch.dtype | None, cores: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """``x``, the cores and the bias in the dtype to compute in: under autocast, differentiable casts
        (the gradients reach the parameters in their own dtype), else the parameters themselves."""
        bias = self.bias
        if autocast is None:
            return x, cores, bias
        return x.to(autocast), [c.to(autocast) for c in cores], None if bias is None else bias.to(autocast)

    def _plan(self, x: torch.Tensor, rows: Any, cores: list[torch.Tensor]) -> ContractionPlan:
        """The plan for this call (see :class:`tnlayers.layer.LayerPlanner` for the autotune policy)."""
        gradients = _gradients(x, cores)
        bucket = _bucket(rows)
        dtype = str(x.dtype).removeprefix("torch.")
        key = kit.tune_key("torch", str(x.device), dtype, gradients) if self.planner.autotunes else ()
        if torch.compiler.is_compiling() or not self.planner.autotunes:
            return _compiled_plan(self.planner, bucket, gradients, key, self.saved_budget)  # type: ignore[no-any-return]
        timer = _timer(x.reshape(-1, self.spec.in_features), cores, gradients, self.saved_budget)
        return self.planner.plan(bucket, gradients, key, timer, saved_budget=self.saved_budget)

    def save(self, path: str | os.PathLike[str], name: str = "mpo") -> None:
        """Write the cores and bias to a portable :func:`tnlayers.save` checkpoint."""
        tnlayers.save(path, list(self.cores), self.bias, name=name)  # bfloat16 is stored widened to float32


class MPOLinear(_MPOModule):
    """``nn.Linear`` with its weight stored as MPO cores: ``y = x @ W + b`` for ``x`` of shape ``(..., in)``.

    The first two arguments are feature counts, as for ``nn.Linear`` (``MPOLinear(784, 256, rank=8)``:
    modes balanced over ``n_cores``), or mode lists (``MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 8)``).
    ``to_dense()`` returns the ``(out_features, in_features)`` matrix ``nn.Linear.weight`` would hold.
    In ``eval()`` under ``torch.no_grad()``, when the plan for the batch builds ``W`` before
    touching the input (it found materialising cheaper), ``W`` is built once and reused until a
    core changes.
    """

    def __init__(
        self,
        in_modes: int | Sequence[int],
        out_modes: int | Sequence[int],
        rank: int | Sequence[int] = 8,
        bias: bool = True,
        init: str = "glorot",
        strategy: Any = "auto",
        device: Any = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        *,
        n_cores: int | None = None,
        saved_budget: float | None = kit.DEFAULT_SAVED_BUDGET,
    ) -> None:
        super().__init__()
        spec = kit.spec_of_arguments(in_modes, out_modes, rank, n_cores)
        self._setup(spec, bias, init, strategy, device, dtype, seed, saved_budget)

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    @classmethod
    def from_cores(
        cls, cores: Sequence[Any], bias: Any = None, strategy: Any = "auto", device: Any = None
    ) -> MPOLinear:
        """A layer holding copies of the given cores (NumPy arrays or tensors) and bias."""
        arrays = [np.asarray(c.detach().cpu() if isinstance(c, torch.Tensor) else c) for c in cores]
        spec = tnlayers.decompose.spec_from_cores(arrays)
        dtype = getattr(torch, str(arrays[0].dtype))
        layer = cls(spec.in_modes, spec.out_modes, spec.ranks, bias is not None, "glorot", strategy, device, dtype, 0)
        layer._load_cores(arrays, None if bias is None else np.asarray(torch.as_tensor(bias).detach().cpu()))
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        max_rank: int | Sequence[int] | None = None,
        tol: float | None = None,
        n_cores: int = 4,
        strategy: Any = "auto",
    ) -> MPOLinear:
        """TT-SVD of a trained ``nn.Linear`` (bias copied); the report is in ``.decomposition``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        matrix = weight.cpu().double().numpy().T
        cores, report = tnlayers.from_dense(matrix, in_modes, out_modes, max_rank, tol, n_cores=n_cores)
        layer = cls.from_cores(cores, None, strategy, weight.device).to(weight.dtype)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        layer.decomposition = report
        return layer

    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix ``nn.Linear.weight`` would hold (differentiable)."""
        return self.weight_matrix().T

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's dense weight and bias."""
        first = self.cores[0]
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, first.device, first.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cores = self._core_tensors()
        key = self._call_key(x, cores)
        known = None if key is None else self._known_calls.get(key)
        if known is None:
            autocast = _check_tensor(x, cores[0].dtype, cores[0].device, "MPOLinear")
            kit.check_input(tuple(x.shape), self.in_features, "MPOLinear")
            x, cores, bias = self._operands(x, autocast, cores)
            rows = math.prod(x.shape[:-1])
            serves = self._serve_cached() and self._serves_kept_weight(x, rows, cores)
            known = (None if serves else self._plan(x, rows, cores), serves)
            if key is not None:
                if len(self._known_calls) >= _KNOWN_CALLS:
                    self._known_calls.clear()
                self._known_calls[key] = known
        else:
            bias = self.bias
        plan, serves = known
        if serves:
            return F.linear(x, self._inference_weight().T.to(x.dtype), bias)
        return run_plan(cast(ContractionPlan, plan), x, cores, bias, self.saved_budget)

    def extra_repr(self) -> str:
        described = kit.describe(self.spec, self.bias is not None)
        return f"in_features={self.in_features}, out_features={self.out_features}, {described}"


class MPOConv2d(_MPOModule):
    """``nn.Conv2d`` whose kernel, seen as a ``(in_channels*kh*kw, out_channels)`` matrix, is an MPO.

    Rows of that matrix are ordered ``(channel, kernel row, kernel column)``, as in
    ``conv.weight.reshape(out_channels, -1).T``. The forward either builds the kernel and calls
    ``F.conv2d``, or contracts the cores with the unfolded input patches, whichever the cost model
    prefers for the number of output positions (see :func:`tnlayers.layer.conv_route`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        rank: int | Sequence[int] = 8,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        init: str = "glorot",
        strategy: Any = "auto",
        device: Any = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
        n_cores: int = 4,
        *,
        saved_budget: float | None = kit.DEFAULT_SAVED_BUDGET,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.geometry = kit.ConvGeometry.make(kernel_size, stride, padding, dilation)
        if self.geometry.padding == "same" and self.geometry.stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride {self.geometry.stride}")
        rows = in_channels * self.geometry.rows_per_channel
        what = f"in_channels*kh*kw = {in_channels}*{self.kernel_size[0]}*{self.kernel_size[1]}"
        spec = kit.layer_spec(rows, out_channels, in_modes, out_modes, rank, n_cores, what, "out_channels")
        self._setup(spec, bias, init, strategy, device, dtype, seed, saved_budget)

    kernel_size = property(lambda self: self.geometry.kernel_size)
    stride = property(lambda self: self.geometry.stride)
    dilation = property(lambda self: self.geometry.dilation)
    padding = property(lambda self: self.geometry.padding, doc="``(top, bottom, left, right)`` or ``'same'``.")

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        max_rank: int | Sequence[int] | None = None,
        tol: float | None = None,
        n_cores: int = 4,
        strategy: Any = "auto",
    ) -> MPOConv2d:
        """TT-SVD of a trained ``nn.Conv2d`` kernel (bias copied); the report is in ``.decomposition``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(
                f"from_conv supports groups=1 and padding_mode='zeros', got groups={conv.groups}, "
                f"padding_mode={conv.padding_mode!r}"
            )
        weight = conv.weight.detach()
        matrix = weight.cpu().double().reshape(conv.out_channels, -1).numpy().T
        cores, report = tnlayers.from_dense(matrix, in_modes, out_modes, max_rank, tol, n_cores=n_cores)
        spec = report.spec
        padding: Any = conv.padding
        layer = cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), spec.in_modes, spec.out_modes, spec.ranks,
            stride=tuple(conv.stride), padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(conv.dilation), bias=conv.bias is not None, strategy=strategy, device=weight.device,
            dtype=torch.float64, seed=0,
        )  # fmt: skip
        layer._load_cores(cores, None)
        layer = layer.to(weight.dtype)
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().clone())
        layer.decomposition = report
        return layer

    @classmethod
    def from_cores(
        cls, cores: Sequence[Any], bias: Any = None, *, kernel_size: int | Sequence[int], **kwargs: Any
    ) -> MPOConv2d:
        """A conv holding copies of the given cores (of the ``(in_channels*kh*kw, out_channels)`` matrix, any
        framework's arrays, e.g. from a Keras ``MPOConv2D``) and bias. ``kernel_size`` is needed; ``stride``,
        ``padding``, ``dilation``, ``strategy`` and ``device`` may follow. ``MPOConv2d.load(path,
        kernel_size=3, padding=1)`` reads a checkpoint."""
        arrays = [np.asarray(c.detach().cpu() if isinstance(c, torch.Tensor) else c) for c in cores]
        spec = tnlayers.decompose.spec_from_cores(arrays)
        kernel, channels = kit.conv_channels(spec, kernel_size)
        dtype = getattr(torch, str(arrays[0].dtype))
        layer = cls(
            channels, spec.out_features, kernel, spec.in_modes, spec.out_modes, spec.ranks,
            bias=bias is not None, dtype=dtype, seed=0, **kwargs,
        )  # fmt: skip
        layer._load_cores(arrays, None if bias is None else np.asarray(torch.as_tensor(bias).detach().cpu()))
        return layer

    def kernel(self) -> torch.Tensor:
        """The ``(out_channels, in_channels, kh, kw)`` kernel ``nn.Conv2d.weight`` would hold (differentiable)."""
        return self.weight_matrix().T.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> torch.Tensor:
        """Same as :meth:`kernel`."""
        return self.kernel()

    def to_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with this layer's kernel and bias."""
        first = self.cores[0]
        padding: Any = "same" if self.padding == "same" else (self.padding[0], self.padding[2])
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, padding, self.dilation,
            bias=self.bias is not None, device=first.device, dtype=first.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cores = self._core_tensors()
        autocast = _check_tensor(x, cores[0].dtype, cores[0].device, "MPOConv2d")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"MPOConv2d expects a tensor of shape (batch, {self.in_channels}, height, width) or "
                f"({self.in_channels}, height, width), got {tuple(x.shape)}"
            )
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        x, cores, bias = self._operands(x, autocast, cores)
        height, width = self.geometry.output_size(x.shape[2], x.shape[3])
        plan, build_kernel = _compiled_conv_route(self.planner, _bucket(x.shape[0] * height * width))
        top, bottom, left, right = self.geometry.pads(x.shape[2], x.shape[3])
        padding: tuple[int, int] = (top, left)
        if (top, left) != (bottom, right):
            x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
        if build_kernel:
            kernel = self._inference_weight() if self._serve_cached() else dense_weight(cores, _OPS)
            kernel = kernel.T.to(x.dtype).reshape(self.out_channels, self.in_channels, *self.kernel_size)
            return F.conv2d(x, kernel, bias, self.stride, padding, self.dilation)
        patches = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride).transpose(1, 2)
        y = run_plan(plan, patches, cores, bias, self.saved_budget)  # (batch, positions, out_channels)
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, height, width)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, {kit.describe(self.spec, self.bias is not None)}"
        )


class MPOEmbedding(nn.Module):
    """An ``nn.Embedding`` whose ``(num_embeddings, embedding_dim)`` table is an MPO: ``(*) -> (*, embedding_dim)``.

    A lookup contracts only the looked-up rows' slices of the cores (:func:`tnlayers.layer.embedding_rows`),
    each distinct row once per call (outside ``torch.compile``); the table is never formed. A vocabulary
    of awkward factors is padded (30,522 rows to 30,576 = 12 * 14 * 14 * 13 over 4 cores); the padded
    rows are never returned, and an index outside
    ``[0, num_embeddings)`` is a ``ValueError``. Entries start with variance ``std**2`` (``nn.Embedding``: 1).
    ``padding_idx`` is not supported: its row is one of the MPO's like any other.

    Fitted to lookup counts (``from_embedding(..., counts=)``, or ``compress`` with calibration), the
    layer also holds ``row_order`` (a buffer: the MPO row of each table row, most-looked-up first) and
    ``row_scale`` (a parameter: each row's factor); row ``t`` is ``row_scale[t] * mpo_row(row_order[t])``
    (:func:`tnlayers.layer.weighted_embedding_cores`). Both are ``None`` otherwise.
    """

    row_order: torch.Tensor | None
    row_scale: nn.Parameter | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int | Sequence[int] = 8,
        n_cores: int = 4,
        row_modes: Sequence[int] | None = None,
        dim_modes: Sequence[int] | None = None,
        std: float = 1.0,
        device: Any = None,
        dtype: Any = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = kit.embedding_spec(num_embeddings, embedding_dim, rank, n_cores, row_modes, dim_modes)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        dtype = dtype or torch.get_default_dtype()
        cores = tnlayers.init_cores(self.spec, "normal", seed, np.float64, std=std)
        self.cores = nn.ParameterList([nn.Parameter(torch.as_tensor(c, dtype=dtype, device=device)) for c in cores])
        self.register_buffer("row_order", None)
        self.register_parameter("row_scale", None)
        self.decomposition: tnlayers.decompose.DecompositionReport | None = None

    @classmethod
    def from_cores(
        cls,
        cores: Sequence[Any],
        num_embeddings: int | None = None,
        device: Any = None,
        row_order: Any = None,
        row_scale: Any = None,
    ) -> MPOEmbedding:
        """A layer holding copies of the cores (rows: the "in" side); ``num_embeddings`` defaults to all rows.
        ``row_order`` and ``row_scale`` (see the class) are copied too where given."""
        arrays = [np.asarray(c.detach().cpu() if isinstance(c, torch.Tensor) else c) for c in cores]
        spec = tnlayers.decompose.spec_from_cores(arrays)
        rows = spec.in_features if num_embeddings is None else num_embeddings
        layer = cls(
            rows,
            spec.out_features,
            spec.ranks,
            row_modes=spec.in_modes,
            dim_modes=spec.out_modes,
            device=device,
            dtype=getattr(torch, str(arrays[0].dtype)),
        )
        with torch.no_grad():
            for core, array in zip(layer.cores, arrays):
                core.copy_(torch.as_tensor(array))
        layer.set_row_weights(row_order, row_scale)
        return layer

    def set_row_weights(self, row_order: Any = None, row_scale: Any = None) -> None:
        """Set ``row_order`` and ``row_scale`` (see the class; ``None`` removes one), checked, on the cores'
        device and (the scale) dtype."""
        order, scale = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for v in (row_order, row_scale))
        kit.check_row_weights(order, scale, self.num_embeddings, self.spec.in_features)
        first = self.cores[0]
        self.row_order = (
            None if order is None else torch.as_tensor(np.asarray(order), dtype=torch.int64).to(first.device)
        )
        scale = None if scale is None else torch.as_tensor(np.asarray(scale)).to(first.device, first.dtype)
        self.row_scale = None if scale is None else nn.Parameter(scale)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        max_rank: int | Sequence[int] | None = None,
        tol: float | None = None,
        n_cores: int = 4,
        row_modes: Sequence[int] | None = None,
        dim_modes: Sequence[int] | None = None,
        counts: Any = None,
        smoothing: float = kit.DEFAULT_SMOOTHING,
    ) -> MPOEmbedding:
        """TT-SVD of a trained ``nn.Embedding``'s table (rows padded); the report is in ``.decomposition``.

        With ``counts`` (how often each row is looked up, as :func:`collect_grams` gives them), the fit is
        count-weighted and the rows reordered (:func:`tnlayers.layer.weighted_embedding_cores`); the
        report's singular values are then the weighted table's, its error the plain ``||E - E'|| / ||E||``."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        weight = embedding.weight.detach()
        table = weight.cpu().double().numpy()
        if counts is None:
            cores, report = kit.embedding_cores(table, max_rank, tol, n_cores, row_modes, dim_modes)
            order = scale = None
        else:
            counts = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts
            fit = kit.weighted_embedding_cores(table, counts, max_rank, tol, n_cores, row_modes, dim_modes, smoothing)
            cores, order, scale = fit.cores, fit.row_order, fit.row_scale
            report = kit.weighted_embedding_report(table, fit)
        layer = cls.from_cores(cores, embedding.num_embeddings, weight.device, order, scale).to(weight.dtype)
        layer.decomposition = report
        return layer

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"MPOEmbedding expects a tensor of indices, got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"MPOEmbedding expects integer indices, got dtype {indices.dtype}")
        if not torch.compiler.is_compiling() and indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.num_embeddings:
                bad = low if low < 0 else high
                raise ValueError(f"embedding index {bad} is out of range: expected 0 <= index < {self.num_embeddings}")
        flat = indices.reshape(-1)
        positions = flat if self.row_order is None else self.row_order[flat]
        repeated = None
        if flat.numel() > 1 and not torch.compiler.is_compiling():  # each distinct row once (text repeats tokens)
            positions, repeated = torch.unique(positions, return_inverse=True)
        rows = kit.embedding_rows(list(self.cores), positions, self.spec.in_modes, _gather_rows, _OPS)
        if repeated is not None:
            rows = rows[repeated]
        if self.row_scale is not None:
            rows = rows * self.row_scale[flat].unsqueeze(-1)
        return cast(torch.Tensor, rows).reshape(*indices.shape, self.embedding_dim)

    def to_dense(self) -> torch.Tensor:
        """The ``(num_embeddings, embedding_dim)`` table (differentiable), what ``nn.Embedding.weight`` holds."""
        table = cast(torch.Tensor, dense_weight(list(self.cores), _OPS))
        table = table[: self.num_embeddings] if self.row_order is None else table[self.row_order]
        return table if self.row_scale is None else table * self.row_scale.unsqueeze(-1)

    @property
    def weight(self) -> torch.Tensor:
        """The table, formed on each read (for code that reads ``.weight``; lookups never form it)."""
        return self.to_dense()

    def to_embedding(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding this layer's table."""
        first = self.cores[0]
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            embedding.weight.copy_(self.to_dense())
        return embedding

    def save(self, path: str | os.PathLike[str], name: str = "mpo") -> None:
        """Write the cores to a :func:`tnlayers.save` checkpoint (``from_cores(tnlayers.load(...)[0],
        num_embeddings)`` reads it back). A count-weighted layer (``row_order``/``row_scale``) is saved
        with the model's ``state_dict`` instead (:func:`restructure` rebuilds it): the portable format
        holds cores and a bias only, so ``save`` refuses it rather than drop its rows' order and scales."""
        if self.row_order is not None or self.row_scale is not None:
            raise ValueError(
                "this MPOEmbedding has row_order/row_scale (a count-weighted fit), which the tnlayers.save format "
                "does not hold; save the model's state_dict (restructure() rebuilds the layer to load it)"
            )
        tnlayers.save(path, [c.detach().cpu().numpy() for c in self.cores], None, name=name)

    def extra_repr(self) -> str:
        weighted = ", rows ordered" if self.row_order is not None else ""
        weighted += ", rows scaled" if self.row_scale is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, {kit.describe(self.spec, False)}{weighted}"


def _gather_rows(core: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    return core.permute(1, 0, 2, 3)[digits]


Candidate = tuple[str, nn.Module, Any, Any]  # name, module, in_modes, out_modes


def compress(
    model: nn.Module,
    rank: int | Sequence[int] | None = None,
    tol: float | None = None,
    min_features: int = kit.DEFAULT_MIN_FEATURES,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    n_cores: int = 4,
    modes: Callable[[str, int, int], tuple[Sequence[int], Sequence[int]] | None] | None = None,
    *,
    budget: float | None = None,
    calibration: Iterable[Any] | None = None,
    sweeps: int = 2,
    two_site: bool = False,
    ridge: float = 1e-6,
    progress: bool = False,
    sensitivity: Mapping[str, float] | None = None,
) -> CompressionReport:
    """Replace, in place, the ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` layers of a trained model
    by MPO layers (:class:`MPOLinear`, :class:`MPOConv2d`, :class:`MPOEmbedding`).

    Each matching layer (see :func:`tnlayers.layer.compress_choice`; for a conv, ``in_features =
    in_channels*kh*kw``; for an embedding, ``(num_embeddings, embedding_dim)``) is decomposed with bond
    cap ``rank`` and/or relative error ``tol``. ``modes(name, in, out)`` may choose the factorisation
    (``None`` for balanced modes over ``n_cores`` cores).

    - ``calibration``: batches of the model's inputs (a tensor is passed as ``model(batch)``, a tuple as
      ``model(*batch)``, a dict as ``model(**batch)``), or the Gram matrices :func:`collect_grams` gave,
      by layer name. One pass under ``no_grad`` collects each
      candidate ``nn.Linear``'s input Gram matrix ``X^T X`` (float64, never ``X``), and those layers are
      fitted to their outputs (:func:`tnlayers.calibrated_fit`: TT-SVD, then ``sweeps`` DMRG-style sweeps);
      the report gives each one's relative output error. Each candidate ``nn.Embedding``'s lookups are
      counted, and its table is fitted to them (:func:`tnlayers.layer.weighted_embedding_cores`: rows
      reordered by count, a count-weighted TT-SVD, one scale per row); its report row's ``output_error``
      is the count-weighted error. Convs use TT-SVD.
    - ``budget``: the whole model's parameters after compression, as a fraction of before (embeddings and
      layers left dense included). Each layer's bond cap is chosen from :data:`tnlayers.calibrate.RANK_LADDER`
      (up to ``rank`` where given) by :func:`tnlayers.calibrate.allocate`, from the TT-SVD error of each
      cap (the output error where calibrated; for an embedding, the bound its TT-SVD spectra give): the
      layers that lose least give most; a layer may stay dense.
    - ``sensitivity``: per layer name, how much the model's output moves per unit of that layer's relative
      error (:func:`output_sensitivity` measures it); the budget then weighs each layer's squared error by
      it, so that errors of layers that matter more downstream cost more. Every candidate needs an entry.

    A layer whose MPO would not be smaller is kept, and listed in the report's ``skipped``, as is the
    output projection of ``nn.MultiheadAttention`` (which reads its ``.weight``). An
    ``nn.TransformerEncoderLayer`` whose feed-forward layers are replaced runs its regular path in
    inference too (its fused fast path reads their ``.weight``). A layer reachable under several names is
    replaced once, by one MPO, at every name; a layer whose weight is shared with another (tied weights)
    is left dense and listed in ``skipped``. ``progress=True`` shows tqdm bars (where tqdm is installed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    kit.check_compress_options(rank, tol, budget, sensitivity)
    params_before = sum(p.numel() for p in model.parameters())
    aliases: dict[int, list[str]] = {}  # a module reachable under several names is replaced at all of them
    weight_users: dict[int, set[int]] = {}  # a weight shared by several modules is tied: left alone
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            weight_users.setdefault(id(module.weight), set()).add(id(module))
    candidates, skipped = _candidates(model, weight_users, min_features, include, exclude, modes)
    observed = [name for name, module, *_ in candidates if isinstance(module, (nn.Linear, nn.Embedding))]
    if isinstance(calibration, Mapping):  # Gram matrices collected before (collect_grams), by layer name
        grams = {name: calibration[name] for name in observed if name in calibration}
    else:
        grams = collect_grams(model, calibration, observed, progress) if calibration is not None else {}
    if budget is None:
        caps: dict[str, Any] = {name: rank for name, *_ in candidates}
    else:
        weights = kit.check_sensitivity(sensitivity, [name for name, *_ in candidates])
        target = math.floor(budget * params_before)
        described = [
            kit.BudgetCandidate(name, _matrix_shape(module), isinstance(module, nn.Embedding), im, om,
                                functools.partial(_matrix, module))
            for name, module, im, om in candidates
        ]  # fmt: skip
        caps = kit.budget_caps(described, grams, target, params_before, rank, tol, n_cores, weights)
    rows = []
    for name, module, in_modes, out_modes in _bar(candidates, progress, "fitting"):
        if name not in caps:
            skipped.append((name, "the budget keeps it dense"))
            continue
        replacement, report, output_error = _fitted(
            module,
            grams.get(name) if isinstance(module, (nn.Linear, nn.Embedding)) else None,
            in_modes,
            out_modes,
            caps[name],
            tol,
            n_cores,
            sweeps,
            two_site,
            ridge,
        )
        scales = getattr(replacement, "row_scale", None)
        extra = 0 if scales is None else scales.numel()
        reason = kit.no_saving(report, extra)
        if reason is not None:
            skipped.append((name, reason))
            continue
        replacement.train(module.training)
        for alias in aliases[id(module)]:
            _replace(model, alias, replacement)
        rows.append(kit.layer_report(name, type(module).__name__, report, output_error, extra))
    params_after = sum(p.numel() for p in model.parameters())
    return CompressionReport(tuple(rows), params_before, params_after, tuple(skipped))


def _candidates(
    model: nn.Module,
    weight_users: dict[int, set[int]],
    min_features: int,
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
    modes: Callable[[str, int, int], tuple[Sequence[int], Sequence[int]] | None] | None,
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """The layers ``compress`` replaces, with their modes, and those it leaves dense with the reason."""
    candidates: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            continue
        if len(weight_users[id(module.weight)]) > 1:
            skipped.append((name, "its weight is tied to another layer's; an MPO of it would break the tie"))
            continue
        shape = _matrix_shape(module)
        if not kit.compress_choice(name, *shape, include, exclude, min_features):
            continue
        if module.weight.is_meta:
            raise ValueError(
                f"layer {name!r} is on the meta device and holds no values to decompose; "
                "materialise the model first (model.to_empty(device=...) and load_state_dict)"
            )
        chosen = modes(name, *shape) if modes is not None else None
        in_modes, out_modes = chosen if chosen is not None else (None, None)
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            skipped.append((name, "nn.MultiheadAttention reads this projection's .weight directly"))
        elif isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            skipped.append((name, f"groups={module.groups}, padding_mode={module.padding_mode!r} not supported"))
        else:
            candidates.append((name, module, in_modes, out_modes))
    return candidates, skipped


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of the matrix an MPO of ``module`` stands for (an embedding: ``(rows, dim)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel(), module.out_channels
    return cast(nn.Embedding, module).num_embeddings, cast(nn.Embedding, module).embedding_dim


def _matrix(module: nn.Module) -> np.ndarray:
    """The float64 ``(in, out)`` matrix of ``module`` (``W^T`` of a linear or a conv's kernel; an embedding's table)."""
    weight = cast(torch.Tensor, module.weight).detach().cpu().double()
    if isinstance(module, nn.Embedding):
        return weight.numpy()
    return weight.reshape(weight.shape[0], -1).numpy().T


def _bar(items: Sequence[Any], progress: bool, what: str) -> Iterable[Any]:
    if not progress:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are a nicety: tqdm is not a dependency of the core
        return items
    return cast(Iterable[Any], tqdm(items, desc=f"compress: {what}", leave=False))


def output_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str],
    noise: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """How far the model's output moves per unit of relative error at each named layer's output.

    For each layer in turn, a forward hook adds Gaussian noise to its output, of ``noise`` times the
    output's RMS (a relative error of about ``noise``), and the whole model runs on ``batches`` (as
    :func:`collect_grams` passes them); the result is ``||Δ out||² / ||out||²`` over all batches, divided
    by ``noise²``. The model must return a tensor. A first-order measure of how a layer's error reaches
    the output through everything after it (residual connections, normalisations, other branches):
    what :func:`compress` needs (``sensitivity=``) to spread a budget by effect on the model's output.
    Isotropic noise is a crude stand-in for a compression error, which is structured: on MiniLM at half
    the parameters it rated the word embedding low, and the spread it gave lost to the plain one
    (docs/transformer.md).
    """
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 < noise < math.inf:
        raise ValueError(f"noise must be a positive number (a relative error), got {noise!r}")
    batches = list(batches)
    modules = {name: model.get_submodule(name) for name in names}

    def run() -> list[torch.Tensor]:
        outputs = []
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    out = model(**batch)
                elif isinstance(batch, (tuple, list)):
                    out = model(*batch)
                else:
                    out = model(batch)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"output_sensitivity needs a model that returns a tensor, got {type(out).__name__}; "
                        "wrap the model so that it returns the output to keep"
                    )
                outputs.append(out.double())
        return outputs

    reference = run()
    scale = sum(float((out**2).sum()) for out in reference)
    if scale == 0:
        raise ValueError("the model's outputs on the batches are all zero: no relative change to measure")
    found = {}
    for name in _bar(list(names), progress, "sensitivity"):
        generator = torch.Generator().manual_seed(seed)

        def perturb(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            rms = output.detach().double().pow(2).mean().sqrt()
            draw = torch.randn(output.shape, generator=generator, dtype=torch.float64)  # noqa: B023
            return output + (noise * rms * draw).to(output.device, output.dtype)

        handle = modules[name].register_forward_hook(perturb)
        try:
            moved = sum(float(((out - ref) ** 2).sum()) for out, ref in zip(run(), reference))
        finally:
            handle.remove()
        found[name] = moved / scale / noise**2
    return found


def collect_grams(
    model: nn.Module, batches: Iterable[Any], names: Sequence[str], progress: bool = False
) -> dict[str, Any]:
    """``X^T X`` of the inputs of the named ``nn.Linear`` layers over one pass of ``batches`` (forward
    pre-hooks, ``no_grad``; a batch is passed as ``model(batch)``, ``model(*batch)`` or ``model(**batch)``),
    accumulated in float64 on the layer's device; ``X`` itself is never kept. For a named ``nn.Embedding``,
    how often each row is looked up (a vector: the diagonal of ``X^T X`` for one-hot inputs)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str, features: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            rows = args[0].detach().reshape(-1, features).double()
            sums[name] = sums[name] + rows.T @ rows if name in sums else rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return hook

    def count_for(name: str, rows: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            found = torch.bincount(args[0].detach().reshape(-1), minlength=rows).double()
            sums[name] = sums[name] + found if name in sums else found
            counts[name] = counts.get(name, 0) + int(args[0].numel())

        return hook

    handles = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            handles.append(module.register_forward_pre_hook(count_for(name, module.num_embeddings)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook_for(name, module.in_features)))
        else:
            raise TypeError(
                f"collect_grams reads nn.Linear and nn.Embedding inputs; {name!r} is a {type(module).__name__}"
            )
    try:
        with torch.no_grad():
            for batch in _bar(list(batches), progress, "calibration"):
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
    if names and not sums:
        raise ValueError("the calibration batches reached none of the layers to compress (was it empty?)")
    grams: dict[str, Any] = {}
    for name, total in sums.items():
        if total.ndim == 1:  # an embedding: how often each row was looked up (a diagonal X^T X)
            grams[name] = total.cpu().numpy()
            continue
        gram = tnlayers.calibrate.Gram(total.shape[0])
        gram.matrix, gram.rows = total.cpu().numpy(), counts[name]
        grams[name] = gram
    return grams


def _fitted(
    module: nn.Module,
    gram: Any,
    in_modes: Any,
    out_modes: Any,
    cap: Any,
    tol: float | None,
    n_cores: int,
    sweeps: int,
    two_site: bool,
    ridge: float,
) -> tuple[nn.Module, tnlayers.decompose.DecompositionReport, float | None]:
    """The MPO layer for ``module``, its decomposition report and (calibrated) relative output error;
    ``gram``: a linear layer's :class:`tnlayers.calibrate.Gram`, an embedding's lookup counts, or ``None``."""
    if isinstance(module, nn.Embedding):
        embedding = MPOEmbedding.from_embedding(module, cap, tol, n_cores, in_modes, out_modes, counts=gram)
        found = cast(tnlayers.decompose.DecompositionReport, embedding.decomposition)
        if gram is None:
            return embedding, found, None
        table = _matrix(module)
        lookups = tnlayers.calibrate.output_error(embedding.to_dense().detach().double().cpu().numpy(), table, gram)
        return embedding, found, lookups
    if isinstance(module, nn.Conv2d):
        conv = MPOConv2d.from_conv(module, in_modes, out_modes, cap, tol, n_cores)
        return conv, cast(tnlayers.decompose.DecompositionReport, conv.decomposition), None
    linear = cast(nn.Linear, module)
    if gram is None:
        layer = MPOLinear.from_linear(linear, in_modes, out_modes, cap, tol, n_cores)
        return layer, cast(tnlayers.decompose.DecompositionReport, layer.decomposition), None
    cores, fit = tnlayers.calibrated_fit(
        _matrix(linear),
        gram,
        in_modes,
        out_modes,
        cap,
        tol,
        n_cores=n_cores,
        sweeps=sweeps,
        two_site=two_site,
        ridge=ridge,
    )
    weight = linear.weight.detach()
    layer = MPOLinear.from_cores(cores, None, "auto", weight.device).to(weight.dtype)
    layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
    report = tnlayers.decompose.DecompositionReport(fit.spec, fit.weight_error, ())
    layer.decomposition = report
    return layer, report, fit.error


def restructure(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Give ``model`` the MPO layers a ``state_dict`` holds, at its ranks, so ``load_state_dict`` fits.

    A model compressed with ``tol=`` has ranks that depend on the weights; to load its checkpoint, build
    the original (dense or otherwise compressed) architecture, call ``restructure(model, state_dict)``,
    then ``model.load_state_dict(state_dict)``. Every ``{name}.cores.0 ...`` group in ``state_dict``
    turns the module at ``name`` (an ``nn.Linear``, ``nn.Conv2d`` or MPO layer of the same shape) into
    an MPO layer of the stored modes and ranks, on the module's device and dtype (a conv keeps its
    kernel size, stride, padding and dilation). Returns the names replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"restructure expects an nn.Module, got {type(model).__name__}")
    prefixes = sorted({key[: -len("cores.0")] for key in state_dict if key.endswith("cores.0")})
    aliases: dict[int, list[str]] = {}
    for alias, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(alias)
    replaced = []
    for prefix in prefixes:
        name = prefix.rstrip(".")
        cores, k = [], 0
        while f"{prefix}cores.{k}" in state_dict:
            cores.append(state_dict[f"{prefix}cores.{k}"])
            k += 1
        spec = tnlayers.decompose.spec_from_cores(cores)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the state_dict has MPO cores for {name!r}, which the model does not have") from None
        replacement = _mpo_like(module, name, spec, f"{prefix}bias" in state_dict)
        target = module if replacement is None else replacement
        if isinstance(target, MPOEmbedding):  # a count-weighted table: its rows' order and scales
            weights = [state_dict.get(f"{prefix}{key}") for key in ("row_order", "row_scale")]
            if any(
                (w is None) != (getattr(target, key) is None) for w, key in zip(weights, ("row_order", "row_scale"))
            ):
                target.set_row_weights(*weights)
                replacement = target
        if replacement is None:
            continue
        for alias in aliases[id(module)]:
            _replace(model, alias, replacement)
        replaced.append(name)
    return replaced


def _mpo_like(module: nn.Module, name: str, spec: tnlayers.MPOSpec, bias: bool) -> nn.Module | None:
    """An MPO layer of ``spec`` in ``module``'s place (``None`` when ``module`` already is one)."""
    if isinstance(module, _MPOModule) and module.spec == spec and (module.bias is not None) == bias:
        return None
    if isinstance(module, (nn.Embedding, MPOEmbedding)) and not bias:
        rows, dim = module.num_embeddings, module.embedding_dim
        if isinstance(module, MPOEmbedding) and module.spec == spec:
            return None
        if spec.out_features == dim and spec.in_features >= rows:
            first = module.cores[0] if isinstance(module, MPOEmbedding) else module.weight
            return MPOEmbedding(
                rows, dim, spec.ranks, row_modes=spec.in_modes, dim_modes=spec.out_modes,
                device=first.device, dtype=first.dtype,
            )  # fmt: skip
    weight = module.cores[0] if isinstance(module, _MPOModule) else getattr(module, "weight", None)
    device, dtype = (weight.device, weight.dtype) if isinstance(weight, torch.Tensor) else (None, None)
    modes, ranks = (spec.in_modes, spec.out_modes), spec.ranks
    if isinstance(module, (nn.Linear, MPOLinear)) and (module.in_features, module.out_features) == (
        spec.in_features,
        spec.out_features,
    ):
        return MPOLinear(*modes, ranks, bias, device=device, dtype=dtype)
    if isinstance(module, (nn.Conv2d, MPOConv2d)) and spec.out_features == module.out_channels:
        kernel = (int(module.kernel_size[0]), int(module.kernel_size[1]))
        if spec.in_features == module.in_channels * kernel[0] * kernel[1]:
            conv = MPOConv2d(
                module.in_channels, module.out_channels, kernel, *modes, ranks, bias=bias, device=device, dtype=dtype
            )
            conv.geometry = (
                module.geometry
                if isinstance(module, MPOConv2d)
                else kit.ConvGeometry.make(kernel, module.stride, module.padding, module.dilation)
            )
            return conv
    raise ValueError(
        f"the state_dict holds an MPO of {spec.in_features} -> {spec.out_features} features for {name!r}, "
        f"but the model has a {type(module).__name__} there that it cannot replace"
    )


def freeze_cores(model: nn.Module, cores: str | Iterable[int] = "central", bias: bool = False) -> tuple[int, int]:
    """``freeze`` on every MPO layer of ``model``; returns ``(trainable, frozen)`` MPO parameters.

    With the default, only the small auxiliary cores (and biases) of each layer stay trainable, the
    recovery step of MPOP (Liu et al., ACL 2021) after decomposing a pretrained model.
    """
    layers = [module for module in model.modules() if isinstance(module, _MPOModule)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MPO layers to freeze; run compress first")
    trainable = frozen = 0
    for layer in layers:
        layer.freeze(cores, bias)
        for core in layer.cores:
            if core.requires_grad:
                trainable += core.numel()
            else:
                frozen += core.numel()
    return trainable, frozen


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)
    if isinstance(parent, nn.TransformerEncoderLayer):
        # its fused inference fast path reads linear1.weight and linear2.weight; this flag turns it off
        parent.activation_relu_or_gelu = 0
