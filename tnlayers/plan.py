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
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import opt_einsum
from opt_einsum.paths import ssa_to_linear

from .cost import DEFAULT_COST_MODEL, CostModel
from .spec import MPOSpec, _as_positive_int

__all__ = [
    "STRATEGIES",
    "ContractionPlan",
    "Pairwise",
    "PlanStep",
    "GRADIENTS",
    "MAX_BUCKET",
    "auto_candidates",
    "candidate_optimizers",
    "batch_bucket",
    "dense_cost",
    "plan",
    "plan_by_key",
    "plan_cost",
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
#: Exhaustive searches grow factorially with the cores: refused above these counts (here "optimal" took
#: 1.5 s at 8 cores and 37 s at 9; "branch-all" 2.7 s at 10). "dp" finds the flop-optimal path in 0.1 s.
EXHAUSTIVE_LIMITS = {"optimal": 8, "branch-all": 10}
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

    def __hash__(self) -> int:
        """The fields' hash, computed once: a training call looks plans up in several caches
        (``kept_for_backward``, ``in_place_layout`` ...), and hashing every step costs about 3 us each time."""
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, Any]:
        """Without the cached hash: string hashes differ between processes."""
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @property
    def flops(self) -> int:
        """Multiply-adds counted as 2 flops, summed over steps."""
        return sum(2 * m * n * k for m, n, k, _ in self.step_sizes)

    @property
    def memory_traffic(self) -> int:
        """Elements read and written, summed over steps."""
        return sum(moved for *_, moved in self.step_sizes)

    def describe(self) -> str:
        """The steps in words, one per line (for teaching and debugging), then opt_einsum's equation::

        auto -> dp for MPOSpec(4x7x7x4 -> ...) at batch 32: 1.02e+07 flops, largest intermediate ...
          1. G2 * G1 over b1: (224 x 8) @ (8 x 16) product
        """
        lines = [
            f"{self.strategy} -> {self.method} for {self.spec} at batch {self.batch_size}: "
            f"{self.flops:.3g} flops, largest intermediate {self.largest_intermediate:,} elements",
            *(f"  {line}" for line in step_lines(self)),
            f"  (as one einsum: {self.equation}, path {list(self.path)})",
        ]
        return "\n".join(lines)


def contraction_steps(plan: ContractionPlan) -> list[tuple[frozenset[int], frozenset[int], list[str]]]:
    """Per step of ``plan``: the operands merged on each side (0 is ``x``, ``k`` is core ``k``)
    and the edges contracted between them (``"i3"`` is the input leg of core 3, ``"b2"`` the bond
    between cores 2 and 3)."""
    n = plan.spec.n_cores
    groups: list[frozenset[int]] = [frozenset({k}) for k in range(n + 1)]
    steps = []
    for step in plan.steps:
        i, j = step.positions
        a = groups.pop(i)
        b = groups.pop(j)
        edges = [f"i{k}" for k in range(1, n + 1) if (0 in a and k in b) or (0 in b and k in a)]
        edges += [f"b{k}" for k in range(1, n) if (k in a and k + 1 in b) or (k in b and k + 1 in a)]
        steps.append((a, b, edges))
        groups.append(a | b)
    return steps


def _group_name(group: frozenset[int]) -> str:
    names = ["x" if k == 0 else f"G{k}" for k in sorted(group)]
    return names[0] if len(names) == 1 else "(" + " ".join(names) + ")"


def step_lines(plan: ContractionPlan) -> list[str]:
    """``"1. G2 * G1 over b1: (224 x 8) @ (8 x 16) product"``: each step, what it joins, over which legs,
    and the matrix product it amounts to."""
    lines = []
    for number, ((a, b, edges), sizes) in enumerate(zip(contraction_steps(plan), plan.step_sizes), start=1):
        m, n, k, _ = sizes
        over = ", ".join(edges) if edges else "nothing (outer product)"
        lines.append(f"{number}. {_group_name(a)} * {_group_name(b)} over {over}: ({m} x {k}) @ ({k} x {n}) product")
    return lines


#: The largest bucket: from here on every candidate's cost grows linearly in the rows, so the ranking
#: no longer changes with the batch, and a compiled graph needs no more than 25 bucket guards.
MAX_BUCKET = 1 << 24


def batch_bucket(batch_size: Any) -> int:
    """The power of two at or above ``batch_size`` (``DEFAULT_BATCH`` when unknown, 1 for 0), at most ``MAX_BUCKET``.

    Bucketed by comparisons only: a symbolic size (``torch.SymInt`` under ``torch.compile``) becomes
    a few guards, and the bucket stays a plain int, a constant of the graph.
    """
    if batch_size is None:
        return DEFAULT_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        size = _as_positive_int(batch_size, "batch_size", minimum=0)  # NumPy ints pass, anything else is named
    elif batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    else:
        size = batch_size
    bucket = 1
    while bucket < size and bucket < MAX_BUCKET:
        bucket *= 2
    return bucket


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


def operand_needs(gradients: str, n_operands: int) -> tuple[bool, ...]:
    """Per operand (``x``, then the cores), whether a backward for ``gradients`` asks for its gradient."""
    return (gradients == "all", *([gradients != "none"] * (n_operands - 1)))


def grad_inputs(
    steps: Sequence[PlanStep] | Sequence[tuple[int, int]], n_operands: int, gradients: str
) -> tuple[tuple[bool, bool], ...] | None:
    """Per step, whether each of its two inputs needs a gradient (``None`` for ``gradients="none"``)."""
    if gradients == "none":
        return None
    needs = list(operand_needs(gradients, n_operands))
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


#: Exhaustive search of operand orders up to this many steps (2**steps orders); greedy per step beyond.
_LAYOUT_SEARCH_STEPS = 10


def _contiguous_block(term: str, letters: set[str]) -> bool:
    """Whether ``letters`` sit together at the start or the end of ``term``: an operand whose contracted
    axes do is read in place as a matrix or its transpose."""
    k = len(letters)
    return set(term[:k]) == letters or set(term[len(term) - k :]) == letters


#: A product batched over an operand's leading indices (read in place, see :func:`_one_block`) runs only when
#: each of its matrix products has at least this many multiply-adds; below, the operand is copied to one
#: matrix, as ``tensordot`` does (measured: 32768 products ``(8, 8) @ (8, 4)`` ran 10x slower than that copy
#: and one product; 256 products ``(128, 32) @ (32, 32)`` faster than it).
BATCHED_MIN_WORK = 4096


def _batched_work(term: str, letters: set[str], free_other: int, size: Callable[[str], int]) -> int:
    """Multiply-adds per matrix product when ``term`` is read in place as a batch over the indices before
    its contracted block: ``(Q, K) @ (K, N)``, ``Q`` the indices after the block."""
    last = max(k for k, ch in enumerate(term) if ch in letters)
    return size(term[last + 1 :]) * size("".join(ch for ch in term if ch in letters)) * free_other


def _one_block(term: str, letters: set[str]) -> bool:
    """Whether ``letters`` sit together anywhere in ``term``: a first operand whose contracted axes do is
    read in place as a batch of matrices (over the indices before the block; see the executor's
    ``_MatmulRoute``)."""
    positions = [k for k, ch in enumerate(term) if ch in letters]
    return bool(positions) and positions[-1] - positions[0] + 1 == len(positions)


#: A second operand not copied anyway is reordered (copied) for the next step's sake only when it is this many
#: times smaller than the first (a core or a product of cores against one carrying the batch).
_REORDER_SMALLER = 8


def _reordered_free(free_first: str, free_second: str, wanted: str | frozenset[str]) -> str:
    """``free_second`` reordered so that the output ``free_first + free_second`` suits its reader: the
    layer's output order (``wanted`` a string) or a next step that contracts the indices ``wanted``, which
    then sit in one block (at the end where ``free_first`` holds none of them, else after its own)."""
    if isinstance(wanted, str):
        return "".join(sorted(free_second, key=wanted.index))
    in_first = [ch for ch in free_first if ch in wanted]
    if in_first and free_first[len(free_first) - len(in_first) :] != "".join(in_first):
        return free_second  # the first operand's share of the block is not at its end: no order helps
    summed = "".join(ch for ch in free_second if ch in wanted)
    others = "".join(ch for ch in free_second if ch not in wanted)
    return summed + others if in_first else others + summed


def _step_layout(
    a: str, b: str, swap: bool, size: Callable[[str], int], batched: bool, wanted: str | frozenset[str] = ""
) -> tuple[str, str, str, int]:
    """``(first, second, output, elements copied)`` of one step, run as ``first @ second``, which writes
    their free indices in their own orders (no transpose after the product).

    ``batched`` (forward-only plans): ``first`` is read in place when its contracted indices form one
    block anywhere (a batched product over the indices before it; the executor's ``_MatmulRoute``),
    else copied; ``second`` when they lead or trail it in an order that matches, else copied (when
    ``first`` is copied anyway, the order is ``second``'s). Otherwise (plans that autograd
    differentiates step by step): an operand is read in place only with its contracted block at an
    edge; the larger operand sets their order, and the other is copied unless its block matches it.

    ``wanted`` (the reader of the output, see :func:`_reordered_free`): where ``first`` is read in place
    and ``second`` is copied anyway or small next to it (a core or a product of cores against one
    carrying the batch), ``second``'s free indices are written in the order the reader wants (the
    executors transpose ``second``, not the product).
    """
    first, second = (b, a) if swap else (a, b)
    summed = set(a) & set(b)
    second_copied = False
    if batched:
        in_place = _one_block(first, summed) and (
            _contiguous_block(first, summed)
            or _batched_work(first, summed, size("".join(ch for ch in second if ch not in summed)), size)
            >= BATCHED_MIN_WORK
        )
        copied = 0 if in_place else size(first)
        order = [ch for ch in (first if copied == 0 else second) if ch in summed]
        if not _contiguous_block(second, summed) or [ch for ch in second if ch in summed] != order:
            copied += size(second)
            second_copied = True
        first_in_place = in_place
    else:
        leader, follower = (a, b) if size(a) >= size(b) else (b, a)
        copied = 0 if _contiguous_block(leader, summed) else size(leader)
        in_leader = [ch for ch in leader if ch in summed]
        if not _contiguous_block(follower, summed) or [ch for ch in follower if ch in summed] != in_leader:
            copied += size(follower)
            second_copied = follower == second
        first_in_place = leader == first and _contiguous_block(first, summed)
    free_first = "".join(ch for ch in first if ch not in summed)
    free_second = "".join(ch for ch in second if ch not in summed)
    if wanted and first_in_place and (second_copied or _REORDER_SMALLER * size(second) <= size(first)):
        reordered = _reordered_free(free_first, free_second, wanted)
        if reordered != free_second:
            copied += 0 if second_copied else size(second)
            free_second = reordered
    return first, second, free_first + free_second, copied


def _readers(inputs: Sequence[str], pairs: Sequence[tuple[int, int]], final: str) -> list[str | frozenset[str]]:
    """Per step, who reads its output: the indices the step that consumes it contracts, or ``final``
    (the layer's output order) for the last step. Index sets do not depend on the operands' orders."""
    terms = [frozenset(term) for term in inputs]
    made = [-1] * len(terms)  # per term in ``terms``: the step that made it (-1: an input)
    readers: list[str | frozenset[str]] = [final] * len(pairs)
    for k, (i, j) in enumerate(pairs):
        a, maker_a = terms.pop(i), made.pop(i)
        b, maker_b = terms.pop(j), made.pop(j)
        for maker in (maker_a, maker_b):
            if maker >= 0:
                readers[maker] = a & b
        terms.append(a ^ b)
        made.append(k)
    return readers


def _layout(
    inputs: list[str], pairs: Sequence[tuple[int, int]], final: str, size: Callable[[str], int], batched: bool
) -> list[tuple[tuple[int, int], str, str, str, int]]:
    """Per step ``(positions, first, second, output, elements copied)``: the operand order of every step
    chosen so that the fewest elements are copied (the result's transpose to ``final`` included).

    ``pairs`` pop two operands from the list (the second position counted after the first pop). Each
    step may swap its operands, which decides the order of its output's indices and so whether later
    steps read their operands in place.
    """

    readers = _readers(inputs, pairs, final)

    def simulate(swaps: Sequence[bool]) -> tuple[int, list[tuple[tuple[int, int], str, str, str, int]]]:
        terms, total = list(inputs), 0
        steps: list[tuple[tuple[int, int], str, str, str, int]] = []
        for (i, j), swap, wanted in zip(pairs, swaps, readers):
            a = terms.pop(i)
            b = terms.pop(j)
            first, second, output, copied = _step_layout(a, b, swap, size, batched, wanted)
            if swap:  # pop b first: its position in the list before a was removed, then a's without b
                b_at = j if j < i else j + 1
                positions = (b_at, i if i < b_at else i - 1)
            else:
                positions = (i, j)
            if len(steps) == len(pairs) - 1 and output != final:
                copied += size(final)  # the result is transposed once, into the layer's output order
                output = final
            terms.append(output)
            total += copied
            steps.append((positions, first, second, output, copied))
        return total, steps

    if len(pairs) <= _LAYOUT_SEARCH_STEPS:
        orders = itertools.product((False, True), repeat=len(pairs))
        return min((simulate(swaps) for swaps in orders), key=lambda found: found[0])[1]
    swaps: list[bool] = []
    for _ in pairs:  # greedy: each step's swap chosen with the later ones unswapped
        swaps.append(min((False, True), key=lambda s: simulate([*swaps, s])[0]))
    return simulate(swaps)[1]


class _IntegerLabels(opt_einsum.paths.PathOptimizer):  # type: ignore[misc]
    """An opt_einsum search run on integer index labels. Python salts the hashes of strings per process
    (``PYTHONHASHSEED``) and the searches break ties between equal-cost contractions in set order, so on the
    equation's letters ``greedy`` and ``random-greedy`` found different paths, of equal flops but not equal
    speed, in different processes; integers hash to themselves, so the same search finds the same path."""

    def __init__(self, search: Callable[..., Any]) -> None:
        self.search = search

    def __call__(self, inputs: Any, output: Any, size_dict: dict[str, int], memory_limit: Any = None) -> Any:
        label = {ch: k for k, ch in enumerate(sorted(size_dict))}
        return self.search(
            [frozenset(label[ch] for ch in term) for term in inputs],
            frozenset(label[ch] for ch in output),
            {label[ch]: size for ch, size in size_dict.items()},
            memory_limit,
        )


def _on_integer_labels(optimize: Any) -> Any:
    """``optimize`` for ``contract_path``: opt_einsum's own searches (by name or instance) on integer labels
    (:class:`_IntegerLabels`); explicit paths and other packages' optimisers as given."""
    if isinstance(optimize, str):
        return _IntegerLabels(opt_einsum.paths.get_path_fn(optimize))
    if type(optimize).__module__.startswith("opt_einsum."):
        return _IntegerLabels(optimize)
    return optimize


def _build(
    spec: MPOSpec, batch: int, strategy: str, method: str, optimize: Any, model: CostModel, gradients: str = "none"
) -> ContractionPlan:
    equation = _equation(spec)
    shapes = _operand_shapes(spec, batch)
    try:
        path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=_on_integer_labels(optimize))
    except (ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(f"cannot plan strategy {strategy!r} for {spec}: {err}") from None
    sizes = dict(info.size_dict)

    def size(indices: Any) -> int:
        return math.prod(sizes[ch] for ch in indices)

    pairs = []
    for positions, _, _, _, _ in info.contraction_list:
        if len(positions) != 2:
            raise ValueError(f"strategy {strategy!r} gave a step over {len(positions)} operands; only pairs are run")
        pairs.append((int(positions[0]), int(positions[1])))
    inputs, output = equation.split("->")
    steps, step_sizes, largest = [], [], 0
    for positions, a, b, out, copied in _layout(inputs.split(","), pairs, output, size, gradients == "none"):
        steps.append(_make_step(positions, (a, b), out))
        summed = set(a) & set(b)
        m, n, k = size(set(a) - summed), size(set(b) - summed), size(summed)
        step_sizes.append((m, n, k, size(a) + size(b) + size(out) + 2 * copied))
        largest = max(largest, size(out))
    builds = _builds_weight(steps, len(shapes))
    cost = _cost(spec, batch, builds, steps, step_sizes, model, gradients)
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
        builds_weight=builds,
        cost=cost,
        gradients=gradients,
    )


def _cost(
    spec: MPOSpec,
    batch: int,
    builds_weight: bool,
    steps: Sequence[PlanStep],
    step_sizes: Sequence[tuple[int, int, int, int]],
    model: CostModel,
    gradients: str,
) -> float:
    if builds_weight:  # run as dense_weight builds W, then one product (tnlayers.contract.execute)
        run_sizes = _materialized_sizes(spec, batch)
        grads = [(True, True)] * (len(run_sizes) - 1) + [(gradients == "all", True)]
        return model.estimate(run_sizes, None if gradients == "none" else grads)
    return model.estimate(step_sizes, grad_inputs(steps, spec.n_cores + 1, gradients))


@functools.lru_cache(maxsize=1024)
def in_place_layout(plan_: ContractionPlan) -> ContractionPlan:
    """``plan_`` laid out as a forward plan is, for an executor that reads strided operands in place in
    training too (a planned backward, :func:`tnlayers.contract.planned_backward`, which reads each step's
    inputs as its forward did): the same path, intermediates and ids (so what a training call keeps by
    :func:`tnlayers.contract.keep_within` applies), fewer copies. A training plan's own layout is for
    autograd, which copies such operands (``tensordot``). ``cost`` is left as planned."""
    if plan_.gradients == "none" or plan_.builds_weight:
        return plan_
    path = [list(pair) for pair in plan_.path]
    laid_out = _build(plan_.spec, plan_.batch_size, plan_.strategy, plan_.method, path, DEFAULT_COST_MODEL)
    return dataclasses.replace(plan_, steps=laid_out.steps, step_sizes=laid_out.step_sizes)


def plan_cost(plan_: ContractionPlan, model: CostModel) -> float:
    """``plan_``'s cost under another ``model``, for what it was planned for (its ``gradients``): the
    ``cost`` it would have been built with (so plans can be re-ranked, e.g. when fitting a model)."""
    return _cost(
        plan_.spec, plan_.batch_size, plan_.builds_weight, plan_.steps, plan_.step_sizes, model, plan_.gradients
    )


def candidate_optimizers(n: int) -> list[tuple[str, Any]]:
    """The one table of ``auto``'s candidates for ``n`` cores: ``(name, opt_einsum optimiser)``, the optimiser
    ``None`` for the orderings built here."""
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
        for name, optimizer in candidate_optimizers(spec.n_cores):
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
        if spec.n_cores > EXHAUSTIVE_LIMITS.get(name, spec.n_cores):
            raise ValueError(
                f"strategy {name!r} searches exhaustively and is limited to {EXHAUSTIVE_LIMITS[name]} cores "
                f"(it would run for minutes or more on {spec.n_cores}); use 'dp' (flop-optimal here) or 'auto'"
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


def plan_by_key(
    spec: MPOSpec, bucket: int, key: str | Path, cost_model: CostModel, gradients: str = "none"
) -> ContractionPlan:
    """:func:`plan` for a strategy already checked by :func:`strategy_key` and a bucket from
    :func:`batch_bucket`: the cache lookup alone, which layers make on every call."""
    return _plan_cached(spec, bucket, key if isinstance(key, str) else ("path", key), cost_model, gradients)


def strategy_key(spec: MPOSpec, strategy: Any) -> str | Path:
    """What a layer keeps of ``strategy``: checked now (not at the first call), hashable and constant.

    A name comes back lower-cased; an explicit path or a path optimiser (searched once, here) comes
    back as the path it stands for, a tuple of pairs.
    """
    planned = plan(spec, None, strategy)
    return strategy.lower() if isinstance(strategy, str) else planned.path


def weight_split(shapes: Sequence[tuple[int, ...]]) -> int:
    """Where :func:`tnlayers.contract.dense_weight` cuts the chain of cores of these shapes into two halves
    (1 for one core): the bond that makes the larger half smallest. Lists only: torch.compile traces this."""
    if len(shapes) == 1:
        return 1
    sizes = [math.prod([shape[1] * shape[2] for shape in shapes[:k]]) for k in range(len(shapes) + 1)]
    larger = [max(sizes[k], sizes[-1] // sizes[k]) * shapes[k][0] for k in range(1, len(shapes))]
    return 1 + larger.index(min(larger))


def weight_step_sizes(spec: MPOSpec) -> list[tuple[int, int, int, int]]:
    """``(M, N, K, elements moved)`` of the products :func:`tnlayers.contract.dense_weight` runs: each half's
    chain, then ``L @ R``; the final transpose of ``W`` is counted as moving ``W`` twice more."""
    shapes = spec.core_shapes
    if len(shapes) == 1:
        return []  # W is the core, reshaped
    k = weight_split(shapes)
    sizes: list[tuple[int, int, int, int]] = []
    for half in (shapes[:k], shapes[k:]):
        rows = half[0][0] * half[0][1] * half[0][2]
        for shape in half[1:]:
            m, kk, n = rows, shape[0], shape[1] * shape[2] * shape[3]
            sizes.append((m, n, kk, m * kk + kk * n + m * n))
            rows = m * shape[1] * shape[2]
    left = math.prod([s[1] * s[2] for s in shapes[:k]])
    right = math.prod([s[1] * s[2] for s in shapes[k:]])
    r = shapes[k][0]
    sizes.append((left, right, r, left * r + r * right + 3 * left * right))
    return sizes


def _materialized_sizes(spec: MPOSpec, rows: int) -> list[tuple[int, int, int, int]]:
    """The products of building ``W`` (:func:`weight_step_sizes`), then the one ``(rows, in) @ (in, out)``."""
    m, n, k = rows, spec.out_features, spec.in_features
    return [*weight_step_sizes(spec), (m, n, k, m * k + k * n + m * n)]


def dense_cost(spec: MPOSpec, rows: int | None, *, cost_model: CostModel = DEFAULT_COST_MODEL) -> float:
    """Model cost of building ``W`` from the cores, then one ``(rows, in) @ (in, out)`` product."""
    return cost_model.estimate(_materialized_sizes(spec, batch_bucket(rows)))
