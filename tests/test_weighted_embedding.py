"""Embedding tables fitted to how often their rows are looked up, against references built in plain NumPy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import _param, dense_reference, make_layer_harness

import tnlayers
from tnlayers import layer as kit

SMOOTHING = kit.DEFAULT_SMOOTHING


def _skewed(rows: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random table and Zipf-like lookup counts in a shuffled row order (some rows never looked up)."""
    rng = np.random.default_rng(seed)
    counts = np.floor(1000.0 / np.arange(1, rows + 1) ** 1.2)
    return rng.normal(size=(rows, dim)), rng.permutation(counts)


def _svd_reference(
    table: np.ndarray, counts: np.ndarray, modes: tuple[int, int], dims: tuple[int, int], rank: int
) -> np.ndarray:
    """Two cores by hand: weight the rows by sqrt(count + smoothing), sort them by count (ties by index), pad,
    truncate the SVD of the MPO's matrix ``(i1 j1, i2 j2)``, then undo the padding, the order and the weights."""
    (a, b), (c, d) = modes, dims
    root = np.sqrt(counts + SMOOTHING)
    order = sorted(range(len(counts)), key=lambda t: (-counts[t], t))
    padded = np.zeros((a * b, c * d))
    padded[: len(order)] = (table * root[:, None])[order]
    matrix = padded.reshape(a, b, c, d).transpose(0, 2, 1, 3).reshape(a * c, b * d)
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    kept = (u[:, :rank] * s[:rank]) @ vh[:rank]
    back = kept.reshape(a, c, b, d).transpose(0, 2, 1, 3).reshape(a * b, c * d)
    approximation = np.empty_like(table)
    approximation[order] = back[: len(order)]
    return approximation / root[:, None]


def _weighted_error(approximation: np.ndarray, table: np.ndarray, counts: np.ndarray) -> float:
    return float(np.sqrt(np.sum(counts[:, None] * (table - approximation) ** 2) / np.sum(counts[:, None] * table**2)))


def test_the_weighted_fit_is_the_truncated_svd_of_the_weighted_sorted_table() -> None:
    table, counts = _skewed(60, 12)
    fit = kit.weighted_embedding_cores(table, counts, max_rank=4, row_modes=(8, 8), dim_modes=(3, 4))
    got = dense_reference(fit.cores)[fit.row_order] * fit.row_scale[:, None]
    np.testing.assert_allclose(got, _svd_reference(table, counts, (8, 8), (3, 4), 4), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fit.row_scale, 1 / np.sqrt(counts + SMOOTHING), rtol=1e-15)
    assert fit.report.ranks == (1, 4, 1)


def test_rows_are_ordered_by_lookups_ties_by_index() -> None:
    counts = np.array([3.0, 0.0, 7.0, 3.0, 0.0, 9.0])
    fit = kit.weighted_embedding_cores(np.eye(6), counts, n_cores=2)
    # by count, ties by index: rows 5, 2, 0, 3, 1, 4 take MPO rows 0 .. 5
    assert fit.row_order.tolist() == [2, 4, 1, 3, 5, 0]
    assert fit.row_order.dtype == np.int64


def test_weighting_keeps_the_looked_up_rows_and_full_rank_is_exact() -> None:
    """At the same bond cap the count-weighted fit loses less of the lookups than plain TT-SVD does, and
    with no truncation it returns the table itself."""
    table, counts = _skewed(256, 16, seed=1)
    weighted = kit.weighted_embedding_cores(table, counts, max_rank=6, n_cores=3)
    plain, _ = kit.embedding_cores(table, max_rank=6, n_cores=3)
    weighted_table = dense_reference(weighted.cores)[weighted.row_order] * weighted.row_scale[:, None]
    plain_table = dense_reference(plain)[:256]
    assert _weighted_error(weighted_table, table, counts) < 0.7 * _weighted_error(plain_table, table, counts)
    exact = kit.weighted_embedding_cores(table, counts, n_cores=3)
    np.testing.assert_allclose(
        dense_reference(exact.cores)[exact.row_order] * exact.row_scale[:, None], table, rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize(
    ("counts", "smoothing", "message"),
    [
        (np.ones(5), SMOOTHING, r"counts must have one entry per table row, shape \(6,\), got shape \(5,\)"),
        (np.array([1.0, -1, 0, 0, 0, 0]), SMOOTHING, "counts must be finite and >= 0"),
        (np.array([1.0, np.nan, 0, 0, 0, 0]), SMOOTHING, "counts must be finite and >= 0"),
        (np.ones(6), 0.0, "smoothing must be a positive number .* got 0.0"),
        (np.ones(6), True, "smoothing must be a positive number .* got True"),
    ],
)
def test_bad_counts_name_what_was_given(counts: np.ndarray, smoothing: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kit.weighted_embedding_cores(np.ones((6, 4)), counts, n_cores=2, smoothing=smoothing)


@pytest.mark.parametrize(
    ("order", "scale", "error", "message"),
    [
        (np.array([0, 1, 2]), None, ValueError, r"row_order must have shape \(4,\), got \(3,\)"),
        (np.array([0.0, 1, 2, 3]), None, TypeError, "row_order must hold integers .* got dtype float64"),
        (np.array([0, 1, 2, 9]), None, ValueError, r"row_order must lie in \[0, 9\) .* got 0 .. 9"),
        (np.array([0, 1, 1, 2]), None, ValueError, "row_order must not send two table rows to one MPO row"),
        (None, np.ones(5), ValueError, r"row_scale must have shape \(4,\), got \(5,\)"),
        (None, np.array([1.0, np.inf, 1, 1]), ValueError, "row_scale must hold finite floating-point numbers"),
    ],
)
def test_bad_row_weights_name_what_was_given(order: Any, scale: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        kit.check_row_weights(order, scale, 4, 9)


class _Framework:
    """A count-weighted embedding from a table, from cores, a lookup, in NumPy, torch or Keras."""

    def __init__(self, name: str) -> None:
        make_layer_harness(name)
        self.name = name

    def fitted(self, table: np.ndarray, counts: np.ndarray, **kwargs: Any) -> Any:
        if self.name == "numpy":
            from tnlayers.backends.numpy import MPOEmbedding

            return MPOEmbedding.from_dense(table, counts=counts, **kwargs)
        if self.name == "keras":
            import keras
            from tnlayers.backends.keras import MPOEmbedding as KerasEmbedding

            dense = keras.layers.Embedding(*table.shape, dtype="float64")
            dense.build((None,))
            dense.embeddings.assign(table)
            return KerasEmbedding.from_dense(dense, counts=counts, **kwargs)
        import torch
        from tnlayers.backends.torch import MPOEmbedding as TorchEmbedding

        dense = torch.nn.Embedding(*table.shape, dtype=torch.float64)
        with torch.no_grad():
            dense.weight.copy_(torch.from_numpy(table))
        return TorchEmbedding.from_embedding(dense, counts=torch.from_numpy(counts), **kwargs)

    def from_cores(self, cores: list[np.ndarray], rows: int, order: np.ndarray, scale: np.ndarray) -> Any:
        module = __import__(f"tnlayers.backends.{self.name}", fromlist=["MPOEmbedding"])
        return module.MPOEmbedding.from_cores(cores, rows, row_order=order, row_scale=scale)

    def lookup(self, layer: Any, indices: np.ndarray) -> np.ndarray:
        if self.name == "torch":
            import torch

            return layer(torch.from_numpy(indices)).detach().numpy()
        return np.asarray(layer(indices))

    def table(self, layer: Any) -> np.ndarray:
        dense = layer.to_dense()
        return dense.detach().numpy() if self.name == "torch" else np.asarray(dense)


@pytest.fixture(params=[_param(name) for name in ("numpy", "torch", "keras")])
def framework(request: pytest.FixtureRequest) -> _Framework:
    return _Framework(request.param)


def test_lookups_and_the_table_are_the_weighted_fit(framework: _Framework) -> None:
    table, counts = _skewed(60, 12, seed=2)
    layer = framework.fitted(table, counts, max_rank=4, row_modes=(8, 8), dim_modes=(3, 4))
    reference = _svd_reference(table, counts, (8, 8), (3, 4), 4)
    indices = np.array([[0, 59, 7], [59, 3, 3]])
    np.testing.assert_allclose(framework.lookup(layer, indices), reference[indices], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(framework.table(layer), reference, rtol=1e-9, atol=1e-9)
    plain = np.linalg.norm(table - reference) / np.linalg.norm(table)  # every framework reports the table's error
    assert layer.decomposition.relative_error == pytest.approx(plain, rel=1e-9)
    assert layer.decomposition.ranks == (1, 4, 1)
    with pytest.raises(ValueError, match="embedding index 60 is out of range"):
        framework.lookup(layer, np.array([60]))


def test_weighted_cores_are_portable_between_frameworks(framework: _Framework) -> None:
    """Cores, order and scales fitted in NumPy give the same rows in every framework."""
    table, counts = _skewed(50, 8, seed=3)
    fit = kit.weighted_embedding_cores(table, counts, max_rank=3, n_cores=2)
    layer = framework.from_cores(fit.cores, 50, fit.row_order, fit.row_scale)
    expected = dense_reference(fit.cores)[fit.row_order] * fit.row_scale[:, None]
    indices = np.arange(50)
    np.testing.assert_allclose(framework.lookup(layer, indices), expected, rtol=1e-6, atol=1e-7)  # Keras: float32


@pytest.mark.parametrize("name", [_param("numpy"), _param("torch")])  # Keras saves the model (.keras): below
def test_a_weighted_table_is_not_silently_cut_down_on_save(name: str, tmp_path: Any) -> None:
    framework = _Framework(name)
    table, counts = _skewed(20, 4)
    layer = framework.fitted(table, counts, max_rank=2, n_cores=2)
    with pytest.raises(ValueError, match=r"row_order/row_scale .* does not hold"):
        layer.save(tmp_path / "embedding.safetensors")
    assert not (tmp_path / "embedding.safetensors").exists()


def test_a_weighted_keras_embedding_survives_a_keras_save(tmp_path: Any) -> None:
    """A model holding a count-weighted table, saved as .keras and loaded: the same rows, order and scales."""
    _Framework("keras")
    import keras
    from tnlayers.backends.keras import MPOEmbedding

    table, counts = _skewed(30, 8, seed=7)
    fit = kit.weighted_embedding_cores(table, counts, max_rank=3, n_cores=2)
    layer = MPOEmbedding.from_cores(fit.cores, 30, fit.row_order, fit.row_scale, dtype="float64")
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer])
    indices = np.array([[0, 29, 5, 5]])
    before = np.asarray(model(indices))
    np.testing.assert_allclose(
        before[0], (dense_reference(fit.cores)[fit.row_order] * fit.row_scale[:, None])[indices[0]], rtol=1e-9
    )
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(np.asarray(loaded(indices)), before, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(loaded.layers[0].row_order), fit.row_order)
    with pytest.raises(ValueError, match="takes row_order and row_scale together"):
        MPOEmbedding.from_cores(fit.cores, 30, fit.row_order, None)


def test_torch_gradients_reach_the_cores_and_the_row_scales() -> None:
    """d(sum(rows * g)) against the same table built by einsum, gathered, and scaled in torch."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOEmbedding

    table, counts = _skewed(40, 6, seed=4)
    fit = kit.weighted_embedding_cores(table, counts, max_rank=3, n_cores=2)
    layer = MPOEmbedding.from_cores(fit.cores, 40, row_order=fit.row_order, row_scale=fit.row_scale)
    indices = torch.tensor([[1, 39, 1], [20, 0, 7]])
    weights = torch.randn(2, 3, 6, dtype=torch.float64)
    (layer(indices) * weights).sum().backward()
    cores = [torch.from_numpy(c).requires_grad_(True) for c in fit.cores]
    scale = torch.from_numpy(fit.row_scale).requires_grad_(True)
    rows = torch.einsum("aijc,cxyd->ixjy", *cores).reshape(-1, 6)[torch.from_numpy(fit.row_order)]
    ((rows * scale[:, None])[indices] * weights).sum().backward()
    assert layer.row_scale is not None and layer.row_scale.grad is not None and scale.grad is not None
    torch.testing.assert_close(layer.row_scale.grad, scale.grad, rtol=1e-10, atol=1e-12)
    for got, core in zip(layer.cores, cores):
        torch.testing.assert_close(got.grad, core.grad, rtol=1e-10, atol=1e-12)


def test_a_weighted_embedding_reloads_into_the_original_architecture() -> None:
    """compress with calibration batches, save the state_dict, rebuild the dense model, restructure, load."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOEmbedding, compress, restructure

    def build() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(101, 48), torch.nn.Linear(48, 48))

    model = build()
    batches = [torch.randint(0, 60, (4, 9), generator=torch.Generator().manual_seed(k)) for k in range(3)]
    compress(model, rank=4, n_cores=2, include="0", calibration=batches)
    assert isinstance(model[0], MPOEmbedding) and model[0].row_order is not None
    state = model.state_dict()
    assert {"0.row_order", "0.row_scale"} <= set(state)
    fresh = build()
    assert restructure(fresh, state) == ["0"]
    fresh.load_state_dict(state)
    indices = torch.tensor([[0, 100, 7, 59]])
    torch.testing.assert_close(fresh(indices), model(indices), rtol=0, atol=0)


def test_calibrated_compress_fits_the_embedding_to_its_lookups() -> None:
    """The report's output error is the count-weighted error of the table the model now holds, computed
    here from lookups counted by hand; the row scales are counted as parameters."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import compress

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Embedding(96, 32), torch.nn.Linear(32, 32))
    original = model[0].weight.detach().double().numpy().copy()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 96, (6, 7), generator=gen) ** 2 // 96 for _ in range(5)]  # skewed to low rows
    counts = np.bincount(torch.cat([b.reshape(-1) for b in batches]).numpy(), minlength=96).astype(float)
    report = compress(model, rank=3, n_cores=2, calibration=batches, min_features=16, include="0")
    (row,) = report.layers
    table = model[0].to_dense().detach().double().numpy()
    assert row.output_error == pytest.approx(_weighted_error(table, original, counts), rel=1e-6)
    plain = np.linalg.norm(original - table) / np.linalg.norm(original)
    assert row.relative_error == pytest.approx(plain, rel=1e-6)
    cores = sum(c.numel() for c in model[0].cores)
    assert row.params_after == cores + 96
    assert report.network_params_after == cores + 96 + 32 * 32 + 32


def test_low_rank_with_row_weights_is_the_dense_gram_fit() -> None:
    """Per-row weights (a diagonal ``C``) give the fit a dense ``diag(weights)`` gives, and the error the
    weighted rows' (computed here)."""
    table, counts = _skewed(40, 10, seed=6)
    fit = tnlayers.low_rank_fit(table, 3, counts)
    dense = tnlayers.low_rank_fit(table, 3, np.diag(counts))
    np.testing.assert_allclose(fit.first @ fit.second, dense.first @ dense.second, rtol=1e-8, atol=1e-8)
    assert fit.error == pytest.approx(_weighted_error(fit.first @ fit.second, table, counts), rel=1e-9)
    with pytest.raises(ValueError, match=r"per-row weights must be 40 finite numbers >= 0"):
        tnlayers.low_rank_fit(table, 3, -counts)


def test_the_row_scales_count_when_deciding_whether_a_table_shrinks() -> None:
    """40 x 16 at bond 12 over modes 5x8 -> 4x4: cores of 624 parameters shrink the 640-entry table, but not
    with the 40 row scales a count-weighted fit adds, so calibration keeps it dense and says why."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOEmbedding, compress

    def build() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(40, 16))

    options = {"rank": 12, "n_cores": 2, "min_features": 1, "modes": lambda *_: ((5, 8), (4, 4))}
    plain = build()
    compress(plain, **options)
    assert isinstance(plain[0], MPOEmbedding) and sum(c.numel() for c in plain[0].cores) == 624
    weighted = build()
    report = compress(weighted, calibration=[torch.arange(40).reshape(4, 10)], **options)
    assert report.skipped == (("0", "no saving at ranks (1, 12, 1): 664 >= 640"),)
    assert isinstance(weighted[0], torch.nn.Embedding)
