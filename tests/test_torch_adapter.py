"""The torch adapter's constructors and conversions, from the mutation run (docs/mutation-survivors.md): each
against a reference built here (``F.conv2d`` with the kernel from the cores' dense matrix, the embedding table),
in float64 so that a dropped dtype shows."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from conftest import dense_reference

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from tnlayers.backends.torch import MPOConv2d, MPOEmbedding, compress, freeze_cores, restructure  # noqa: E402
from torch import nn  # noqa: E402

import tnlayers  # noqa: E402


def _kernel(cores: list[np.ndarray], out_channels: int, in_channels: int, kernel: tuple[int, int]) -> torch.Tensor:
    """``nn.Conv2d.weight`` of the ``(in_channels*kh*kw, out_channels)`` matrix the cores stand for."""
    return torch.from_numpy(dense_reference(cores).T.reshape(out_channels, in_channels, *kernel).copy())


def test_conv_from_cores_of_any_framework() -> None:
    spec = tnlayers.MPOSpec((2, 3, 3), (2, 2, 2), 2)  # 2 channels x 3 x 3 -> 8 channels
    cores = tnlayers.init_cores(spec, seed=1, dtype=np.float64)
    bias = np.arange(8.0)
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    expected = F.conv2d(x, _kernel(cores, 8, 2, (3, 3)), torch.from_numpy(bias), stride=2, padding=1)
    for given in (cores, [torch.from_numpy(c) for c in cores]):
        conv = MPOConv2d.from_cores(given, bias, kernel_size=3, stride=2, padding=1)
        assert conv.cores[0].dtype == torch.float64 and (conv.in_channels, conv.out_channels) == (2, 8)
        torch.testing.assert_close(conv(x), expected, rtol=1e-10, atol=1e-12)
    plain = MPOConv2d.from_cores(cores, kernel_size=(3, 3))
    assert plain.bias is None
    torch.testing.assert_close(plain(x), F.conv2d(x, _kernel(cores, 8, 2, (3, 3))), rtol=1e-10, atol=1e-12)
    geometry = "2, 8, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), "
    assert plain.extra_repr().startswith(geometry)
    assert plain.extra_repr().endswith(", bias=False") and conv.extra_repr().endswith(", bias=True")


def test_conv_from_and_to_nn_conv2d_keep_every_setting() -> None:
    torch.manual_seed(0)
    source = nn.Conv2d(2, 8, (3, 3), stride=1, padding=(1, 2), bias=False).double()
    conv = MPOConv2d.from_conv(source, tol=0.0, strategy="zipper")
    assert conv.spec.n_cores == 4 and conv.strategy == "zipper" and conv.bias is None
    assert conv.cores[0].dtype == torch.float64 and conv.decomposition is not None
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(conv(x), source(x), rtol=1e-9, atol=1e-12)
    back = conv.to_conv()
    assert back.padding == (1, 2) and back.bias is None and back.weight.dtype == torch.float64
    torch.testing.assert_close(back(x), source(x), rtol=1e-9, atol=1e-12)
    assert MPOConv2d.from_conv(nn.Conv2d(16, 32, 3)).spec.n_cores == 4  # 144 features could take 5 modes
    assert MPOConv2d.from_conv(nn.Conv2d(16, 32, 3), n_cores=2).spec.n_cores == 2
    cut = MPOConv2d.from_conv(source, tol=0.5)
    assert cut.decomposition is not None and 0.01 < cut.decomposition.relative_error <= 0.5
    with pytest.raises(TypeError, match=r"^from_conv expects an nn.Conv2d, got Linear$"):
        MPOConv2d.from_conv(nn.Linear(2, 2))


def test_embedding_conversions_settings_and_messages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    table = nn.Embedding(30, 8).double()
    layer = MPOEmbedding.from_embedding(table, max_rank=2, row_modes=(2, 4, 4), dim_modes=(4, 2, 1))
    assert (layer.spec.in_modes, layer.spec.out_modes, max(layer.spec.ranks)) == ((2, 4, 4), (4, 2, 1), 2)
    assert layer.cores[0].dtype == torch.float64
    exact = MPOEmbedding.from_embedding(table, tol=0.0)
    assert exact.spec.n_cores == 4 and exact.decomposition is not None and exact.decomposition.relative_error < 1e-12
    torch.testing.assert_close(exact.to_dense(), table.weight.detach(), rtol=1e-10, atol=1e-12)
    back = exact.to_embedding()
    assert back.weight.shape == (30, 8) and back.weight.dtype == torch.float64
    torch.testing.assert_close(back.weight, table.weight, rtol=1e-10, atol=1e-12)
    cut = MPOEmbedding.from_embedding(table, tol=0.5)
    assert cut.decomposition is not None and 0.01 < cut.decomposition.relative_error <= 0.5
    padded = MPOEmbedding.from_cores(list(exact.cores))  # every row of the padded modes
    assert padded.num_embeddings == exact.spec.in_features and padded.spec.out_modes == exact.spec.out_modes
    assert padded.cores[0].dtype == torch.float64
    fresh, wide = MPOEmbedding(30, 8, seed=2), MPOEmbedding(30, 8, std=3.0, seed=2)
    assert fresh.decomposition is None and fresh.cores[0].dtype == torch.float32 and fresh.spec.n_cores == 4
    ratio = wide.to_dense().std() / fresh.to_dense().std()
    assert float(ratio) == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(MPOEmbedding(30, 8, seed=2).cores[0], fresh.cores[0], rtol=0, atol=0)
    assert max(MPOEmbedding(4096, 64).spec.ranks) == 8
    assert exact.extra_repr().startswith("30, 8, modes=") and "bias=False" in exact.extra_repr()
    exact.save(tmp_path / "table.safetensors")
    cores, bias = tnlayers.load(tmp_path / "table.safetensors")
    assert bias is None and all(np.array_equal(a, b.detach().numpy()) for a, b in zip(cores, exact.cores))
    with pytest.raises(TypeError, match=r"^MPOEmbedding expects a tensor of indices, got list$"):
        exact([1, 2])
    with pytest.raises(TypeError, match=r"^MPOEmbedding expects integer indices"):
        exact(torch.ones(2))
    with pytest.raises(ValueError, match=r"-1"):
        exact(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"^embedding index 30 is out of range"):  # not the smallest index
        exact(torch.tensor([0, 30]))
    with pytest.raises(TypeError, match=r"^MPOEmbedding expects integer indices"):
        exact(torch.tensor([True, False]))
    with pytest.raises(TypeError, match=r"^from_embedding expects an nn.Embedding, got Linear$"):
        MPOEmbedding.from_embedding(nn.Linear(2, 2))


def test_compress_names_what_it_leaves_and_why() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3, padding_mode="reflect", padding=1))
    report = compress(model, rank=2, min_features=1)
    assert report.skipped == (
        ("0", "groups=2, padding_mode='zeros' not supported"),
        ("1", "groups=1, padding_mode='reflect' not supported"),
    )
    attention = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    skipped = dict(compress(attention, rank=2, min_features=1).skipped)
    assert skipped["self_attn.out_proj"] == "nn.MultiheadAttention reads this projection's .weight directly"
    with torch.device("meta"):
        on_meta = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(
        ValueError, match=r"materialise the model first \(model.to_empty\(device=...\) and load_state_dict\)$"
    ):
        compress(on_meta, rank=2, min_features=1)


def test_freeze_cores_leaves_biases_to_train_unless_asked() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    compress(model, rank=2, min_features=1)
    freeze_cores(model)
    assert all(layer.bias.requires_grad for layer in model)
    freeze_cores(model, bias=True)
    assert not any(layer.bias.requires_grad for layer in model)
    with pytest.raises(ValueError, match=r"^Sequential has no MPO layers to freeze; run compress first$"):
        freeze_cores(nn.Sequential(nn.ReLU()))


def test_restructure_in_float64_with_an_embedding() -> None:
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(nn.Embedding(30, 16), nn.Linear(16, 16), nn.Conv1d(1, 1, 1)).double()

    compressed = build()
    compress(compressed, rank=3, min_features=1)
    state = copy.deepcopy(compressed.state_dict())
    fresh = build()
    assert sorted(restructure(fresh, state)) == ["0", "1"]
    fresh.load_state_dict(state)
    assert all(p.dtype == torch.float64 for p in fresh.parameters())
    tokens = torch.tensor([[1, 2, 29]])
    torch.testing.assert_close(fresh[1](fresh[0](tokens)), compressed[1](compressed[0](tokens)), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"^restructure expects an nn.Module, got dict$"):
        restructure(dict(state), state)  # type: ignore[arg-type]
