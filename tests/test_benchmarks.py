"""The benchmarks run (their --quick modes) and write what they promise; nothing is timed in tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tnlayers

ROOT = Path(__file__).resolve().parents[1]
#: The environment with glibc's allocator as it comes (no ``MALLOC_*_`` variables).
_GLIBC_DEFAULTS = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


def test_orderings_quick(tmp_path: Path) -> None:
    """The smoke run of the ordering benchmark on every installed backend: records, summary, plots, fit."""
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    command = [sys.executable, "-m", "benchmarks.orderings", "--quick", "--fit", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_GLIBC_DEFAULTS)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {r["allocator"] for r in records} == {"default"}
    timed = [r for r in records if r["mode"] != "overhead"]
    backends = {"numpy", "torch", "tensorflow"}
    assert {r["backend"] for r in timed} == backends
    assert {(r["case"], r["batch"], r["mode"]) for r in timed} == {
        (case, batch, mode)
        for case in ("FC2 784->256 D4", "LeNet conv3 400->120")
        for batch in (1, 64)
        for mode in ("forward", "forward+backward")
    }
    orderings = {r["ordering"] for r in timed}
    assert {"zipper", "reverse-zipper", "materialize", "greedy", "dp", "dp-combo", "optimal", "auto"} <= orderings
    assert {"autotune", "dense", "tltorch-blocktt", "random-greedy", "cotengra"} <= orderings
    assert all(r["median_s"] > 0 and r["flops"] > 0 and r["gemm_gflops"][r["backend"]] > 0 for r in timed)
    assert all(r["memory_bytes"] > 0 for r in timed if r["backend"] == "torch" and r["mode"] == "forward+backward")
    materialized = [r for r in timed if r["ordering"] == "materialize"]  # NumPy trains on the steps' tape
    assert materialized and all(
        r["weight_route"] == (r["backend"] != "numpy" or r["mode"] == "forward") for r in materialized
    )
    assert not any(r["weight_route"] for r in timed if r["ordering"] == "zipper")
    assert [r["case"] for r in records if r["mode"] == "overhead"] == ["FC2 784->256 D4", "1024 4x4x4x4x4 D8"]
    for backend in backends:
        assert f"{backend:<10} {'auto':<16} fwd+bwd time / fastest ordering: median" in result.stdout
        assert f"{backend:<10} {'auto by path':<16} fwd+bwd time / fastest path: median" in result.stdout
        assert f"{backend:<10} fitted CostModel(" in result.stdout
    summary = (tmp_path / "summary.md").read_text()
    assert "## torch" in summary and "Per-call overhead" in summary
    assert "| case | batch | auto chose | flops vs dense | x dense | efficiency | % of GEMM ceiling |" in summary
    assert "OMP_WAIT_POLICY" in summary and "allocator default." in summary
    assert (tmp_path / "time_vs_batch.png").stat().st_size > 10_000
    assert (tmp_path / "measured_vs_model.png").stat().st_size > 10_000
    records_path, again = str(tmp_path / "records.jsonl"), str(tmp_path / "again")
    command = [sys.executable, "-m", "benchmarks.orderings", "--backends", "torch", "--from-records", records_path]
    command += ["--fit", "--check-fit", records_path, "--out", again]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for weights in ("fitted", "current"):
        assert f"torch      {weights} weights on the second run, by path: median" in result.stdout


def test_planners_are_judged_per_ordering_and_per_path() -> None:
    """Contenders that ran the same path are one computation: pooled, the fastest is not the luckiest."""
    from benchmarks.orderings import ratio_table

    def record(ordering: str, path: list[list[int]] | None, ms: float) -> dict[str, object]:
        return {"backend": "torch", "case": "c", "batch": 8, "mode": "forward+backward", "ordering": ordering,
                "method": ordering, "path": path, "median_s": ms / 1e3}  # fmt: skip

    a, b = [[0, 1], [0, 1]], [[1, 2], [0, 1]]
    records = [
        record("zipper", a, 10.0),
        record("greedy", b, 6.0),  # path b: 6, 8, 9 and 13 ms -> its time is the median, 8.5 ms
        record("dp-combo", b, 9.0),
        record("auto", b, 13.0),
        record("autotune", b, 8.0),
        record("optimal", a, 12.0),  # path a: 10 and 12 ms -> 11 ms
        record("dense", None, 3.0),  # a baseline: neither an ordering nor a path
        record("auto", a, 1.0) | {"mode": "forward"},  # another mode: ignored here
    ]
    (row,) = ratio_table(records)
    assert row["fastest"] == "greedy" and row["fastest_ms"] == 6.0
    assert row["auto"] == 13.0 / 6.0 and row["autotune"] == 8.0 / 6.0 and row["dense"] == 0.5
    assert row["auto by path"] == 1.0 and row["autotune by path"] == 1.0  # b (8.5 ms) beats a (11 ms)
    records[1] = record("greedy", b, 30.0)  # now b: 8, 9, 13, 30 -> 11 ms
    records[5] = record("optimal", a, 10.0)  # a: 10 and 10 -> 10 ms
    (row,) = ratio_table(records)
    assert row["auto by path"] == pytest.approx(11.0 / 10.0) and row["fastest"] == "dp-combo"
    # only the planner and the baselines ran (``--orderings auto dense``): no ordering to judge it by
    assert ratio_table([record("auto", a, 2.0), record("dense", None, 3.0), record("tltorch-blocktt", None, 4.0)]) == []


def test_plans_that_ran_the_weight_route_are_one_path() -> None:
    """Plans that build ``W`` run as ``dense_weight`` and one product whatever their path's core order: the
    planner picking one of them is judged by the median of all of them, not by the luckiest one's time."""
    from benchmarks.orderings import path_times, ratio_table
    from benchmarks.orderings.analysis import WEIGHT_ROUTE

    def record(ordering: str, path: list[list[int]], ms: float, weight_route: bool) -> dict[str, object]:
        return {"backend": "torch", "case": "c", "batch": 256, "mode": "forward+backward", "ordering": ordering,
                "method": ordering, "path": path, "median_s": ms / 1e3, "weight_route": weight_route}  # fmt: skip

    steps, w1, w2 = [[0, 1], [0, 1], [0, 1]], [[1, 2], [1, 2], [0, 1]], [[2, 3], [1, 2], [0, 1]]
    records = [
        record("zipper", steps, 9.0, False),
        record("materialize", w1, 3.3, True),
        record("dp-combo", w2, 5.2, True),  # the same computation as materialize's: 3.3, 5.2 and 4.0 -> 4.0 ms
        record("auto", w2, 4.0, True),
        record("dp", w1, 12.0, False) | {"backend": "numpy"},  # NumPy's training ran the steps: its own path
        record("greedy", w2, 6.0, False) | {"backend": "numpy"},
    ]
    times, ran = path_times(records, "forward+backward")
    assert times[("torch", "c", 256)] == {tuple(map(tuple, steps)): 9.0e-3, WEIGHT_ROUTE: 4.0e-3}
    assert ran[("torch", "c", 256, "dp-combo")] == ran[("torch", "c", 256, "materialize")] == WEIGHT_ROUTE
    assert set(times[("numpy", "c", 256)]) == {tuple(map(tuple, w1)), tuple(map(tuple, w2))}
    torch_row = next(row for row in ratio_table(records) if row["backend"] == "torch")
    assert torch_row["auto by path"] == 1.0 and torch_row["auto"] == pytest.approx(4.0 / 3.3)
    # records written before the field existed keep their paths apart
    old = [{k: v for k, v in r.items() if k != "weight_route"} for r in records[:4]]
    assert len(path_times(old, "forward+backward")[0][("torch", "c", 256)]) == 3


def test_orderings_forward_only_reports_the_forward_efficiency(tmp_path: Path) -> None:
    """A run of the forward alone (the NumPy and TensorFlow goal) prints and writes its efficiency, and no plot
    of training times it did not measure."""
    command = [sys.executable, "-m", "benchmarks.orderings", "--backends", "numpy", "--cases", "LeNet fc 84->10"]
    command += ["--batches", "256", "--orderings", "auto", "dense", "--modes", "forward", "--repeats", "1"]
    result = subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "numpy      auto against dense from batch 256 (forward): efficiency median" in result.stdout
    assert "fwd+bwd" not in result.stdout
    summary = (tmp_path / "summary.md").read_text()
    assert "`auto` against the dense layer holding the same W (forward, same round):" in summary
    assert "| LeNet fc 84->10 | 256 |" in summary
    assert not (tmp_path / "time_vs_batch.png").exists()


def test_orderings_rejects_unknown_backends(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.orderings", "--backends", "mxnet", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown backend(s) ['mxnet']" in result.stderr


def test_torch_layers_quick(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "records.jsonl"
    command = [sys.executable, "-m", "benchmarks.torch_layers", "--quick", "--out", str(out), "--reuse-freed-memory"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_GLIBC_DEFAULTS)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["case"], r["rank"], r["batch"]) for r in records] == [("784->256 FC2", 16, 1), ("784->256 FC2", 16, 64)]
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 16)
    for record in records:
        for mode in ("inference", "forward+backward"):
            assert record[mode]["mpo"] > 0 and record[mode]["dense"] > 0
        plan = tnlayers.plan(spec, record["batch"], record["plan"], gradients="cores")  # the recorded ordering
        assert record["flops_vs_dense"] == pytest.approx(plan.flops / (2 * record["batch"] * 784 * 256))
        assert record["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "unset")
        assert record["allocator"] == f"reuse_freed_memory({1 << 30})"  # the second configuration, as asked


def test_allocator_quick() -> None:
    """Both configurations run in their own processes and every step of the W route is reported."""
    pytest.importorskip("torch")
    command = [sys.executable, "-m", "benchmarks.allocator", "--quick"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from benchmarks.allocator import STEPS

    rows = {line.split(" | ")[0].lstrip("| "): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"step", *STEPS, "MPOLinear", "nn.Linear"}
    for name in (*STEPS, "MPOLinear", "nn.Linear"):
        default, reused, ratio = (float(cell) for cell in rows[name].strip("| ").split(" | ")[1:])
        assert default > 0 and reused > 0 and ratio == pytest.approx(reused / default, abs=0.02)


def test_training_memory_quick(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    out = tmp_path / "records.jsonl"
    command = [sys.executable, "-m", "benchmarks.training_memory", "--quick", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    kept = record["kept_bytes"]
    assert kept["dense"] >= 1024 * 512 * 4  # Dense keeps its (1024, 512) float32 input
    assert kept["bounded"] <= 1.6 * kept["dense"] < kept["unbounded"]
    assert set(record["seconds"]) == {"dense", "bounded", "unbounded"} and min(record["seconds"].values()) > 0


def test_keras_layers_quick(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    out = tmp_path / "records.jsonl"
    command = [sys.executable, "-m", "benchmarks.keras_layers", "--quick", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["rank"], r["batch"]) for r in records] == [(8, 1), (8, 32)]
    for record in records:
        for mode in ("forward", "forward+backward"):
            assert set(record[mode]) == {"mpo", "dense", "tn_keras"} and min(record[mode].values()) > 0


def test_orderings_profile_splits_the_time(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    command = [sys.executable, "-m", "benchmarks.orderings", "--profile", "FC2 784->256 D4", "--batches", "8"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "auto -> " in result.stdout and "dense layer, forward+backward" in result.stdout
    shares = [float(line.split("(")[1].split("%")[0]) for line in result.stdout.splitlines() if "%)" in line]
    assert len(shares) == 3 and abs(sum(shares) - 100) <= 2  # GEMM, copies and the rest add up
    bad = subprocess.run([*command[:4], "no such case"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no case named 'no such case'" in bad.stderr


def test_auto_is_judged_against_the_dense_layer() -> None:
    from benchmarks.orderings import dense_ratios

    def record(ordering: str, ms: float, flops: int, gflops: float) -> dict[str, object]:
        return {"backend": "torch", "case": "c", "batch": 256, "mode": "forward+backward", "ordering": ordering,
                "method": "greedy", "median_s": ms / 1e3, "flops": flops, "gflops_per_s": gflops}  # fmt: skip

    records = [record("dense", 2.0, 100, 90.0), record("auto", 1.0, 25, 10.0), record("zipper", 9.0, 99, 1.0)]
    (row,) = dense_ratios(records, {"torch": 100.0})
    assert (row["x dense"], row["flops vs dense"], row["efficiency"], row["% of GEMM"]) == (0.5, 0.25, 0.5, 10.0)
    assert dense_ratios([records[1]], {"torch": 100.0}) == []  # no dense layer timed beside it: no ratio


def test_a_cost_model_is_scored_on_records_it_was_not_fitted_to() -> None:
    """``score_cost_model``: the measured time of the path the model picks over the fastest path's, per case,
    each candidate costed as the torch layer plans it (within its bound on what training keeps)."""
    from benchmarks.orderings import score_cost_model

    spec = tnlayers.MPOSpec((8, 8, 8, 8), (8, 8, 8, 8), 8)
    paths = {name: [list(pair) for pair in tnlayers.plan(spec, 256, name).path] for name in ("zipper", "materialize")}

    def record(case: str, ordering: str, ms: float, budget: float | None = 1.5) -> dict[str, object]:
        return {"backend": "torch", "case": case, "batch": 256, "mode": "forward+backward", "ordering": ordering,
                "path": paths[ordering], "in_modes": [8] * 4, "out_modes": [8] * 4, "ranks": [1, 8, 8, 8, 1],
                "flops": 100, "median_s": ms / 1e3, "saved_budget": budget}  # fmt: skip

    # memory nearly free: by flops zipper (a quarter of the dense flops) is the cheaper plan; but its
    # intermediates are 8x the input, so under the 1.5x bound its backward recomputes them all, and at a
    # second per step of the planned backward the model must pick materialize, whose backward fits
    model = tnlayers.CostModel(bandwidth=1e12, planned_step_overhead=1.0)
    costs = {name: tnlayers.plan(spec, 256, name, cost_model=model, gradients="cores").cost for name in paths}
    assert costs["zipper"] < costs["materialize"]
    picked = "zipper"  # what the model picks with no bound
    times = {picked: 3.0, ({*paths} - {picked}).pop(): 1.0}  # ... made 3x slower than the other
    fooled = [record("fooled", name, ms, None) for name, ms in times.items()]
    right = [record("right", "zipper", 2.0), record("right", "materialize", 1.0)]
    median, geomean, worst = score_cost_model(model, fooled + right)
    assert (median, worst) == (2.0, 3.0) and geomean == pytest.approx(3.0**0.5)
    assert score_cost_model(model, right) == (1.0, 1.0, 1.0)
    slow_fit = [record("right", "zipper", 1.0), record("right", "materialize", 2.0)]  # recomputing pays here
    assert score_cost_model(model, slow_fit) == (2.0, 2.0, 2.0)


def _mpo_reference(cores: list[np.ndarray], x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x @ W + bias`` with ``W`` contracted by plain NumPy, one core at a time (independent of the twins)."""
    weight = cores[0][0]  # (i, j, r)
    for core in cores[1:]:
        i, j = weight.shape[:2]
        weight = np.einsum("ijr,rklq->ikjlq", weight, core).reshape(i * core.shape[1], j * core.shape[2], -1)
    return x @ weight[..., 0] + bias


def _check_twin(route: Any) -> None:
    """``route(x, bias, split, *cores)`` gives ``x @ W + b`` and the gradients of ``x``, the bias and every core
    of a float64 reference (NumPy's W; autograd on plain einsums), for every split of two layers."""
    import torch

    rng = np.random.default_rng(0)
    layers = [((3, 4, 2), (2, 5, 3), (1, 3, 4, 1)), ((2, 5, 3, 2), (4, 1, 3, 2), (1, 2, 5, 3, 1))]  # modes, ranks
    for in_modes, out_modes, ranks in layers:
        arrays = [rng.standard_normal((r, i, j, q)) for r, i, j, q in zip(ranks, in_modes, out_modes, ranks[1:])]
        x_array = rng.standard_normal((5, math.prod(in_modes)))
        bias_array = rng.standard_normal(math.prod(out_modes))
        cores = [torch.tensor(a, requires_grad=True) for a in arrays]
        x, bias = torch.tensor(x_array, requires_grad=True), torch.tensor(bias_array, requires_grad=True)
        for split in range(1, len(cores)):
            y = route(x, bias, split, *cores)
            np.testing.assert_allclose(y.detach().numpy(), _mpo_reference(arrays, x_array, bias_array), atol=1e-10)
            probe = torch.tensor(rng.standard_normal(y.shape))
            got = torch.autograd.grad(y, [x, bias, *cores], probe)
            weight = cores[0][0]
            for core in cores[1:]:
                weight = torch.einsum("ijr,rklq->ikjlq", weight, core).flatten(0, 1).flatten(1, 2)
            expected = torch.autograd.grad(x @ weight[..., 0] + bias, [x, bias, *cores], probe)
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-10)


def test_kernel_bound_python_twin_matches_the_dense_reference() -> None:
    """The W route written by hand in Python, as one autograd node."""
    pytest.importorskip("torch")
    from benchmarks import kernel_bound

    _check_twin(kernel_bound.weight_route(kernel_bound.python_forward, kernel_bound.python_backward))


def test_kernel_bound_cpp_twin_matches_the_dense_reference_and_runs(tmp_path: Path) -> None:
    """The C++ twin (compiled once here, about 40 s) against the reference; then the benchmark's smoke run,
    with the same build, times every contender after checking each against the dense layer."""
    pytest.importorskip("torch")
    from benchmarks import kernel_bound

    native = kernel_bound.compile_native(tmp_path / "build")
    _check_twin(kernel_bound.weight_route(native.forward, native.backward))
    out = tmp_path / "records.jsonl"
    command = [sys.executable, "-m", "benchmarks.kernel_bound", "--quick", "--build-dir", str(tmp_path / "build")]
    result = subprocess.run([*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in records] == [1, 64]
    assert all(set(r["seconds"]) == set(kernel_bound.CONTENDERS) and min(r["seconds"].values()) > 0 for r in records)
