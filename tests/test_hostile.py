"""Hostile and careless inputs: each gets a specific error naming what was given, never a silent result.

The first regressions of the reliability issue; each case failed (silently or deep in a framework)
before the fix it pins down.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tnlayers.backends.numpy import MPOLinear as NumpyMPOLinear

import tnlayers

SPEC = tnlayers.MPOSpec((2, 3), (3, 2), 2)


@pytest.mark.parametrize("std", [math.inf, -math.inf, math.nan, 0.0, -1.0])
def test_init_rejects_a_std_that_is_not_positive_and_finite(std: float) -> None:
    with pytest.raises(ValueError, match=f"std must be a positive finite number, got {std!r}"):
        tnlayers.init_cores(SPEC, "normal", std=std)


@pytest.mark.parametrize("backend", ["pytorch", "cupy", "Torch"])
def test_report_rejects_an_unknown_backend_instead_of_using_numpys_model(backend: str) -> None:
    with pytest.raises(ValueError, match=f"unknown backend '{backend}'; expected one of numpy, torch"):
        tnlayers.report(SPEC, 32, backend=backend)


@pytest.mark.parametrize("length", [1, 5, 10])
def test_numpy_layer_rejects_a_bias_of_the_wrong_length(length: int) -> None:
    cores = tnlayers.init_cores(SPEC, seed=0)
    with pytest.raises(ValueError, match=rf"bias must have shape \(6,\), got \({length},\)"):
        NumpyMPOLinear.from_cores(cores, np.zeros(length, np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_numpy_layer_rejects_integer_cores(dtype: Any) -> None:
    cores = [c.astype(dtype) for c in tnlayers.init_cores(SPEC, seed=0)]
    with pytest.raises(TypeError, match=f"cores must hold floating-point numbers, got dtype {np.dtype(dtype)}"):
        NumpyMPOLinear.from_cores(cores)


def test_a_checkpoint_whose_dtype_was_edited_to_integers_is_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = tmp_path / "layer.safetensors"
    tnlayers.save(path, tnlayers.init_cores(SPEC, seed=0), np.zeros(6, np.float32))
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file({key: value.astype(np.int32) for key, value in tensors.items()}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"TypeError: layer 'mpo' holds int32 tensors; MPO weights are floating"):
        tnlayers.load(path)


@pytest.mark.parametrize("make", ["linear", "conv"])
def test_torch_layers_check_the_input_device(make: str) -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOConv2d, MPOLinear

    layer = MPOLinear((2, 3), (3, 2), 2) if make == "linear" else MPOConv2d(1, 2, 3, rank=2)
    shape = (4, 6) if make == "linear" else (1, 1, 5, 5)
    x = torch.empty(shape, device="meta")  # a CPU layer used to return uninitialised CPU memory here
    with pytest.raises(ValueError, match=r"has its weights on cpu but the input is on meta; use x.to\('cpu'\)"):
        layer(x)


@pytest.mark.parametrize("scale", [1e-170, 1e-40, 1e40, 1e170])
def test_from_dense_reports_the_true_error_at_extreme_magnitudes(scale: float) -> None:
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(24, 12))
    cores, report = tnlayers.from_dense(matrix * scale, (2, 3, 4), (3, 2, 2), tol=0.5)
    rebuilt = tnlayers.to_dense([c / scale ** (1 / 3) for c in cores])  # back to unit scale, in float64
    measured = np.linalg.norm(rebuilt - matrix) / np.linalg.norm(matrix)
    assert 0 < report.relative_error <= 0.5 and report.relative_error == pytest.approx(measured, rel=1e-9)
    _, unscaled = tnlayers.from_dense(matrix, (2, 3, 4), (3, 2, 2), tol=0.5)
    assert report.ranks == unscaled.ranks
    np.testing.assert_allclose(report.singular_values[0] / scale, unscaled.singular_values[0], rtol=1e-9)


@pytest.mark.parametrize("scale", [1e-40, 1e40])
def test_truncate_works_on_cores_at_extreme_magnitudes(scale: float) -> None:
    cores = tnlayers.init_cores(tnlayers.MPOSpec((2, 3, 4), (3, 2, 2), 4), seed=0, dtype=np.float64)
    out, report = tnlayers.truncate([c * scale for c in cores], max_rank=2)
    reference, expected = tnlayers.truncate(cores, max_rank=2)
    assert report.ranks == expected.ranks and report.relative_error == pytest.approx(expected.relative_error)
    np.testing.assert_allclose(
        tnlayers.to_dense([c / scale for c in out]), tnlayers.to_dense(reference), rtol=1e-9, atol=1e-12
    )


def test_compress_replaces_a_shared_module_everywhere_and_leaves_tied_weights_alone() -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear, compress

    torch.manual_seed(0)
    shared = torch.nn.Linear(256, 256)
    low_rank = tnlayers.to_dense(tnlayers.init_cores(tnlayers.MPOSpec((4,) * 4, (4,) * 4, 2), seed=0))
    with torch.no_grad():
        shared.weight.copy_(torch.from_numpy(low_rank.T))
    model = torch.nn.ModuleDict({"a": shared, "b": shared})  # one layer under two names
    x = torch.randn(4, 256)
    report = compress(model, rank=2, n_cores=4)  # exact: the weight has TT ranks 2
    assert isinstance(model["a"], MPOLinear) and model["a"] is model["b"] and len(report.layers) == 1
    torch.testing.assert_close(model["b"](x), shared(x), rtol=1e-4, atol=1e-4)

    first, second = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    second.weight = first.weight  # tied
    tied = torch.nn.Sequential(first, second)
    before = sum(p.numel() for p in tied.parameters())
    report = compress(tied, rank=4)
    assert not report.layers and all(isinstance(m, torch.nn.Linear) for m in tied)
    assert [reason for _, reason in report.skipped] == [
        "its weight is tied to another layer's; an MPO of it would break the tie"
    ] * 2
    assert sum(p.numel() for p in tied.parameters()) == before and tied[1].weight is tied[0].weight
