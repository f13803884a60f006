"""The benchmarks run (their --quick modes) and write what they promise; nothing is timed in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_orderings_quick(tmp_path: Path) -> None:
    """The smoke run of the ordering benchmark on every installed backend: records, summary, plots, fit."""
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    command = [sys.executable, "-m", "benchmarks.orderings", "--quick", "--fit", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
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
    assert [r["case"] for r in records if r["mode"] == "overhead"] == ["FC2 784->256 D4", "1024 4x4x4x4x4 D8"]
    for backend in backends:
        assert f"{backend:<10} auto     fwd+bwd time / fastest ordering: median" in result.stdout
        assert f"{backend:<10} fitted CostModel(" in result.stdout
    summary = (tmp_path / "summary.md").read_text()
    assert "## torch" in summary and "Per-call overhead" in summary
    assert (tmp_path / "time_vs_batch.png").stat().st_size > 10_000
    assert (tmp_path / "measured_vs_model.png").stat().st_size > 10_000


def test_orderings_rejects_unknown_backends(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.orderings", "--backends", "mxnet", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown backend(s) ['mxnet']" in result.stderr


def test_torch_layers_quick(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "records.jsonl"
    command = [sys.executable, "-m", "benchmarks.torch_layers", "--quick", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["case"], r["rank"], r["batch"]) for r in records] == [("784->256 FC2", 8, 1), ("784->256 FC2", 8, 64)]
    for record in records:
        for mode in ("forward", "forward+backward"):
            assert record[mode]["mpo"] > 0 and record[mode]["dense"] > 0
    assert "forward+backward ms: mpo, dense, ratio" in result.stdout


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
