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


# Mutants of checkpoint.py that survived `make mutate` (docs/testing.md), each killed here.
def test_a_save_that_fails_while_writing_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.numpy

    path = tmp_path / "keep.safetensors"
    cores = tnlayers.init_cores(SPEC, seed=0)
    tnlayers.save(path, cores)
    before = path.read_bytes()
    written: list[Path] = []

    def failing_save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        written.append(Path(filename))
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        tnlayers.save(path, cores)
    (temporary,) = written
    assert temporary.parent == tmp_path and temporary.suffix == ".tmp"  # beside the target: os.replace is atomic
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_bfloat16_arrays_are_saved_widened_to_float32_exactly(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cores = [c.astype(ml_dtypes.bfloat16) for c in tnlayers.init_cores(SPEC, seed=0)]
    tnlayers.save(tmp_path / "bf16.safetensors", cores, np.ones(SPEC.out_features, dtype=ml_dtypes.bfloat16))
    loaded = tnlayers.load(tmp_path / "bf16.safetensors")
    for got, saved in zip(loaded.cores, cores):
        assert got.dtype == np.float32 and np.array_equal(got, saved.astype(np.float32))
    assert loaded.bias is not None and loaded.bias.dtype == np.float32 and np.all(loaded.bias == 1)


class _Unreadable:
    """Has a shape, but no values to give."""

    def __init__(self, shape: tuple[int, ...] = (24,)) -> None:
        self.shape = shape

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise ValueError("no values here")


@pytest.mark.parametrize(
    ("cores", "bias", "error", "message"),
    [
        ("unreadable core", None, TypeError, r"^core 0 of layer 'mpo' must be array-like, got _Unreadable: no values"),
        ("spec", "unreadable bias", TypeError, r"^bias of layer 'mpo' must be array-like, got _Unreadable"),
        ("spec", np.zeros(3), ValueError, r"^bias of layer 'mpo' must have shape \(24,\), got \(3,\)$"),
    ],
    ids=["core not array-like", "bias not array-like", "bias of the wrong length"],
)
def test_save_names_the_tensor_it_cannot_write(
    tmp_path: Path, cores: Any, bias: Any, error: type[Exception], message: str
) -> None:
    values: list[Any] = tnlayers.init_cores(SPEC, seed=0)
    if cores == "unreadable core":
        values[0] = _Unreadable(values[0].shape)
    with pytest.raises(error, match=message):
        tnlayers.save(tmp_path / "x.safetensors", values, _Unreadable() if isinstance(bias, str) else bias)


def test_save_layers_says_what_it_got_instead_of_a_pair(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^layer 'fc' must be given as \(cores, bias\), got list$"):
        tnlayers.save_layers(tmp_path / "x.safetensors", {"fc": [tnlayers.init_cores(SPEC, seed=0), None]})


def test_bonds_above_the_exact_maximum_load_as_saved(tmp_path: Path) -> None:
    """A checkpoint may hold redundant bonds (rank 8 where 4 is exact): loading never clips them."""
    rng = np.random.default_rng(0)
    cores = [rng.normal(size=(1, 2, 2, 8)).astype(np.float32), rng.normal(size=(8, 2, 2, 1)).astype(np.float32)]
    tnlayers.save(tmp_path / "wide.safetensors", cores)
    loaded = tnlayers.load(tmp_path / "wide.safetensors")
    assert [c.shape for c in loaded.cores] == [(1, 2, 2, 8), (8, 2, 2, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(loaded.cores, cores))


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        (np.zeros(5, np.float32), r"layer 'mpo': bias shape \(5,\) does not match 24$"),
        (np.zeros(24, np.int32), r"layer 'mpo' holds int32 tensors; MPO weights are floating point$"),
    ],
    ids=["bias of the wrong length", "integer bias"],
)
def test_a_checkpoint_whose_bias_was_edited_is_refused_naming_it(
    tmp_path: Path, bias: np.ndarray, message: str
) -> None:
    from safetensors import safe_open

    path = tmp_path / "edited.safetensors"
    tnlayers.save(path, tnlayers.init_cores(SPEC, seed=0), np.zeros(24, np.float32))
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    _write(path, {**tensors, "mpo.bias": bias}, metadata)
    with pytest.raises(ValueError, match=rf"is not a valid tnlayers checkpoint: \w+: {message}"):
        tnlayers.load(path)
