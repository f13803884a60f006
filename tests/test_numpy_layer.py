"""NumPy-only parts of the NumPy MPOLinear: its backward as a chain rule, optimisers, modes, training on MNIST."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import dense_reference, real_mnist
from tnlayers.backends.numpy import SGD, Adam, MPOLinear

import tnlayers
from tnlayers.datasets import load_mnist


def test_dense_gradient_of_w_is_recovered() -> None:
    """Chain rule check on the whole W: sum_k <grad_k, dcore_k> = <x^T g, dW> for a small step."""
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 4, seed=2, dtype=np.float64)
    rng = np.random.default_rng(3)
    x, g = rng.normal(size=(8, 784)), rng.normal(size=(8, 256))
    layer(x)
    layer.backward(g)
    directions = [rng.normal(size=c.shape) for c in layer.cores]
    eps = 1e-6
    plus = dense_reference([c + eps * d for c, d in zip(layer.cores, directions)])
    minus = dense_reference([c - eps * d for c, d in zip(layer.cores, directions)])
    dense_directional = np.sum((x.T @ g) * (plus - minus) / (2 * eps))
    mpo_directional = sum(np.sum(gk * d) for gk, d in zip(layer.core_grads, directions))
    assert mpo_directional == pytest.approx(dense_directional, rel=1e-6)


def test_eval_mode_keeps_nothing_and_backward_needs_forward() -> None:
    layer = MPOLinear((2, 2), (2, 2), 2, seed=0)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.zeros((1, 4), np.float32))
    layer.eval()
    layer(np.ones((3, 4), np.float32))
    with pytest.raises(RuntimeError, match="training mode"):
        layer.backward(np.zeros((3, 4), np.float32))
    with pytest.raises(RuntimeError, match="no gradients"):
        layer.grads()


def test_from_dense_save_load_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    matrix = rng.normal(size=(12, 30))
    bias = rng.normal(size=30)
    layer = MPOLinear.from_dense(matrix, (3, 4), (5, 6), bias=bias)
    assert layer.decomposition.relative_error < 1e-12
    np.testing.assert_allclose(layer.to_dense(), matrix, atol=1e-12)
    layer.save(tmp_path / "layer.safetensors")
    loaded = MPOLinear.load(tmp_path / "layer.safetensors")
    x = rng.normal(size=(5, 12))
    np.testing.assert_array_equal(loaded(x), layer(x))
    auto = MPOLinear.from_dense(matrix, n_cores=2, max_rank=2)
    assert auto.spec.in_modes == (3, 4) and auto.spec.ranks == (1, 2, 1)
    assert MPOLinear.auto(784, 256, n_cores=4, rank=8).spec == tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)


@pytest.mark.parametrize("optimizer", [SGD, Adam])
def test_optimisers_reduce_a_regression_loss(optimizer) -> None:
    rng = np.random.default_rng(5)
    target = MPOLinear((3, 4), (4, 3), 2, seed=6, dtype=np.float64)
    layer = MPOLinear((3, 4), (4, 3), 3, seed=7, dtype=np.float64)
    opt = (
        optimizer(layer.parameters(), lr=0.05)
        if optimizer is Adam
        else optimizer(layer.parameters(), lr=0.05, momentum=0.9)
    )
    x = rng.normal(size=(64, 12))
    y = target(x)
    losses = []
    for _ in range(300):
        error = layer(x) - y
        losses.append(float(np.mean(error**2)))
        layer.backward(2 * error / error.size)
        opt.step(layer.grads())
    assert losses[-1] < 0.01 * losses[0]


def _softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(probs[np.arange(len(labels)), labels] + 1e-12))
    grad = probs
    grad[np.arange(len(labels)), labels] -= 1
    return float(loss), grad / len(labels)


def test_numpy_mpo_network_learns_mnist(mnist_dir: Path) -> None:
    """The paper's MPO-FC2 (784 -> 256 -> 10, both layers MPOs) in pure NumPy, 3 epochs on 30k images."""
    images, labels = load_mnist(mnist_dir, "train")
    test_images, test_labels = load_mnist(mnist_dir, "test")
    x_train, y_train = images[:30000], labels[:30000]
    hidden = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 8, init="he", seed=0)
    output = MPOLinear((4, 4, 4, 4), (1, 1, 10, 1), 4, seed=1)
    opt = Adam(hidden.parameters() + output.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _epoch in range(3):
        order = rng.permutation(len(x_train))
        for batch in np.array_split(order, len(order) // 64):
            pre = hidden(x_train[batch])
            logits = output(np.maximum(pre, 0))
            _, grad = _softmax_cross_entropy(logits, y_train[batch])
            grad_hidden = output.backward(grad.astype(np.float32)) * (pre > 0)
            hidden.backward(grad_hidden)
            opt.step(hidden.grads() + output.grads())
    hidden.eval()
    output.eval()
    predictions = output(np.maximum(hidden(test_images), 0)).argmax(axis=1)
    accuracy = float(np.mean(predictions == test_labels))
    print(f"NumPy MPO-FC2: {accuracy:.3f} test accuracy after {time.perf_counter() - start:.1f} s")
    assert accuracy > (0.93 if real_mnist() else 0.85), accuracy  # the generated stand-in: see test_keras


def test_a_path_optimiser_is_searched_once_when_the_layer_is_built() -> None:
    import opt_einsum

    class CountingOptimizer(opt_einsum.paths.PathOptimizer):
        calls = 0

        def __call__(self, inputs, output, size_dict, memory_limit=None):  # type: ignore[no-untyped-def]
            CountingOptimizer.calls += 1
            return opt_einsum.paths.greedy(inputs, output, size_dict, memory_limit)

    layer = MPOLinear((2, 3, 2), (3, 1, 2), 2, seed=0, strategy=CountingOptimizer(), dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(5, 12))
    for _ in range(3):
        np.testing.assert_allclose(layer(x), x @ dense_reference(layer.cores) + layer.bias, rtol=1e-10)
    assert CountingOptimizer.calls == 1
