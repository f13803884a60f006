"""Contraction orderings of MPO layers compared on the same hardware, and the planner's ``auto`` judged.

    python -m benchmarks.orderings                          # numpy, torch and tensorflow; the full grid
    python -m benchmarks.orderings --backends torch --cases paper --batches 1 32 1024
    python -m benchmarks.orderings --quick                  # a smoke run (< 60 s), used by a test
    python -m benchmarks.orderings --backends torch --fit   # also fit the torch cost model to the times

For each case (layer shape and bond dimension), batch size and backend, every ordering runs on the
same inputs: its output is checked against the dense product (NumPy, float64) first, then the
orderings are timed round-robin (warm-up, then ``--repeats`` samples), forward and
forward+backward (gradients of the cores, ``loss = y.sum()``). The dense layer and, where
installed, TensorLy-Torch's blockTT ``FactorizedLinear`` (torch) and TensorNetwork's tn_keras
``DenseMPO`` (tensorflow) run beside them. Output in ``--out``: ``records.jsonl`` (one line per
measurement, with versions, threads and CPU), ``summary.md`` and two PNG plots.

GPU: ``--device cuda`` runs torch on the GPU and synchronises before reading the clock (untested
here: this project's machines have no GPU).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts: see ../shared/BENCHMARKING.md
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import opt_einsum
from tqdm.auto import tqdm

import tnlayers
from tnlayers.contract import backprop, execute, get_ops
from tnlayers.plan import grad_inputs
from tnlayers.timing import calls_per_sample, round_robin

ORDERINGS = (
    "zipper",
    "reverse-zipper",
    "materialize",
    "greedy",
    "dp",
    "dp-combo",
    "optimal",
    "random-greedy",
    "cotengra",
    "auto",
    "autotune",
)
BASELINES = ("dense", "tltorch-blocktt", "tn_keras")
BATCHES = (1, 8, 64, 256, 1024, 4096)
QUICK_BATCHES = (1, 64)
MAX_DENSE_FLOPS = 2e10
"""Cases whose dense forward exceeds this many flops are skipped (4096 x 4096 at batch >= 1024)."""


SLOW_CALL_S = 0.3
"""A contender whose one call takes longer is timed alone with SLOW_REPEATS calls (zipper at large batch)."""
SLOW_REPEATS = 3


def _seconds_once(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    rank: int

    @property
    def spec(self) -> tnlayers.MPOSpec:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
            return tnlayers.MPOSpec(self.in_modes, self.out_modes, self.rank)


def _cases() -> list[Case]:
    cases = [Case(f"FC2 784->256 D{d}", "paper", (4, 7, 7, 4), (4, 4, 4, 4), d) for d in (2, 4, 8, 16, 22)]
    cases += [
        Case("LeNet conv3 400->120", "paper", (2, 10, 10, 2), (2, 5, 6, 2), 4),
        Case("LeNet fc 120->84", "paper", (2, 5, 6, 2), (2, 3, 7, 2), 4),
        Case("LeNet fc 84->10", "paper", (2, 3, 7, 2), (1, 5, 2, 1), 2),
        Case("VGG conv-as-MPO 2048", "paper", (2, 8, 8, 8, 2), (2, 8, 8, 8, 2), 4),
        Case("VGG fc 512->4096", "paper", (4, 4, 4, 4, 2), (4, 4, 8, 8, 4), 4),
        Case("VGG fc 4096->4096", "paper", (4, 4, 8, 8, 4), (4, 4, 8, 8, 4), 4),
    ]
    square = [(8, 16, 8), (4, 8, 8, 4), (4,) * 5, (2, 4, 4, 4, 4, 2)]  # 3 to 6 cores
    for modes in square:
        for rank in (4, 16, 64):
            cases.append(Case(f"1024 {'x'.join(map(str, modes))} D{rank}", "square", modes, modes, rank))
    big = [(16, 16, 16), (8, 8, 8, 8), (4,) * 6]
    for modes in big:
        for rank in (8, 32):
            cases.append(Case(f"4096 {'x'.join(map(str, modes))} D{rank}", "square", modes, modes, rank))
    cases += [
        Case("uneven 3072->512 D8", "uneven", (4, 8, 12, 8), (2, 4, 8, 8), 8),
        Case("uneven 1000->300 D16", "uneven", (10, 10, 10), (5, 6, 10), 16),
        Case("uneven 4096->64 D16", "uneven", (8, 8, 8, 8), (2, 2, 4, 4), 16),
        Case("uneven 64->4096 D16", "uneven", (2, 2, 4, 4), (8, 8, 8, 8), 16),
    ]
    return cases


CASES = _cases()
QUICK_CASES = [CASES[1], CASES[5]]


def _optimizers(n_cores: int) -> dict[str, Any]:
    """How each ordering is asked of the planner (a name, or an opt_einsum / cotengra path optimiser)."""
    chosen: dict[str, Any] = {name: name for name in ("zipper", "reverse-zipper", "materialize", "greedy")}
    chosen["dp"] = opt_einsum.DynamicProgramming(minimize="flops")
    chosen["dp-combo"] = opt_einsum.DynamicProgramming(minimize="combo")  # flops + bytes written
    if n_cores <= 5:
        chosen["optimal"] = "optimal"
    chosen["random-greedy"] = opt_einsum.RandomGreedy(max_repeats=32, minimize="flops")
    try:
        import cotengra

        chosen["cotengra"] = cotengra.HyperOptimizer(max_repeats=16, minimize="flops", progbar=False, parallel=False)
    except ImportError:
        pass
    return chosen


def _time_now(sync: Callable[[], None]) -> float:
    sync()
    return time.perf_counter()


class Runner:
    """One backend's arrays for one case and batch: forward and forward+backward of any plan, and the peers."""

    backend = "numpy"

    def __init__(self, spec: tnlayers.MPOSpec, batch: int, dtype: str, device: str, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.spec, self.batch, self.device = spec, batch, device
        self.cores_np = [c.astype(dtype) for c in tnlayers.init_cores(spec, seed=seed)]
        self.x_np = rng.normal(size=(batch, spec.in_features)).astype(dtype)
        self.weight_np = tnlayers.to_dense(self.cores_np).astype(dtype)
        self.setup()

    def setup(self) -> None:
        self.ops = get_ops("numpy")

    def sync(self) -> None:
        pass

    def forward(self, plan: tnlayers.ContractionPlan) -> Callable[[], Any]:
        return lambda: execute(plan, self.x_np, self.cores_np, None, self.ops)

    def train_step(self, plan: tnlayers.ContractionPlan) -> Callable[[], Any]:
        grad = np.ones((self.batch, *self.spec.out_modes), self.x_np.dtype)

        def run() -> Any:
            tape: list[Any] = []
            execute(plan, self.x_np, self.cores_np, None, self.ops, tape)
            return backprop(plan.steps, tape, grad, self.ops, self.spec.n_cores + 1)

        return run

    def dense(self) -> tuple[Callable[[], Any], Callable[[], Any]]:
        grad = np.ones((self.batch, self.spec.out_features), self.x_np.dtype)
        return (lambda: self.x_np @ self.weight_np), (lambda: self.x_np.T @ grad)

    def peers(self) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
        return {}

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def memory(self, run: Callable[[], Any]) -> int | None:
        """Peak bytes allocated during one call (NumPy: tracemalloc)."""
        tracemalloc.start()
        run()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return int(peak)

    def gemm_gflops(self, size: int) -> float:
        a = np.ones((size, size), self.x_np.dtype)
        times = round_robin({"gemm": lambda: a @ a}, 3)["gemm"]
        return 2 * size**3 / statistics.median(times) / 1e9


class TorchRunner(Runner):
    backend = "torch"

    def setup(self) -> None:
        import torch

        self.torch = torch
        self.ops = get_ops("torch")
        self.x = torch.from_numpy(self.x_np).to(self.device)
        self.cores = [torch.from_numpy(c).to(self.device).requires_grad_(True) for c in self.cores_np]
        self.weight = torch.from_numpy(self.weight_np).to(self.device).requires_grad_(True)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def _backward(self, y: Any) -> Any:
        y.backward(self.torch.ones_like(y))  # gradients accumulate in place: no fresh buffers per call
        self.sync()

    def _inference(self, compute: Callable[[], Any]) -> Callable[[], Any]:
        """``compute`` under ``no_grad``, finished (synchronised) before it returns."""

        def run() -> Any:
            with self.torch.no_grad():
                y = compute()
            self.sync()
            return y

        return run

    def forward(self, plan: tnlayers.ContractionPlan) -> Callable[[], Any]:
        return self._inference(lambda: execute(plan, self.x, self.cores, None, self.ops))

    def train_step(self, plan: tnlayers.ContractionPlan) -> Callable[[], Any]:
        return lambda: self._backward(execute(plan, self.x, self.cores, None, self.ops))

    def dense(self) -> tuple[Callable[[], Any], Callable[[], Any]]:
        return self._inference(lambda: self.x @ self.weight), (lambda: self._backward(self.x @ self.weight))

    def peers(self) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
        try:
            import tltorch
        except ImportError:
            return {}
        layer = tltorch.FactorizedLinear(
            self.spec.in_modes,
            self.spec.out_modes,
            bias=False,
            factorization="blocktt",
            rank=list(self.spec.ranks),
            implementation="factorized",
        )
        with self.torch.no_grad():  # the same W: blockTT factors are (r, out, in, r')
            for factor, core in zip(layer.weight.factors, self.cores_np):
                factor.copy_(self.torch.from_numpy(core.transpose(0, 2, 1, 3)))
        layer = layer.to(self.device)
        return {"tltorch-blocktt": (self._inference(lambda: layer(self.x)), lambda: self._backward(layer(self.x)))}

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value.detach().cpu().numpy())

    def memory(self, run: Callable[[], Any]) -> int | None:
        """Bytes autograd keeps for the backward pass (measured with saved-tensor hooks)."""
        saved = [0]

        def pack(tensor: Any) -> Any:
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with self.torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return saved[0]

    def gemm_gflops(self, size: int) -> float:
        a = self.torch.ones(size, size, device=self.device)

        def run() -> None:
            a @ a
            self.sync()

        return 2 * size**3 / statistics.median(round_robin({"gemm": run}, 3)["gemm"]) / 1e9


class TensorFlowRunner(Runner):
    backend = "tensorflow"

    def setup(self) -> None:
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # one tf.function per ordering and case: retracing is expected here
        self.tf = tf
        self.ops = get_ops("tensorflow")
        self.x = tf.constant(self.x_np)
        self.cores = [tf.Variable(c) for c in self.cores_np]
        self.weight = tf.Variable(self.weight_np)

    def _pair(
        self, compute: Callable[[], Any], variables: Sequence[Any]
    ) -> tuple[Callable[[], Any], Callable[[], Any]]:
        forward = self.tf.function(compute)

        @self.tf.function  # type: ignore[untyped-decorator]
        def train() -> Any:
            with self.tf.GradientTape() as tape:
                y = compute()
            return tape.gradient(y, variables)

        return (lambda: forward().numpy()), (lambda: [g.numpy() for g in train()])

    def forward(self, plan: tnlayers.ContractionPlan) -> Callable[[], Any]:
        return self._pair(lambda: execute(plan, self.x, self.cores, None, self.ops), self.cores)[0]

    def train_step(self, plan: tnlayers.ContractionPlan) -> Callable[[], Any]:
        return self._pair(lambda: execute(plan, self.x, self.cores, None, self.ops), self.cores)[1]

    def dense(self) -> tuple[Callable[[], Any], Callable[[], Any]]:
        return self._pair(lambda: self.x @ self.weight, [self.weight])

    def peers(self) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
        from benchmarks.keras_layers import _peer

        try:
            layer = _peer(self.cores_np, np.zeros(self.spec.out_features, self.x_np.dtype))
        except (ValueError, TypeError, AssertionError):
            return {}  # DenseMPO needs in and out features that are perfect n-th powers and one bond
        if layer is None or self.spec.ranks[1:-1] != (max(self.spec.ranks),) * (self.spec.n_cores - 1):
            return {}
        return {"tn_keras": self._pair(lambda: layer(self.x), layer.trainable_weights)}

    def memory(self, run: Callable[[], Any]) -> int | None:
        return None

    def gemm_gflops(self, size: int) -> float:
        a = self.tf.ones((size, size))
        matmul = self.tf.function(lambda: self.tf.matmul(a, a))
        return 2 * size**3 / statistics.median(round_robin({"gemm": lambda: matmul().numpy()}, 3)["gemm"]) / 1e9


class JaxRunner(Runner):
    backend = "jax"

    def setup(self) -> None:
        import jax

        self.jax = jax
        self.ops = get_ops("jax")
        self.x = jax.numpy.asarray(self.x_np)
        self.cores = [jax.numpy.asarray(c) for c in self.cores_np]
        self.weight = jax.numpy.asarray(self.weight_np)

    def forward(self, plan: tnlayers.ContractionPlan) -> Callable[[], Any]:
        run = self.jax.jit(lambda cores: execute(plan, self.x, cores, None, self.ops))
        return lambda: run(self.cores).block_until_ready()

    def train_step(self, plan: tnlayers.ContractionPlan) -> Callable[[], Any]:
        run = self.jax.jit(self.jax.grad(lambda cores: execute(plan, self.x, cores, None, self.ops).sum()))
        return lambda: self.jax.block_until_ready(run(self.cores))

    def dense(self) -> tuple[Callable[[], Any], Callable[[], Any]]:
        forward = self.jax.jit(lambda w: self.x @ w)
        train = self.jax.jit(self.jax.grad(lambda w: (self.x @ w).sum()))
        return (lambda: forward(self.weight).block_until_ready()), (lambda: train(self.weight).block_until_ready())

    def memory(self, run: Callable[[], Any]) -> int | None:
        return None

    def gemm_gflops(self, size: int) -> float:
        a = self.jax.numpy.ones((size, size))
        matmul = self.jax.jit(lambda: a @ a)
        return (
            2
            * size**3
            / statistics.median(round_robin({"gemm": lambda: matmul().block_until_ready()}, 3)["gemm"])
            / 1e9
        )


RUNNERS: dict[str, type[Runner]] = {
    "numpy": Runner,
    "torch": TorchRunner,
    "tensorflow": TensorFlowRunner,
    "jax": JaxRunner,
}


def available_backends() -> list[str]:
    import importlib.util

    names = {"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}
    return [name for name, module in names.items() if importlib.util.find_spec(module) is not None]


def _plans(runner: Runner, orderings: Sequence[str], gradients: str) -> dict[str, tnlayers.ContractionPlan]:
    spec, batch = runner.spec, runner.batch
    model = tnlayers.cost_model_for(runner.backend)
    chosen = _optimizers(spec.n_cores)
    plans = {}
    for name in orderings:
        if name == "auto":  # what a layer plans: for a forward, or for training with the input as data
            plans[name] = tnlayers.plan(spec, batch, "auto", cost_model=model, gradients=gradients)
        elif name == "autotune":
            run = runner.forward if gradients == "none" else runner.train_step
            key = (runner.backend, runner.device, str(runner.x_np.dtype), "infer" if gradients == "none" else "train")
            plans[name] = tnlayers.autotune.tune(spec, batch, run, key, cost_model=model)
        elif name in chosen:
            plans[name] = tnlayers.plan(spec, batch, chosen[name], cost_model=model)
    return plans


def measure_case(
    runner: Runner, orderings: Sequence[str], repeats: int, modes: Sequence[str], case: Case
) -> list[dict[str, Any]]:
    """Check every contender's output against the dense product, then time them round-robin."""
    plans = _plans(runner, orderings, "none")
    planned_for_training = [name for name in ("auto", "autotune") if name in plans]
    train_plans = {**plans, **_plans(runner, planned_for_training, "cores")}
    reference = runner.x_np.astype(np.float64) @ runner.weight_np.astype(np.float64)
    scale = float(np.abs(reference).max())
    tolerance = 1e-3 if runner.x_np.dtype == np.float32 else 1e-9
    dense_forward, dense_train = runner.dense()
    contenders: dict[str, dict[str, Callable[[], Any]]] = {
        "forward": {name: runner.forward(p) for name, p in plans.items()},
        "forward+backward": {name: runner.train_step(p) for name, p in train_plans.items()},
    }
    contenders["forward"]["dense"], contenders["forward+backward"]["dense"] = dense_forward, dense_train
    for name, (peer_forward, peer_train) in runner.peers().items():
        contenders["forward"][name], contenders["forward+backward"][name] = peer_forward, peer_train
    checks = {
        **contenders["forward"],
        **{f"{n} (training plan)": runner.forward(train_plans[n]) for n in planned_for_training},
    }
    for name, run in checks.items():
        error = float(np.abs(runner.to_numpy(run()).astype(np.float64) - reference).max()) / scale
        if error > tolerance:
            raise RuntimeError(f"{name} is wrong on {case.name} at batch {runner.batch}: relative error {error:.1e}")
    records = []
    for mode in modes:
        runs = contenders[mode]
        once = {name: _seconds_once(run) for name, run in runs.items()}  # also the warm-up
        quick = {name: run for name, run in runs.items() if once[name] <= SLOW_CALL_S}
        inner = calls_per_sample(runs["auto"] if "auto" in quick else next(iter(quick.values())), 5e-3) if quick else 1
        times = round_robin(quick, repeats, inner, warmup=1) if quick else {}
        for name in runs.keys() - quick.keys():  # far slower than the rest: a few plain calls keep the run short
            times[name] = round_robin({name: runs[name]}, SLOW_REPEATS, 1, warmup=0)[name]
        for name, samples in times.items():
            plan = (plans if mode == "forward" else train_plans).get(name)
            median = statistics.median(samples)
            flops = plan.flops if plan else 2 * runner.batch * runner.spec.in_features * runner.spec.out_features
            work = flops if mode == "forward" else 3 * flops  # backward: two products per forward product
            record: dict[str, Any] = {
                "backend": runner.backend,
                "device": runner.device,
                "case": case.name,
                "group": case.group,
                "in_modes": list(case.in_modes),
                "out_modes": list(case.out_modes),
                "ranks": list(runner.spec.ranks),
                "batch": runner.batch,
                "dtype": str(runner.x_np.dtype),
                "mode": mode,
                "ordering": name,
                "method": plan.method if plan else name,
                "path": [list(p) for p in plan.path] if plan else None,
                "median_s": median,
                "q25_s": float(np.quantile(samples, 0.25)),
                "q75_s": float(np.quantile(samples, 0.75)),
                "repeats": len(samples),
                "calls_per_sample": inner if name in quick else 1,
                "flops": flops,
                "gflops_per_s": work / median / 1e9,
                "largest_intermediate": plan.largest_intermediate if plan else runner.batch * runner.spec.out_features,
                "step_sizes": [list(s) for s in plan.step_sizes] if plan else None,
                "model_cost": plan.cost if plan else None,
            }
            records.append(record)
        if mode == "forward+backward":
            for record in records[-len(times) :]:
                record["memory_bytes"] = runner.memory(runs[record["ordering"]])
    return records


def overhead(repeats: int = 7) -> list[dict[str, Any]]:
    """Per-call cost of a torch ``MPOLinear`` forward at batch 1 against a bare chain of ``torch.einsum`` calls.

    Three contenders on the same input and cores, under ``no_grad``: the layer (input checks, bucket,
    plan lookup, execute), ``execute`` of the cached plan alone, and the plan's pairwise equations
    typed out as ``torch.einsum`` calls (no tnlayers code at all). The layer's Python overhead is
    layer minus bare chain.
    """
    import torch
    from tnlayers.backends.torch import MPOLinear

    TORCH_OPS = get_ops("torch")
    records = []
    for case in (CASES[1], Case("1024 4x4x4x4x4 D8", "square", (4,) * 5, (4,) * 5, 8)):
        layer = MPOLinear(case.in_modes, case.out_modes, case.rank, bias=False, seed=0)
        x = torch.randn(1, layer.in_features)
        plan = tnlayers.plan(layer.spec, 1, cost_model=tnlayers.cost_model_for("torch"))
        cores = [c.detach() for c in layer.cores]
        shapes = plan.operand_shapes
        equations = [(step.positions, step.forward.equation) for step in plan.steps]

        def bare(x: Any = x, cores: Any = cores, shapes: Any = shapes, equations: Any = equations) -> Any:
            arrays = [x.reshape(shapes[0]), *(c.reshape(s) for c, s in zip(cores, shapes[1:]))]
            for (i, j), equation in equations:
                a, b = arrays.pop(i), arrays.pop(j)
                arrays.append(torch.einsum(equation, a, b))
            return arrays[0].reshape(1, -1)

        runs: dict[str, Callable[[], object]] = {
            "layer forward": functools.partial(layer, x),
            "execute (cached plan)": functools.partial(execute, plan, x, cores, None, TORCH_OPS),
            "bare torch.einsum chain": bare,
        }
        with torch.no_grad():
            torch.testing.assert_close(runs["layer forward"](), bare(), rtol=1e-4, atol=1e-5)
            times = round_robin(runs, repeats, calls_per_sample(bare, 5e-3), warmup=2)
        medians = {name: statistics.median(t) for name, t in times.items()}
        base = medians["bare torch.einsum chain"]
        layer_s = medians["layer forward"]
        records.append(
            {
                "case": case.name,
                "method": plan.method,
                **{k: 1e6 * v for k, v in medians.items()},
                "overhead_us": 1e6 * (layer_s - base),
                "overhead_vs_contraction": (layer_s - base) / base,
                "dispatch_us": 1e6 * (layer_s - medians["execute (cached plan)"]),
            }
        )
    return records


def overhead_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    header = (
        "| case (batch 1, torch, no_grad) | plan | layer forward us | execute us | bare einsum chain us | "
        "checks + plan lookup us | layer - bare chain, / bare chain |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in records:
        cells = [
            r["case"],
            r["method"],
            f"{r['layer forward']:.1f}",
            f"{r['execute (cached plan)']:.1f}",
            f"{r['bare torch.einsum chain']:.1f}",
            f"{r['dispatch_us']:.1f}",
            f"{r['overhead_us']:.1f} us, {r['overhead_vs_contraction']:+.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def environment(backends: Sequence[str], threads: int | None, device: str, gemm: dict[str, float]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "opt_einsum": opt_einsum.__version__,
        "tnlayers": tnlayers.__version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "device": device,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gemm_gflops": gemm,
    }
    if "torch" in backends:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if "tensorflow" in backends:
        import tensorflow as tf

        env["tensorflow"] = tf.__version__
    if "jax" in backends:
        import jax

        env["jax"] = jax.__version__
    env["threads"] = threads
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PLANNERS = ("auto", "autotune")

PathKey = tuple[tuple[int, ...], ...]


def path_times(
    records: Sequence[dict[str, Any]], mode: str
) -> tuple[dict[tuple[Any, ...], dict[PathKey, float]], dict[tuple[Any, ...], PathKey]]:
    """Per (backend, case, batch): each distinct path's time, the median over the contenders that ran
    it (baselines have no path); and per (backend, case, batch, ordering) the path it ran."""
    samples: dict[tuple[Any, ...], dict[PathKey, list[float]]] = {}
    ran: dict[tuple[Any, ...], PathKey] = {}
    for r in records:
        if r["mode"] != mode or r["ordering"] in BASELINES or r.get("path") is None:
            continue
        key, path = (r["backend"], r["case"], r["batch"]), tuple(map(tuple, r["path"]))
        samples.setdefault(key, {}).setdefault(path, []).append(r["median_s"])
        ran[(*key, r["ordering"])] = path
    times = {key: {path: statistics.median(t) for path, t in paths.items()} for key, paths in samples.items()}
    return times, ran


def ratio_table(records: Sequence[dict[str, Any]], mode: str = "forward+backward") -> list[dict[str, Any]]:
    """Per (backend, case, batch): the fastest ordering and each contender's time / that fastest time.

    Also ``"auto by path"`` and ``"autotune by path"``: several contenders often run the very same
    path (the same steps), so their medians are repeated measurements of one computation. Per
    distinct path the median of those medians is its time; the planner's ratio is its path's time
    over the fastest path's. The per-contender ratio takes the minimum over a dozen noisy medians as
    "the fastest", which biases it low; this one does not.
    """
    groups: dict[tuple[Any, ...], dict[str, float]] = {}
    chosen: dict[tuple[Any, ...], str] = {}
    for r in records:
        if r["mode"] != mode:
            continue
        key = (r["backend"], r["case"], r["batch"])
        groups.setdefault(key, {})[r["ordering"]] = r["median_s"]
        if r["ordering"] == "auto":
            chosen[key] = r["method"]
    path_time, ran = path_times(records, mode)
    rows = []
    for key, times in groups.items():
        orderings = {name: t for name, t in times.items() if name not in BASELINES and name not in PLANNERS}
        fastest_name = min(orderings, key=orderings.__getitem__)
        fastest = orderings[fastest_name]
        judged = {
            f"{name} by path": path_time[key][ran[(*key, name)]] / min(path_time[key].values())
            for name in PLANNERS
            if (*key, name) in ran
        }
        rows.append(
            {
                "backend": key[0],
                "case": key[1],
                "batch": key[2],
                "fastest": fastest_name,
                "fastest_ms": 1e3 * fastest,
                "auto_chose": chosen.get(key),
                **{name: t / fastest for name, t in times.items()},
                **judged,
            }
        )
    return rows


def planner_figures(rows: Sequence[dict[str, Any]], contender: str = "auto") -> tuple[float, float, float]:
    """Median, geometric mean and worst of ``contender``'s time / the fastest ordering's."""
    ratios = [row[contender] for row in rows if contender in row]
    if not ratios:
        return math.nan, math.nan, math.nan
    return statistics.median(ratios), math.exp(statistics.fmean(map(math.log, ratios))), max(ratios)


def markdown_summary(records: Sequence[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [f"# Contraction orderings on {env['cpu']} ({env['cores']} cores, {env['device']})", ""]
    lines.append("Time / the fastest ordering of that case (forward+backward, median of round-robin repeats).")
    lines.append(
        "`by path`: the planner's path against the fastest path, a path's time being the median over every "
        "contender that ran that same path (so the fastest is not the luckiest of a dozen noisy medians)."
    )
    lines.append(
        "GEMM ceiling measured here (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in env["gemm_gflops"].items())
    )
    lines.append("")
    rows = ratio_table(records)
    for backend in sorted({row["backend"] for row in rows}):
        subset = [row for row in rows if row["backend"] == backend]
        lines.append(f"## {backend}")
        lines.append("")
        example = tnlayers.report(CASES[3].spec, 1024, backend=backend)  # what the planner sees, per strategy
        lines += ["`tnlayers.report` of the paper's FC2 layer at D = 16, batch 1024:", ""]
        lines += ["```", str(example), "```", ""]
        for contender in ("auto", "autotune", "auto by path", "autotune by path", *BASELINES):
            med, geo, worst = planner_figures(subset, contender)
            if not math.isnan(med):
                against = "path" if "path" in contender else "ordering"
                lines.append(
                    f"- `{contender}`: median {med:.2f}x, geometric mean {geo:.2f}x, worst {worst:.2f}x of the "
                    f"fastest {against} over {sum(contender in r for r in subset)} cases"
                )
        lines.append("")
        columns = [c for c in (*ORDERINGS, *BASELINES) if any(c in r for r in subset)]
        lines.append("| case | batch | fastest | ms | auto chose | " + " | ".join(columns) + " |")
        lines.append("|---|---|---|---|---|" + "---|" * len(columns))
        for row in subset:
            cells = [f"{row[c]:.2f}" if c in row else "" for c in columns]
            lines.append(
                f"| {row['case']} | {row['batch']} | {row['fastest']} | {row['fastest_ms']:.3f} | "
                f"{row['auto_chose']} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Time against batch size per ordering (a few cases), and measured time against the model's cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    train = [r for r in records if r["mode"] == "forward+backward"]
    backends = sorted({r["backend"] for r in train})
    cases = list(dict.fromkeys(r["case"] for r in train))[:4]
    figure, axes = plt.subplots(
        len(backends), len(cases), figsize=(4.2 * len(cases), 3.4 * len(backends)), squeeze=False
    )
    for row, backend in enumerate(backends):
        for column, case in enumerate(cases):
            ax = axes[row][column]
            subset = [r for r in train if r["backend"] == backend and r["case"] == case]
            for name in dict.fromkeys(r["ordering"] for r in subset):
                points = sorted((r["batch"], 1e3 * r["median_s"]) for r in subset if r["ordering"] == name)
                style = "--" if name in BASELINES else "-"
                ax.plot(
                    *zip(*points), style, marker="o", markersize=3, label=name, linewidth=2.5 if name == "auto" else 1
                )
            ax.set(xscale="log", yscale="log", title=f"{backend}: {case}", xlabel="batch", ylabel="ms (fwd+bwd)")
    axes[0][-1].legend(fontsize=6)
    figure.tight_layout()
    paths.append(out / "time_vs_batch.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    figure, axes = plt.subplots(1, len(backends), figsize=(4.5 * len(backends), 4), squeeze=False)
    for column, backend in enumerate(backends):
        points = [
            (r["model_cost"], r["median_s"])
            for r in records
            if r["backend"] == backend and r["mode"] == "forward" and r["model_cost"]
        ]
        ax = axes[0][column]
        ax.scatter(*zip(*points), s=6, alpha=0.6)
        ax.set(
            xscale="log", yscale="log", title=f"{backend}: forward", xlabel="cost model (units)", ylabel="measured s"
        )
    figure.tight_layout()
    paths.append(out / "measured_vs_model.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    return paths


PARALLEL_THRESHOLD = tnlayers.cost_model_for("torch").parallel_threshold
"""``M*N*K`` from which MKL's sgemm splits a product across the 2 threads of this machine (found by
timing random shapes on 1 and 2 threads); ``--fit`` fits the cost of waking the threads."""
AUTO_CHOICES = ("zipper", "reverse-zipper", "materialize", "greedy", "dp", "dp-combo", "optimal", "random-greedy")
"""The measured orderings that ``auto`` chooses among (it also plans dp by size, which is not timed here)."""


def fit_cost_model(
    records: Sequence[dict[str, Any]], mode: str = "forward+backward"
) -> tuple[tnlayers.CostModel, tuple[float, float, float]]:
    """Grid search of CostModel weights for ``auto``'s choice among its candidates.

    Scored by the worst, then the geometric mean, of the picked path's time / the fastest path's
    (any ordering, opt_einsum's and cotengra's included; a path's time is the median over the
    contenders that ran it, as in :func:`ratio_table`), a worst within 1.5x counting as met;
    returns the model and its (median, geometric mean, worst) on these records.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        if r["mode"] == mode and r["ordering"] in AUTO_CHOICES:
            groups.setdefault((r["backend"], r["case"], r["batch"]), []).append(r)
    path_time, ran = path_times(records, mode)
    fastest = {key: min(times.values()) for key, times in path_time.items()}

    gradients = "none" if mode == "forward" else "cores"

    def estimate(model: tnlayers.CostModel, r: dict[str, Any]) -> float:
        grads = grad_inputs([tuple(p) for p in r["path"]], len(r["in_modes"]) + 1, gradients)
        return model.estimate([tuple(s) for s in r["step_sizes"]], grads)

    def pick(model: tnlayers.CostModel, group: list[dict[str, Any]]) -> dict[str, Any]:
        return group[model.choose_index([estimate(model, r) for r in group], [r["flops"] for r in group])]

    def ratios(model: tnlayers.CostModel) -> list[float]:
        return [
            path_time[key][ran[(*key, pick(model, group)["ordering"])]] / fastest[key] for key, group in groups.items()
        ]

    def score(model: tnlayers.CostModel) -> tuple[float, float]:
        values = ratios(model)  # the bound first (worst within 1.5x), then the geometric mean
        return max(max(values), 1.5), round(math.exp(statistics.fmean(map(math.log, values))), 4)

    grid = itertools.product([4e10, 8e10, 1.6e11, 3.2e11], [2e8, 4e8, 1e9, 2e9, 4e9], [1, 2, 8, 32],
                             [1e-5, 2e-5, 4e-5], [0.0, 0.1, 0.2, 0.3], [0.0, 5e-5, 9e-5, 1.5e-4])  # fmt: skip
    models = (tnlayers.CostModel(p, b, h, o, t, PARALLEL_THRESHOLD if w else math.inf, w) for p, b, h, o, t, w in grid)
    best = min(models, key=score)
    values = ratios(best)
    return best, (statistics.median(values), math.exp(statistics.fmean(map(math.log, values))), max(values))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.orderings", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None, help="numpy torch tensorflow jax (default: installed)")
    parser.add_argument("--cases", nargs="+", default=["all"], help="all, paper, square, uneven, or case names")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--orderings", nargs="+", default=list(ORDERINGS))
    parser.add_argument("--modes", nargs="+", default=["forward", "forward+backward"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch / TF intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda (untested here)")
    parser.add_argument("--out", type=Path, default=Path("results/orderings"))
    parser.add_argument("--quick", action="store_true", help="2 cases at batch 1 and 64, 2 repeats (< 60 s)")
    parser.add_argument("--fit", action="store_true", help="fit each backend's CostModel weights to these times")
    parser.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead measurement (torch)")
    parser.add_argument(
        "--from-records", type=Path, default=None, help="summarise / --fit a records.jsonl, timing nothing"
    )
    args = parser.parse_args(argv)
    backends = args.backends or [b for b in ("numpy", "torch", "tensorflow") if b in available_backends()]
    unknown = [b for b in backends if b not in RUNNERS]
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; expected some of {', '.join(RUNNERS)}")
    missing = [b for b in backends if b not in available_backends()]
    if missing:
        parser.error(f"backend(s) {missing} not installed")
    if args.quick:
        cases, batches, repeats = QUICK_CASES, list(QUICK_BATCHES), 2
    else:
        selected = set(args.cases)
        cases = [c for c in CASES if "all" in selected or c.group in selected or c.name in selected]
        batches, repeats = args.batches, args.repeats
        if not cases:
            parser.error(f"no case matches {args.cases}")
    if args.threads:
        if "torch" in backends:
            import torch

            torch.set_num_threads(args.threads)
        if "tensorflow" in backends:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    # autotune starts from nothing here (its winners are kept beside the results, not in ~/.cache)
    os.environ["TNLAYERS_CACHE_DIR"] = str(args.out / "autotune-cache")
    tnlayers.autotune.clear(disk=True)
    records: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_records:  # re-summarise (and refit) earlier measurements, timing nothing
        for line in args.from_records.read_text().splitlines():
            record = json.loads(line)
            if record["mode"] == "overhead" or record["backend"] in backends:
                (calls if record["mode"] == "overhead" else records).append(record)
        env = {k: records[0][k] for k in ("cpu", "cores", "device", "gemm_gflops")} if records else {}
    else:
        jobs = [
            (b, c, n)
            for b in backends
            for c in cases
            for n in batches
            if 2 * n * c.spec.in_features * c.spec.out_features <= MAX_DENSE_FLOPS
        ]
        gemm = {}
        for backend in tqdm(jobs and backends, desc="GEMM ceilings", leave=False):
            runner = RUNNERS[backend](CASES[0].spec, 1, args.dtype, args.device)
            gemm[backend] = runner.gemm_gflops(1024 if args.quick else 2048)
        env = environment(backends, args.threads, args.device, gemm)
        with (args.out / "records.jsonl").open("w") as handle:  # written as measured: a long run keeps its part
            for backend, case, batch in tqdm(jobs, desc="cases"):
                runner = RUNNERS[backend](case.spec, batch, args.dtype, args.device if backend == "torch" else "cpu")
                measured = measure_case(runner, args.orderings, repeats, args.modes, case)
                records += measured
                handle.writelines(json.dumps({**record, **env}) + "\n" for record in measured)
                handle.flush()
            calls = [] if args.no_overhead or "torch" not in backends else overhead(3 if args.quick else 9)
            handle.writelines(json.dumps({"mode": "overhead", **record, **env}) + "\n" for record in calls)
    summary = markdown_summary(records, env)
    if calls:
        summary += "\n## Per-call overhead\n\n" + "\n".join(overhead_lines(calls)) + "\n"
    (args.out / "summary.md").write_text(summary + "\n")
    figures = plot(records, args.out)
    rows = ratio_table(records)
    result: dict[str, Any] = {"records": records, "environment": env, "figures": {}, "overhead": calls}
    print()
    if calls:
        print("\n".join(overhead_lines(calls)) + "\n")
    for backend in backends:
        subset = [row for row in rows if row["backend"] == backend]
        for contender in (*PLANNERS, *(f"{name} by path" for name in PLANNERS)):
            med, geo, worst = planner_figures(subset, contender)
            result["figures"][(backend, contender)] = (med, geo, worst)
            against = "path" if "path" in contender else "ordering"
            print(
                f"{backend:<10} {contender:<16} fwd+bwd time / fastest {against}: "
                f"median {med:.3f}x, geomean {geo:.3f}x, worst {worst:.3f}x over {len(subset)} cases"
            )
        if args.fit:
            fitted, (med, geo, worst) = fit_cost_model([r for r in records if r["backend"] == backend])
            result["figures"][(backend, "fitted")] = fitted
            print(f"{backend:<10} fitted {fitted}: median {med:.3f}x, geomean {geo:.3f}x, worst {worst:.3f}x")
    print(
        f"\n{'read' if args.from_records else 'wrote'} {len(records)} records; wrote {args.out / 'summary.md'}, "
        + ", ".join(str(p) for p in figures)
    )
    return result


if __name__ == "__main__":
    main()
