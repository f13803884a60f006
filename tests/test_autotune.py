"""strategy="autotune": the fastest candidate wins, winners persist on disk, a corrupt cache is never trusted."""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_at_callers_line, dense_reference, reference_core_gradients

import tnlayers
from tnlayers import autotune
from tnlayers.autotune import MAX_INDEX
from tnlayers.plan import auto_candidates

SPEC = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
KEY = ("test", "cpu", "float32", "train")


def _slow_except(winner: str) -> Callable[[tnlayers.ContractionPlan], Callable[[], object]]:
    """Every candidate sleeps 3 ms per call except ``winner``: the tuner must find it."""

    def make_run(candidate: tnlayers.ContractionPlan) -> Callable[[], object]:
        return (lambda: None) if candidate.method == winner else (lambda: time.sleep(3e-3))

    return make_run


def _candidate_methods(batch: int) -> list[str]:
    plans = sorted(auto_candidates(SPEC, batch), key=lambda p: (p.cost, p.flops))
    methods: list[str] = []
    for p in plans:
        if all(p.path != q.path for q in plans[: plans.index(p)]):
            methods.append(p.method)
    return methods[:4]


@pytest.fixture
def tuner(tmp_path: Path) -> autotune.Autotuner:
    return autotune.Autotuner(tmp_path / "autotune.json")


def test_tune_keeps_the_fastest_candidate_and_writes_it_to_disk(tuner: autotune.Autotuner) -> None:
    methods = _candidate_methods(64)
    winner = methods[-1]  # the model's fourth choice, made fastest here
    chosen = tuner.tune(SPEC, 64, _slow_except(winner), KEY, repeats=2)
    assert chosen.method == winner and chosen.strategy == "autotune"
    stored = json.loads(tuner.path.read_text())
    assert stored["version"] == 1 and len(stored["entries"]) == 1
    entry = next(iter(stored["entries"].values()))
    assert entry["method"] == winner and [tuple(p) for p in entry["path"]] == list(chosen.path)
    fresh = autotune.Autotuner(tuner.path)  # a new process: only the file is left
    calls: list[str] = []
    again = fresh.tune(SPEC, 50, lambda p: lambda: calls.append(p.method), KEY)  # same bucket (64)
    assert again.path == chosen.path and calls == []  # remembered, nothing timed


@pytest.mark.parametrize(
    "changed",
    [
        {"batch": 128},
        {"spec": tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 6)},  # other ranks
        {"spec": tnlayers.MPOSpec((7, 4, 4, 7), (4, 4, 4, 4), 8)},  # other modes
        {"key": ("other", *KEY[1:])},
        {"key": (KEY[0], "cuda:0", *KEY[2:])},
        {"key": (*KEY[:2], "float64", KEY[3])},
        {"key": (*KEY[:3], "none")},
    ],
    ids=["bucket", "ranks", "modes", "backend", "device", "dtype", "gradients"],
)
def test_every_part_of_the_key_tells_entries_apart(tuner: autotune.Autotuner, changed: dict[str, Any]) -> None:
    tuner.tune(SPEC, 64, _slow_except(_candidate_methods(64)[0]), KEY, repeats=1)
    assert tuner.cached(SPEC, 64, KEY) is not None
    spec, batch, key = changed.get("spec", SPEC), changed.get("batch", 64), changed.get("key", KEY)
    assert tuner.cached(spec, batch, key) is None
    assert autotune.Autotuner(tuner.path).cached(spec, batch, key) is None  # from the file too


def test_tuners_sharing_a_file_merge_their_winners(tuner: autotune.Autotuner) -> None:
    other = autotune.Autotuner(tuner.path)  # another process, started before the first one wrote
    assert other.cached(SPEC, 8, KEY) is None
    tuner.tune(SPEC, 8, _slow_except(_candidate_methods(8)[0]), KEY, repeats=1)
    other.tune(SPEC, 16, _slow_except(_candidate_methods(16)[0]), KEY, repeats=1)
    assert len(json.loads(tuner.path.read_text())["entries"]) == 2
    assert not list(tuner.path.parent.glob("*.tmp"))


def test_the_default_tuner_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TNLAYERS_CACHE_DIR", str(tmp_path / "a"))
    autotune.default_tuner.cache_clear()
    first = autotune.default_tuner()
    monkeypatch.setenv("TNLAYERS_CACHE_DIR", str(tmp_path / "b"))
    assert autotune.default_tuner() is first and first.path == tmp_path / "a" / "autotune.json"
    assert autotune.cache_dir_from({"XDG_CACHE_HOME": "/x"}) == Path("/x/tnlayers")


def test_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(tuner: autotune.Autotuner) -> None:
    tuner.path.write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt autotune cache"):
        assert tuner.cached(SPEC, 8, KEY) is None
    winner = _candidate_methods(8)[0]
    chosen = tuner.tune(SPEC, 8, _slow_except(winner), KEY, repeats=2)
    assert chosen.method == winner  # the one made fastest on purpose
    (entry,) = json.loads(tuner.path.read_text())["entries"].values()  # the file is whole again, with it
    assert entry["method"] == winner and [tuple(p) for p in entry["path"]] == list(chosen.path)


@pytest.mark.parametrize("path", [[[0, 1]], [[0, 9], [0, 1], [0, 1], [0, 1]], "zipper", [["a", "b"]]])
def test_a_malformed_entry_is_never_trusted(tuner: autotune.Autotuner, path: Any) -> None:
    tuner.tune(SPEC, 16, _slow_except(_candidate_methods(16)[0]), KEY, repeats=1)
    content = json.loads(tuner.path.read_text())
    for entry in content["entries"].values():
        entry["path"] = path
    tuner.path.write_text(json.dumps(content))
    with pytest.warns(UserWarning, match="malformed autotune cache entry"):
        assert autotune.Autotuner(tuner.path).cached(SPEC, 16, KEY) is None


def test_an_unwritable_cache_still_tunes(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    tuner = autotune.Autotuner(blocker / "sub" / "autotune.json")  # a directory below a file cannot exist
    with pytest.warns(UserWarning, match="could not write the autotune cache") as record:
        chosen = tuner.tune(SPEC, 4, _slow_except(_candidate_methods(4)[0]), KEY, repeats=1)
    assert chosen.strategy == "autotune"
    assert_at_callers_line(record[0], __file__)


def test_a_miss_is_silent_and_a_hit_is_planned_for_the_batch_asked(tuner: autotune.Autotuner) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuner.cached(SPEC, 48, KEY) is None
    chosen = tuner.tune(SPEC, 48, _slow_except(_candidate_methods(48)[0]), KEY, repeats=1)
    assert tuner.cached(SPEC, 40, KEY) == chosen  # the same bucket (64), in memory
    found = autotune.Autotuner(tuner.path).cached(SPEC, 40, KEY)  # from the file: planned for the batch asked
    expected = tnlayers.plan(SPEC, 40, chosen.path)
    assert found is not None and found.path == chosen.path
    assert (found.batch_size, found.flops) == (expected.batch_size, expected.flops)


def test_a_corrupt_file_warns_once_when_read_and_not_again_when_rewritten(tuner: autotune.Autotuner) -> None:
    tuner.path.write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt autotune cache"):
        assert tuner.cached(SPEC, 8, KEY) is None
    tuner.path.write_text("{still not json")  # corrupt again when the winner is merged into it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuner.tune(SPEC, 8, _slow_except(_candidate_methods(8)[0]), KEY, repeats=1)
    assert len(json.loads(tuner.path.read_text())["entries"]) == 1


def test_plan_accepts_autotune_as_the_model_choice() -> None:
    assert tnlayers.plan(SPEC, 32, "autotune").path == tnlayers.plan(SPEC, 32, "auto").path


def test_layers_autotune_on_their_first_call_and_stay_right(layer_harness: Any) -> None:
    """One policy in every framework: an eager call times the candidates, once per key."""
    layer = layer_harness.make((2, 3, 4), (3, 2, 2), 3, "autotune", np.float32)
    layer_harness.set_bias(layer, np.linspace(-1, 1, 12).astype(np.float32))
    cores, bias = layer_harness.weights(layer)
    x = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
    expected = x.astype(np.float64) @ dense_reference(cores) + bias
    np.testing.assert_allclose(layer_harness.forward(layer, x), expected, rtol=1e-4, atol=1e-5)
    entries = json.loads(autotune.default_tuner().path.read_text())["entries"]
    keys = [json.loads(k) for k in entries]
    assert [k[3:] for k in keys] == [[8, layer_harness.tune_backend, "cpu", "float32", "none"]]
    grad_out = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    _, core_grads, _ = layer_harness.grads(layer, x, grad_out)  # tunes again, for training
    expected_grads = reference_core_gradients(cores, x, grad_out)
    for ours, theirs in zip(core_grads, expected_grads):
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)
    entries = json.loads(autotune.default_tuner().path.read_text())["entries"]
    assert sorted(json.loads(k)[-1] for k in entries) == ["all", "none"]


def test_torch_autotune_leaves_no_gradient_behind() -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear

    # float64, so that different contraction orders agree to rounding and any leftover gradient shows
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 4, strategy="autotune", seed=0, dtype=torch.float64)
    x = torch.randn(32, 784, dtype=torch.float64)
    layer(x).sum().backward()
    grads = [c.grad.clone() for c in layer.cores]
    with torch.no_grad():
        layer(x)
    keys = [json.loads(k) for k in json.loads(autotune.default_tuner().path.read_text())["entries"]]
    assert sorted(k[-1] for k in keys) == ["cores", "none"]
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
    assert cost.chosen.path == tnlayers.plan(spec, 1000, cost_model=tnlayers.cost.cost_model_for("torch")).path
    assert any(row["chosen"] for row in rows.values())
    text = str(cost)
    assert "<- auto" in text and "14,848 params of 200,704" in text and f"auto picks {cost.chosen.method}" in text


def test_report_accepts_layers_of_any_backend(layer_harness: Any) -> None:
    layer = layer_harness.make((2, 3), (3, 2), 2, "auto", np.float32)
    assert tnlayers.report(layer, 8).spec == tnlayers.decompose.spec_from_cores(layer_harness.weights(layer)[0])


def test_a_malformed_entry_warning_names_the_spec_and_the_fault_at_the_callers_line(
    tuner: autotune.Autotuner,
) -> None:
    tuner.tune(SPEC, 16, _slow_except(_candidate_methods(16)[0]), KEY, repeats=1)
    content = json.loads(tuner.path.read_text())
    for entry in content["entries"].values():
        entry["path"] = [[0, 9]]
    tuner.path.write_text(json.dumps(content))
    expected = rf"^ignoring a malformed autotune cache entry for {re.escape(str(SPEC))} \(ValueError\(.*\)\); tuning"
    with pytest.warns(UserWarning, match=expected + " again$") as caught:
        assert autotune.Autotuner(tuner.path).cached(SPEC, 16, KEY) is None
    (warning,) = caught.list
    assert_at_callers_line(warning, __file__)  # the line that asked the cache, not tnlayers


def test_an_entry_without_a_method_name_is_served_as_a_path(tuner: autotune.Autotuner) -> None:
    chosen = tuner.tune(SPEC, 16, _slow_except(_candidate_methods(16)[0]), KEY, repeats=1)
    content = json.loads(tuner.path.read_text())
    for entry in content["entries"].values():
        del entry["method"]
    tuner.path.write_text(json.dumps(content))
    served = autotune.Autotuner(tuner.path).cached(SPEC, 16, KEY)
    assert served is not None and served.path == chosen.path
    assert served.method == "path" and served.strategy == "autotune"


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ([[0, 1], "01"], TypeError, r"^path must be a list of lists, got \[\[0, 1\], '01'\]$"),
        ([[0, True]], ValueError, r"^path index True is not an int in \[0, \d+\)$"),
        ([[0, 2 * MAX_INDEX]], ValueError, rf"^path index {2 * MAX_INDEX} is not an int in \[0, {2 * MAX_INDEX}\)$"),
        ([[0, -1]], ValueError, r"^path index -1 is not an int"),
    ],
    ids=["a pair that is a string", "a bool index", "the first index too large", "a negative index"],
)
def test_a_cached_path_must_be_pairs_of_small_ints(path: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        autotune._path_of({"path": path})
    assert autotune._path_of({"path": [[0, 2 * MAX_INDEX - 1]]}) == [(0, 2 * MAX_INDEX - 1)]  # the last one allowed


def test_the_cache_folder_defaults_to_the_users_cache() -> None:
    assert autotune.cache_dir_from({}) == Path.home() / ".cache" / "tnlayers"
    assert autotune.cache_dir_from({"XDG_CACHE_HOME": "/x"}) == Path("/x/tnlayers")
    assert autotune.cache_dir_from({"XDG_CACHE_HOME": "/x", "TNLAYERS_CACHE_DIR": "/y"}) == Path("/y")


def test_the_tuner_names_its_file_and_forgets_in_memory_or_on_disk(tuner: autotune.Autotuner) -> None:
    assert repr(tuner) == f"Autotuner({str(tuner.path)!r})"
    chosen = tuner.tune(SPEC, 16, _slow_except(_candidate_methods(16)[1]), KEY, repeats=1)
    tuner.path.write_text(json.dumps({"version": 1, "entries": {}}))  # another process emptied the file
    assert tuner.cached(SPEC, 16, KEY) is not None  # still remembered in memory
    tuner.clear()
    assert tuner.path.exists()  # memory only, by default
    assert tuner.cached(SPEC, 16, KEY) is None  # forgotten: the file is read again
    tuner.tune(SPEC, 16, _slow_except(chosen.method), KEY, repeats=1)
    tuner.clear(disk=True)
    assert not tuner.path.exists() and tuner.cached(SPEC, 16, KEY) is None
    tuner.clear(disk=True)  # no file: nothing to delete, no error


def test_a_tuner_from_the_environment_keeps_its_file_in_the_cache_folder(tmp_path: Path) -> None:
    found = autotune.Autotuner.from_environment({"TNLAYERS_CACHE_DIR": str(tmp_path / "here")})
    assert found.path == tmp_path / "here" / "autotune.json"


def test_a_stored_entry_records_every_candidate_time_and_the_winner(tuner: autotune.Autotuner) -> None:
    methods = _candidate_methods(16)
    chosen = tuner.tune(SPEC, 16, _slow_except(methods[2]), KEY, repeats=1)
    content = json.loads(tuner.path.read_text())
    assert content["version"] == 1
    (entry,) = content["entries"].values()
    assert entry["method"] == methods[2] == chosen.method and chosen.strategy == "autotune"
    assert tuple(tuple(pair) for pair in entry["path"]) == chosen.path
    assert sorted(entry["median_s"]) == sorted(methods)
    assert entry["median_s"][methods[2]] < min(t for m, t in entry["median_s"].items() if m != methods[2])
    again = autotune.Autotuner(tuner.path).cached(SPEC, 16, KEY)
    assert again is not None and again.method == methods[2] and again.strategy == "autotune"
    assert again.batch_size == 16 and again.path == chosen.path


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"version": 2, "entries": {}}', "expected a JSON object with version 1"),
        ('{"version": 1}', "no 'entries' object"),
    ],
)
def test_a_corrupt_cache_file_is_ignored_with_its_fault_at_the_callers_line(
    tmp_path: Path, content: str, reason: str
) -> None:
    path = tmp_path / "autotune.json"
    path.write_text(content)
    expected = (
        rf"^ignoring the corrupt autotune cache {re.escape(str(path))} \({re.escape(reason)}\); it will be rewritten$"
    )
    with pytest.warns(UserWarning, match=expected) as caught:
        assert autotune.Autotuner(path).cached(SPEC, 16, KEY) is None
    (warning,) = caught.list
    assert_at_callers_line(warning, __file__)
