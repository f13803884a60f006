"""Checkpoints: safetensors round trips, several layers per file, portability, and clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, dense_reference
from safetensors.numpy import save_file

import tnlayers

SPEC = tnlayers.MPOSpec((2, 3, 4), (4, 3, 2), (3, 5))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_roundtrip_is_bit_exact(tmp_path: Path, dtype) -> None:
    cores = tnlayers.init_cores(SPEC, seed=0, dtype=dtype)
    bias = np.arange(SPEC.out_features, dtype=dtype)
    tnlayers.save(tmp_path / "a.safetensors", cores, bias)
    loaded = tnlayers.load(tmp_path / "a.safetensors")
    assert loaded.spec == SPEC
    for a, b in zip(loaded.cores, cores):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(loaded.bias, bias)
    cores_again, bias_again = loaded  # unpacks as (cores, bias)
    assert bias_again is loaded.bias and cores_again is loaded.cores


def test_no_bias_and_several_layers(tmp_path: Path) -> None:
    first = tnlayers.init_cores(SPEC, seed=1)
    second = tnlayers.init_cores(tnlayers.MPOSpec((4, 7), (2, 5), 3), seed=2)
    path = tmp_path / "model.safetensors"
    head_bias = np.linspace(-1, 1, 10).astype(np.float32)
    tnlayers.save_layers(path, {"encoder.fc1": (first, None), "head": (second, head_bias)})
    layers = tnlayers.load_layers(path)
    assert list(layers) == ["encoder.fc1", "head"]
    assert layers["encoder.fc1"].bias is None and np.array_equal(layers["head"].bias, head_bias)
    for name, saved in (("encoder.fc1", first), ("head", second)):  # every core of every layer, bit-exact
        for loaded in (layers[name].cores, tnlayers.load(path, name).cores):
            assert len(loaded) == len(saved)
            assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(loaded, saved))
    with pytest.raises(ValueError, match="holds 2 layers"):
        tnlayers.load(path)
    with pytest.raises(KeyError, match="no layer 'missing'"):
        tnlayers.load(path, "missing")


def test_the_file_is_plain_safetensors_with_the_spec_in_its_metadata(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    tnlayers.save(path, tnlayers.init_cores(SPEC, seed=0))
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    layers = json.loads(header["__metadata__"]["layers"])
    assert layers == [
        {"name": "mpo", "in_modes": [2, 3, 4], "out_modes": [4, 3, 2], "ranks": [1, 3, 5, 1], "bias": False}
    ]
    assert header["mpo.core.1"]["shape"] == [3, 3, 3, 5] and header["mpo.core.1"]["dtype"] == "F32"


def test_saving_torch_tensors_loads_in_numpy_with_the_same_outputs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    cores = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in SPEC.core_shapes]
    bias = torch.randn(SPEC.out_features, dtype=torch.float64)
    x = np.random.default_rng(0).normal(size=(5, SPEC.in_features))
    y_torch = tnlayers.contract(torch.from_numpy(x), cores, bias).detach().numpy()
    tnlayers.save(tmp_path / "t.safetensors", cores, bias)
    loaded = tnlayers.load(tmp_path / "t.safetensors")
    assert_close(tnlayers.contract(x, loaded.cores, loaded.bias), y_torch, np.float64)
    assert_close(x @ dense_reference(loaded.cores) + loaded.bias, y_torch, np.float64)


def test_an_existing_checkpoint_survives_a_failed_save(tmp_path: Path) -> None:
    path = tmp_path / "keep.safetensors"
    cores = tnlayers.init_cores(SPEC, seed=0)
    tnlayers.save(path, cores)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"core 2 of layer 'mpo' must hold floating-point numbers, got dtype int32"):
        tnlayers.save(path, [*cores[:-1], np.zeros(cores[-1].shape, dtype=np.int32)])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def _write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, Any] | None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        tnlayers.load(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ValueError, match="not a valid tnlayers checkpoint"):
        tnlayers.load(garbage)
    core = np.zeros((1, 2, 2, 1), np.float32)
    no_meta = _write(tmp_path / "nometa.safetensors", {"mpo.core.0": core}, None)
    with pytest.raises(ValueError, match="metadata format"):
        tnlayers.load(no_meta)
    good_meta = {"format": "tnlayers.mpo", "format_version": "1"}
    layer = {"name": "mpo", "in_modes": [2], "out_modes": [2], "ranks": [1, 1], "bias": False}
    missing = _write(tmp_path / "missing.safetensors", {"other": core}, {**good_meta, "layers": json.dumps([layer])})
    with pytest.raises(ValueError, match="KeyError"):
        tnlayers.load(missing)
    wrong_shape = {**layer, "in_modes": [3]}
    mismatch = _write(
        tmp_path / "mismatch.safetensors", {"mpo.core.0": core}, {**good_meta, "layers": json.dumps([wrong_shape])}
    )
    with pytest.raises(ValueError, match="do not match"):
        tnlayers.load(mismatch)
    newer = _write(
        tmp_path / "newer.safetensors", {"mpo.core.0": core}, {**good_meta, "format_version": "9", "layers": "[]"}
    )
    with pytest.raises(ValueError, match="format_version"):
        tnlayers.load(newer)
    extra = _write(
        tmp_path / "extra.safetensors",
        {"mpo.core.0": core, "stowaway": core},
        {**good_meta, "layers": json.dumps([layer])},
    )
    with pytest.raises(ValueError, match="stowaway"):
        tnlayers.load(extra)
