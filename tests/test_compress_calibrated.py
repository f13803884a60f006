"""torch ``compress`` with calibration data and a whole-model budget, on a small model (no ``transformers``):
``collect_grams`` against ``X^T X`` of the activations taken here, each fitted layer's output error against
``||X (W - W')|| / ||X W||`` computed here from the cores, and the budget against the parameters counted here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import dense_reference

torch = pytest.importorskip("torch")
from tnlayers.backends.torch import MPOLinear, collect_grams, compress  # noqa: E402
from torch import nn  # noqa: E402

from tnlayers.calibrate import Gram  # noqa: E402


class Tagger(nn.Module):
    """Token ids -> an embedding, two linear layers: ``model(tokens)``, ``model(*(tokens,))``, ``model(tokens=)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.up = nn.Linear(16, 36)
        self.down = nn.Linear(36, 16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(tokens))))


def _model_and_batches() -> tuple[Tagger, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Tagger().double()
    with torch.no_grad():  # anisotropic activations: what calibration is for
        model.embed.weight.mul_(torch.logspace(0, -2, 16, dtype=torch.float64))
    generator = torch.Generator().manual_seed(1)
    return model, [torch.randint(0, 30, (4, 6), generator=generator) for _ in range(3)]  # rows 30-39 never seen


def _inputs(model: Tagger, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Each layer's input rows, by calling the model's parts here."""
    with torch.no_grad():
        tokens = torch.cat([b.reshape(-1) for b in batches])
        embedded = model.embed(tokens)
        hidden = torch.relu(model.up(embedded))
    return {"up": embedded.numpy(), "down": hidden.numpy(), "tokens": tokens.numpy()}


def _relu_model() -> nn.Module:
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(4, 4))
    model.add_module("act", nn.ReLU())
    return model


def test_collect_grams_is_x_transpose_x_of_each_layers_inputs() -> None:
    model, batches = _model_and_batches()
    rows = _inputs(model, batches)
    forms = [batches, [(b,) for b in batches], [{"tokens": b} for b in batches]]  # model(b), model(*b), model(**b)
    for form in forms:
        grams = collect_grams(model, form, ["embed", "up", "down"])
        np.testing.assert_array_equal(grams["embed"], np.bincount(rows["tokens"], minlength=40))
        for name in ("up", "down"):
            assert isinstance(grams[name], Gram) and grams[name].rows == 72
            np.testing.assert_allclose(grams[name].matrix, rows[name].T @ rows[name], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=r"^collect_grams reads nn.Linear and nn.Embedding inputs; 'act' is a ReLU$"):
        collect_grams(_relu_model(), [torch.ones(2, 4)], ["act"])
    with pytest.raises(ValueError, match=r"^the calibration batches reached none of the layers to compress"):
        collect_grams(model, [], ["up"])


def _output_error(x: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - approx)) / np.linalg.norm(x @ w))


def test_calibrated_compress_reports_the_true_output_error_and_beats_tt_svd() -> None:
    model, batches = _model_and_batches()
    rows = _inputs(model, batches)
    weights = {name: getattr(model, name).weight.detach().numpy().T.copy() for name in ("up", "down")}
    biases = {name: getattr(model, name).bias.detach().clone() for name in ("up", "down")}
    plain, fitted = copy.deepcopy(model), copy.deepcopy(model)
    compress(plain, rank=2, n_cores=2, min_features=1, include=["up", "down"])
    report = compress(fitted, rank=2, n_cores=2, min_features=1, include=["up", "down"], calibration=batches)
    by_name = {row.name: row for row in report.layers}
    assert sorted(by_name) == ["down", "up"]
    for name in ("up", "down"):
        layer = getattr(fitted, name)
        assert isinstance(layer, MPOLinear) and layer.spec.ranks == (1, 2, 1)
        approx = dense_reference([c.detach().numpy() for c in layer.cores])
        measured = _output_error(rows[name], weights[name], approx)
        assert by_name[name].output_error == pytest.approx(measured, rel=1e-8)
        assert by_name[name].relative_error == pytest.approx(
            np.linalg.norm(weights[name] - approx) / np.linalg.norm(weights[name]), rel=1e-8
        )
        plain_approx = dense_reference([c.detach().numpy() for c in getattr(plain, name).cores])
        assert measured < _output_error(rows[name], weights[name], plain_approx)  # fitted to the outputs
        torch.testing.assert_close(layer.bias, biases[name], rtol=0, atol=0)
        assert layer.cores[0].dtype == torch.float64
    again = copy.deepcopy(model)
    grams = collect_grams(model, batches, ["up", "down"])
    compress(again, rank=2, n_cores=2, min_features=1, include=["up", "down"], calibration=grams, sweeps=2)
    for name in ("up", "down"):
        for a, b in zip(getattr(again, name).cores, getattr(fitted, name).cores):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sweeps_and_two_site_reach_the_fit() -> None:
    model, batches = _model_and_batches()
    errors = {}
    for how in ({"sweeps": 0}, {"sweeps": 3}, {"sweeps": 2, "two_site": True}):
        student = copy.deepcopy(model)
        report = compress(student, rank=2, n_cores=2, min_features=1, include=["up"], calibration=batches, **how)
        errors[str(how)] = report.layers[0].output_error
    assert errors["{'sweeps': 3}"] < errors["{'sweeps': 0}"]  # no sweep: the TT-SVD start
    assert errors["{'sweeps': 2, 'two_site': True}"] < errors["{'sweeps': 0}"]


def test_a_whole_model_budget_counts_every_parameter() -> None:
    model, batches = _model_and_batches()
    before = sum(p.numel() for p in model.parameters())
    for fraction in (0.9, 0.75):
        student = copy.deepcopy(model)
        report = compress(student, budget=fraction, n_cores=2, min_features=1, calibration=batches)
        after = sum(p.numel() for p in student.parameters())
        assert after <= fraction * before and report.network_params_after == after
        assert report.network_params_before == before and report.layers
        for row in report.layers:
            assert row.params_after < row.params_before
        kept = {name for name, reason in report.skipped if reason == "the budget keeps it dense"}
        assert kept | {row.name for row in report.layers} == {"embed", "up", "down"}
    assert before == 40 * 16 + (16 * 36 + 36) + (36 * 16 + 16)  # 1,844, of which the biases (52) stay
    with pytest.raises(
        ValueError,
        match=r"^a budget of 10 of the model's 1,844 parameters cannot be met: the parts"
        r" compress leaves alone hold 52, and the 3 layers it may replace need at least \d+ more$",
    ):
        compress(copy.deepcopy(model), budget=10 / 1844, n_cores=2, min_features=1)
    for budget in (1.0, 0.0, True, "0.5"):
        with pytest.raises(ValueError, match=r"budget must be a fraction of the model's parameters in \(0, 1\)"):
            compress(copy.deepcopy(model), budget=budget)


def test_the_budget_goes_where_the_outputs_lose_least() -> None:
    """Two 16 x 16 layers, one an exact Kronecker product (a bond of 1 holds it) and one random, and a budget
    with room for one dense layer beside a small MPO: the exact one becomes the MPO, at no output error, and
    the random one stays dense; with ``rank=2`` no bond beyond 2 is tried."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).double()
    a, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(torch.kron(a, b).T)  # W = x -> x @ kron(a, b): one bond of 1 between (4, 4) modes
    batches = [torch.randn(32, 16, dtype=torch.float64) for _ in range(2)]
    before = sum(p.numel() for p in model.parameters())  # 544
    report = compress(model, budget=0.75, n_cores=2, min_features=1, calibration=batches)
    assert [row.name for row in report.layers] == ["0"] and report.layers[0].ranks == (1, 1, 1)
    assert report.layers[0].output_error < 1e-5  # exact but for the fit's ridge (1e-6 of the mean diagonal)
    assert report.skipped == (("1", "the budget keeps it dense"),)
    assert isinstance(model[1], nn.Linear) and sum(p.numel() for p in model.parameters()) <= 0.75 * before
    capped = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).double()
    report = compress(capped, budget=0.5, rank=2, n_cores=2, min_features=1, calibration=batches)
    assert [max(row.ranks) for row in report.layers] == [2, 2]


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


class _Branches(nn.Module):
    """``a(x) + 3 b(x) + 0 * dead(x)``: the branches' effect on the output is known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.dead = nn.Linear(32, 48), nn.Linear(32, 48), nn.Linear(32, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 3 * self.b(x) + 0 * self.dead(x)


def test_output_sensitivity_is_each_layers_share_of_the_output() -> None:
    """Noise of relative size e at a branch moves the output by its weight times e times the branch's norm:
    expected ``w^2 ||branch||^2 / ||output||^2`` (computed here), 0 for a branch multiplied by 0."""
    from tnlayers.backends.torch import output_sensitivity

    torch.manual_seed(0)
    model = _Branches().double()
    batches = [torch.randn(64, 32, dtype=torch.float64) for _ in range(3)]
    found = output_sensitivity(model, batches, ["a", "b", "dead"], noise=0.01)
    with torch.no_grad():
        out = sum(float((model(x) ** 2).sum()) for x in batches)
        share_a = sum(float((model.a(x) ** 2).sum()) for x in batches) / out
        share_b = 9 * sum(float((model.b(x) ** 2).sum()) for x in batches) / out
    assert found["dead"] == 0.0
    assert found["a"] == pytest.approx(share_a, rel=0.05) and found["b"] == pytest.approx(share_b, rel=0.05)
    assert found["b"] > 3 * found["a"]  # the branch weighed by 3 counts 9 times as much
    assert output_sensitivity(model, batches, ["a"], noise=0.01) == {"a": found["a"]}  # seeded: the same draw
    with pytest.raises(ValueError, match=r"noise must be a positive number .* got 0"):
        output_sensitivity(model, batches, ["a"], noise=0)
    with pytest.raises(TypeError, match="needs a model that returns a tensor, got tuple"):
        output_sensitivity(_Pair(), [torch.ones(2)], ["lin"])


def test_a_sensitive_layer_keeps_more_of_the_budget() -> None:
    """Two alike random layers and room for one MPO beside a dense layer: the layer the sensitivity calls
    a thousand times as sensitive stays dense, whichever it is."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).double()
    batches = [torch.randn(32, 16, dtype=torch.float64) for _ in range(2)]
    for sensitive, cheap in (("0", "1"), ("1", "0")):
        student = copy.deepcopy(model)
        report = compress(
            student, budget=0.75, n_cores=2, min_features=1, calibration=batches,
            sensitivity={sensitive: 1000.0, cheap: 1.0},
        )  # fmt: skip
        assert [row.name for row in report.layers] == [cheap]
        assert report.skipped == ((sensitive, "the budget keeps it dense"),)
    for bad, message in (
        ({"0": 1.0}, r"sensitivity has no entry for the layers \['1'\]"),
        ({"0": 1.0, "1": -1.0}, r"sensitivity\['1'\] must be a finite number >= 0, got -1.0"),
        ({"0": 1.0, "1": True}, r"sensitivity\['1'\] must be a finite number >= 0, got True"),
    ):
        with pytest.raises(ValueError, match=message):
            compress(copy.deepcopy(model), budget=0.75, n_cores=2, min_features=1, sensitivity=bad)
    with pytest.raises(ValueError, match="sensitivity weighs the layers in a whole-model budget: give budget="):
        compress(copy.deepcopy(model), rank=2, sensitivity={"0": 1.0, "1": 1.0})
