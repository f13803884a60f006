"""Constructors that read like each framework's own layer, convs shared across frameworks, and warnings
only about what the user chose (the ecosystem issue, items 5 and 6)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import dense_reference

import tnlayers


def test_numpy_and_torch_linears_take_feature_counts_like_nn_linear() -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.numpy import MPOLinear as NumpyLinear
    from tnlayers.backends.torch import MPOLinear

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # modes the library picks never warn
        layer = MPOLinear(784, 256, rank=8)
        numpy_layer = NumpyLinear(784, 256, seed=0, dtype=np.float64)
        mixed = MPOLinear(100, (4, 4), rank=3)
        five = MPOLinear(1024, 1024, rank=4, n_cores=5)
    assert layer.spec == numpy_layer.spec == tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    assert mixed.spec == tnlayers.MPOSpec((10, 10), (4, 4), 3) and five.spec.n_cores == 5
    x = np.random.default_rng(0).normal(size=(3, 784))
    weight = dense_reference([c.detach().double().numpy() for c in layer.cores])
    with torch.no_grad():
        np.testing.assert_allclose(layer(torch.from_numpy(x).float()).numpy(), x @ weight, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(numpy_layer(x), x @ dense_reference(numpy_layer.cores), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="n_cores applies to feature counts"):
        MPOLinear((4, 4), (4, 4), 2, n_cores=3)


def test_keras_dense_takes_units_first_like_dense() -> None:
    pytest.importorskip("keras")
    from tnlayers.backends.keras import MPODense

    with warnings.catch_warnings():
        warnings.simplefilter("error", tnlayers.RankClippedWarning)
        layer = MPODense(256, activation="relu", rank=4, seed=0)
        x = np.random.default_rng(1).normal(size=(2, 784)).astype("float32")
        y = np.asarray(layer(x))
        MPODense(units=10)(x)
    cores, bias = layer.numpy_weights()
    np.testing.assert_allclose(y, np.maximum(x @ dense_reference(cores) + bias, 0), rtol=1e-4, atol=1e-4)
    assert layer.units == 256 and layer.get_config()["units"] == 256
    with pytest.raises(ValueError, match=r"units twice: 256 .* units=128"):
        MPODense(256, units=128)


def test_convolutions_warn_only_about_modes_the_user_chose() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("keras")
    from tnlayers.backends.keras import MPOConv2D
    from tnlayers.backends.torch import MPOConv2d

    with warnings.catch_warnings():
        warnings.simplefilter("error", tnlayers.RankClippedWarning)
        MPOConv2d(16, 32, 3)
        MPOConv2D(8, 3)(np.zeros((1, 8, 8, 1), np.float32))  # one channel: 9 rows, modes picked here
    with pytest.warns(tnlayers.RankClippedWarning, match="exceed the exact maximum"):
        MPOConv2d(1, 8, 3, in_modes=(1, 3, 3), out_modes=(2, 2, 2), rank=16)  # the user's own modes
    assert torch.is_tensor(MPOConv2d(16, 32, 3).kernel())


def test_a_conv_checkpoint_is_shared_between_torch_and_keras(tmp_path: Path) -> None:
    """Saved by torch's ``MPOConv2d``, loaded by Keras's ``MPOConv2D`` and by torch again: the same outputs,
    against the convolution of the dense kernel built by NumPy (im2col in ``conftest``)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("keras")
    from conftest import reference_patches
    from tnlayers.backends.keras import MPOConv2D
    from tnlayers.backends.torch import MPOConv2d

    torch.manual_seed(0)
    conv = MPOConv2d(3, 8, 3, rank=4, padding=1, dtype=torch.float64)
    with torch.no_grad():
        conv.bias.normal_()
    conv.save(tmp_path / "conv.safetensors")
    keras_conv = MPOConv2D.load(tmp_path / "conv.safetensors", kernel_size=3, padding="same")
    torch_again = MPOConv2d.load(tmp_path / "conv.safetensors", kernel_size=3, padding=1)
    x = np.random.default_rng(2).normal(size=(2, 3, 7, 7))
    cores, bias = tnlayers.load(tmp_path / "conv.safetensors")
    patches, (rows, cols), _ = reference_patches(x, (3, 3), 1, 1, 1)  # (batch*rows*cols, C*kh*kw)
    expected = (patches @ dense_reference(cores) + bias).reshape(2, rows, cols, 8).transpose(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(torch_again(torch.from_numpy(x)).numpy(), expected, rtol=1e-10, atol=1e-10)
    from_keras = np.asarray(keras_conv(np.transpose(x, (0, 2, 3, 1)).astype(np.float32)))
    np.testing.assert_allclose(np.transpose(from_keras, (0, 3, 1, 2)), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a multiple of the kernel's 2\\*2 positions"):
        MPOConv2d.load(tmp_path / "conv.safetensors", kernel_size=2)


def test_sizes_that_do_not_factorise_are_reported_not_silently_kept() -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import compress

    matrix = np.random.default_rng(0).normal(size=(97, 64))
    with pytest.warns(UserWarning, match=r"97 in features do not factorise into 4 modes \(modes \(1, 1, 97, 1\)\)"):
        tnlayers.from_dense(matrix)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # modes the user gives are the user's choice: no warning
        tnlayers.from_dense(matrix, (97, 1), (8, 8))
    net = torch.nn.Sequential(torch.nn.Linear(97, 89))
    with pytest.warns(UserWarning, match="do not factorise"):
        report = compress(net, rank=64)
    assert report.layers == () and "97 in features do not factorise" in report.skipped[0][1]
