"""Keras ``compress`` with calibration data and a whole-model budget, on a small functional model:
``collect_grams`` against ``X^T X`` of activations computed here in NumPy from the layers' weights, each
fitted layer's output error against ``||X (W - W')|| / ||X W||`` from its cores, the budget against the
parameters counted here, and the same fits and caps as the PyTorch ``compress`` on the same weights."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from conftest import dense_reference

keras = pytest.importorskip("keras", reason="keras is not installed")
from tnlayers.backends.keras import MPODense, MPOEmbedding, collect_grams, compress  # noqa: E402

from tnlayers.calibrate import Gram  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::tnlayers.RankClippedWarning")


def _np(value: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)


def _tagger() -> Any:
    """Token ids -> an embedding (anisotropic: what calibration is for) -> two dense layers, in float64."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(40, 16, name="embed", dtype="float64")(tokens)
    hidden = keras.layers.Dense(36, activation="relu", name="up", dtype="float64")(embedded)
    model = keras.Model(tokens, keras.layers.Dense(16, name="down", dtype="float64")(hidden))
    table = model.get_layer("embed").embeddings
    table.assign(_np(table) * np.logspace(0, -2, 16))
    for name in ("up", "down"):  # biases that matter, so a lost bias shows
        bias = model.get_layer(name).bias
        bias.assign(np.random.default_rng(len(name)).normal(size=bias.shape))
    return model


def _batches() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 30, size=(4, 6)).astype("int32") for _ in range(3)]  # rows 30-39 never seen


def _weights(model: Any) -> dict[str, np.ndarray]:
    return {
        "embed": _np(model.get_layer("embed").embeddings),
        **{name: _np(model.get_layer(name).kernel) for name in ("up", "down")},
        **{f"{name}.bias": _np(model.get_layer(name).bias) for name in ("up", "down")},
    }


def _inputs(model: Any, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each layer's input rows, computed here in NumPy from the layers' weights."""
    w = _weights(model)
    tokens = np.concatenate([b.reshape(-1) for b in batches])
    embedded = w["embed"][tokens]
    hidden = np.maximum(embedded @ w["up"] + w["up.bias"], 0)
    return {"up": embedded, "down": hidden, "tokens": tokens}


def _output_error(x: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - approx)) / np.linalg.norm(x @ w))


def test_collect_grams_is_x_transpose_x_of_each_layers_inputs() -> None:
    model, batches = _tagger(), _batches()
    rows = _inputs(model, batches)
    grams = collect_grams(model, batches, ["embed", "up", "down"])
    np.testing.assert_array_equal(grams["embed"], np.bincount(rows["tokens"], minlength=40))
    for name in ("up", "down"):
        assert isinstance(grams[name], Gram) and grams[name].rows == 72
        np.testing.assert_allclose(grams[name].matrix, rows[name].T @ rows[name], rtol=1e-12, atol=1e-12)
    only = collect_grams(model, batches, ["down"])  # one layer: the probe returns one tensor
    np.testing.assert_allclose(only["down"].matrix, grams["down"].matrix, rtol=1e-12)
    flat = keras.Sequential([keras.Input((4,)), keras.layers.Flatten(name="flat")])
    with pytest.raises(TypeError, match=r"^collect_grams reads Dense and Embedding inputs; 'flat' is a Flatten$"):
        collect_grams(flat, [np.ones((2, 4))], ["flat"])
    with pytest.raises(ValueError, match=r"^the calibration batches reached none of the layers to compress"):
        collect_grams(model, [], ["up"])

    class Subclassed(keras.Model):  # no graph to read a layer's input from
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(3, name="dense")

        def call(self, x: Any) -> Any:
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"^calibration reads the layers' inputs from the model's graph; 'subclassed'"):
        collect_grams(subclassed, [np.ones((2, 4))], ["dense"])


def test_calibrated_compress_reports_the_true_output_error_and_beats_tt_svd() -> None:
    model, batches = _tagger(), _batches()
    rows, w = _inputs(model, batches), _weights(model)
    plain, _ = compress(model, rank=2, n_cores=2, min_features=1, include=["up", "down"])
    fitted, report = compress(model, rank=2, n_cores=2, min_features=1, calibration=batches)
    by_name = {row.name: row for row in report.layers}
    assert sorted(by_name) == ["down", "embed", "up"]
    for name in ("up", "down"):
        layer = fitted.get_layer(name)
        assert isinstance(layer, MPODense) and layer.built_spec.ranks == (1, 2, 1)
        approx = dense_reference([_np(c) for c in layer.cores])
        measured = _output_error(rows[name], w[name], approx)
        assert by_name[name].output_error == pytest.approx(measured, rel=1e-8)
        assert by_name[name].relative_error == pytest.approx(
            np.linalg.norm(w[name] - approx) / np.linalg.norm(w[name]), rel=1e-8
        )
        plain_approx = dense_reference([_np(c) for c in plain.get_layer(name).cores])
        assert measured < _output_error(rows[name], w[name], plain_approx)  # fitted to the outputs
        np.testing.assert_array_equal(_np(layer.bias), w[f"{name}.bias"])
    embedding = fitted.get_layer("embed")
    assert isinstance(embedding, MPOEmbedding) and embedding.row_scale is not None  # count-weighted
    table = dense_reference([_np(c) for c in embedding.cores])[_np(embedding.row_order).astype(int)]
    table = table * _np(embedding.row_scale)[:, None]
    counts = np.bincount(rows["tokens"], minlength=40)
    weighted = np.sqrt(np.sum(counts[:, None] * (w["embed"] - table) ** 2) / np.sum(counts[:, None] * w["embed"] ** 2))
    assert by_name["embed"].output_error == pytest.approx(weighted, rel=1e-8)
    assert by_name["embed"].params_after == sum(_np(c).size for c in embedding.cores) + 80  # row order and scales
    tokens = batches[0]  # the compressed model runs the fitted matrices, checked in NumPy
    hidden = np.maximum(
        table[tokens] @ dense_reference([_np(c) for c in fitted.get_layer("up").cores]) + w["up.bias"], 0
    )
    expected = hidden @ dense_reference([_np(c) for c in fitted.get_layer("down").cores]) + w["down.bias"]
    np.testing.assert_allclose(_np(fitted(tokens)), expected, rtol=1e-9, atol=1e-9)
    again, _ = compress(
        model, rank=2, n_cores=2, min_features=1, calibration=collect_grams(model, batches, ["embed", "up", "down"])
    )
    for name in ("embed", "up", "down"):  # Gram matrices given instead of batches: the same fit
        for a, b in zip(again.get_layer(name).cores, fitted.get_layer(name).cores):
            np.testing.assert_allclose(_np(a), _np(b), rtol=1e-10, atol=1e-12)


def test_a_whole_model_budget_counts_every_parameter() -> None:
    model, batches = _tagger(), _batches()
    before = 40 * 16 + (16 * 36 + 36) + (36 * 16 + 16)
    assert model.count_params() == before
    for fraction in (0.6, 0.35):
        compressed, report = compress(model, n_cores=2, min_features=1, budget=fraction, calibration=batches)
        counted = sum(int(np.prod(v.shape)) for v in compressed.weights)
        assert report.network_params_after == compressed.count_params() == counted <= math.floor(fraction * before)
        assert report.network_params_before == before
        kept = {name for name, reason in report.skipped if reason == "the budget keeps it dense"}
        assert kept | {row.name for row in report.layers} == {"embed", "up", "down"}
    with pytest.raises(ValueError, match=r"budget must be a fraction of the model's parameters in \(0, 1\), got 1.5"):
        compress(model, budget=1.5)
    with pytest.raises(ValueError, match=r"^sensitivity weighs the layers in a whole-model budget"):
        compress(model, rank=2, sensitivity={"up": 1.0})
    with pytest.raises(ValueError, match=r"cannot be met"):
        compress(model, n_cores=2, min_features=1, budget=0.01)


def test_same_fits_and_caps_as_the_torch_compress() -> None:
    """One kit behind both adapters: the same weights and calibration give the same matrices and bonds."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import compress as torch_compress
    from torch import nn

    model, batches = _tagger(), _batches()
    w = _weights(model)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.up, self.down = nn.Embedding(40, 16), nn.Linear(16, 36), nn.Linear(36, 16)

        def forward(self, tokens: Any) -> Any:
            return self.down(torch.relu(self.up(self.embed(tokens))))

    for how in ({"rank": 2}, {"rank": 3, "tol": 0.3}):
        twin = Tagger().double()
        with torch.no_grad():
            twin.embed.weight.copy_(torch.from_numpy(w["embed"]))
            for name in ("up", "down"):
                getattr(twin, name).weight.copy_(torch.from_numpy(w[name].T))
                getattr(twin, name).bias.copy_(torch.from_numpy(w[f"{name}.bias"]))
        torch_report = torch_compress(
            twin, n_cores=2, min_features=1, calibration=[torch.from_numpy(b).long() for b in batches], **how
        )
        compressed, report = compress(model, n_cores=2, min_features=1, calibration=batches, **how)
        assert [(r.name, r.ranks) for r in report.layers] == [(r.name, r.ranks) for r in torch_report.layers]
        for row in report.layers:
            theirs = getattr(twin, row.name).to_dense().detach().numpy()
            theirs = theirs if row.name == "embed" else theirs.T  # nn.Linear holds W^T
            np.testing.assert_allclose(_np(compressed.get_layer(row.name).to_dense()), theirs, rtol=1e-8, atol=1e-10)
