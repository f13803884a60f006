"""Every framework's MPO layer against the dense reference (the layer_harness fixture lists them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    LAYER_HARNESSES,
    assert_close,
    dense_reference,
    make_layer_harness,
    reference_core_gradients,
    reference_patch_gradient,
    reference_patches,
)

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


@pytest.mark.parametrize("target", list(LAYER_HARNESSES))
def test_a_checkpoint_written_by_one_framework_loads_bit_exact_in_every_other(
    layer_harness: Any, target: str, tmp_path: Path
) -> None:
    reader = make_layer_harness(target)
    layer = layer_harness.make((2, 3, 4), (4, 3, 2), 3, strategy="auto", dtype=np.float32)
    layer_harness.set_bias(layer, np.linspace(-1, 1, 24, dtype=np.float32))
    cores, bias = layer_harness.weights(layer)
    layer.save(tmp_path / "layer.safetensors")
    loaded = reader.load(tmp_path / "layer.safetensors")
    loaded_cores, loaded_bias = reader.weights(loaded)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded_cores, cores))
    assert np.array_equal(loaded_bias, bias)
    x = np.random.default_rng(3).normal(size=(5, 24)).astype(np.float32)
    assert_close(reader.forward(loaded, x), x.astype(np.float64) @ dense_reference(cores) + bias, np.float32)


def test_from_dense_recovers_a_low_rank_layer_and_reports_its_error(layer_harness: Any) -> None:
    rng = np.random.default_rng(4)
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 3)
    exact = dense_reference(tnlayers.init_cores(spec, seed=4, dtype=np.float64))  # TT ranks <= 3
    bias = rng.normal(size=256)
    layer = layer_harness.from_dense(exact, bias, (4, 7, 7, 4), (4, 4, 4, 4), 8)
    assert layer.decomposition.ranks == (1, 3, 3, 3, 1) and layer.decomposition.relative_error < 1e-12
    x = rng.normal(size=(6, 784))
    assert_close(layer_harness.forward(layer, x), x @ exact + bias, np.float64)
    noisy = exact + 0.1 * np.abs(exact).mean() * rng.normal(size=exact.shape)
    truncated = layer_harness.from_dense(noisy, bias, (4, 7, 7, 4), (4, 4, 4, 4), 4)
    cores, _ = layer_harness.weights(truncated)
    measured = np.linalg.norm(dense_reference(cores) - noisy) / np.linalg.norm(noisy)
    np.testing.assert_allclose(truncated.decomposition.relative_error, measured, rtol=1e-8)
    assert_close(layer_harness.forward(truncated, x), x @ dense_reference(cores) + bias, np.float64)


def test_a_wrong_input_width_names_the_expected_one(layer_harness: Any) -> None:
    layer = layer_harness.make((2, 3, 4), (3, 2, 2), 3, strategy="auto", dtype=np.float32)
    with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 24\), got \(5, 7\)"):
        layer_harness.forward(layer, np.ones((5, 7), np.float32))


#: (kernel, stride, padding, dilation): the geometries both frameworks' convolutions accept
CONV_GEOMETRIES = [
    (3, 1, "same", 1),
    ((2, 3), 2, "valid", 1),
    (4, 1, "same", 1),
    (3, 1, "valid", 2),
    (3, (1, 2), "valid", 1),
]


@pytest.mark.parametrize("strategy", ["auto", "materialize", "zipper", "dp"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), CONV_GEOMETRIES)
def test_conv_forward_and_gradients_match_the_dense_convolution(
    conv_harness: Any, strategy: str, kernel: Any, stride: Any, padding: Any, dilation: Any
) -> None:
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    layer = conv_harness.make_conv(3, 8, kernel, (3, kh, kw), (2, 2, 2), 3, stride, padding, dilation, strategy,
                                   np.float64, seed=4)  # fmt: skip
    rng = np.random.default_rng(5)
    conv_harness.set_bias(layer, rng.normal(size=8))
    cores, bias = conv_harness.weights(layer)
    x = rng.normal(size=(2, 3, 9, 11))
    patches, (oh, ow), _ = reference_patches(x, (kh, kw), stride, padding, dilation)
    weight = dense_reference(cores)  # rows (channel, kernel row, kernel column)
    expected = (patches @ weight + bias).reshape(2, oh, ow, 8).transpose(0, 3, 1, 2)
    assert_close(conv_harness.conv_forward(layer, x), expected, np.float64)
    grad_out = rng.normal(size=expected.shape)
    grad_rows = grad_out.transpose(0, 2, 3, 1).reshape(-1, 8)
    grad_x, core_grads, bias_grad = conv_harness.conv_grads(layer, x, grad_out)
    expected_x = reference_patch_gradient(grad_rows @ weight.T, x.shape, (kh, kw), stride, padding, dilation)
    assert_close(grad_x, expected_x, np.float64)
    assert_close(bias_grad, grad_rows.sum(axis=0), np.float64)
    for actual, reference in zip(core_grads, reference_core_gradients(cores, patches, grad_rows)):
        assert_close(actual, reference, np.float64)


@pytest.mark.parametrize("target", ["torch", "keras"])
def test_a_conv_checkpoint_runs_the_same_in_every_framework(conv_harness: Any, target: str, tmp_path: Path) -> None:
    reader = make_layer_harness(target)
    layer = conv_harness.make_conv(3, 8, 3, (3, 3, 3), (2, 2, 2), 4, 1, "same", 1, "auto", np.float32, seed=5)
    conv_harness.set_bias(layer, np.linspace(-1, 1, 8, dtype=np.float32))
    layer.save(tmp_path / "conv.safetensors")
    twin = reader.make_conv(3, 8, 3, (3, 3, 3), (2, 2, 2), 4, 1, "same", 1, "auto", np.float32)
    reader.set_weights(twin, *tnlayers.load(tmp_path / "conv.safetensors"))
    x = np.random.default_rng(6).normal(size=(2, 3, 7, 7)).astype(np.float32)
    assert_close(reader.conv_forward(twin, x), conv_harness.conv_forward(layer, x), np.float32)
