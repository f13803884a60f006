"""Shared fixtures: one ``harness`` per array backend, and the independent dense reference.

Set ``TNLAYERS_TEST_BACKENDS=numpy,torch`` to run only some backends. A backend that is not
installed is skipped with a reason naming it (CI installs all of them).
"""

from __future__ import annotations

import importlib.util
import os
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

import tnlayers
from tnlayers.contract import Tape, backprop, execute, get_ops

# Property tests draw the same examples on every run (CI cannot go red by chance); set
# HYPOTHESIS_PROFILE=explore to search new ones locally.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

MNIST_DIR = Path(os.environ.get("TNLAYERS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))


def dense_reference(cores: list[np.ndarray]) -> np.ndarray:
    """W of shape (in_features, out_features) from one explicit einsum over all indices (not tnlayers code)."""
    n = len(cores)
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(n + 1)]
    ins = [next(letters) for _ in range(n)]
    outs = [next(letters) for _ in range(n)]
    terms = [bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n)]
    equation = ",".join(terms) + "->" + bonds[0] + "".join(ins) + "".join(outs) + bonds[n]
    full = np.einsum(equation, *[np.asarray(c, dtype=np.float64) for c in cores], optimize="greedy")
    rows = int(np.prod([c.shape[1] for c in cores]))
    return full.reshape(rows, -1)


def reference_core_gradients(cores: list[np.ndarray], x: np.ndarray, grad_out: np.ndarray) -> list[np.ndarray]:
    """Gradients of sum(grad_out * (x @ W)) for every core, from dense matrices only.

    W is linear in each core, so <dL/dcore_k, e> = sum(grad_out * (x @ W(cores with e at k))) exactly;
    evaluating that for every basis element e gives the gradient (use small cores).
    """
    x2 = np.asarray(x, np.float64).reshape(-1, int(np.prod([c.shape[1] for c in cores])))
    g2 = np.asarray(grad_out, np.float64).reshape(len(x2), -1)
    grads = []
    for k, core in enumerate(cores):
        flat_grad = np.zeros(core.size)
        for flat in range(core.size):
            basis = np.zeros(core.size)
            basis[flat] = 1.0
            replaced = [*cores[:k], basis.reshape(core.shape), *cores[k + 1 :]]
            flat_grad[flat] = np.sum(g2 * (x2 @ dense_reference(replaced)))
        grads.append(flat_grad.reshape(core.shape))
    return grads


def assert_close(actual: Any, expected: np.ndarray, dtype: Any) -> None:
    """rtol 1e-10 in float64 and 1e-4 in float32, relative to the reference's scale."""
    rtol = 1e-10 if np.dtype(dtype) == np.float64 else 1e-4
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


class NumpyHarness:
    name = "numpy"

    def asarray(self, array: np.ndarray) -> Any:
        return np.array(array)

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def grads(self, x: Any, cores: list[Any], grad_out: np.ndarray, strategy: Any) -> tuple[Any, list[Any]]:
        """Gradients of sum(grad_out * contract(x, cores)) by the core's reverse mode over the plan."""
        spec = tnlayers.decompose.spec_from_cores(cores)
        plan = tnlayers.plan(spec, int(np.prod(x.shape[:-1])), strategy)
        tape: Tape = []
        ops = get_ops("numpy")
        execute(plan, x, cores, None, ops, tape)
        grads = backprop(plan.steps, tape, grad_out.reshape(-1, *spec.out_modes), ops, spec.n_cores + 1)
        return grads[0].reshape(x.shape), [g.reshape(c.shape) for g, c in zip(grads[1:], cores)]


class TorchHarness:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def asarray(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.array(array))

    def to_numpy(self, value: Any) -> np.ndarray:
        return value.detach().cpu().numpy()

    def grads(self, x: Any, cores: list[Any], grad_out: np.ndarray, strategy: Any) -> tuple[Any, list[Any]]:
        x = x.clone().requires_grad_(True)
        cores = [c.clone().requires_grad_(True) for c in cores]
        y = tnlayers.contract(x, cores, strategy=strategy)
        (y * self.torch.from_numpy(grad_out)).sum().backward()
        return x.grad, [c.grad for c in cores]


class TensorflowHarness:
    name = "tensorflow"

    def __init__(self) -> None:
        import tensorflow as tf

        self.tf = tf

    def asarray(self, array: np.ndarray) -> Any:
        return self.tf.constant(array)

    def to_numpy(self, value: Any) -> np.ndarray:
        return value.numpy()

    def grads(self, x: Any, cores: list[Any], grad_out: np.ndarray, strategy: Any) -> tuple[Any, list[Any]]:
        with self.tf.GradientTape() as tape:
            tape.watch([x, *cores])
            y = tnlayers.contract(x, cores, strategy=strategy)
            loss = self.tf.reduce_sum(y * self.tf.constant(grad_out))
        grads = tape.gradient(loss, [x, *cores])
        return grads[0], grads[1:]


class JaxHarness:
    name = "jax"

    def __init__(self) -> None:
        import jax

        jax.config.update("jax_enable_x64", True)
        self.jax = jax

    def asarray(self, array: np.ndarray) -> Any:
        return self.jax.numpy.asarray(array)

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def grads(self, x: Any, cores: list[Any], grad_out: np.ndarray, strategy: Any) -> tuple[Any, list[Any]]:
        def loss(x: Any, cores: list[Any]) -> Any:
            return (tnlayers.contract(x, cores, strategy=strategy) * grad_out).sum()

        gx, gcores = self.jax.grad(loss, argnums=(0, 1))(x, cores)
        return gx, list(gcores)


HARNESSES = {"numpy": NumpyHarness, "torch": TorchHarness, "tensorflow": TensorflowHarness, "jax": JaxHarness}
_SELECTED = os.environ.get("TNLAYERS_TEST_BACKENDS")


def _param(name: str) -> Any:
    module = {"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax", "keras": "keras"}[name]
    missing = importlib.util.find_spec(module) is None
    return pytest.param(name, id=name, marks=pytest.mark.skipif(missing, reason=f"{module} is not installed"))


@pytest.fixture(params=[_param(name) for name in HARNESSES])
def harness(request: pytest.FixtureRequest) -> Any:
    if _SELECTED and request.param not in _SELECTED.split(","):
        pytest.skip(f"{request.param} not in TNLAYERS_TEST_BACKENDS={_SELECTED}")
    return HARNESSES[request.param]()


class NumpyLayerHarness:
    """How the shared layer tests build, run and differentiate a framework's MPO layer."""

    name = "numpy"
    tune_backend = "numpy"

    def make(self, in_modes: Any, out_modes: Any, rank: Any, strategy: Any, dtype: Any, seed: int = 0) -> Any:
        from tnlayers.backends.numpy import MPOLinear

        return MPOLinear(in_modes, out_modes, rank, seed=seed, strategy=strategy, dtype=dtype)

    def set_bias(self, layer: Any, values: np.ndarray) -> None:
        layer.bias[:] = values

    def weights(self, layer: Any) -> tuple[list[np.ndarray], np.ndarray | None]:
        return list(layer.cores), layer.bias

    def forward(self, layer: Any, x: np.ndarray) -> np.ndarray:
        """An inference call (nothing kept for a backward)."""
        training = layer.training
        try:
            return np.asarray(layer.eval()(x))
        finally:
            layer.training = training

    def grads(self, layer: Any, x: np.ndarray, grad_out: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], Any]:
        layer(x)
        grad_x = layer.backward(grad_out)
        return grad_x, list(layer.core_grads), layer.bias_grad


class TorchLayerHarness:
    name = "torch"
    tune_backend = "torch"

    def make(self, in_modes: Any, out_modes: Any, rank: Any, strategy: Any, dtype: Any, seed: int = 0) -> Any:
        import torch
        from tnlayers.backends.torch import MPOLinear

        torch_dtype = getattr(torch, np.dtype(dtype).name)
        return MPOLinear(in_modes, out_modes, rank, strategy=strategy, dtype=torch_dtype, seed=seed)

    def set_bias(self, layer: Any, values: np.ndarray) -> None:
        import torch

        with torch.no_grad():
            layer.bias.copy_(torch.from_numpy(values))

    def weights(self, layer: Any) -> tuple[list[np.ndarray], np.ndarray | None]:
        return [c.detach().numpy().copy() for c in layer.cores], layer.bias.detach().numpy().copy()

    def forward(self, layer: Any, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return layer(torch.from_numpy(x)).numpy()

    def grads(self, layer: Any, x: np.ndarray, grad_out: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], Any]:
        import torch

        layer.zero_grad()
        x_t = torch.from_numpy(x).requires_grad_(True)
        layer(x_t).backward(torch.from_numpy(grad_out))
        return x_t.grad.numpy(), [c.grad.numpy() for c in layer.cores], layer.bias.grad.numpy()


class KerasLayerHarness:
    """The Keras MPODense on whichever Keras backend runs (KERAS_BACKEND); gradients by that backend."""

    name = "keras"

    @property
    def tune_backend(self) -> str:
        import keras

        return "keras-" + keras.backend.backend()

    def make(self, in_modes: Any, out_modes: Any, rank: Any, strategy: Any, dtype: Any, seed: int = 0) -> Any:
        from tnlayers.backends.keras import MPODense

        layer = MPODense(in_modes, out_modes, rank, strategy=strategy, seed=seed, dtype=np.dtype(dtype).name)
        layer.build((None, int(np.prod(in_modes))))
        return layer

    def set_bias(self, layer: Any, values: np.ndarray) -> None:
        layer.bias.assign(values)

    def weights(self, layer: Any) -> tuple[list[np.ndarray], np.ndarray | None]:
        return layer.numpy_weights()  # type: ignore[no-any-return]

    def forward(self, layer: Any, x: np.ndarray) -> np.ndarray:
        import keras

        return keras.ops.convert_to_numpy(layer(x))  # type: ignore[no-any-return]

    def grads(self, layer: Any, x: np.ndarray, grad_out: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], Any]:
        import keras

        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            x_t = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(x_t)
                y = layer(x_t, training=True)
            grads = tape.gradient(y, [x_t, *layer.trainable_variables], output_gradients=tf.constant(grad_out))
        elif backend == "jax":
            import jax

            def loss(variables: Any, x: Any) -> Any:
                y, _ = layer.stateless_call(variables, [], x, training=True)
                return (y * grad_out).sum()

            values = [v.value for v in layer.trainable_variables]
            grad_vars, grad_x = jax.grad(loss, argnums=(0, 1))(values, x)
            grads = [grad_x, *grad_vars]
        else:
            import torch

            x_t = torch.from_numpy(x).requires_grad_(True)
            for v in layer.trainable_variables:
                v.value.grad = None
            layer(x_t, training=True).backward(torch.from_numpy(grad_out))
            grads = [x_t.grad, *[v.value.grad for v in layer.trainable_variables]]
        arrays = [keras.ops.convert_to_numpy(g) for g in grads]
        return arrays[0], arrays[1:-1], arrays[-1]


LAYER_HARNESSES = {"numpy": NumpyLayerHarness, "torch": TorchLayerHarness, "keras": KerasLayerHarness}


@pytest.fixture(params=[_param(name) for name in LAYER_HARNESSES])
def layer_harness(request: pytest.FixtureRequest) -> Any:
    if _SELECTED and request.param not in _SELECTED.split(","):
        pytest.skip(f"{request.param} not in TNLAYERS_TEST_BACKENDS={_SELECTED}")
    return LAYER_HARNESSES[request.param]()


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {MNIST_DIR} (set TNLAYERS_DATA)")
    return MNIST_DIR


@pytest.fixture(autouse=True)
def _private_autotune_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read or write the user's ~/.cache/tnlayers."""
    monkeypatch.setenv("TNLAYERS_CACHE_DIR", str(tmp_path_factory.mktemp("tnlayers-cache")))
    tnlayers.autotune.default_tuner.cache_clear()  # the next default tuner reads the environment above
