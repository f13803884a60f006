"""Every framework's MPO layer against the dense reference (the layer_harness fixture lists them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, dense_reference, reference_core_gradients

import tnlayers


@pytest.mark.parametrize("strategy", ["auto", "zipper", "reverse-zipper", "materialize", "greedy", "dp"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_and_gradients_match_the_dense_layer(layer_harness: Any, strategy: str, dtype: Any) -> None:
    layer = layer_harness.make((2, 3, 2), (3, 1, 2), (2, 3), strategy=strategy, dtype=dtype)
    rng = np.random.default_rng(1)
    layer_harness.set_bias(layer, rng.normal(size=6).astype(dtype))
    cores, bias = layer_harness.weights(layer)
    weight = dense_reference(cores)
    for leading in [(4,), (2, 3), (1,)]:
        x = rng.normal(size=(*leading, 12)).astype(dtype)
        g = rng.normal(size=(*leading, 6)).astype(dtype)
        assert_close(layer_harness.forward(layer, x), x.astype(np.float64) @ weight + bias, dtype)
        grad_x, core_grads, bias_grad = layer_harness.grads(layer, x, g)
        assert_close(grad_x, g.astype(np.float64) @ weight.T, dtype)
        assert_close(bias_grad, g.reshape(-1, 6).sum(axis=0).astype(np.float64), dtype)
        for actual, expected in zip(core_grads, reference_core_gradients(cores, x, g)):
            assert_close(actual, expected, dtype)


def test_uneven_and_prime_modes(layer_harness: Any) -> None:
    layer = layer_harness.make((4, 7, 7, 4), (4, 4, 4, 4), 5, strategy="auto", dtype=np.float64)
    other = layer_harness.make((13, 1, 3), (1, 7, 2), 2, strategy="auto", dtype=np.float64)
    rng = np.random.default_rng(2)
    for mpo, width in ((layer, 784), (other, 39)):
        cores, bias = layer_harness.weights(mpo)
        x = rng.normal(size=(9, width))
        assert_close(layer_harness.forward(mpo, x), x @ dense_reference(cores) + bias, np.float64)


def test_checkpoint_roundtrip_gives_the_same_outputs(layer_harness: Any, tmp_path: Path) -> None:
    layer = layer_harness.make((2, 3, 4), (4, 3, 2), 3, strategy="auto", dtype=np.float32)
    layer_harness.set_bias(layer, np.linspace(-1, 1, 24, dtype=np.float32))
    cores, bias = layer_harness.weights(layer)
    tnlayers.save(tmp_path / "layer.safetensors", cores, bias)
    loaded = tnlayers.load(tmp_path / "layer.safetensors")
    x = np.random.default_rng(3).normal(size=(5, 24)).astype(np.float32)
    assert_close(tnlayers.contract(x, loaded.cores, loaded.bias), layer_harness.forward(layer, x), np.float32)
