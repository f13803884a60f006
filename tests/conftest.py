"""Shared fixtures: one ``harness`` per array backend, and the independent dense reference.

Set ``TNLAYERS_TEST_BACKENDS=numpy,torch`` to run only some backends. A backend that is not
installed is skipped with a reason naming it (CI installs all of them).
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import os
import random
import string
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

import tnlayers
import tnlayers.datasets
from tnlayers.contract import Tape, backprop, execute, get_ops

# Property tests draw the same examples on every run (CI cannot go red by chance); set
# HYPOTHESIS_PROFILE=explore to search new ones locally.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state: Python's, NumPy's global one, and torch's and Keras's
    when the test session has imported them (a test's result never depends on the tests run before it)."""
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002  (the legacy global generator some libraries still draw from)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
    if "keras" in sys.modules:
        sys.modules["keras"].utils.set_random_seed(0)


def _import_the_mutated_adapters() -> None:
    """Under ``make mutate`` (``mutmut run`` works in ``mutants/``), ``tnlayers.backends`` and ``tnlayers.apps``
    come from the mutated copies there: the install maps them to ``backends/`` and ``apps/`` of the checkout.

    They are imported under the names mutmut gives their mutants (``backends.torch``, from the file's path) and
    aliased as ``tnlayers.backends...``: mutmut matches a mutant to the tests that reach it by the function's
    ``__module__``, so under the installed name every adapter mutant would read "no tests"."""
    here = Path.cwd()
    if here.name != "mutants" or not (here / "backends" / "__init__.py").is_file():
        return
    for name, folder, submodules in (("backends", here / "backends", ("numpy", "torch")), ("apps", here / "apps", ())):
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        sys.modules[f"tnlayers.{name}"] = package
        spec.loader.exec_module(package)
        setattr(tnlayers, name, package)
        for submodule in submodules:
            module = importlib.import_module(f"{name}.{submodule}")
            sys.modules[f"tnlayers.{name}.{submodule}"] = module
            setattr(package, submodule, module)


_import_the_mutated_adapters()


@functools.cache
def real_mnist() -> Path | None:
    """MNIST where tnlayers finds it ($TNLAYERS_DATA, ../shared beside the working directory or the checkout);
    ``None`` where it does not, and the tests that need digits use a generated stand-in (``mnist_dir``).
    Looked up on first use, not at import: under ``make mutate`` a mutant of ``find_folder`` must fail tests,
    not the loading of this file."""
    return tnlayers.datasets.find_folder("mnist")


#: ``TNLAYERS_REQUIRE_ALL=1`` (set by ``make test`` and CI): a test skipped for a missing framework or
#: package fails instead, so a green run has run everything.
REQUIRE_ALL = os.environ.get("TNLAYERS_REQUIRE_ALL") == "1"

#: Cost-model weights for the tests of planning under the bound on what training keeps: fixed (not a
#: backend's fitted ones), so the expected choices do not move with a refit.
BOUNDED_MODEL = tnlayers.CostModel(
    peak_flops=3.2e11, bandwidth=2e9, half_size=1, step_overhead=1e-5, tolerance=0.1, planned_step_overhead=6e-5
)
MISSING_MARKS = ("could not import", "is not installed")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if any(mark in reason for mark in MISSING_MARKS):
            report.outcome = "failed"
            report.longrepr = f"TNLAYERS_REQUIRE_ALL=1 and this test was skipped: {reason}"


def pytest_report_header() -> str:
    real = real_mnist()
    found = f"MNIST from {real}" if real else "MNIST not found: the digit tests use a generated stand-in"
    return f"tnlayers: {found}; TNLAYERS_REQUIRE_ALL={'1' if REQUIRE_ALL else 'unset'}"


def assert_at_callers_line(warning: Any, test_file: str) -> None:
    """The warning points at the test's own line (``stacklevel`` right), not into tnlayers; under ``make mutate``
    the first frame outside tnlayers is mutmut's trampoline, which sits between a mutated function and its caller."""
    trampoline = os.path.join("mutmut", "mutation", "trampoline.py")
    if "MUTANT_UNDER_TEST" in os.environ and warning.filename.endswith(trampoline):
        return
    assert warning.filename == test_file


def _widened(core: Any) -> np.ndarray:
    """A core in float64, or complex128 for complex NumPy cores."""
    complex_core = isinstance(core, np.ndarray) and np.iscomplexobj(core)
    return np.asarray(core, dtype=np.complex128 if complex_core else np.float64)


def dense_reference(cores: list[np.ndarray]) -> np.ndarray:
    """W of shape (in_features, out_features) from one explicit einsum over all indices (not tnlayers code),
    in float64 (complex128 for complex cores)."""
    n = len(cores)
    if 3 * n + 1 > len(string.ascii_letters):  # too many indices for one einsum: chain tensordots instead
        chain = _widened(cores[0])
        for core in cores[1:]:
            chain = np.tensordot(chain, _widened(core), axes=([-1], [0]))
        chain = chain.reshape(chain.shape[1:-1])  # (i1, j1, i2, j2, ...): the outer bonds are 1
        chain = chain.transpose([*range(0, 2 * n, 2), *range(1, 2 * n, 2)])
        return chain.reshape(int(np.prod([c.shape[1] for c in cores])), -1)
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(n + 1)]
    ins = [next(letters) for _ in range(n)]
    outs = [next(letters) for _ in range(n)]
    terms = [bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n)]
    equation = ",".join(terms) + "->" + bonds[0] + "".join(ins) + "".join(outs) + bonds[n]
    full = np.einsum(equation, *[_widened(c) for c in cores], optimize="greedy")
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


def reference_patches(
    x: np.ndarray, kernel: tuple[int, int], stride: Any, padding: Any, dilation: Any
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int, int, int]]:
    """Rows ``(batch*oh*ow, channels*kh*kw)`` of the zero-padded NCHW input (plain NumPy im2col), the output
    size and the padding ``(top, bottom, left, right)``; ``padding`` is an int or ``"valid"``/``"same"``."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    n, c, h, w = x.shape
    extent = (dh * (kernel[0] - 1) + 1, dw * (kernel[1] - 1) + 1)
    if padding == "same":  # output ceil(size / stride); the odd pixel at the bottom / right
        totals = [max((-(-size // s) - 1) * s + e - size, 0) for size, s, e in zip((h, w), (sh, sw), extent)]
        pads = (totals[0] // 2, totals[0] - totals[0] // 2, totals[1] // 2, totals[1] - totals[1] // 2)
    else:
        p = 0 if padding == "valid" else padding
        pads = (p, p, p, p)
    padded = np.pad(x, ((0, 0), (0, 0), pads[:2], pads[2:]))
    oh = (h + pads[0] + pads[1] - extent[0]) // sh + 1
    ow = (w + pads[2] + pads[3] - extent[1]) // sw + 1
    rows = np.empty((n, oh, ow, c, *kernel))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            window = padded[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
            rows[..., i, j] = window.transpose(0, 2, 3, 1)
    return rows.reshape(n * oh * ow, -1), (oh, ow), pads


def reference_patch_gradient(
    grad_rows: np.ndarray, x_shape: tuple[int, ...], kernel: tuple[int, int], stride: Any, padding: Any, dilation: Any
) -> np.ndarray:
    """The gradient for the NCHW input of ``sum(grad_rows * patches(x))``: each patch entry added back."""
    x = np.zeros(x_shape)
    _, (oh, ow), pads = reference_patches(x, kernel, stride, padding, dilation)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    n, c, h, w = x_shape
    padded = np.zeros((n, c, h + pads[0] + pads[1], w + pads[2] + pads[3]))
    grads = grad_rows.reshape(n, oh, ow, c, *kernel)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            window = (slice(None), slice(None), slice(i * dh, i * dh + sh * (oh - 1) + 1, sh),
                      slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))  # fmt: skip
            padded[window] += grads[..., i, j].transpose(0, 3, 1, 2)
    return padded[:, :, pads[0] : pads[0] + h, pads[2] : pads[2] + w]


class NumpyLayerHarness:
    """How the shared layer tests build, run, train and differentiate a framework's MPO layer."""

    name = "numpy"
    tune_backend = "numpy"

    def make(self, in_modes: Any, out_modes: Any, rank: Any, strategy: Any, dtype: Any, seed: int = 0) -> Any:
        from tnlayers.backends.numpy import MPOLinear

        return MPOLinear(in_modes, out_modes, rank, seed=seed, strategy=strategy, dtype=dtype)

    def load(self, path: Path) -> Any:
        from tnlayers.backends.numpy import MPOLinear

        return MPOLinear.load(path)

    def from_dense(self, matrix: np.ndarray, bias: np.ndarray, in_modes: Any, out_modes: Any, max_rank: int) -> Any:
        from tnlayers.backends.numpy import MPOLinear

        return MPOLinear.from_dense(matrix, in_modes, out_modes, bias=bias, max_rank=max_rank)

    def set_bias(self, layer: Any, values: np.ndarray) -> None:
        layer.bias[:] = values

    def weights(self, layer: Any) -> tuple[list[np.ndarray], np.ndarray | None]:
        return [np.array(c) for c in layer.cores], None if layer.bias is None else np.array(layer.bias)

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

    def train_step(self, layer: Any, x: np.ndarray) -> None:
        """One AdamW step (lr 0.1, weight decay 0.1) on ``sum(layer(x))``: it moves every trainable array."""
        from tnlayers.backends.numpy import Adam

        optimizer = Adam(layer.parameters(), lr=0.1, weight_decay=0.1)
        layer.train()(x)
        layer.backward(np.ones((len(x), layer.out_features), x.dtype))
        optimizer.step(layer.grads())


class TorchLayerHarness:
    name = "torch"
    tune_backend = "torch"

    def make(self, in_modes: Any, out_modes: Any, rank: Any, strategy: Any, dtype: Any, seed: int = 0) -> Any:
        import torch
        from tnlayers.backends.torch import MPOLinear

        torch_dtype = getattr(torch, np.dtype(dtype).name)
        return MPOLinear(in_modes, out_modes, rank, strategy=strategy, dtype=torch_dtype, seed=seed)

    def make_conv(
        self, channels: int, filters: int, kernel: Any, in_modes: Any, out_modes: Any, rank: Any,
        stride: Any, padding: Any, dilation: Any, strategy: Any, dtype: Any, seed: int = 0,
    ) -> Any:  # fmt: skip
        import torch
        from tnlayers.backends.torch import MPOConv2d

        torch_dtype = getattr(torch, np.dtype(dtype).name)
        return MPOConv2d(channels, filters, kernel, in_modes, out_modes, rank, stride, padding, dilation,
                         strategy=strategy, dtype=torch_dtype, seed=seed)  # fmt: skip

    def load(self, path: Path) -> Any:
        from tnlayers.backends.torch import MPOLinear

        return MPOLinear.load(path)

    def from_dense(self, matrix: np.ndarray, bias: np.ndarray, in_modes: Any, out_modes: Any, max_rank: int) -> Any:
        import torch
        from tnlayers.backends.torch import MPOLinear

        linear = torch.nn.Linear(*matrix.shape, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(matrix.T))
            linear.bias.copy_(torch.from_numpy(bias))
        return MPOLinear.from_linear(linear, in_modes, out_modes, max_rank)

    def set_bias(self, layer: Any, values: np.ndarray) -> None:
        import torch

        with torch.no_grad():
            layer.bias.copy_(torch.from_numpy(values))

    def set_weights(self, layer: Any, cores: list[np.ndarray], bias: np.ndarray) -> None:
        import torch

        with torch.no_grad():
            for core, values in zip(layer.cores, cores):
                core.copy_(torch.from_numpy(values))
            layer.bias.copy_(torch.from_numpy(bias))

    def weights(self, layer: Any) -> tuple[list[np.ndarray], np.ndarray | None]:
        return [c.detach().numpy().copy() for c in layer.cores], layer.bias.detach().numpy().copy()

    def forward(self, layer: Any, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return layer(torch.from_numpy(x)).numpy()

    conv_forward = forward  # torch convolutions take NCHW, like the references

    def grads(self, layer: Any, x: np.ndarray, grad_out: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], Any]:
        import torch

        layer.zero_grad()
        x_t = torch.from_numpy(x).requires_grad_(True)
        layer(x_t).backward(torch.from_numpy(grad_out))
        return x_t.grad.numpy(), [c.grad.numpy() for c in layer.cores], layer.bias.grad.numpy()

    conv_grads = grads

    def train_step(self, layer: Any, x: np.ndarray) -> None:
        import torch

        optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
        layer(torch.from_numpy(x)).sum().backward()
        optimizer.step()


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

    def make_conv(
        self, channels: int, filters: int, kernel: Any, in_modes: Any, out_modes: Any, rank: Any,
        stride: Any, padding: Any, dilation: Any, strategy: Any, dtype: Any, seed: int = 0,
    ) -> Any:  # fmt: skip
        from tnlayers.backends.keras import MPOConv2D

        layer = MPOConv2D(filters, kernel, in_modes, out_modes, rank, stride, padding, dilation, strategy=strategy,
                          seed=seed, dtype=np.dtype(dtype).name)  # fmt: skip
        layer.build((None, None, None, channels))
        return layer

    def load(self, path: Path) -> Any:
        from tnlayers.backends.keras import MPODense

        return MPODense.load(path)

    def from_dense(self, matrix: np.ndarray, bias: np.ndarray, in_modes: Any, out_modes: Any, max_rank: int) -> Any:
        import keras
        from tnlayers.backends.keras import MPODense

        dense = keras.layers.Dense(matrix.shape[1], dtype="float64")
        dense.build((None, matrix.shape[0]))
        dense.kernel.assign(matrix)
        dense.bias.assign(bias)
        return MPODense.from_dense(dense, in_modes, out_modes, max_rank)

    def set_bias(self, layer: Any, values: np.ndarray) -> None:
        layer.bias.assign(values)

    def set_weights(self, layer: Any, cores: list[np.ndarray], bias: np.ndarray) -> None:
        layer.set_numpy_weights(cores, bias)

    def weights(self, layer: Any) -> tuple[list[np.ndarray], np.ndarray | None]:
        return layer.numpy_weights()  # type: ignore[no-any-return]

    def forward(self, layer: Any, x: np.ndarray) -> np.ndarray:
        import keras

        return keras.ops.convert_to_numpy(layer(x))  # type: ignore[no-any-return]

    def conv_forward(self, layer: Any, x: np.ndarray) -> np.ndarray:
        """NCHW in and out, like the references (Keras convolutions are channels-last)."""
        return self.forward(layer, x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def grads(self, layer: Any, x: np.ndarray, grad_out: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], Any]:
        """Gradients of ``sum(grad_out * layer(x, training=True))`` by the backend's autodiff."""
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

    def conv_grads(self, layer: Any, x: np.ndarray, grad_out: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], Any]:
        nhwc = (0, 2, 3, 1)
        grad_x, core_grads, bias_grad = self.grads(layer, x.transpose(nhwc), grad_out.transpose(nhwc))
        return grad_x.transpose(0, 3, 1, 2), core_grads, bias_grad

    def train_step(self, layer: Any, x: np.ndarray) -> None:
        import keras

        model = keras.Sequential([keras.Input((x.shape[1],)), layer])
        model.compile(optimizer=keras.optimizers.AdamW(0.1, weight_decay=0.1), loss="mse")
        model.fit(x, np.ones((len(x), layer.units), np.float32), epochs=1, batch_size=len(x), verbose=0)


LAYER_HARNESSES = {"numpy": NumpyLayerHarness, "torch": TorchLayerHarness, "keras": KerasLayerHarness}
CONV_HARNESSES = ("torch", "keras")


def make_layer_harness(name: str) -> Any:
    """The harness of ``name``, or a skip naming the missing framework (or the backend selection)."""
    if _SELECTED and name not in _SELECTED.split(","):
        pytest.skip(f"{name} not in TNLAYERS_TEST_BACKENDS={_SELECTED}")
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")
    return LAYER_HARNESSES[name]()


@pytest.fixture(params=[_param(name) for name in LAYER_HARNESSES])
def layer_harness(request: pytest.FixtureRequest) -> Any:
    return make_layer_harness(request.param)


@pytest.fixture(params=[_param(name) for name in CONV_HARNESSES])
def conv_harness(request: pytest.FixtureRequest) -> Any:
    """The frameworks with an MPO convolution."""
    return make_layer_harness(request.param)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped: magic 0x0000 08 <ndim>, the big-endian dims, the data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1))


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST's folder; where it is missing, MNIST's four files written from
    :func:`tnlayers.datasets.synthetic_digits` (30,000 train, 10,000 test), so the digit tests run anyway."""
    real = real_mnist()
    if real is not None:
        return real
    folder = tmp_path_factory.mktemp("generated-mnist")
    for split, count, seed in (("train", 30000, 0), ("t10k", 10000, 1)):
        images, labels = tnlayers.datasets.synthetic_digits(count, seed)
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", np.round(images * 255).reshape(count, 28, 28))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture
def real_mnist_dir() -> Path:
    """The real MNIST files, for the tests of them (checksums, sizes); the one skip ``TNLAYERS_REQUIRE_ALL`` allows."""
    real = real_mnist()
    if real is None:
        pytest.skip("the real MNIST files are not here (set TNLAYERS_DATA); the other digit tests ran on a stand-in")
    return real


@pytest.fixture(autouse=True)
def _private_autotune_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read or write the user's ~/.cache/tnlayers."""
    monkeypatch.setenv("TNLAYERS_CACHE_DIR", str(tmp_path_factory.mktemp("tnlayers-cache")))
    tnlayers.autotune.default_tuner.cache_clear()  # the next default tuner reads the environment above
