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
