"""Contraction planning: which pairwise order contracts the input with the cores.

A :class:`ContractionPlan` is plain data (strings and tuples of ints), made once per
``(spec, batch-size bucket, strategy)`` and cached. Executing it needs only a two-operand
``einsum`` (or ``tensordot``) from the framework, so compilers see plain tensor ops.

The network contracted is ``x[b, i1..in] * core1[i1, j1, a1] * core2[a1, i2, j2, a2] * ...``:
the size-1 outer bonds of the first and last core are squeezed away before planning, so that
every index appears in exactly two operands (or one operand and the output) and every pairwise
step is a plain matrix product.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import opt_einsum
from opt_einsum.paths import ssa_to_linear

from .spec import MPOSpec, _as_positive_int

__all__ = [
    "DEFAULT_COST_MODEL",
    "STRATEGIES",
    "ContractionPlan",
    "CostModel",
    "COST_MODELS",
    "Pairwise",
    "PlanStep",
    "GRADIENTS",
    "auto_candidates",
    "batch_bucket",
    "cost_model_for",
    "conv_route",
    "dense_cost",
    "plan",
    "strategy_key",
]

#: Orderings built here (besides ``"auto"``, the cost-model choice among candidates).
OWN_STRATEGIES = ("zipper", "reverse-zipper", "materialize")
#: opt_einsum path optimisers accepted by name (``"auto"`` means ours, not opt_einsum's).
OPT_EINSUM_STRATEGIES = (
    "greedy",
    "dp",
    "optimal",
    "branch-all",
    "branch-2",
    "branch-1",
    "random-greedy",
    "random-greedy-128",
    "auto-hq",
    "eager",
)
STRATEGIES = ("auto", "autotune", *OWN_STRATEGIES, *OPT_EINSUM_STRATEGIES)
#: Plans are made for powers of two; this bucket is used when the batch size is unknown.
DEFAULT_BATCH = 128
Path = tuple[tuple[int, int], ...]
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Pairwise(NamedTuple):
    """One two-operand contraction, as an einsum equation and as ``tensordot(...).transpose(perm)``."""

    equation: str
    axes: tuple[tuple[int, ...], tuple[int, ...]]
    perm: tuple[int, ...]


class PlanStep(NamedTuple):
    """Pop the operands at ``positions`` (in that order), contract them, append the result."""

    positions: tuple[int, int]
    forward: Pairwise
    grads: tuple[Pairwise, Pairwise]
    """``grads[0]`` maps ``(grad_out, b) -> grad_a``; ``grads[1]`` maps ``(a, grad_out) -> grad_b``."""


@dataclass(frozen=True)
class CostModel:
    """Estimated cost of a plan: per step, GEMM time at a shape-dependent efficiency plus memory traffic.

    ``time = overhead + 2*M*N*K / (peak_flops * e(M) * e(N) * e(K)) + (|A| + |B| + |C|) / bandwidth``
    with ``e(d) = d / (d + half_size)``: small matrix dimensions run far below the GEMM peak.
    ``bandwidth`` is an effective figure (elements per second) that also stands for the transposes
    and copies a framework makes around each product. A product with ``M*N*K >= parallel_threshold``
    also pays ``parallel_overhead``: the BLAS splits it across threads, and waking them costs time
    (about 90 us per product on a 2-vCPU VM with ``OMP_WAIT_POLICY=PASSIVE``, where MKL's sgemm goes
    parallel from ``M*N*K`` of about 1.9e5). The defaults were fitted on a 2-core x86 CPU
    (float32; torch forward+backward and NumPy forward over 32 layer shapes and batch sizes).
    """

    peak_flops: float = 4e10
    bandwidth: float = 1e8
    half_size: float = 16.0
    step_overhead: float = 2e-5
    tolerance: float = 0.0
    """``auto`` takes the fewest-flops plan among those estimated within this fraction of the cheapest:
    where the model cannot tell plans apart, less arithmetic is the safer bet."""
    parallel_threshold: float = math.inf
    """``M*N*K`` from which a product runs multi-threaded (``inf``: the model ignores threading)."""
    parallel_overhead: float = 0.0
    """Seconds a multi-threaded product pays to start its threads."""

    def choose(self, plans: Sequence[ContractionPlan]) -> ContractionPlan:
        """The plan ``auto`` runs: the fewest flops among those costed within ``tolerance`` of the cheapest.

        Then the lowest cost; plans the model cannot tell apart (costs equal to 9 digits, as when two
        paths have the same step sizes) go to the first in ``plans``, not to the last bit of rounding.
        """
        return plans[self.choose_index([p.cost for p in plans], [p.flops for p in plans])]

    def choose_index(self, costs: Sequence[float], flops: Sequence[int]) -> int:
        """:meth:`choose` on bare numbers: the index of the plan it picks (also used to fit the model)."""
        cheapest = min(costs)
        near = [k for k, cost in enumerate(costs) if cost <= cheapest * (1 + self.tolerance)]
        return min(near, key=lambda k: (flops[k], float(f"{costs[k]:.9g}")))

    def step_cost(self, m: int, n: int, k: int, elements_moved: int) -> float:
        def efficiency(d: int) -> float:
            return d / (d + self.half_size)

        gemm = 2.0 * m * n * k / (self.peak_flops * efficiency(m) * efficiency(n) * efficiency(k))
        threads = self.parallel_overhead if m * n * k >= self.parallel_threshold else 0.0
        return self.step_overhead + gemm + threads + elements_moved / self.bandwidth

    def estimate(
        self,
        step_sizes: Sequence[tuple[int, int, int, int]],
        grad_inputs: Sequence[tuple[bool, bool]] | None = None,
    ) -> float:
        """The cost of a plan from its ``step_sizes`` (so a plan can be re-scored under another model).

        With ``grad_inputs`` (per step, whether each of its two inputs needs a gradient) the backward
        pass is added: one more product of the step's size per input that needs a gradient.
        """
        forward = sum(self.step_cost(*sizes) for sizes in step_sizes)
        if grad_inputs is None:
            return forward
        return forward + sum(self.step_cost(*sizes) * (a + b) for sizes, (a, b) in zip(step_sizes, grad_inputs))


DEFAULT_COST_MODEL = CostModel()

#: Per backend, weights fitted to forward+backward times on a 2-core x86 CPU (float32) by
#: ``python -m benchmarks.orderings --fit`` (torch: 183 cases and batch sizes, see benchmarks/README.md;
#: its GEMM peak and bandwidth came out near the measured 311-344 GFLOP/s and 8 GB/s, and its
#: threading cost near the ~90 us timed for one multi-threaded product under OMP_WAIT_POLICY=PASSIVE);
#: refit them for other hardware. jax has not been fitted and uses the default.
COST_MODELS: dict[str, CostModel] = {
    "numpy": DEFAULT_COST_MODEL,
    "torch": CostModel(
        peak_flops=3.2e11,
        bandwidth=2e9,
        half_size=1,
        step_overhead=1e-5,
        tolerance=0.1,
        parallel_threshold=1.9e5,
        parallel_overhead=9e-5,
    ),
    "tensorflow": DEFAULT_COST_MODEL,
    "jax": DEFAULT_COST_MODEL,
}


def cost_model_for(backend: str) -> CostModel:
    """The calibrated :class:`CostModel` of ``backend`` (numpy, torch, tensorflow, jax), else the default."""
    return COST_MODELS.get(backend, DEFAULT_COST_MODEL)


@dataclass(frozen=True)
class ContractionPlan:
    """A planned contraction of ``x`` (reshaped to ``(batch, *in_modes)``) with the squeezed cores."""

    spec: MPOSpec
    batch_size: int
    """The batch-size bucket the plan was made for; it is correct at every batch size."""
    strategy: str
    """The strategy asked for (``"auto"``, ``"zipper"``, ``"greedy"``, ``"path"`` for an explicit path ...)."""
    method: str
    """The ordering executed; for ``"auto"`` the candidate it chose."""
    equation: str
    path: Path
    operand_shapes: tuple[tuple[int, ...], ...]
    """Shapes planned for: ``(batch_size, *in_modes)``, then each core with outer bonds squeezed."""
    steps: tuple[PlanStep, ...] = field(repr=False)
    step_sizes: tuple[tuple[int, int, int, int], ...] = field(repr=False)
    """Per step ``(M, N, K, elements moved)``: the matrix product ``(M, K) @ (K, N)`` it amounts to."""
    largest_intermediate: int
    """Elements of the largest array a step creates (the output included)."""
    builds_weight: bool
    """Whether the cores are contracted into ``W`` before the input is touched (the input joins only
    in the last step): a materialising plan, whatever its name."""
    cost: float
    """The cost model's estimate: relative units (the defaults overestimate seconds about 4x); only ranks plans."""
    gradients: str = "none"
    """What ``cost`` counts: ``"none"`` a forward, ``"cores"`` also the cores' gradients, ``"all"`` the input's too."""

    @property
    def flops(self) -> int:
        """Multiply-adds counted as 2 flops, summed over steps."""
        return sum(2 * m * n * k for m, n, k, _ in self.step_sizes)

    @property
    def memory_traffic(self) -> int:
        """Elements read and written, summed over steps."""
        return sum(moved for *_, moved in self.step_sizes)

    def describe(self) -> str:
        """A readable table of the steps (for teaching and debugging)."""
        lines = [
            f"{self.strategy} -> {self.method} for {self.spec} at batch {self.batch_size}: "
            f"{self.flops:.3g} flops, largest intermediate {self.largest_intermediate:,} elements",
            f"  equation {self.equation}",
        ]
        for k, step in enumerate(self.steps):
            lines.append(f"  step {k}: operands {step.positions} : {step.forward.equation}")
        return "\n".join(lines)


def batch_bucket(batch_size: int | None) -> int:
    """The power of two at or above ``batch_size`` (``DEFAULT_BATCH`` when unknown, 1 for 0)."""
    if batch_size is None:
        return DEFAULT_BATCH
    size = _as_positive_int(batch_size, "batch_size", minimum=0)
    return 1 << max(size - 1, 0).bit_length()


def _operand_shapes(spec: MPOSpec, batch: int) -> tuple[tuple[int, ...], ...]:
    shapes: list[tuple[int, ...]] = [(batch, *spec.in_modes)]
    for k, core_shape in enumerate(spec.core_shapes):
        shape: tuple[int, ...] = core_shape
        if k == spec.n_cores - 1:
            shape = shape[:3]
        if k == 0:
            shape = shape[1:]
        shapes.append(shape)
    return tuple(shapes)


def _equation(spec: MPOSpec) -> str:
    n = spec.n_cores

    def sym(k: int) -> str:
        return str(opt_einsum.get_symbol(k))

    batch, ins, outs = sym(0), [sym(1 + k) for k in range(n)], [sym(1 + n + k) for k in range(n)]
    bonds = [sym(1 + 2 * n + k) for k in range(n - 1)]
    terms = [batch + "".join(ins)]
    for k in range(n):
        left = bonds[k - 1] if k > 0 else ""
        right = bonds[k] if k < n - 1 else ""
        terms.append(left + ins[k] + outs[k] + right)
    return ",".join(terms) + "->" + batch + "".join(outs)


def _pairwise(inputs: tuple[str, str], output: str) -> Pairwise:
    """Rewrite ``a,b->c`` with letters a-zA-Z and derive its tensordot form."""
    symbols: dict[str, str] = {}
    for char in "".join(inputs) + output:
        if char not in symbols:
            if len(symbols) == len(_LETTERS):
                raise ValueError(f"a pairwise step needs more than {len(_LETTERS)} indices: {inputs}->{output}")
            symbols[char] = _LETTERS[len(symbols)]
    a, b, c = ("".join(symbols[ch] for ch in term) for term in (*inputs, output))
    summed = [ch for ch in a if ch in b]
    if any(ch in c for ch in summed) or sorted(c) != sorted(set(a + b) - set(summed)):
        raise ValueError(f"step {a},{b}->{c} is not a plain matrix product")
    axes = (tuple(a.index(ch) for ch in summed), tuple(b.index(ch) for ch in summed))
    kept = [ch for ch in a if ch not in summed] + [ch for ch in b if ch not in summed]
    return Pairwise(f"{a},{b}->{c}", axes, tuple(kept.index(ch) for ch in c))


def _make_step(positions: tuple[int, int], inputs: tuple[str, str], output: str) -> PlanStep:
    a, b = inputs
    return PlanStep(
        positions=positions,
        forward=_pairwise((a, b), output),
        grads=(_pairwise((output, b), a), _pairwise((a, output), b)),
    )


def _ordering_path(name: str, n: int) -> list[tuple[int, int]]:
    """Linear (opt_einsum) path for the orderings built here; operand 0 is x, 1..n the cores."""
    if n == 1:
        return [(0, 1)]
    if name == "zipper":
        ssa = [(0, 1)] + [(n + k, k + 1) for k in range(1, n)]
    elif name == "reverse-zipper":
        ssa = [(0, n)] + [(n + k, n - k) for k in range(1, n)]
    else:  # materialize: W = core1 * core2 * ... first, then one product with x
        ssa = [(1, 2)] + [(n + k, k + 2) for k in range(1, n - 1)] + [(0, 2 * n - 1)]
    return [(int(i), int(j)) for i, j in ssa_to_linear(ssa)]


GRADIENTS = ("none", "cores", "all")
"""What a plan is costed for: a forward only, gradients of the cores (the input is data), or of the input too."""


def grad_inputs(
    steps: Sequence[PlanStep] | Sequence[tuple[int, int]], n_operands: int, gradients: str
) -> tuple[tuple[bool, bool], ...] | None:
    """Per step, whether each of its two inputs needs a gradient (``None`` for ``gradients="none"``)."""
    if gradients == "none":
        return None
    needs = [gradients == "all"] + [True] * (n_operands - 1)
    flags = []
    for step in steps:
        # a PlanStep pops its operands in its own order; a raw path pair pops the later position first
        i, j = step.positions if isinstance(step, PlanStep) else sorted(step, reverse=True)
        a = needs.pop(i)
        b = needs.pop(j)
        flags.append((a, b))
        needs.append(a or b)
    return tuple(flags)


def _builds_weight(steps: Sequence[PlanStep], n_operands: int) -> bool:
    ids = list(range(n_operands))
    for step in steps[:-1]:
        i, j = step.positions
        a, b = ids.pop(i), ids.pop(j)
        if 0 in (a, b):
            return False
        ids.append(-1)
    return True


def _build(
    spec: MPOSpec, batch: int, strategy: str, method: str, optimize: Any, model: CostModel, gradients: str = "none"
) -> ContractionPlan:
    equation = _equation(spec)
    shapes = _operand_shapes(spec, batch)
    try:
        path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimize)
    except (ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(f"cannot plan strategy {strategy!r} for {spec}: {err}") from None
    sizes = dict(info.size_dict)

    def size(indices: Any) -> int:
        return math.prod(sizes[ch] for ch in indices)

    steps, step_sizes, largest = [], [], 0
    for positions, _, einsum_str, _, _ in info.contraction_list:
        if len(positions) != 2:
            raise ValueError(f"strategy {strategy!r} gave a step over {len(positions)} operands; only pairs are run")
        inputs, output = einsum_str.split("->")
        a, b = inputs.split(",")
        steps.append(_make_step((positions[0], positions[1]), (a, b), output))
        summed = set(a) & set(b)
        m, n, k = size(set(a) - summed), size(set(b) - summed), size(summed)
        moved = size(a) + size(b) + size(output)
        largest = max(largest, size(output))
        step_sizes.append((m, n, k, moved))
    return ContractionPlan(
        spec=spec,
        batch_size=batch,
        strategy=strategy,
        method=method,
        equation=equation,
        path=tuple((int(p[0]), int(p[1])) for p in path),
        operand_shapes=shapes,
        steps=tuple(steps),
        step_sizes=tuple(step_sizes),
        largest_intermediate=largest,
        builds_weight=_builds_weight(steps, len(shapes)),
        cost=model.estimate(step_sizes, grad_inputs(steps, len(shapes), gradients)),
        gradients=gradients,
    )


def _auto_candidates(n: int) -> list[tuple[str, Any]]:
    candidates: list[tuple[str, Any]] = [(name, None) for name in OWN_STRATEGIES]
    candidates += [
        ("greedy", "greedy"),
        ("dp", opt_einsum.DynamicProgramming(minimize="flops")),
        ("dp-size", opt_einsum.DynamicProgramming(minimize="size")),
        ("dp-combo", opt_einsum.DynamicProgramming(minimize="combo")),
        # deterministic: opt_einsum seeds trial r with r (see _candidates_cached for the global state)
        ("random-greedy", opt_einsum.RandomGreedy(max_repeats=32, minimize="flops")),
    ]
    if n <= 6:
        candidates.append(("optimal", "optimal"))
    return candidates


@functools.lru_cache(maxsize=256)
def _candidates_cached(
    spec: MPOSpec, batch: int, model: CostModel, gradients: str = "none"
) -> tuple[ContractionPlan, ...]:
    plans = []
    state = random.getstate()  # RandomGreedy reseeds Python's global generator: give the user theirs back
    try:
        for name, optimizer in _auto_candidates(spec.n_cores):
            optimize = _ordering_path(name, spec.n_cores) if optimizer is None else optimizer
            plans.append(_build(spec, batch, "auto", name, optimize, model, gradients))
    finally:
        random.setstate(state)
    return tuple(plans)


def auto_candidates(
    spec: MPOSpec, batch_size: int | None = None, cost_model: CostModel = DEFAULT_COST_MODEL, gradients: str = "none"
) -> list[ContractionPlan]:
    """The plans ``"auto"`` chooses among: zipper, reverse-zipper, materialize, greedy, dp (by flops, size
    and both), random-greedy (32 seeded trials) and optimal (up to 6 cores)."""
    return list(_candidates_cached(spec, batch_bucket(batch_size), cost_model, _check_gradients(gradients)))


def _check_gradients(gradients: str) -> str:
    if gradients not in GRADIENTS:
        raise ValueError(f"gradients must be one of {', '.join(map(repr, GRADIENTS))}, got {gradients!r}")
    return gradients


@functools.lru_cache(maxsize=1024)
def _plan_cached(
    spec: MPOSpec, batch: int, key: str | tuple[str, Path], model: CostModel, gradients: str = "none"
) -> ContractionPlan:
    """``key`` is a strategy name or ``(label, explicit path)``."""
    n = spec.n_cores
    if isinstance(key, tuple):
        label, path = key
        return _build(spec, batch, label, label, list(path), model, gradients)
    if key in OWN_STRATEGIES:
        return _build(spec, batch, key, key, _ordering_path(key, n), model, gradients)
    if key in ("auto", "autotune"):
        chosen = model.choose(_candidates_cached(spec, batch, model, gradients))
        return chosen if key == "auto" else dataclasses.replace(chosen, strategy=key)
    return _build(spec, batch, key, key, key, model, gradients)


def _known_opt_einsum_name(name: str) -> bool:
    if name in OPT_EINSUM_STRATEGIES:
        return True
    try:  # names registered by other packages, e.g. cotengra's "hyper"
        opt_einsum.paths.get_path_fn(name)
    except KeyError:
        return False
    return name != "auto"


def plan(
    spec: MPOSpec,
    batch_size: int | None = None,
    strategy: str | Sequence[Sequence[int]] | Callable[..., Any] = "auto",
    *,
    cost_model: CostModel = DEFAULT_COST_MODEL,
    gradients: str = "none",
) -> ContractionPlan:
    """Plan the contraction of a ``(batch_size, in_features)`` input with the cores of ``spec``.

    ``strategy`` is ``"auto"`` (the cost model's choice among zipper, reverse-zipper, materialize,
    greedy, dp and optimal), ``"autotune"`` (here the same choice, as planning never times
    anything; layers time candidates on their first call, see :mod:`tnlayers.autotune`), one of
    :data:`STRATEGIES`, any other path optimiser name opt_einsum
    knows, an explicit opt_einsum path (pairs of operand positions; operand 0 is the input), or an
    opt_einsum ``PathOptimizer`` instance. Plans are cached per ``(spec, batch bucket, strategy)``;
    the bucket is the next power of two. An optimiser object is not a cache key (it is stateful and
    hashed by identity): each call searches with it, then returns the plan cached under the path it
    found. Search once and keep that plan, or its ``path``, as layers do.

    ``gradients`` says what the plan will run for, and so what its ``cost`` counts: ``"none"`` (a
    forward), ``"cores"`` (training a first layer: the cores' gradients, not the input's) or ``"all"``.
    A backward pass adds one product per step input that needs a gradient, so e.g. materialising,
    whose big last product needs no gradient for the data, gains in training. It is part of the cache key.
    """
    if not isinstance(spec, MPOSpec):
        raise TypeError(f"spec must be an MPOSpec, got {type(spec).__name__}")
    if not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model must be a CostModel, got {type(cost_model).__name__}")
    _check_gradients(gradients)
    batch = batch_bucket(batch_size)
    if isinstance(strategy, str):
        name = strategy.lower()
        if name not in STRATEGIES and not _known_opt_einsum_name(name):
            raise ValueError(
                f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}, "
                f"another opt_einsum path optimiser name, or an explicit path"
            )
        return _plan_cached(spec, batch, name, cost_model, gradients)
    if callable(strategy):  # PathOptimizer instance or path function: search, then cache by the path
        label = type(strategy).__name__
        found = _build(spec, batch, label, label, strategy, cost_model, gradients)
        return _plan_cached(spec, batch, (label, found.path), cost_model, gradients)
    if isinstance(strategy, Sequence):
        path = []
        for step in strategy:
            if (
                not isinstance(step, Sequence)
                or len(step) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in step)
            ):
                raise ValueError(f"an explicit path must be a sequence of pairs of ints, got step {step!r}")
            path.append((int(step[0]), int(step[1])))
        if len(path) != spec.n_cores:
            raise ValueError(
                f"an explicit path for {spec.n_cores} cores needs {spec.n_cores} pairwise steps, got {len(path)}"
            )
        return _plan_cached(spec, batch, ("path", tuple(path)), cost_model, gradients)
    raise TypeError(
        f"strategy must be a name, an explicit path or an opt_einsum PathOptimizer, got {type(strategy).__name__}"
    )


def strategy_key(spec: MPOSpec, strategy: Any) -> str | Path:
    """What a layer keeps of ``strategy``: checked now (not at the first call), hashable and constant.

    A name comes back lower-cased; an explicit path or a path optimiser (searched once, here) comes
    back as the path it stands for, a tuple of pairs.
    """
    planned = plan(spec, None, strategy)
    return strategy.lower() if isinstance(strategy, str) else planned.path


def dense_cost(spec: MPOSpec, rows: int | None, *, cost_model: CostModel = DEFAULT_COST_MODEL) -> float:
    """Model cost of building ``W`` from the cores, then one ``(rows, in) @ (in, out)`` product."""
    building = plan(spec, 1, "materialize", cost_model=cost_model).step_sizes[:-1]
    m, n, k = batch_bucket(rows), spec.out_features, spec.in_features
    return cost_model.estimate(building) + cost_model.step_cost(m, n, k, m * k + k * n + m * n)


def conv_route(
    spec: MPOSpec,
    rows: int | None,
    strategy: str | Sequence[Sequence[int]] = "auto",
    *,
    cost_model: CostModel = DEFAULT_COST_MODEL,
) -> tuple[ContractionPlan, bool]:
    """How an MPO convolution runs ``rows`` output positions (batch x height x width).

    Returns the plan for contracting the unfolded input (``rows`` patches of ``in_features``) and
    whether building the kernel and running the framework's own convolution is cheaper instead.
    ``"auto"`` decides by the cost model (unfolding writes and reads every patch once more);
    an explicit strategy builds the kernel when its plan does (:attr:`ContractionPlan.builds_weight`,
    e.g. ``"materialize"``), and unfolds otherwise.
    """
    bucket = batch_bucket(rows)
    if isinstance(strategy, str) or (isinstance(strategy, tuple) and all(isinstance(p, tuple) for p in strategy)):
        return _conv_route_cached(spec, bucket, strategy, cost_model)  # layers call this on every forward
    return _conv_route_cached.__wrapped__(spec, bucket, strategy, cost_model)


@functools.lru_cache(maxsize=1024)
def _conv_route_cached(
    spec: MPOSpec, bucket: int, strategy: Any, cost_model: CostModel
) -> tuple[ContractionPlan, bool]:
    chosen = plan(spec, bucket, strategy, cost_model=cost_model)
    if chosen.strategy not in ("auto", "autotune"):  # convolutions do not time: autotune is the model's choice
        return chosen, chosen.builds_weight
    unfolded = chosen.cost + 2 * bucket * spec.in_features / cost_model.bandwidth
    return chosen, dense_cost(spec, bucket, cost_model=cost_model) < unfolded
