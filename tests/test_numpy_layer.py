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


@pytest.mark.parametrize(("strategy", "reuses"), [("auto", True), ("zipper", False)])
def test_eval_reuses_w_and_never_serves_a_stale_one(strategy: str, reuses: bool) -> None:
    """In eval, where the plan needs the dense flops (FC2 at D=16, batch 3), one product with a kept ``W``;
    rebuilt after an optimiser's in-place step, a core replaced, a core edited in place. An explicit
    ordering runs as asked."""
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 16, seed=5, dtype=np.float64, strategy=strategy)
    layer.bias[:] = np.random.default_rng(0).normal(size=256)
    x = np.random.default_rng(1).normal(size=(3, 1, 784))

    def check() -> None:
        np.testing.assert_allclose(layer(x), x @ dense_reference(layer.cores) + layer.bias, rtol=1e-10, atol=1e-10)

    layer.eval()
    check()
    kept = layer._cached_weight
    assert (kept is not None) == reuses
    check()
    assert layer._cached_weight is kept  # reused, not rebuilt
    layer.train()
    layer(x)
    layer.backward(np.ones((3, 1, 256)))
    SGD(layer.parameters(), lr=0.1).step(layer.grads())
    layer.eval()
    check()  # after an in-place optimiser step
    layer.cores[1] = layer.cores[1] * 2  # replaced
    check()
    layer.cores[2][0, 0, 0, 0] += 1.0  # edited in place
    check()


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


# From the mutation run of the NumPy adapter (docs/mutation-survivors.md).


def test_layer_without_bias_one_core_and_its_settings() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 12))
    plain = MPOLinear((3, 4), (2, 3), 2, bias=False, seed=4, dtype=np.float64)
    np.testing.assert_allclose(plain(x), x @ dense_reference(plain.cores), rtol=1e-12)
    one = MPOLinear((12,), (6,), 1, seed=4, dtype=np.float64)  # a single core: W itself
    np.testing.assert_allclose(one(x), x @ one.cores[0][0, :, :, 0] + one.bias, rtol=1e-12)
    assert MPOLinear(784, 256, n_cores=2).spec.n_cores == 2
    np.testing.assert_array_equal(
        MPOLinear((3, 4), (2, 3), 2, seed=9).cores[0], MPOLinear((3, 4), (2, 3), 2, seed=9).cores[0]
    )
    layer = MPOLinear((3, 4), (2, 3), 2)
    assert repr(layer) == f"MPOLinear({layer.spec}, bias=True, dtype=float32, strategy='auto')"
    assert layer.decomposition is None and MPOLinear.from_cores(layer.cores).strategy == "auto"
    with pytest.raises(ValueError, match=r"^MPOLinear expects"):
        layer(np.ones((2, 5), np.float32))
    with pytest.raises(
        TypeError, match=r"cores and bias must share one dtype, got \['float32', 'float32', 'bias float64'\]"
    ):
        MPOLinear.from_cores(layer.cores, np.zeros(6))
    with pytest.raises(TypeError, match=r"cores and bias must share one dtype, got \['float32', 'float64'\]$"):
        MPOLinear.from_cores([layer.cores[0], layer.cores[1].astype(np.float64)])
    only_bias = MPOLinear((3, 4), (2, 3), 2).freeze("all")  # every core frozen, the bias trains
    with pytest.raises(RuntimeError, match="no gradients yet"):
        only_bias.grads()


def test_backward_calls_in_order_and_their_messages() -> None:
    layer = MPOLinear((3, 4), (2, 3), 2, seed=1)
    with pytest.raises(RuntimeError, match=r"^no gradients yet: call forward and backward first$"):
        layer.grads()
    with pytest.raises(RuntimeError, match=r"^backward needs a forward call in training mode first \(see train\(\)\)$"):
        layer.backward(np.ones((2, 6), np.float32))
    layer(np.ones((2, 12), np.float32))
    with pytest.raises(ValueError, match=r"^grad_out must be an array of shape \(2, 6\), got \(2, 5\)$"):
        layer.backward(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"^grad_out must be an array of shape \(2, 6\), got \[1.0\]$"):
        layer.backward([1.0])
    layer.backward(np.ones((2, 6), np.float32))
    with pytest.raises(RuntimeError, match="backward needs a forward call"):  # the saved forward is used up
        layer.backward(np.ones((2, 6), np.float32))


def test_a_new_layer_trains_its_bias() -> None:
    layer = MPOLinear((3, 4), (2, 3), 2, seed=1)
    layer(np.ones((2, 12), np.float32))
    layer.backward(np.ones((2, 6), np.float32))
    SGD(layer.parameters(), lr=0.5).step(layer.grads())
    np.testing.assert_allclose(layer.bias, -1.0)  # 0 - 0.5 * (2 rows of ones)


def test_from_dense_passes_its_settings_on(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    matrix = rng.normal(size=(12, 6))
    layer = MPOLinear.from_dense(matrix, (4, 3), (3, 2), tol=0.3, strategy="zipper")
    assert (layer.spec.in_modes, layer.spec.out_modes, layer.strategy) == ((4, 3), (3, 2), "zipper")
    assert layer.decomposition is not None and layer.decomposition.relative_error <= 0.3
    assert layer.decomposition.relative_error > 0.01  # the tolerance cut something
    assert MPOLinear.from_dense(rng.normal(size=(16, 16))).spec.n_cores == 4
    layer.save(tmp_path / "default.safetensors")
    layer.save(tmp_path / "named.safetensors", name="encoder")
    for path, name in ((tmp_path / "default.safetensors", "mpo"), (tmp_path / "named.safetensors", "encoder")):
        cores, _ = tnlayers.load(path, name=name)
        for got, kept in zip(cores, layer.cores):
            np.testing.assert_array_equal(got, kept)


def test_optimiser_defaults_and_eps_by_hand() -> None:
    p = np.ones(3)
    sgd, adam = SGD([p]), Adam([p])
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (0.01, 0.0, 0.0)
    assert (adam.lr, adam.betas, adam.eps, adam.weight_decay) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    g = np.array([0.5, -2.0, 1e-3])
    p = np.zeros(3)
    Adam([p], lr=0.1, eps=0.05).step([g])  # step 1: m = 0.1 g, v = 0.001 g^2, scale = lr sqrt(0.001) / 0.1
    expected = -0.1 * np.sqrt(0.001) / 0.1 * (0.1 * g) / (np.sqrt(0.001 * g * g) + 0.05)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    with pytest.raises(TypeError, match=r"^parameter 0 must be a numpy.ndarray \(updated in place\), got list$"):
        SGD([[1.0]])
    with pytest.raises(ValueError, match=r"^gradient 0 has shape \(2,\), parameter 0 has shape \(3,\)$"):
        sgd.step([np.ones(2)])


def test_numpy_embedding_settings_save_and_repr(tmp_path: Path) -> None:
    from tnlayers.backends.numpy import MPOEmbedding

    rng = np.random.default_rng(6)
    table = rng.normal(size=(30, 8))
    layer = MPOEmbedding.from_dense(table, max_rank=2, row_modes=(2, 4, 4), dim_modes=(4, 2, 1))
    assert (layer.spec.in_modes, layer.spec.out_modes, max(layer.spec.ranks)) == ((2, 4, 4), (4, 2, 1), 2)
    np.testing.assert_allclose(layer.to_dense(), tnlayers.to_dense(layer.cores)[:30], rtol=1e-6)
    cut = MPOEmbedding.from_dense(table, tol=0.5)
    assert cut.decomposition is not None and 0.1 < cut.decomposition.relative_error <= 0.5
    assert layer.decomposition is not None and layer.decomposition.relative_error > 0.1
    exact = MPOEmbedding.from_dense(table, tol=0.0, n_cores=2)
    assert exact.spec.n_cores == 2 and exact.decomposition is not None and exact.decomposition.relative_error < 1e-12
    np.testing.assert_allclose(exact(np.array([[0, 29], [3, 3]])), table[[[0, 29], [3, 3]]], atol=1e-12)
    fresh = MPOEmbedding(30, 8, seed=2)
    assert fresh.spec.n_cores == 4 and fresh.decomposition is None
    assert max(MPOEmbedding(4096, 64).spec.ranks) == 8
    np.testing.assert_array_equal(fresh.cores[0], MPOEmbedding(30, 8, seed=2).cores[0])
    assert fresh.cores[0].dtype == np.float32
    wide = MPOEmbedding(30, 8, std=3.0, seed=2)
    np.testing.assert_allclose(np.std(wide.to_dense()) / np.std(fresh.to_dense()), 3.0, rtol=1e-5)
    back = MPOEmbedding.from_cores(exact.cores)  # all the padded rows, when not told how many
    assert back.num_embeddings == exact.spec.in_features and back.spec.out_modes == exact.spec.out_modes
    layer.save(tmp_path / "table.safetensors")
    cores, bias = tnlayers.load(tmp_path / "table.safetensors")
    assert bias is None and all(np.array_equal(a, b) for a, b in zip(cores, layer.cores))
    assert repr(layer).startswith("MPOEmbedding(30, 8, modes=2x4x4->4x2x1,") and repr(layer).endswith(", bias=False)")
