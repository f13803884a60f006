"""strategy="autotune": the fastest candidate wins, winners persist on disk, a corrupt cache is never trusted."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import dense_reference, reference_core_gradients

import tnlayers
from tnlayers import autotune

SPEC = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
KEY = ("test", "cpu", "float32", "train")


def _slow_except(winner: str) -> Callable[[tnlayers.ContractionPlan], Callable[[], object]]:
    """Every candidate sleeps 3 ms per call except ``winner``: the tuner must find it."""

    def make_run(candidate: tnlayers.ContractionPlan) -> Callable[[], object]:
        return (lambda: None) if candidate.method == winner else (lambda: time.sleep(3e-3))

    return make_run


def _candidate_methods(batch: int) -> list[str]:
    plans = sorted(tnlayers.auto_candidates(SPEC, batch), key=lambda p: (p.cost, p.flops))
    methods: list[str] = []
    for p in plans:
        if all(p.path != q.path for q in plans[: plans.index(p)]):
            methods.append(p.method)
    return methods[:4]


def test_tune_keeps_the_fastest_candidate_and_writes_it_to_disk() -> None:
    methods = _candidate_methods(64)
    winner = methods[-1]  # the model's fourth choice, made fastest here
    chosen = autotune.tune(SPEC, 64, _slow_except(winner), KEY, repeats=2)
    assert chosen.method == winner and chosen.strategy == "autotune"
    stored = json.loads(autotune.cache_file().read_text())
    assert stored["version"] == 1 and len(stored["entries"]) == 1
    entry = next(iter(stored["entries"].values()))
    assert entry["method"] == winner and [tuple(p) for p in entry["path"]] == list(chosen.path)
    autotune.clear()  # a new process: only the file is left
    calls: list[str] = []
    again = autotune.tune(SPEC, 50, lambda p: lambda: calls.append(p.method), KEY)  # same bucket (64)
    assert again.path == chosen.path and calls == []  # remembered, nothing timed
    assert autotune.cached(SPEC, 64, ("test", "cpu", "float64", "train")) is None  # another dtype: not tuned


def test_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten() -> None:
    autotune.cache_file().parent.mkdir(parents=True, exist_ok=True)
    autotune.cache_file().write_text("{not json")
    autotune.clear()
    with pytest.warns(UserWarning, match="corrupt autotune cache"):
        assert autotune.cached(SPEC, 8, KEY) is None
    chosen = autotune.tune(SPEC, 8, _slow_except(_candidate_methods(8)[0]), KEY, repeats=2)
    assert json.loads(autotune.cache_file().read_text())["entries"]
    assert chosen.path == tnlayers.plan(SPEC, 8, list(chosen.path)).path


@pytest.mark.parametrize("path", [[[0, 1]], [[0, 9], [0, 1], [0, 1], [0, 1]], "zipper", [["a", "b"]]])
def test_a_malformed_entry_is_never_trusted(path: Any) -> None:
    autotune.tune(SPEC, 16, _slow_except(_candidate_methods(16)[0]), KEY, repeats=1)
    content = json.loads(autotune.cache_file().read_text())
    for entry in content["entries"].values():
        entry["path"] = path
    autotune.cache_file().write_text(json.dumps(content))
    autotune.clear()
    with pytest.warns(UserWarning, match="malformed autotune cache entry"):
        assert autotune.cached(SPEC, 16, KEY) is None


def test_an_unwritable_cache_still_tunes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TNLAYERS_CACHE_DIR", str(blocker / "sub"))  # a directory below a file cannot exist
    autotune.clear()
    with pytest.warns(UserWarning, match="could not write the autotune cache"):
        chosen = autotune.tune(SPEC, 4, _slow_except(_candidate_methods(4)[0]), KEY, repeats=1)
    assert chosen.strategy == "autotune"


def test_plan_accepts_autotune_as_the_model_choice() -> None:
    assert tnlayers.plan(SPEC, 32, "autotune").path == tnlayers.plan(SPEC, 32, "auto").path


def test_layers_with_autotune_compute_the_right_result(layer_harness: Any) -> None:
    layer = layer_harness.make((2, 3, 4), (3, 2, 2), 3, "autotune", np.float32)
    layer_harness.set_bias(layer, np.linspace(-1, 1, 12).astype(np.float32))
    cores, bias = layer_harness.weights(layer)
    x = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
    expected = x.astype(np.float64) @ dense_reference(cores) + bias
    np.testing.assert_allclose(layer_harness.forward(layer, x), expected, rtol=1e-4, atol=1e-5)
    if layer_harness.name == "keras":
        layer.autotune(5, repeats=1)
        np.testing.assert_allclose(layer_harness.forward(layer, x), expected, rtol=1e-4, atol=1e-5)
    entries = json.loads(autotune.cache_file().read_text())["entries"]
    assert any(layer_harness.name in key for key in entries)
    if layer_harness.name != "keras":  # the gradients of a tuned layer are right too
        grad_out = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
        _, core_grads, _ = layer_harness.grads(layer, x, grad_out)
        expected_grads = reference_core_gradients(cores, x, grad_out)
        for ours, theirs in zip(core_grads, expected_grads):
            np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)


def test_torch_autotune_tunes_training_and_inference_separately() -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear

    # float64, so that different contraction orders agree to rounding and any leftover gradient shows
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 4, strategy="autotune", seed=0, dtype=torch.float64)
    x = torch.randn(32, 784, dtype=torch.float64)
    layer(x).sum().backward()
    grads = [c.grad.clone() for c in layer.cores]
    with torch.no_grad():
        layer(x)
    keys = [json.loads(k) for k in json.loads(autotune.cache_file().read_text())["entries"]]
    assert sorted(k[-1] for k in keys) == ["infer", "train"]
    reference = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 4, strategy="zipper", seed=0, dtype=torch.float64)
    reference(x).sum().backward()
    for ours, theirs in zip(grads, reference.cores):
        torch.testing.assert_close(ours, theirs.grad, rtol=1e-10, atol=1e-12)  # tuning left no gradient behind


def _zipper_flops(spec: tnlayers.MPOSpec, batch: int) -> int:
    """Flops of the left-to-right sweep, counted from the shapes (written here, not tnlayers code)."""
    ins, outs, ranks = spec.in_modes, spec.out_modes, spec.ranks
    total = 0
    for k in range(spec.n_cores):
        done_out, left_in = math.prod(outs[:k]), math.prod(ins[k + 1 :])
        total += 2 * batch * done_out * left_in * ranks[k] * ins[k] * outs[k] * ranks[k + 1]
    return total


def test_report_lists_every_strategy_with_its_flops() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 16)
    cost = tnlayers.report(spec, 1000, backend="torch")
    rows = {row["strategy"]: row for row in cost.as_dicts()}
    assert set(rows) == {"zipper", "reverse-zipper", "materialize", "greedy", "dp", "optimal"}
    assert cost.batch_size == 1024 and rows["zipper"]["flops"] == _zipper_flops(spec, 1024)
    assert cost.chosen.path == tnlayers.plan(spec, 1000, cost_model=tnlayers.cost_model_for("torch")).path
    assert any(row["chosen"] for row in rows.values())
    text = str(cost)
    assert "<- auto" in text and "14,848 params of 200,704" in text and f"auto picks {cost.chosen.method}" in text


def test_report_accepts_layers_of_any_backend(layer_harness: Any) -> None:
    layer = layer_harness.make((2, 3), (3, 2), 2, "auto", np.float32)
    assert tnlayers.report(layer, 8).spec == tnlayers.spec_from_cores(layer_harness.weights(layer)[0])
