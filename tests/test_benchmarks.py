"""The calibration benchmark runs (its --quick mode); benchmarks are never timed in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_calibrate_quick(backend: str, tmp_path: Path) -> None:
    if backend == "torch":
        pytest.importorskip("torch")
    out = tmp_path / "records.jsonl"
    command = [
        sys.executable,
        "-m",
        "benchmarks.calibrate",
        "--quick",
        "--fit",
        "--backend",
        backend,
        "--out",
        str(out),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "default cost model: median" in result.stdout and "fitted CostModel(" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 2 * 6  # 2 shapes x 2 batch sizes x 6 orderings
    assert {r["strategy"] for r in records} == {"zipper", "reverse-zipper", "materialize", "greedy", "dp", "optimal"}
    assert all(r["median_s"] > 0 and r["flops"] > 0 and r["backend"] == backend for r in records)


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
