"""The framework-free layer kit: everything an MPO layer needs that no framework has to do.

Adapters (``tnlayers.backends.torch``, ``.keras``, ``.numpy``) hold parameters and run plans; the
rules they share live here, once:

- :class:`LayerPlanner`: which plan a layer runs for a call, with one autotune policy;
- :func:`tune_key`: the one cache-key format (backend, device, dtype, gradients);
- :func:`layer_spec`, :class:`ConvGeometry`, :func:`conv_route`: shapes of dense and conv layers;
- argument and input checks (:func:`pair`, :func:`draw_seed`, :func:`check_input`, :func:`check_init`);
- :func:`freeze_flags`: which parameters a ``freeze`` call leaves trainable;
- :func:`compress_choice` and :func:`layer_report`: ``compress``'s selection rules and report rows.

The autotune policy, the same in every framework: with ``strategy="autotune"`` a layer times the
cost model's best candidates on its first call for a ``(batch bucket, device, dtype, gradients)``
when it runs eagerly on concrete inputs, and runs the remembered winner after that. Where nothing
can be timed (inside ``torch.compile``, ``tf.function`` or ``jax.jit``) it runs a winner tuned
before, else the cost model's choice.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .autotune import Autotuner, default_tuner
from .calibrate import RANK_LADDER, allocate, output_error
from .checkpoint import load
from .contract import ArrayOps, backward_reads, keep_within, recomputed_ids, weight_halves
from .cost import CostModel, cost_model_for
from .decompose import DecompositionReport, from_dense, to_dense, trivial_modes
from .init import INITIALIZERS
from .plan import (
    GRADIENTS,
    ContractionPlan,
    auto_candidates,
    batch_bucket,
    dense_cost,
    operand_needs,
    plan,
    plan_by_key,
    strategy_key,
    weight_step_sizes,
)
from .reports import LayerReport
from .spec import MPOSpec, RankClippedWarning, _as_positive_int, factorize_balanced, padded_size

__all__ = [
    "SEED_LIMIT",
    "ConvGeometry",
    "LayerPlanner",
    "MPOLayerMixin",
    "WeightedEmbedding",
    "check_indices",
    "check_init",
    "check_input",
    "check_row_weights",
    "compress_choice",
    "conv_route",
    "describe",
    "draw_seed",
    "embedding_cores",
    "embedding_rows",
    "embedding_spec",
    "freeze_flags",
    "gradients_needed",
    "layer_report",
    "layer_spec",
    "modes_or_none",
    "no_saving",
    "pair",
    "tune_key",
    "weighted_embedding_cores",
]

#: Seeds drawn for a layer lie in ``[0, SEED_LIMIT)``: a signed 32-bit int, which every framework's
#: generator (and ``keras.utils.set_random_seed``) accepts.
SEED_LIMIT = 2**31 - 1
#: ``compress`` leaves layers whose smaller side has fewer features dense by default (heads, tiny convs).
DEFAULT_MIN_FEATURES = 32


# --- arguments ---------------------------------------------------------------------------------


def draw_seed(seed: int | None, draw: Callable[[int], int]) -> int:
    """``seed``, or ``draw(SEED_LIMIT)`` from the framework's seeded generator (so its global seed governs init)."""
    if seed is None:
        return int(draw(SEED_LIMIT))
    return _as_positive_int(seed, "seed", minimum=0)


def pair(value: Any, name: str, minimum: int = 1) -> tuple[int, int]:
    """``(v, v)`` for an int ``v``, or a pair of ints, each at least ``minimum``."""
    values = (value, value) if isinstance(value, int) else value
    try:
        first, second = values
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in (first, second)):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return (first, second)


def modes_or_none(value: Any, name: str) -> tuple[int, ...] | None:
    """``None``, or the modes as a tuple (checked fully by :class:`MPOSpec`)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive integers or None, got {value!r}")
    return tuple(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def spec_of_arguments(in_arg: Any, out_arg: Any, rank: int | Sequence[int], n_cores: int | None = None) -> MPOSpec:
    """The spec of a dense layer's first two arguments, each a feature count (``784``, as ``nn.Linear``
    takes it; modes then balanced over ``n_cores``, 4 by default) or a mode list (``(4, 7, 7, 4)``)."""
    if not _is_count(in_arg) and not _is_count(out_arg):
        if n_cores is not None:
            raise ValueError(f"n_cores applies to feature counts; the modes {in_arg} and {out_arg} fix {len(in_arg)}")
        return MPOSpec(in_arg, out_arg, rank)
    in_modes = None if _is_count(in_arg) else modes_or_none(in_arg, "in_modes")
    out_modes = None if _is_count(out_arg) else modes_or_none(out_arg, "out_modes")
    in_features = int(in_arg) if in_modes is None else math.prod(in_modes)
    out_features = int(out_arg) if out_modes is None else math.prod(out_modes)
    return layer_spec(in_features, out_features, in_modes, out_modes, rank, n_cores)


def check_init(init: Any, name: str = "init") -> str:
    if init not in INITIALIZERS:
        raise ValueError(f"unknown {name} {init!r}; expected one of {', '.join(INITIALIZERS)}")
    return str(init)


#: What a layer in training keeps for its backward, at most, as a multiple of what the dense layer it
#: replaces keeps (its input): the planned backward recomputes intermediates beyond it (issue 19).
DEFAULT_SAVED_BUDGET = 1.5
#: Below this many rows the bound is not applied: what a step keeps there is small in bytes (about the
#: size of the cores), while recomputing it would double the per-call cost that dominates small batches.
MIN_BOUNDED_ROWS = 32


def check_saved_budget(saved_budget: Any) -> float | None:
    """``saved_budget`` checked: ``None`` (keep all the backward reads) or a number >= 1."""
    if saved_budget is None:
        return None
    if isinstance(saved_budget, bool) or not isinstance(saved_budget, (int, float)) or not saved_budget >= 1:
        raise ValueError(f"saved_budget must be None or a number >= 1 (times the input's bytes), got {saved_budget!r}")
    return float(saved_budget)


def kept_for_backward(
    plan: ContractionPlan, rows: int, needs: tuple[bool, ...], saved_budget: float
) -> frozenset[int] | None:
    """What a planned backward keeps within ``saved_budget`` times the input's bytes (see
    :func:`tnlayers.contract.keep_within`), or ``None`` when everything the backward reads fits, so
    autograd's own backward keeps no more than the budget, and below :data:`MIN_BOUNDED_ROWS` rows.
    A plan that builds ``W`` keeps nothing when ``W`` does not fit (its other intermediates are small
    and quick to rebuild)."""
    return None if rows < MIN_BOUNDED_ROWS else _kept_for_backward(plan, rows, needs, saved_budget)


@functools.lru_cache(maxsize=1024)
def backward_intermediates(plan: ContractionPlan, needs: tuple[bool, ...]) -> frozenset[int]:
    """The step outputs a backward asking for ``needs`` reads: what an unbounded forward keeps."""
    n_operands = len(plan.operand_shapes)
    return frozenset(k for k in backward_reads(plan.steps, n_operands, needs) if k >= n_operands)


@functools.lru_cache(maxsize=1024)
def _kept_for_backward(
    plan: ContractionPlan, rows: int, needs: tuple[bool, ...], saved_budget: float
) -> frozenset[int] | None:
    size = rows * plan.spec.in_features
    if plan.builds_weight:  # autograd keeps x (for the cores), W (for x), and the inputs of W's products
        chain = sum(m * k + k * n for m, n, k, _ in weight_step_sizes(plan.spec))
        kept = (size + chain if any(needs[1:]) else 0) + (plan.spec.dense_params if needs[0] else 0)
        return None if kept <= saved_budget * size else frozenset()
    reads_x = 0 in backward_reads(plan.steps, len(plan.operand_shapes), needs)
    keep = keep_within(plan, rows, needs, max(int(saved_budget * size) - (size if reads_x else 0), 0))
    return None if keep == backward_intermediates(plan, needs) else keep


@functools.lru_cache(maxsize=1024)
def keeps_weight_halves(plan: ContractionPlan, rows: int, needs: tuple[bool, ...], saved_budget: float) -> bool:
    """Whether a planned backward of ``plan``, which builds ``W`` and keeps nothing else (see
    :func:`kept_for_backward`), keeps ``W``'s two small halves (:func:`tnlayers.contract.weight_halves`):
    when they fit ``saved_budget`` beside the input it keeps for the cores' gradients. The backward then
    builds ``W`` again only for the input's gradient, from the halves."""
    if not plan.builds_weight or plan.spec.n_cores == 1:
        return False
    left, right, bond, _ = weight_step_sizes(plan.spec)[-1]  # L @ R: (left, bond) @ (bond, right)
    size = rows * plan.spec.in_features
    return (size if any(needs[1:]) else 0) + (left + right) * bond <= saved_budget * size


def recomputed_steps(
    plan_: ContractionPlan, rows: int, needs: tuple[bool, ...], saved_budget: float | None
) -> tuple[tuple[int, int, int, int], ...] | None:
    """The ``(M, N, K, elements moved)`` of the products a training call by ``plan_`` runs again in its
    backward under ``saved_budget`` (see :func:`kept_for_backward`), or ``None`` where everything the
    backward reads fits and autograd's own backward runs. ``needs``: per operand (``x``, then the cores)."""
    keep = None if saved_budget is None else kept_for_backward(plan_, rows, needs, saved_budget)
    if keep is None:
        return None
    if plan_.builds_weight:  # W again for x's gradient (from the halves if kept); the halves for the cores'
        sizes = weight_step_sizes(plan_.spec)
        if keeps_weight_halves(plan_, rows, needs, saved_budget):
            return tuple(sizes[-1:] if needs[0] else [])
        return tuple((sizes if needs[0] else []) + (sizes[:-1] if any(needs[1:]) else []))
    n_operands = len(plan_.operand_shapes)
    again = recomputed_ids(plan_.steps, n_operands, keep, backward_reads(plan_.steps, n_operands, needs))
    return tuple(plan_.step_sizes[id_out - n_operands] for id_out in sorted(again))


def training_cost(
    plan_: ContractionPlan, rows: int, needs: tuple[bool, ...], saved_budget: float | None, model: CostModel
) -> float:
    """What a training call by ``plan_`` costs under ``model``, with ``saved_budget`` bounding what it keeps:
    ``plan_.cost`` (forward and backward as autograd runs them) where everything the backward reads fits,
    else that plus the steps the planned backward recomputes (:func:`recomputed_steps`) and its own work
    per step (``CostModel.planned_step_overhead``)."""
    recomputed = recomputed_steps(plan_, rows, needs, saved_budget)
    return plan_.cost + model.bound_cost(len(plan_.steps), recomputed)


@functools.lru_cache(maxsize=1024)
def _auto_within_budget(
    spec: MPOSpec, bucket: int, model: CostModel, gradients: str, saved_budget: float
) -> ContractionPlan:
    """``auto``'s choice for training under ``saved_budget``: its candidates ranked by :func:`training_cost`."""
    candidates = auto_candidates(spec, bucket, model, gradients)
    needs = operand_needs(gradients, spec.n_cores + 1)
    costs = [training_cost(candidate, bucket, needs, saved_budget, model) for candidate in candidates]
    return candidates[model.choose_index(costs, [candidate.flops for candidate in candidates])]


def check_input(shape: Sequence[Any], in_features: int, what: str) -> None:
    """A ``ValueError`` naming the expected width unless ``shape`` is ``(..., in_features)`` (``None`` passes)."""
    if len(shape) == 0 or (shape[-1] is not None and shape[-1] != in_features):
        raise ValueError(f"{what} expects input of shape (..., {in_features}), got {tuple(shape)}")


def layer_spec(
    in_features: int,
    out_features: int,
    in_modes: Sequence[int] | None,
    out_modes: Sequence[int] | None,
    rank: int | Sequence[int],
    n_cores: int | None = None,
    what: str = "in_features",
    out_what: str = "out_features",
) -> MPOSpec:
    """The spec of a layer: modes given, or balanced over ``n_cores`` (4, or as many as the modes given).

    Bonds above what the modes allow are clipped; the :class:`RankClippedWarning` is given only when the
    user chose both mode lists (with modes the library picked, ``rank`` is a cap it applies itself)."""
    given = next((len(m) for m in (in_modes, out_modes) if m is not None), None)
    n = given or (4 if n_cores is None else _as_positive_int(n_cores, "n_cores"))
    with warnings.catch_warnings():
        if in_modes is None or out_modes is None:
            warnings.simplefilter("ignore", RankClippedWarning)
        spec = MPOSpec(
            factorize_balanced(in_features, n) if in_modes is None else in_modes,
            factorize_balanced(out_features, n) if out_modes is None else out_modes,
            rank,
        )
    if spec.in_features != in_features:
        raise ValueError(f"in_modes {spec.in_modes} multiply to {spec.in_features}, but {what} = {in_features}")
    if spec.out_features != out_features:
        raise ValueError(f"out_modes {spec.out_modes} multiply to {spec.out_features}, but {out_what} = {out_features}")
    return spec


def describe(spec: MPOSpec, has_bias: bool) -> str:
    """The layer summary adapters put in their ``repr``."""
    return (
        f"modes={'x'.join(map(str, spec.in_modes))}->{'x'.join(map(str, spec.out_modes))}, "
        f"ranks={spec.ranks}, params={spec.num_params:,} of {spec.dense_params:,} "
        f"(compression {1 / spec.compression_ratio:.1f}x), bias={has_bias}"
    )


def conv_channels(spec: MPOSpec, kernel_size: Any) -> tuple[tuple[int, int], int]:
    """``((kh, kw), channels)`` of a convolution whose kernel matrix ``(channels*kh*kw, filters)`` is ``spec``."""
    kh, kw = pair(kernel_size, "kernel_size")
    if spec.in_features % (kh * kw):
        raise ValueError(f"the cores map {spec.in_features} inputs, not a multiple of the kernel's {kh}*{kw} positions")
    return (kh, kw), spec.in_features // (kh * kw)


# --- planning ----------------------------------------------------------------------------------


def gradients_needed(grad_enabled: bool, cores_trainable: bool, input_needs_grad: bool) -> str:
    """What the backward of this call will need: ``"none"``, the cores' gradients, or the input's too."""
    if not grad_enabled or not cores_trainable:
        return "none"
    return "all" if input_needs_grad else "cores"


def tune_key(backend: str, device: str, dtype: str, gradients: str) -> tuple[str, str, str, str]:
    """The autotune cache key of a call, the same format in every framework."""
    if gradients not in GRADIENTS:
        raise ValueError(f"gradients must be one of {GRADIENTS}, got {gradients!r}")
    return (backend, device, dtype, gradients)


@dataclass(frozen=True)
class LayerPlanner:
    """Plans for one layer: its spec, its strategy (as :func:`tnlayers.plan.strategy_key` keeps it) and
    the cost model of its backend. Frozen and hashable, so compilers can treat a lookup as a constant."""

    spec: MPOSpec
    strategy: Any
    backend: str

    @classmethod
    def make(cls, spec: MPOSpec, strategy: Any, backend: str) -> LayerPlanner:
        """Checks ``strategy`` now (an optimiser searches once), not at the first call."""
        return cls(spec, strategy_key(spec, strategy), backend)

    @property
    def cost_model(self) -> CostModel:
        return cost_model_for(self.backend)

    @property
    def autotunes(self) -> bool:
        return bool(self.strategy == "autotune")

    def plan(
        self,
        rows: Any,
        gradients: str,
        key: Sequence[str] = (),
        timer: Callable[[ContractionPlan], Callable[[], object]] | None = None,
        tuner: Autotuner | None = None,
        saved_budget: float | None = None,
    ) -> ContractionPlan:
        """The plan for ``rows`` input rows (``None`` if unknown) and what the backward will need.

        With ``strategy="autotune"``: the winner remembered under ``key`` (see :func:`tune_key`); else,
        when the adapter can time now, it passes ``timer`` (a plan -> a call that runs it on this
        input) and the candidates are timed; else the cost model's choice. For training under a
        ``saved_budget`` (from :data:`MIN_BOUNDED_ROWS` rows), ``auto`` ranks its candidates by
        :func:`training_cost`: a plan whose backward must recompute pays for it.
        """
        bucket = batch_bucket(rows)
        if self.autotunes:
            tuner = default_tuner() if tuner is None else tuner
            known = tuner.cached(self.spec, bucket, key)
            if known is not None:
                return known
            if timer is not None:
                return tuner.tune(self.spec, bucket, timer, key, self.cost_model, gradients=gradients)
        if self.strategy == "auto" and gradients != "none" and saved_budget is not None and bucket >= MIN_BOUNDED_ROWS:
            return _auto_within_budget(self.spec, bucket, self.cost_model, gradients, saved_budget)
        return plan_by_key(self.spec, bucket, self.strategy, self.cost_model, gradients)

    def conv_route(self, rows: Any) -> tuple[ContractionPlan, bool]:
        """:func:`conv_route` for this layer (its strategy was checked when it was made)."""
        return _conv_route_cached(self.spec, batch_bucket(rows), self.strategy, self.cost_model)

    def reuses_weight(self, plan_: ContractionPlan) -> bool:
        """Whether inference (eval, no gradients) by ``plan_`` runs as one product with a kept ``W``: when
        ``plan_`` builds ``W`` anyway, or, for ``auto`` and ``autotune``, when ``W`` stays in the cache
        between calls (:data:`CACHED_WEIGHT_ELEMENTS`) or the plan moves at least ``W``'s elements itself,
        and either the plan needs at least the dense product's flops or, for a small ``W``
        (:data:`SMALL_WEIGHT_ELEMENTS`) and a cost model fitted to the backend (``CostModel.fitted``: torch),
        the model rates its chain of products dearer than the one product with ``W`` (at small batches each
        product's fixed cost dominates: four small products cost more than one of the same total size). An
        explicit ordering is run as asked."""
        return _reuses_weight(self, plan_, self.cost_model)  # cached: it runs on every inference call


@functools.lru_cache(maxsize=1024)
def _reuses_weight(planner: LayerPlanner, plan_: ContractionPlan, model: CostModel) -> bool:
    """:meth:`LayerPlanner.reuses_weight` (``model``: the planner's cost model, part of the cache key)."""
    if plan_.builds_weight:
        return True
    if planner.strategy not in ("auto", "autotune"):
        return False
    spec = planner.spec
    weight = spec.in_features * spec.out_features
    cached = weight <= CACHED_WEIGHT_ELEMENTS
    if not cached and plan_.memory_traffic < weight:
        return False
    if plan_.flops >= 2 * plan_.batch_size * weight:
        return True
    if weight > SMALL_WEIGHT_ELEMENTS or not model.fitted:  # a large W is read from memory on every call
        return False
    one_product = model.step_cost(plan_.batch_size, spec.out_features, spec.in_features, 0)
    return one_product < model.estimate(plan_.step_sizes)


#: A kept ``W`` up to this many elements (8 MiB in float32) stays in the CPU's cache between calls, so one
#: product with it costs about its flops; a larger one is read from memory on every call (a 4096 x 4096 ``W``
#: at batch 1: 2.3 ms, where its MPO plan took 1.1 ms at 1.5x the flops).
CACHED_WEIGHT_ELEMENTS = 2**21

#: A kept ``W`` up to this many elements (1 MiB in float32) is read from the fast caches, so one product
#: with it costs its flops and one call's fixed cost: inference may then reuse it even where the plan needs
#: fewer flops. Measured (2 threads, batch 8 to 256): FC2's 784 x 256 ``W`` took 2.8x ``nn.Linear`` at batch 1
#: by its plan's four products and 2.8x -> 1.3-2.1x at batch 8; a 1024 x 1024 ``W`` (4 MiB) is read from
#: memory (250 us a call at batch 1 here), and reusing it where the plan needed a quarter of the flops
#: doubled the time.
SMALL_WEIGHT_ELEMENTS = 2**18


# --- convolutions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride, dilation and zero padding of a 2-D convolution, framework-free.

    ``padding`` is ``(top, bottom, left, right)``, or ``"same"`` (output size ``ceil(size / stride)``,
    the extra row or column of an odd total at the bottom or right, as TensorFlow and torch do).
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] | str = (0, 0, 0, 0)

    @classmethod
    def make(cls, kernel_size: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> ConvGeometry:
        """From layer arguments: ``padding`` an int, a pair ``(rows, cols)``, ``"valid"`` or ``"same"``."""
        geometry = cls(pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(dilation, "dilation"))
        if isinstance(padding, str):
            if padding.lower() not in ("valid", "same"):
                raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
            if padding.lower() == "valid":
                return geometry
            return cls(geometry.kernel_size, geometry.stride, geometry.dilation, "same")
        rows, cols = pair(padding, "padding", minimum=0)
        return cls(geometry.kernel_size, geometry.stride, geometry.dilation, (rows, rows, cols, cols))

    @property
    def extent(self) -> tuple[int, int]:
        """The dilated kernel's height and width."""
        return (
            self.dilation[0] * (self.kernel_size[0] - 1) + 1,
            self.dilation[1] * (self.kernel_size[1] - 1) + 1,
        )

    @property
    def rows_per_channel(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` zero padding for an input of this size."""
        if self.padding != "same":
            return self.padding  # type: ignore[return-value]
        pads = []
        for size, stride, extent in zip((height, width), self.stride, self.extent):
            total = max((-(-size // stride) - 1) * stride + extent - size, 0)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output height and width; a ``ValueError`` when the dilated kernel does not fit the padded input."""
        top, bottom, left, right = self.pads(height, width)
        sizes = [
            (size + pad - extent) // stride + 1
            for size, pad, extent, stride in zip(
                (height, width), (top + bottom, left + right), self.extent, self.stride
            )
        ]
        if sizes[0] < 1 or sizes[1] < 1:
            raise ValueError(
                f"input of spatial size {(height, width)} is smaller than the dilated kernel {self.extent} "
                f"(kernel_size {self.kernel_size}, dilation {self.dilation}) after padding {(top, bottom, left, right)}"
            )
        return sizes[0], sizes[1]


def conv_route(
    spec: MPOSpec, rows: Any, strategy: Any = "auto", *, cost_model: CostModel | None = None
) -> tuple[ContractionPlan, bool]:
    """How an MPO convolution runs ``rows`` output positions (batch x height x width).

    Returns the plan for contracting the unfolded input (``rows`` patches of ``in_features``) and
    whether building the kernel and running the framework's own convolution is cheaper instead.
    ``"auto"`` (and ``"autotune"``: convolutions do not time) decide by the cost model, where unfolding
    writes and reads every patch once more; an explicit strategy builds the kernel when its plan does
    (:attr:`ContractionPlan.builds_weight`, e.g. ``"materialize"``), and unfolds otherwise.
    """
    model = cost_model_for("numpy") if cost_model is None else cost_model
    key = strategy_key(spec, strategy) if not isinstance(strategy, tuple) else strategy
    return _conv_route_cached(spec, batch_bucket(rows), key, model)


@functools.lru_cache(maxsize=1024)
def _conv_route_cached(spec: MPOSpec, bucket: int, strategy: Any, model: CostModel) -> tuple[ContractionPlan, bool]:
    chosen = plan(spec, bucket, "auto" if strategy == "autotune" else strategy, cost_model=model)
    if chosen.strategy != "auto":
        return chosen, chosen.builds_weight
    unfolded = chosen.cost + 2 * bucket * spec.in_features / model.bandwidth
    return chosen, dense_cost(spec, bucket, cost_model=model) < unfolded


# --- freezing and compressing ------------------------------------------------------------------


def freeze_flags(spec: MPOSpec, cores: str | Iterable[int] = "central", bias: bool = False) -> tuple[list[bool], bool]:
    """Which parameters stay trainable after ``layer.freeze(cores, bias)``: per core, and the bias.

    ``cores`` names the frozen ones: ``"central"`` (the largest, the default), ``"auxiliary"`` (the
    others), ``"all"`` or indices; the other cores become trainable. ``bias=True`` freezes the bias too.
    Frozen parameters are left out of training in the framework's own way, so they stay bit-identical.
    """
    frozen = spec.select_cores(cores)
    return [k not in frozen for k in range(spec.n_cores)], not bias


def _matches(name: str, patterns: str | Iterable[str] | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_compress_budget(rank: Any, tol: Any) -> None:
    """``compress`` needs a bond cap or an error tolerance (each checked by :func:`tnlayers.from_dense`)."""
    if rank is None and tol is None:
        raise ValueError("compress needs a bond cap (rank=...) or an error tolerance (tol=...), got neither")


def compress_choice(
    name: str,
    in_features: int,
    out_features: int,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_features: int = DEFAULT_MIN_FEATURES,
) -> bool:
    """Whether ``compress`` tries the layer ``name``: its smaller side has at least ``min_features`` (a
    classifier head of 10 outputs is left alone: an MPO of it saves little and costs accuracy), its name
    matches one of the ``include`` glob patterns (all names if ``None``) and none of ``exclude``."""
    if (include is not None and not _matches(name, include)) or _matches(name, exclude):
        return False
    return min(in_features, out_features) >= min_features


def no_saving(report: DecompositionReport, extra_params: int = 0) -> str | None:
    """Why a decomposed layer is kept dense (its MPO, with ``extra_params`` beside the cores, would not be
    smaller), or ``None``."""
    params = report.num_params + extra_params
    if params >= report.dense_params:
        reason = f"no saving at ranks {report.ranks}: {params} >= {report.dense_params}"
        trivial = trivial_modes(report.spec.in_modes, report.spec.out_modes)
        return reason if trivial is None else f"{reason}; {trivial}"
    return None


def layer_report(
    name: str, kind: str, report: DecompositionReport, output_error: float | None = None, extra_params: int = 0
) -> LayerReport:
    """The report row of one replaced layer (``output_error``: on calibration inputs, where fitted to them;
    ``extra_params``: parameters beside the cores, as a count-weighted embedding's row scales)."""
    spec = report.spec
    return LayerReport(
        name=name,
        kind=kind,
        in_features=spec.in_features,
        out_features=spec.out_features,
        in_modes=spec.in_modes,
        out_modes=spec.out_modes,
        ranks=report.ranks,
        params_before=report.dense_params,
        params_after=report.num_params + extra_params,
        relative_error=report.relative_error,
        output_error=output_error,
    )


class BudgetCandidate(NamedTuple):
    """A layer a whole-model budget may replace, as the backends describe it to :func:`budget_caps`."""

    name: str
    shape: tuple[int, int]  # (in, out) of its matrix; an embedding: (rows, dim)
    embedding: bool
    in_modes: Sequence[int] | None
    out_modes: Sequence[int] | None
    matrix: Callable[[], NDArray[np.float64]]  # forms the float64 (in, out) matrix when the budget reads it


def check_compress_options(rank: Any, tol: Any, budget: Any, sensitivity: Any) -> None:
    """``compress`` needs a bond cap or a tolerance, or a whole-model ``budget`` (a fraction of the
    model's parameters in (0, 1)); ``sensitivity`` only weighs the layers within a budget."""
    if budget is None:
        check_compress_budget(rank, tol)
        if sensitivity is not None:
            raise ValueError("sensitivity weighs the layers in a whole-model budget: give budget= as well")
    elif isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ValueError(f"budget must be a fraction of the model's parameters in (0, 1), got {budget!r}")


def check_sensitivity(sensitivity: Any, names: Sequence[str]) -> dict[str, float] | None:
    """``sensitivity`` (layer name -> a finite number >= 0, one per candidate) as a dict of floats."""
    if sensitivity is None:
        return None
    if not isinstance(sensitivity, Mapping):
        raise TypeError(f"sensitivity must map layer names to numbers, got {type(sensitivity).__name__}")
    missing = [name for name in names if name not in sensitivity]
    if missing:
        raise ValueError(f"sensitivity has no entry for the layers {missing} (one number >= 0 per candidate layer)")
    weights = {}
    for name in names:
        value = sensitivity[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"sensitivity[{name!r}] must be a finite number >= 0, got {value!r}")
        weights[name] = float(value)
    return weights


def budget_caps(
    candidates: Sequence[BudgetCandidate],
    grams: Mapping[str, Any],
    target: int,
    params_before: int,
    rank: Any,
    tol: float | None,
    n_cores: int,
    sensitivity: Mapping[str, float] | None = None,
    values_per_row: int = 1,
) -> dict[str, Any]:
    """The bond cap of each candidate under a whole-model parameter ``target`` (absent: kept dense).

    Each cap of :data:`tnlayers.calibrate.RANK_LADDER` (up to ``rank`` where it is an int) is scored by
    the layer's error at that cap: the TT-SVD error, or the output error on its Gram matrix where
    ``grams`` has one; for an embedding, the bound its (count-weighted, where counted) TT-SVD spectra
    give. Errors are weighted by ``sqrt(sensitivity[name])`` where given, and
    :func:`tnlayers.calibrate.allocate` picks the caps: the layers that lose least give most.
    ``values_per_row``: what the framework counts per row of a count-weighted table beside its cores (1 in
    PyTorch, the scales; 2 in Keras, whose ``count_params`` counts the row order too).
    """
    dense_sizes = {c.name: math.prod(c.shape) for c in candidates}
    fixed = params_before - sum(dense_sizes.values())
    ladder = [r for r in RANK_LADDER if not isinstance(rank, int) or r <= rank]
    options: dict[str, list[tuple[int, float]]] = {}
    caps: dict[str, list[Any]] = {}
    for candidate in candidates:
        name, matrix = candidate.name, candidate.matrix()
        pairs: list[tuple[int, float]] = [(dense_sizes[name], 0.0)]
        chosen_caps: list[Any] = [None]
        seen = set()
        counts = grams.get(name) if candidate.embedding else None
        extra = 0 if counts is None else values_per_row * matrix.shape[0]  # a count-weighted table's row scales
        modes = (candidate.in_modes, candidate.out_modes)
        if candidate.embedding:  # one TT-SVD gives every bond's spectrum; a cap's error is bounded by the tails cut
            if counts is None:
                _, report = embedding_cores(matrix, max(ladder), tol, n_cores, *modes)
                total = float(np.sum(matrix**2))
            else:  # the count-weighted table's spectra: its errors are the lookups' (output) errors
                report = weighted_embedding_cores(matrix, counts, max(ladder), tol, n_cores, *modes).report
                total = float(np.sum((np.asarray(counts) + DEFAULT_SMOOTHING)[:, None] * matrix**2))
            spec, spectra = report.spec, report.singular_values
        else:
            spec = layer_spec(matrix.shape[0], matrix.shape[1], *modes, 1, n_cores)
        for cap in ladder:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RankClippedWarning)
                params = MPOSpec(spec.in_modes, spec.out_modes, cap).num_params + extra
            if params >= dense_sizes[name] or params in seen:
                continue
            seen.add(params)
            if candidate.embedding:
                lost = sum(float(np.sum(values[cap:] ** 2)) for values in spectra)
                error = min(1.0, math.sqrt(lost / total)) if total > 0 else 0.0
            else:
                cores, fit = from_dense(matrix, spec.in_modes, spec.out_modes, cap, tol)
                gram = grams.get(name)
                error = fit.relative_error if gram is None else output_error(cores, matrix, gram)
            pairs.append((params, error if sensitivity is None else error * math.sqrt(sensitivity[name])))
            chosen_caps.append(cap)
        options[name], caps[name] = pairs, chosen_caps
    smallest = sum(min(params for params, _ in pairs) for pairs in options.values())
    if target < fixed + smallest:
        raise ValueError(
            f"a budget of {target:,} of the model's {params_before:,} parameters cannot be met: the parts compress "
            f"leaves alone hold {fixed:,}, and the {len(options)} layers it may replace need at least "
            f"{smallest:,} more"
        )
    picked = allocate(options, target - fixed)
    return {name: caps[name][k] for name, k in picked.items() if caps[name][k] is not None}


# --- embeddings -------------------------------------------------------------------------------


def embedding_spec(
    num_embeddings: int,
    embedding_dim: int,
    rank: int | Sequence[int],
    n_cores: int = 4,
    row_modes: Sequence[int] | None = None,
    dim_modes: Sequence[int] | None = None,
) -> MPOSpec:
    """The spec of an ``(num_embeddings, embedding_dim)`` table as an MPO: rows are the "in" side, padded
    to :func:`tnlayers.spec.padded_size` when ``row_modes`` are not given (a vocabulary of awkward factors)."""
    rows = _as_positive_int(num_embeddings, "num_embeddings")
    dim = _as_positive_int(embedding_dim, "embedding_dim")
    n = len(row_modes) if row_modes is not None else _as_positive_int(n_cores, "n_cores")
    padded = padded_size(rows, n) if row_modes is None else math.prod(row_modes)
    if padded < rows:
        raise ValueError(f"row_modes {tuple(row_modes or ())} multiply to {padded} < num_embeddings = {rows}")
    return layer_spec(padded, dim, row_modes, dim_modes, rank, n, "the padded rows", "embedding_dim")


def embedding_cores(
    table: Any,
    max_rank: int | Sequence[int] | None = None,
    tol: float | None = None,
    n_cores: int = 4,
    row_modes: Sequence[int] | None = None,
    dim_modes: Sequence[int] | None = None,
) -> tuple[list[Any], DecompositionReport]:
    """TT-SVD of an ``(num_embeddings, embedding_dim)`` table, its rows padded with zeros to the modes'
    product (:func:`embedding_spec`); the report's error is measured on the padded table."""
    dense = np.asarray(table)
    if dense.ndim != 2:
        raise ValueError(f"an embedding table must be 2-D (num_embeddings, embedding_dim), got shape {dense.shape}")
    spec = embedding_spec(dense.shape[0], dense.shape[1], 1, n_cores, row_modes, dim_modes)
    padded = np.zeros((spec.in_features, dense.shape[1]), dtype=dense.dtype)
    padded[: dense.shape[0]] = dense
    return from_dense(padded, spec.in_modes, spec.out_modes, max_rank, tol)


#: Pseudo-count added to every row's lookup count in :func:`weighted_embedding_cores` (rows never seen in
#: the calibration text keep a small weight, so their scale stays bounded).
DEFAULT_SMOOTHING = 0.1


class WeightedEmbedding(NamedTuple):
    """A count-weighted MPO table: row ``t`` is ``row_scale[t] * mpo_row(row_order[t])``."""

    cores: list[Any]
    report: DecompositionReport
    """TT-SVD's report on the weighted, reordered, padded table: its error is the count-weighted one."""
    row_order: NDArray[np.int64]
    """``(num_embeddings,)``: the MPO row of each table row (a permutation; most-looked-up rows first)."""
    row_scale: NDArray[np.float64]
    """``(num_embeddings,)``: ``1 / sqrt(count + smoothing)`` of each table row."""


def weighted_embedding_cores(
    table: Any,
    counts: Any,
    max_rank: int | Sequence[int] | None = None,
    tol: float | None = None,
    n_cores: int = 4,
    row_modes: Sequence[int] | None = None,
    dim_modes: Sequence[int] | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
) -> WeightedEmbedding:
    """TT-SVD of a ``(num_embeddings, embedding_dim)`` table fitted to how often each row is looked up.

    ``counts[t]`` is how often row ``t`` was looked up on calibration text (``collect_grams`` gives it:
    the diagonal of ``X^T X`` for one-hot inputs ``X``). The rows are reordered by descending count
    (ties by index), so the most significant row digit groups frequency bands; each row is multiplied by
    ``sqrt(count + smoothing)`` before the TT-SVD and divided by it again through ``row_scale``. The
    truncation thus minimises the count-weighted error ``sum_t (count_t + smoothing) ||E_t - E'_t||^2``
    (the embedding's output error on the calibration text) instead of treating every row alike. Costs
    ``num_embeddings`` more parameters (the scales) and a stored permutation.
    """
    dense = np.asarray(table)
    if dense.ndim != 2:
        raise ValueError(f"an embedding table must be 2-D (num_embeddings, embedding_dim), got shape {dense.shape}")
    weights = np.asarray(counts, dtype=np.float64)
    if weights.shape != (dense.shape[0],):
        raise ValueError(
            f"counts must have one entry per table row, shape ({dense.shape[0]},), got shape {weights.shape}"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("counts must be finite and >= 0 (how often each row was looked up)")
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 < smoothing < math.inf:
        raise ValueError(f"smoothing must be a positive number (a pseudo-count per row), got {smoothing!r}")
    order = np.argsort(-weights, kind="stable")  # order[p]: the table row at MPO row p
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order), dtype=np.int64)
    root = np.sqrt(weights + float(smoothing))
    cores, report = embedding_cores((dense * root[:, None])[order], max_rank, tol, n_cores, row_modes, dim_modes)
    return WeightedEmbedding(cores, report, position, 1.0 / root)


def weighted_embedding_report(table: Any, fit: WeightedEmbedding) -> DecompositionReport:
    """The report a count-weighted embedding layer keeps: the weighted table's spec and singular values,
    and the plain table error ``||E - E'|| / ||E||`` (as a calibrated linear layer reports its weight
    error; the count-weighted error is ``compress``'s ``output_error``)."""
    dense = np.asarray(table, dtype=np.float64)
    approximation = to_dense(fit.cores)[fit.row_order] * fit.row_scale[:, None]
    norm = float(np.linalg.norm(dense))
    error = float(np.linalg.norm(dense - approximation)) / norm if norm > 0 else 0.0
    return DecompositionReport(fit.report.spec, error, fit.report.singular_values)


def check_row_weights(row_order: Any, row_scale: Any, num_embeddings: int, mpo_rows: int) -> None:
    """A ``ValueError``/``TypeError`` unless ``row_order`` (``None`` or a permutation of table rows into
    ``[0, mpo_rows)``) and ``row_scale`` (``None`` or finite numbers) hold one entry per table row
    (NumPy views of them; see :class:`WeightedEmbedding`)."""
    if row_order is not None:
        order = np.asarray(row_order)
        if not np.issubdtype(order.dtype, np.integer):
            raise TypeError(f"row_order must hold integers (the MPO row of each table row), got dtype {order.dtype}")
        if order.shape != (num_embeddings,):
            raise ValueError(f"row_order must have shape ({num_embeddings},), got {order.shape}")
        if order.size and (int(order.min()) < 0 or int(order.max()) >= mpo_rows):
            raise ValueError(
                f"row_order must lie in [0, {mpo_rows}) (the MPO's rows), got {int(order.min())} .. {int(order.max())}"
            )
        if len(np.unique(order)) != order.size:
            raise ValueError("row_order must not send two table rows to one MPO row")
    if row_scale is not None:
        scale = np.asarray(row_scale)
        if scale.shape != (num_embeddings,):
            raise ValueError(f"row_scale must have shape ({num_embeddings},), got {scale.shape}")
        if not np.issubdtype(scale.dtype, np.floating) or not np.all(np.isfinite(scale)):
            raise ValueError(f"row_scale must hold finite floating-point numbers, got dtype {scale.dtype}")


def check_indices(indices: Any, num_embeddings: int) -> None:
    """A ``ValueError``/``TypeError`` unless ``indices`` (a NumPy view of them) are integers in
    ``[0, num_embeddings)`` (the padded rows are never returned)."""
    values = np.asarray(indices)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"embedding indices must be integers, got dtype {values.dtype}")
    if values.size and (int(values.min()) < 0 or int(values.max()) >= num_embeddings):
        bad = int(values.min()) if int(values.min()) < 0 else int(values.max())
        raise ValueError(f"embedding index {bad} is out of range: expected 0 <= index < {num_embeddings}")


def embedding_rows(
    cores: Sequence[Any], indices: Any, row_modes: Sequence[int], gather: Callable[[Any, Any], Any], ops: ArrayOps
) -> Any:
    """The table rows of flat ``indices`` (shape ``(B,)``), never forming the ``(rows, dim)`` table.

    Index ``n`` has digits ``(i_1 .. i_n)`` in the row modes (``i_1`` most significant, as in
    ``to_dense``); ``gather(core, digits)`` returns ``core[:, digits]`` as ``(B, r, j, r')``; ``ops`` are
    the framework's (:class:`tnlayers.contract.ArrayOps`). Two routes, whichever moves and multiplies
    fewer numbers (:func:`embedding_lookup_route`):

    - ``"chains"``: each row's slices of the cores, gathered and contracted by two chains of batched
      products that meet at the largest bond (that bond is contracted once, in the last product);
    - ``"halves"``: the two halves of the table, split at the largest bond
      (:func:`tnlayers.contract.weight_halves`, each far smaller than the table), then one batched
      product of each row's two slices. Pays for many rows and large inner bonds: a 30,522 x 384 table
      at bond 768 looks 523 distinct rows up with 1.6 GMAC of slices gathered by the chains, 0.2 by the
      halves.

    Returns ``(B, dim)``.
    """
    reshape = ops.reshape
    shapes = [tuple(int(d) for d in core.shape) for core in cores]
    strides = [math.prod(row_modes[k + 1 :]) for k in range(len(row_modes))]
    digits = [(indices // stride) % mode for mode, stride in zip(row_modes, strides)]
    rows = int(indices.shape[0]) if isinstance(indices.shape[0], int) else None
    route, split = embedding_lookup_route(tuple(shapes), rows)
    if route == "halves":
        return _rows_from_halves(cores, shapes, digits, split, gather, ops)
    pieces = [gather(core, digit) for core, digit in zip(cores, digits)]
    left = reshape(pieces[0], (-1, shapes[0][2], shapes[0][3]))  # (B, J, r)
    for piece, (r, _, cols, r_next) in zip(pieces[1:split], shapes[1:split]):
        left = reshape(left @ reshape(piece, (-1, r, cols * r_next)), (-1, int(left.shape[1]) * cols, r_next))
    if split == len(pieces):
        return reshape(left, (-1, int(left.shape[1])))
    right = reshape(pieces[-1], (-1, shapes[-1][0], shapes[-1][2]))  # (B, r, J')
    for piece, (r, _, cols, r_next) in zip(reversed(pieces[split:-1]), reversed(shapes[split:-1])):
        right = reshape(reshape(piece, (-1, r * cols, r_next)) @ right, (-1, r, cols * int(right.shape[2])))
    product = left @ right  # (B, J, J'): the largest bond, contracted once
    return reshape(product, (-1, int(product.shape[1]) * int(product.shape[2])))


@functools.lru_cache(maxsize=256)
def embedding_lookup_route(shapes: tuple[tuple[int, ...], ...], rows: int | None) -> tuple[str, int]:
    """``("chains" | "halves", split)`` for looking ``rows`` rows up in cores of ``shapes``: the route of
    :func:`embedding_rows` that moves and multiplies fewer numbers, and the core where the left part
    ends (after the largest inner bond). ``rows=None`` (a symbolic batch): the chains."""
    bonds = [shape[0] for shape in shapes[1:]]
    split = 1 + bonds.index(max(bonds)) if bonds else len(shapes)
    if rows is None or split == len(shapes) or len(shapes) < 3:
        return "chains", split
    cols = [shape[2] for shape in shapes]
    j_left, j_right, bond = math.prod(cols[:split]), math.prod(cols[split:]), shapes[split][0]
    slices = [r * j * r_next for r, _, j, r_next in shapes]  # one row's slice of each core
    chain_macs = sum(math.prod(cols[:k]) * slices[k] for k in range(1, split))
    chain_macs += sum(math.prod(cols[k + 1 :]) * slices[k] for k in range(split, len(shapes) - 1))
    per_row_chains = sum(slices) + chain_macs + j_left * bond * j_right
    i_left, i_right = math.prod(s[1] for s in shapes[:split]), math.prod(s[1] for s in shapes[split:])
    halves = (i_left * j_left + i_right * j_right) * bond  # the two halves, built once a call
    build = _half_macs(shapes[:split]) + _half_macs(shapes[split:]) + sum(math.prod(s) for s in shapes)
    per_row_halves = (j_left + j_right) * bond + j_left * bond * j_right
    chains = _GATHERED_CHAIN_WEIGHT * rows * per_row_chains
    by_halves = build + halves + _HALVES_PRODUCT_WEIGHT * rows * per_row_halves
    return ("halves" if by_halves < chains else "chains"), split


#: Relative cost of a multiply-add or gathered number in the per-row chains (gathered slices, batches of
#: small products) and in the halves' per-row products, against one of the halves' large products: measured
#: on a 30,522 x 384 table at bonds 48, 256 and 768 with 1 to 2,000 rows (torch, 2 threads), where the
#: chains ran about 3 G and the halves' products about 30 G multiply-adds a second.
_GATHERED_CHAIN_WEIGHT = 10.0
_HALVES_PRODUCT_WEIGHT = 1.5


def _half_macs(part: Sequence[tuple[int, ...]]) -> int:
    """Multiply-adds of contracting consecutive cores of shapes ``part`` left to right (one half)."""
    macs, rows = 0, part[0][0] * part[0][1] * part[0][2]
    for r, i, j, r_next in part[1:]:
        macs += rows * r * i * j * r_next
        rows *= i * j
    return macs


def _rows_from_halves(
    cores: Sequence[Any],
    shapes: Sequence[tuple[int, ...]],
    digits: Sequence[Any],
    split: int,
    gather: Callable[[Any, Any], Any],
    ops: ArrayOps,
) -> Any:
    """The rows as the product of their slices of the table's two halves (see :func:`embedding_rows`)."""
    left, right = weight_halves(cores, ops, split)  # (IL*JL, r) and (r, IR*JR)
    i_left, i_right = math.prod(s[1] for s in shapes[:split]), math.prod(s[1] for s in shapes[split:])
    j_left, j_right, bond = (
        math.prod(s[2] for s in shapes[:split]),
        math.prod(s[2] for s in shapes[split:]),
        shapes[split][0],
    )
    index_left, index_right = digits[0], digits[split]
    for digit, shape in zip(digits[1:split], shapes[1:split]):
        index_left = index_left * shape[1] + digit
    for digit, shape in zip(digits[split + 1 :], shapes[split + 1 :]):
        index_right = index_right * shape[1] + digit
    first = gather(ops.reshape(left, (1, i_left, j_left, bond)), index_left)  # (B, 1, J, r)
    second = gather(ops.reshape(right, (bond, i_right, j_right, 1)), index_right)  # (B, r, J', 1)
    product = ops.reshape(first, (-1, j_left, bond)) @ ops.reshape(second, (-1, bond, j_right))
    return ops.reshape(product, (-1, j_left * j_right))


# --- what every layer class shares ---------------------------------------------------------------


class MPOLayerMixin:
    """``load``, ``auto``, ``freeze``, ``unfreeze`` and ``saved_budget`` for a framework's layer class.

    The class provides ``from_cores(cores, bias, **kwargs)``, a constructor ``cls(in_modes,
    out_modes, rank, **kwargs)``, ``built_spec`` and ``_set_trainable(per_core, bias)``.
    """

    _saved_budget: float | None = DEFAULT_SAVED_BUDGET

    @property
    def built_spec(self) -> MPOSpec:
        """The layer's spec (a ``RuntimeError`` where a layer builds its weights lazily and has not yet)."""
        spec = getattr(self, "spec", None)
        if not isinstance(spec, MPOSpec):
            name = getattr(self, "name", type(self).__name__)
            raise RuntimeError(f"layer {name!r} is not built yet: call it on an input first")
        return spec

    @property
    def saved_budget(self) -> float | None:
        """In training, at most this many times the input's bytes are kept for the backward (the dense
        layer keeps its input: 1.0); the other intermediates are recomputed in the backward (see
        :func:`kept_for_backward`). ``None``: keep everything the backward reads."""
        return self._saved_budget

    @saved_budget.setter
    def saved_budget(self, value: float | None) -> None:
        self._saved_budget = check_saved_budget(value)

    @classmethod
    def load(cls, path: Any, name: str | None = None, **kwargs: Any) -> Any:
        """A layer from a :func:`tnlayers.save` checkpoint (written by any framework); ``kwargs`` go to
        ``from_cores`` (e.g. ``strategy``)."""
        cores, bias = load(path, name)
        return cls.from_cores(cores, bias, **kwargs)  # type: ignore[attr-defined]

    @classmethod
    def auto(cls, in_features: int, out_features: int, n_cores: int = 4, rank: int = 8, **kwargs: Any) -> Any:
        """A layer with balanced modes for the given feature counts (see :meth:`tnlayers.MPOSpec.auto`)."""
        spec = layer_spec(in_features, out_features, None, None, rank, n_cores)
        return cls(spec.in_modes, spec.out_modes, spec.ranks, **kwargs)  # type: ignore[call-arg]

    def freeze(self, cores: str | Iterable[int] = "central", bias: bool = False) -> Any:
        """Freeze cores (see :func:`tnlayers.layer.freeze_flags`): ``"central"``, ``"auxiliary"``, ``"all"``
        or indices; the other cores become trainable; ``bias=True`` freezes the bias too. Returns the layer."""
        per_core, bias_trainable = freeze_flags(self.built_spec, cores, bias)
        self._set_trainable(per_core, bias_trainable)
        return self

    def unfreeze(self) -> Any:
        """Make every core and the bias trainable again."""
        return self.freeze([], bias=False)

    def _set_trainable(self, per_core: Sequence[bool], bias: bool) -> None:
        raise NotImplementedError
