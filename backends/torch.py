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

import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tnlayers
from tnlayers.contract import dense_weight, execute, get_ops
from tnlayers.plan import ContractionPlan, conv_route, strategy_key
from tnlayers.reports import CompressionReport, LayerReport
from tnlayers.spec import factorize_balanced

__all__ = ["MPOConv2d", "MPOLinear", "compress", "freeze_cores"]

_OPS = get_ops("torch")
_LARGEST_BUCKET = 1 << 24


def _bucket(rows: Any) -> int:
    """The power-of-two bucket of ``rows`` by comparisons only: under ``torch.compile`` a symbolic
    size becomes a few guards, and the bucket stays a plain int (a constant of the graph)."""
    bucket = 1
    while bucket < rows and bucket < _LARGEST_BUCKET:
        bucket *= 2
    return bucket


_COST_MODEL = tnlayers.cost_model_for("torch")


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _linear_plan(
    spec: tnlayers.MPOSpec, bucket: int, strategy: Any, gradients: str, tune_key: tuple[str, ...]
) -> ContractionPlan:
    if strategy == "autotune":  # under torch.compile nothing is timed: a winner tuned before, else the model's
        tuned = tnlayers.autotune.cached(spec, bucket, tune_key)
        if tuned is not None:
            return tuned
    return tnlayers.plan(spec, bucket, strategy, cost_model=_COST_MODEL, gradients=gradients)


def _gradients(x: torch.Tensor, cores: Iterable[torch.Tensor]) -> str:
    """What the backward will need: nothing, the cores' gradients, or the input's too."""
    if not torch.is_grad_enabled() or not any(core.requires_grad for core in cores):
        return "none"
    return "all" if x.requires_grad else "cores"


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _conv_route(spec: tnlayers.MPOSpec, bucket: int, strategy: Any) -> tuple[ContractionPlan, bool]:
    return conv_route(spec, bucket, strategy, cost_model=_COST_MODEL)


def _tune_key(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> tuple[str, ...]:
    return ("torch", str(x.device), str(x.dtype), "infer" if _gradients(x, cores) == "none" else "train")


def _autotuned(spec: tnlayers.MPOSpec, bucket: int, x: torch.Tensor, cores: Sequence[torch.Tensor]) -> ContractionPlan:
    """Time the best candidates on this input (forward, and backward when training), once per bucket."""
    key = _tune_key(x, cores)
    rows = x.detach().reshape(-1, spec.in_features)
    trial = [core.detach().requires_grad_(key[-1] == "train") for core in cores]  # leaves of their own

    def make_run(candidate: ContractionPlan) -> Callable[[], object]:
        def run() -> object:
            with torch.set_grad_enabled(key[-1] == "train"):
                y = execute(candidate, rows, trial, None, _OPS)
                if key[-1] == "train":
                    y.backward(torch.ones_like(y))
            if rows.is_cuda:
                torch.cuda.synchronize(rows.device)
            return y

        return run

    return tnlayers.autotune.tune(spec, bucket, make_run, key, cost_model=_COST_MODEL)


def _draw_seed(seed: int | None) -> int:
    """``seed``, or one drawn from torch's generator so that ``torch.manual_seed`` governs init."""
    return int(torch.randint(0, 2**62, ()).item()) if seed is None else seed


def _check_input(x: Any, in_features: int, dtype: torch.dtype, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{what} expects input of shape (..., {in_features}), got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{what} has dtype {dtype} but the input has dtype {x.dtype}; use x.to({dtype})")


class _MPOModule(nn.Module):
    """Cores as parameters ``cores.0 .. cores.{n-1}`` (layout ``(r, in, out, r')``) and an optional bias."""

    spec: tnlayers.MPOSpec
    decomposition: tnlayers.DecompositionReport | None

    def _setup(
        self,
        spec: tnlayers.MPOSpec,
        bias: bool,
        init: str,
        strategy: Any,
        device: Any,
        dtype: torch.dtype | None,
        seed: int | None,
    ) -> None:
        if init not in tnlayers.INITIALIZERS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(tnlayers.INITIALIZERS)}")
        self.spec = spec
        self.init = init
        self.strategy = strategy_key(spec, strategy)
        self.decomposition = None
        """The TT-SVD report when the layer was made from a trained dense layer."""
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        self.cores = nn.ParameterList([nn.Parameter(torch.empty(shape, **factory)) for shape in spec.core_shapes])
        if bias:
            self.bias = nn.Parameter(torch.empty(spec.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._cached_weight: tuple[tuple[Any, ...], list[torch.Tensor], torch.Tensor] | None = None
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Cores drawn so that ``W`` has the ``init`` variance (exactly in norm); zero bias."""
        fresh = tnlayers.init_cores(self.spec, self.init, _draw_seed(seed), np.float64)
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

    def freeze(self, cores: str | Iterable[int] = "central", bias: bool = False) -> _MPOModule:
        """Stop training some cores: ``"central"`` (the largest), ``"auxiliary"`` (the others), ``"all"`` or indices.

        The other cores become trainable; ``bias=True`` freezes the bias too. Frozen parameters get
        ``requires_grad=False``, so optimisers skip them and they stay bit-identical. Returns the layer.
        """
        frozen = self.spec.select_cores(cores)
        for k, core in enumerate(self.cores):
            core.requires_grad_(k not in frozen)
        if self.bias is not None:
            self.bias.requires_grad_(not bias)
        return self

    def unfreeze(self) -> _MPOModule:
        """Make every core and the bias trainable again."""
        return self.freeze([], bias=False)

    @property
    def frozen_cores(self) -> tuple[int, ...]:
        return tuple(k for k, core in enumerate(self.cores) if not core.requires_grad)

    def weight_matrix(self) -> torch.Tensor:
        """``W`` of shape ``(in_features, out_features)``, the core layout's orientation (differentiable)."""
        return dense_weight(list(self.cores), _OPS)  # type: ignore[no-any-return]

    def _inference_weight(self) -> torch.Tensor:
        """``W``, built once and reused while no core changed (in place, by ``.to`` or by loading)."""
        key = tuple((core._version, core.data_ptr(), core.dtype, core.device) for core in self.cores)
        if self._cached_weight is None or self._cached_weight[0] != key:
            # the cached entry holds the cores' storage, so that no new tensor can reuse its address
            self._cached_weight = (key, [core.detach() for core in self.cores], self.weight_matrix())
        return self._cached_weight[2]

    def _serve_cached(self) -> bool:
        return not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def save(self, path: str | os.PathLike[str], name: str = "mpo") -> None:
        """Write the cores and bias to a portable :func:`tnlayers.save` checkpoint."""
        tnlayers.save(path, [c.detach().cpu().numpy() for c in self.cores], self._numpy_bias(), name=name)

    def _numpy_bias(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.detach().cpu().numpy()

    def _describe(self) -> str:
        spec = self.spec
        return (
            f"modes={'x'.join(map(str, spec.in_modes))}->{'x'.join(map(str, spec.out_modes))}, "
            f"ranks={spec.ranks}, params={spec.num_params:,} of {spec.dense_params:,} "
            f"(compression {1 / spec.compression_ratio:.1f}x), bias={self.bias is not None}"
        )


class MPOLinear(_MPOModule):
    """``nn.Linear`` with its weight stored as MPO cores: ``y = x @ W + b`` for ``x`` of shape ``(..., in)``.

    ``to_dense()`` returns the ``(out_features, in_features)`` matrix ``nn.Linear.weight`` would hold.
    In ``eval()`` under ``torch.no_grad()``, when the plan for the batch builds ``W`` before
    touching the input (it found materialising cheaper), ``W`` is built once and reused until a
    core changes.
    """

    def __init__(
        self,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        rank: int | Sequence[int],
        bias: bool = True,
        init: str = "glorot",
        strategy: Any = "auto",
        device: Any = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self._setup(tnlayers.MPOSpec(in_modes, out_modes, rank), bias, init, strategy, device, dtype, seed)

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    @classmethod
    def auto(cls, in_features: int, out_features: int, n_cores: int = 4, rank: int = 8, **kwargs: Any) -> MPOLinear:
        """A layer with balanced modes for the given feature counts (see :meth:`tnlayers.MPOSpec.auto`)."""
        spec = tnlayers.MPOSpec.auto(in_features, out_features, n_cores, rank)
        return cls(spec.in_modes, spec.out_modes, spec.ranks, **kwargs)

    @classmethod
    def from_cores(
        cls, cores: Sequence[Any], bias: Any = None, strategy: Any = "auto", device: Any = None
    ) -> MPOLinear:
        """A layer holding copies of the given cores (NumPy arrays or tensors) and bias."""
        arrays = [np.asarray(c.detach().cpu() if isinstance(c, torch.Tensor) else c) for c in cores]
        spec = tnlayers.spec_from_cores(arrays)
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
        layer = cls.from_cores([c.astype(np.float64) for c in cores], None, strategy, weight.device)
        layer = layer.to(weight.dtype)
        if linear.bias is None:
            layer.bias = None
        else:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        layer.decomposition = report
        return layer

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], name: str | None = None, strategy: Any = "auto", device: Any = None
    ) -> MPOLinear:
        """A layer from a :func:`tnlayers.save` checkpoint (written by any framework)."""
        cores, bias = tnlayers.load(path, name)
        return cls.from_cores(cores, bias, strategy, device)

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
        _check_input(x, self.in_features, self.cores[0].dtype, "MPOLinear")
        bucket = _bucket(math.prod(x.shape[:-1]))
        if self.strategy != "autotune":
            plan = _linear_plan(self.spec, bucket, self.strategy, _gradients(x, self.cores), ())
        elif torch.compiler.is_compiling():
            plan = _linear_plan(self.spec, bucket, self.strategy, "none", _tune_key(x, list(self.cores)))
        else:
            plan = _autotuned(self.spec, bucket, x, list(self.cores))
        if plan.builds_weight and self._serve_cached():
            return F.linear(x, self._inference_weight().T, self.bias)
        return execute(plan, x, list(self.cores), self.bias, _OPS)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._describe()}"


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
        raise ValueError(f"{name} must be a non-negative int or a pair of them, got {value!r}")
    return (pair[0], pair[1])


class MPOConv2d(_MPOModule):
    """``nn.Conv2d`` whose kernel, seen as a ``(in_channels*kh*kw, out_channels)`` matrix, is an MPO.

    Rows of that matrix are ordered ``(channel, kernel row, kernel column)``, as in
    ``conv.weight.reshape(out_channels, -1).T``. The forward either builds the kernel and calls
    ``F.conv2d``, or contracts the cores with the unfolded input patches, whichever the cost model
    prefers for the number of output positions (an explicit strategy builds the kernel when its plan
    builds ``W``, as ``"materialize"`` does, and unfolds otherwise).
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
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(
                f"kernel_size, stride and dilation must be positive, got {kernel_size!r}, {stride!r}, {dilation!r}"
            )
        self.padding = self._padding(padding)
        rows = in_channels * self.kernel_size[0] * self.kernel_size[1]
        in_modes = factorize_balanced(rows, n_cores) if in_modes is None else in_modes
        out_modes = factorize_balanced(out_channels, len(in_modes)) if out_modes is None else out_modes
        spec = tnlayers.MPOSpec(in_modes, out_modes, rank)
        if spec.in_features != rows or spec.out_features != out_channels:
            raise ValueError(
                f"in_modes {spec.in_modes} multiply to {spec.in_features} and out_modes {spec.out_modes} to "
                f"{spec.out_features}, but a {self.kernel_size[0]}x{self.kernel_size[1]} kernel from "
                f"{in_channels} to {out_channels} channels needs in_channels*kh*kw = {rows} and out_channels = "
                f"{out_channels}"
            )
        self._setup(spec, bias, init, strategy, device, dtype, seed)

    def _padding(self, padding: int | Sequence[int] | str) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` zero padding."""
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride {self.stride}")
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            return (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        rows, cols = _pair(padding, "padding")
        return (cols, cols, rows, rows)

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
        spec = tnlayers.spec_from_cores(cores)
        padding: Any = conv.padding
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            spec.in_modes,
            spec.out_modes,
            spec.ranks,
            stride=tuple(conv.stride),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(conv.dilation),
            bias=conv.bias is not None,
            strategy=strategy,
            device=weight.device,
            dtype=torch.float64,
            seed=0,
        )
        layer._load_cores(cores, None)
        layer = layer.to(weight.dtype)
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().clone())
        layer.decomposition = report
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
        left, right, top, bottom = self.padding
        padding: Any = (top, left) if (left, top) == (right, bottom) else "same"  # only 'same' is uneven
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, padding, self.dilation,
            bias=self.bias is not None, device=first.device, dtype=first.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        left, right, top, bottom = self.padding
        sizes = []
        for size, pad, k, s, d in zip(
            (height, width), (top + bottom, left + right), self.kernel_size, self.stride, self.dilation
        ):
            sizes.append((size + pad - d * (k - 1) - 1) // s + 1)
        if sizes[0] < 1 or sizes[1] < 1:
            raise ValueError(
                f"input of spatial size {(height, width)} is smaller than the dilated kernel "
                f"{self.kernel_size} (dilation {self.dilation}) after padding {self.padding}"
            )
        return sizes[0], sizes[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MPOConv2d expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"MPOConv2d expects a tensor of shape (batch, {self.in_channels}, height, width) or "
                f"({self.in_channels}, height, width), got {tuple(x.shape)}"
            )
        if x.dtype != self.cores[0].dtype:
            raise TypeError(f"MPOConv2d has dtype {self.cores[0].dtype} but the input has dtype {x.dtype}")
        if x.dim() == 3:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        height, width = self._output_size(x.shape[2], x.shape[3])
        plan, build_kernel = _conv_route(self.spec, _bucket(x.shape[0] * height * width), self.strategy)
        left, right, top, bottom = self.padding
        padding: tuple[int, int] = (top, left)
        if (left, top) != (right, bottom):
            x, padding = F.pad(x, self.padding), (0, 0)
        if build_kernel:
            kernel = self._inference_weight().T if self._serve_cached() else self.weight_matrix().T
            kernel = kernel.reshape(self.out_channels, self.in_channels, *self.kernel_size)
            return F.conv2d(x, kernel, self.bias, self.stride, padding, self.dilation)
        patches = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride).transpose(1, 2)
        y = execute(plan, patches, list(self.cores), self.bias, _OPS)  # (batch, positions, out_channels)
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, height, width)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, {self._describe()}"
        )


def _matches(name: str, patterns: str | Iterable[str] | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def compress(
    model: nn.Module,
    rank: int | Sequence[int] | None = None,
    tol: float | None = None,
    min_features: int = 256,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    n_cores: int = 4,
    modes: Callable[[str, int, int], tuple[Sequence[int], Sequence[int]] | None] | None = None,
) -> CompressionReport:
    """Replace, in place, the ``nn.Linear`` and ``nn.Conv2d`` layers of a trained model by MPO layers.

    Each matching layer is decomposed by TT-SVD with bond cap ``rank`` and/or relative error ``tol``
    (see :func:`tnlayers.from_dense`). A layer matches when ``max(in_features, out_features) >=
    min_features`` (for a conv, ``in_features = in_channels*kh*kw``), its name matches one of the
    ``include`` glob patterns (all names if ``None``) and none of ``exclude``. ``modes(name, in,
    out)`` may choose the factorisation (``None`` for balanced modes over ``n_cores`` cores). A layer
    whose MPO would not be smaller is kept, and listed in the report's ``skipped``, as is the output
    projection of ``nn.MultiheadAttention`` (which reads its ``.weight``). An
    ``nn.TransformerEncoderLayer`` whose feed-forward layers are replaced runs its regular path in
    inference too (its fused fast path reads their ``.weight``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    if rank is None and tol is None:
        raise ValueError("compress needs a bond cap (rank=...) or an error tolerance (tol=...), got neither")
    params_before = sum(p.numel() for p in model.parameters())
    rows, skipped = [], []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            shape = (module.weight[0].numel(), module.out_channels)
        else:
            continue
        if (include is not None and not _matches(name, include)) or _matches(name, exclude):
            continue
        if max(shape) < min_features:
            continue
        chosen = modes(name, *shape) if modes is not None else None
        in_modes, out_modes = chosen if chosen is not None else (None, None)
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            skipped.append((name, "nn.MultiheadAttention reads this projection's .weight directly"))
            continue
        if isinstance(module, nn.Linear):
            replacement: _MPOModule = MPOLinear.from_linear(module, in_modes, out_modes, rank, tol, n_cores)
        elif module.groups != 1 or module.padding_mode != "zeros":
            skipped.append((name, f"groups={module.groups}, padding_mode={module.padding_mode!r} not supported"))
            continue
        else:
            replacement = MPOConv2d.from_conv(module, in_modes, out_modes, rank, tol, n_cores)
        report = cast(tnlayers.DecompositionReport, replacement.decomposition)  # set by from_linear / from_conv
        if report.num_params >= report.dense_params:
            skipped.append((name, f"no saving at ranks {report.ranks}: {report.num_params} >= {report.dense_params}"))
            continue
        replacement.train(module.training)
        _replace(model, name, replacement)
        rows.append(
            LayerReport(
                name=name,
                kind=type(module).__name__,
                in_features=shape[0],
                out_features=shape[1],
                in_modes=report.spec.in_modes,
                out_modes=report.spec.out_modes,
                ranks=report.ranks,
                params_before=report.dense_params,
                params_after=report.num_params,
                relative_error=report.relative_error,
            )
        )
    params_after = sum(p.numel() for p in model.parameters())
    return CompressionReport(tuple(rows), params_before, params_after, tuple(skipped))


def freeze_cores(model: nn.Module, cores: str | Iterable[int] = "central", bias: bool = False) -> tuple[int, int]:
    """:meth:`MPOLinear.freeze` on every MPO layer of ``model``; returns ``(trainable, frozen)`` MPO parameters.

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
