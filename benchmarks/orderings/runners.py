"""One runner per backend: the same inputs and cores as arrays of that framework, and calls to time."""

from __future__ import annotations

import importlib.util
import statistics
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import tnlayers
from tnlayers.contract import backprop, execute, get_ops
from tnlayers.layer import DEFAULT_SAVED_BUDGET
from tnlayers.timing import round_robin

from ..records import torch_saved_bytes
from .peers import tltorch_blocktt, tn_keras_dense_mpo


class Runner:
    """One backend's arrays for one case and batch: forward and forward+backward of any plan, and the peers."""

    backend = "numpy"
    saved_budget: float | None = DEFAULT_SAVED_BUDGET
    """What training keeps for the backward, at most, in input sizes (torch: the planned backward's bound)."""
    trains_weight_route = False
    """Whether training runs every plan that builds ``W`` as :func:`tnlayers.contract.dense_weight` and one
    product, whatever its path (as every forward does); NumPy's training runs the path's steps on a tape."""

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

    def matmul(self, size: int) -> Callable[[], Any]:
        """One finished ``(size, size) @ (size, size)`` product of the backend (float32)."""
        a = np.ones((size, size), np.float32)
        return lambda: a @ a

    def gemm_gflops(self, size: int) -> float:
        """The measured GEMM ceiling of this backend: GFLOP/s of a square float32 product."""
        return 2 * size**3 / statistics.median(round_robin({"gemm": self.matmul(size)}, 3)["gemm"]) / 1e9


class TorchRunner(Runner):
    backend = "torch"
    trains_weight_route = True

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

    def train_step(self, plan: tnlayers.ContractionPlan, saved_budget: Any = "runner") -> Callable[[], Any]:
        """Forward and backward as the layer runs them: within ``saved_budget`` (the runner's by default)."""
        from tnlayers.backends.torch import run_plan

        budget = self.saved_budget if saved_budget == "runner" else saved_budget
        return lambda: self._backward(run_plan(plan, self.x, self.cores, None, budget))

    def dense(self) -> tuple[Callable[[], Any], Callable[[], Any]]:
        return self._inference(lambda: self.x @ self.weight), (lambda: self._backward(self.x @ self.weight))

    def peers(self) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
        layer = tltorch_blocktt(self.cores_np, self.device)
        if layer is None:
            return {}
        return {"tltorch-blocktt": (self._inference(lambda: layer(self.x)), lambda: self._backward(layer(self.x)))}

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value.detach().cpu().numpy())

    def memory(self, run: Callable[[], Any]) -> int | None:
        """Bytes autograd keeps for the backward pass: the distinct storages saved-tensor hooks see, the
        parameters' own (cores, dense weight) excluded, as in the training-memory issue."""
        return torch_saved_bytes(run, (*self.cores, self.weight))

    def matmul(self, size: int) -> Callable[[], Any]:
        a = self.torch.ones(size, size, device=self.device)

        def run() -> None:
            a @ a
            self.sync()

        return run


class TensorFlowRunner(Runner):
    backend = "tensorflow"
    trains_weight_route = True

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
        layer = tn_keras_dense_mpo(self.cores_np)
        return {} if layer is None else {"tn_keras": self._pair(lambda: layer(self.x), layer.trainable_weights)}

    def memory(self, run: Callable[[], Any]) -> int | None:
        return None

    def matmul(self, size: int) -> Callable[[], Any]:
        a = self.tf.ones((size, size))
        product = self.tf.function(lambda: self.tf.matmul(a, a))
        return lambda: product().numpy()


class JaxRunner(Runner):
    backend = "jax"
    trains_weight_route = True

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

    def matmul(self, size: int) -> Callable[[], Any]:
        a = self.jax.numpy.ones((size, size))
        product = self.jax.jit(lambda: a @ a)
        return lambda: product().block_until_ready()


RUNNERS: dict[str, type[Runner]] = {
    "numpy": Runner,
    "torch": TorchRunner,
    "tensorflow": TensorFlowRunner,
    "jax": JaxRunner,
}


def available_backends() -> list[str]:
    names = {"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}
    return [name for name, module in names.items() if importlib.util.find_spec(module) is not None]
