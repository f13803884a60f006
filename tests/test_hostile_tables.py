"""The hostile-input tables of the reliability issue: every entry point, pushed as careless users and attackers do.

Each case asserts a specific exception (or warning) type and words of its message. Groups: arguments,
messages for inputs of the wrong kind, checkpoints (truncated, tampered, lying metadata, integer dtypes,
deep nesting, pickle payloads), the autotune cache (hostile entries, races), datasets (corrupt deflate,
bombs, overflowing headers; the memory-hungry ones in a subprocess under a memory cap), torch and Keras
specifics, and the command line. ``test_errors.py`` holds the core's argument table; together they are
the hostile suite (see docs/testing.md).
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import dense_reference
from tnlayers.apps.cli import main as cli_main
from tnlayers.backends.numpy import MPOLinear as NumpyMPOLinear

import tnlayers
from tnlayers.autotune import Autotuner
from tnlayers.datasets import load_mnist, read_idx

SPEC = tnlayers.MPOSpec((2, 3), (3, 2), 2)
CORES = tnlayers.init_cores(SPEC, seed=0)
KEY = ("numpy", "cpu", "float32", "none")

Case = tuple[str, Callable[[], Any], type[Exception], str]


def _raises(cases: list[Case]) -> Any:
    return pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in cases], ids=[c[0] for c in cases])


# --- arguments and messages of the core -----------------------------------------------------------------

TEN = tnlayers.MPOSpec((2,) * 10, (2,) * 10, 4)
CORE_CASES: list[Case] = [
    ("optimal on 10 cores", lambda: tnlayers.plan(TEN, 1, "optimal"), ValueError, "limited to 8 cores.*'dp'"),
    ("OPTIMAL on 10 cores", lambda: tnlayers.plan(TEN, 1, "OPTIMAL"), ValueError, "limited to 8 cores"),
    (
        "a layer of 10 cores with optimal",
        lambda: NumpyMPOLinear((2,) * 10, (2,) * 10, 4, strategy="optimal"),
        ValueError,
        "limited to 8 cores",
    ),
    (
        "branch-all on 12 cores",
        lambda: tnlayers.plan(tnlayers.MPOSpec((2,) * 12, (2,) * 12, 4), 1, "branch-all"),
        ValueError,
        "limited to 10 cores",
    ),
    ("plan gradients typo", lambda: tnlayers.plan(SPEC, 8, gradients="both"), ValueError, "gradients must be one of"),
    ("plan of a non-spec", lambda: tnlayers.plan((2, 3), 8), TypeError, "spec must be an MPOSpec, got tuple"),
    ("plan float batch", lambda: tnlayers.plan(SPEC, 2.5), TypeError, "batch_size must be an integer, got 2.5"),
    ("plan bool path step", lambda: tnlayers.plan(SPEC, 8, [(0, True), (0, 1)]), ValueError, "pairs of ints"),
    ("report of a string", lambda: tnlayers.report("4x4"), TypeError, "MPO layer or a list of cores.*str '4x4'"),
    ("report of an int", lambda: tnlayers.report(12), TypeError, "MPO layer or a list of cores.*int 12"),
    ("report backend typo", lambda: tnlayers.report(SPEC, 8, backend="pytorch"), ValueError, "unknown backend"),
    ("draw_ascii of an int", lambda: tnlayers.draw_ascii(12), TypeError, "list of cores.*got int 12"),
    ("draw_ascii of a string", lambda: tnlayers.draw_ascii("4x4"), TypeError, "got str '4x4'"),
    ("draw_ascii of None", lambda: tnlayers.draw_ascii(None), TypeError, "got NoneType"),
    ("to_dense of a string", lambda: tnlayers.to_dense("abc"), TypeError, "list or tuple of 4-D arrays"),
    ("entanglement of a dict", lambda: tnlayers.entanglement({"a": 1}), TypeError, "4-D"),
    ("truncate rank 0", lambda: tnlayers.truncate(CORES, max_rank=0), ValueError, "max_rank must be >= 1, got 0"),
    ("truncate negative tol", lambda: tnlayers.truncate(CORES, tol=-0.1), ValueError, "tol"),
    (
        "truncate NaN core",
        lambda: tnlayers.truncate([np.full((1, 2, 3, 1), np.nan)]),
        ValueError,
        "NaN or infinite",
    ),
    (
        "from_dense inf entries",
        lambda: tnlayers.from_dense(np.full((6, 6), np.inf), (2, 3), (3, 2)),
        ValueError,
        "infinite",
    ),
    ("from_dense tol nan", lambda: tnlayers.from_dense(np.ones((6, 6)), (2, 3), (3, 2), tol=np.nan), ValueError, "tol"),
    (
        "from_dense string matrix",
        lambda: tnlayers.from_dense("abc", (2, 3), (3, 2)),
        (TypeError, ValueError),  # type: ignore[list-item]
        "matrix",
    ),
    ("init std inf", lambda: tnlayers.init_cores(SPEC, "normal", std=float("inf")), ValueError, "positive finite"),
    ("init negative seed", lambda: tnlayers.init_cores(SPEC, seed=-1), ValueError, "seed"),
    ("save empty name", lambda: tnlayers.save("/tmp/never.safetensors", CORES, name=""), ValueError, "non-empty"),
    ("save no layers", lambda: tnlayers.save_layers("/tmp/never.safetensors", {}), ValueError, "non-empty mapping"),
    (
        "save layer not a pair",
        lambda: tnlayers.save_layers("/tmp/never.safetensors", {"a": CORES}),  # type: ignore[dict-item]
        TypeError,
        r"layer 'a' must be given as \(cores, bias\)",
    ),
    ("load missing file", lambda: tnlayers.load("/nonexistent/x.safetensors"), FileNotFoundError, "no checkpoint"),
]


@_raises(CORE_CASES)
def test_core_refuses_with_a_clear_message(call: Callable[[], Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


# --- checkpoints ------------------------------------------------------------------------------------------


def _safetensors(header: dict[str, Any], data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    """The bytes of a safetensors file: little-endian header length, JSON header, data."""
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _metadata(layers: Any, **extra: str) -> dict[str, str]:
    text = layers if isinstance(layers, str) else json.dumps(layers)
    return {"format": "tnlayers.mpo", "format_version": "1", "layers": text, **extra}


ONE_CORE = {"name": "mpo", "in_modes": [2], "out_modes": [2], "ranks": [1, 1], "bias": False}
CORE_BYTES = np.ones(4, "<f4").tobytes()


def _file(header: dict[str, Any], data: bytes = CORE_BYTES) -> bytes:
    return _safetensors(header, data)


def _core_entry(dtype: str = "F32", shape: tuple[int, ...] = (1, 2, 2, 1), end: int = 16) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [0, end]}


class _Payload:
    """A pickle that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


CHECKPOINT_CASES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("empty file", lambda _: b"", "not a readable safetensors"),
    ("truncated header length", lambda _: b"\x10\x00", "not a readable safetensors"),
    ("header length beyond the file", lambda _: struct.pack("<Q", 10**12) + b"{}", "not a readable safetensors"),
    ("header not JSON", lambda _: _safetensors({}, raw_header=b"{not json"), "not a readable safetensors"),
    (
        "data cut short",
        lambda _: _file({"mpo.core.0": _core_entry(), "__metadata__": _metadata([ONE_CORE])}, CORE_BYTES[:8]),
        "not a readable safetensors",
    ),
    (
        "offsets past the data",
        lambda _: _file({"mpo.core.0": _core_entry(end=64), "__metadata__": _metadata([ONE_CORE])}),
        "not a readable safetensors",
    ),
    ("no metadata", lambda _: _file({"mpo.core.0": _core_entry()}), "metadata format is None"),
    (
        "foreign format",
        lambda _: _file({"mpo.core.0": _core_entry(), "__metadata__": {"format": "pt"}}),
        "metadata format is 'pt'",
    ),
    (
        "future version",
        lambda _: _file({"mpo.core.0": _core_entry(), "__metadata__": _metadata([ONE_CORE], format_version="9")}),
        "format_version '9' is not supported",
    ),
    (
        "layers not JSON",
        lambda _: _file({"mpo.core.0": _core_entry(), "__metadata__": _metadata("[{")}),
        "JSONDecodeError",
    ),
    (
        "deeply nested layers",
        lambda _: _file({"mpo.core.0": _core_entry(), "__metadata__": _metadata("[" * 50_000 + "]" * 50_000)}),
        "RecursionError",
    ),
    (
        "metadata lies about the shape",
        lambda _: _file(
            {"mpo.core.0": _core_entry(), "__metadata__": _metadata([{**ONE_CORE, "in_modes": [4], "out_modes": [1]}])}
        ),
        "do not match",
    ),
    (
        "metadata promises a bias",
        lambda _: _file({"mpo.core.0": _core_entry(), "__metadata__": _metadata([{**ONE_CORE, "bias": True}])}),
        "KeyError",
    ),
    (
        "metadata names a missing core",
        lambda _: _file(
            {
                "mpo.core.0": _core_entry(),
                "__metadata__": _metadata(
                    [{"name": "mpo", "in_modes": [2, 1], "out_modes": [2, 1], "ranks": [1, 1, 1], "bias": False}]
                ),
            }
        ),
        "KeyError",
    ),
    (
        "tensor the metadata does not describe",
        lambda _: _file(
            {
                "mpo.core.0": _core_entry(),
                "evil": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]},
                "__metadata__": _metadata([ONE_CORE]),
            },
            CORE_BYTES + b"\x00" * 4,
        ),
        "tensors not described by the metadata",
    ),
    (
        "integer cores",
        lambda _: _file({"mpo.core.0": _core_entry("I32"), "__metadata__": _metadata([ONE_CORE])}),
        "holds int32 tensors",
    ),
    (
        "metadata ranks of a wrong type",
        lambda _: _file({"mpo.core.0": _core_entry(), "__metadata__": _metadata([{**ONE_CORE, "ranks": "1,1"}])}),
        "ranks",
    ),
    ("a torch pickle", lambda marker: pickle.dumps({"mpo.core.0": _Payload(marker)}), "not a readable safetensors"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_bad_checkpoint_is_refused_naming_the_file_and_never_runs_code(
    tmp_path: Path, make: Callable[[Path], bytes], message: str
) -> None:
    marker = tmp_path / "pickle-ran"
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(make(marker))
    with pytest.raises(ValueError, match=message) as caught:
        tnlayers.load(path)
    assert str(path) in str(caught.value)
    assert not marker.exists()


def test_a_bfloat16_checkpoint_from_another_writer_loads_widened_to_float32(tmp_path: Path) -> None:
    """BF16 tensors (as safetensors.torch writes them) load as the float32 values they hold, exactly."""
    pytest.importorskip("ml_dtypes")
    values = np.array([1.0, -2.0, 0.5, 3.0], np.float32)  # exact in bfloat16: its upper 16 bits
    data = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(_file({"mpo.core.0": _core_entry("BF16", end=8), "__metadata__": _metadata([ONE_CORE])}, data))
    cores, bias = tnlayers.load(path)
    assert cores[0].dtype == np.float32 and bias is None
    np.testing.assert_array_equal(cores[0].reshape(-1), values)


# --- the autotune cache ----------------------------------------------------------------------------------


def _cache_with_path(path_text: str) -> str:
    from tnlayers.autotune import _entry_key

    key = json.dumps(_entry_key(SPEC, 8, KEY))
    return f'{{"version": 1, "entries": {{{key}: {{"path": {path_text}, "method": "m"}}}}}}'


HOSTILE_ENTRIES = {
    "overflowing float": "[[0, 1e400], [0, 1]]",
    "huge int": f"[[0, {10**30}], [0, 1]]",
    "negative index": "[[0, -1], [0, 1]]",
    "float index": "[[0, 1.5], [0, 1]]",
    "bool index": "[[0, true], [0, 1]]",
    "string index": '[["0", "1"], [0, 1]]',
    "triple": "[[0, 1, 2], [0, 1]]",
    "too short": "[[0, 1]]",
    "not a list": '"zipper"',
    "nested deeply": "[" * 20_000 + "]" * 20_000,
    "null": "null",
}


@pytest.mark.parametrize("text", HOSTILE_ENTRIES.values(), ids=HOSTILE_ENTRIES.keys())
def test_a_hostile_cache_entry_is_ignored_with_a_warning(tmp_path: Path, text: str) -> None:
    path = tmp_path / "autotune.json"
    path.write_text(_cache_with_path(text))
    with pytest.warns(UserWarning, match="ignoring (a malformed autotune cache entry|the corrupt autotune cache)"):
        assert Autotuner(path).cached(SPEC, 8, KEY) is None


HOSTILE_FILES = {
    "not JSON": b"{",
    "binary": b"\xff\xfe\x00garbage",
    "a list": b"[]",
    "old version": b'{"version": 0, "entries": {}}',
    "entries a list": b'{"version": 1, "entries": []}',
    "nested deeply": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("content", HOSTILE_FILES.values(), ids=HOSTILE_FILES.keys())
def test_a_corrupt_cache_file_is_ignored_and_a_layer_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    from tnlayers.backends.numpy import MPOLinear

    from tnlayers.autotune import default_tuner

    (tmp_path / "autotune.json").write_bytes(content)
    monkeypatch.setenv("TNLAYERS_CACHE_DIR", str(tmp_path))
    default_tuner.cache_clear()
    try:
        layer = MPOLinear((2, 3), (3, 2), 2, strategy="autotune", seed=0)
        x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
        with pytest.warns(UserWarning, match="ignoring the corrupt autotune cache"):
            y = layer(x)
        np.testing.assert_allclose(y, x @ tnlayers.to_dense(layer.cores) + layer.bias, rtol=1e-4, atol=1e-5)
        assert json.loads((tmp_path / "autotune.json").read_text())["version"] == 1  # rewritten, valid
    finally:
        default_tuner.cache_clear()


def _quick_run(_: Any) -> Callable[[], object]:
    return lambda: None


def _tune_distinct_entries(path: Path, first: int, count: int) -> None:
    """Tune ``count`` entries of their own: batch buckets ``2**first ... 2**(first+count-1)``."""
    tuner = Autotuner(path)
    for power in range(first, first + count):
        tuner.tune(SPEC, 2**power, _quick_run, KEY, top=2, repeats=1)


def test_threads_tuning_one_file_lose_no_entry_and_leave_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "autotune.json"
    threads = [threading.Thread(target=_tune_distinct_entries, args=(path, 3 * k, 3)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(json.loads(path.read_text())["entries"]) == 12
    assert not list(tmp_path.glob("*.tmp"))


def test_processes_tuning_one_file_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "autotune.json"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_hostile_tables import _tune_distinct_entries
        _tune_distinct_entries(Path({str(path)!r}), int(sys.argv[1]), 6)
        """
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, str(6 * k)]) for k in range(4)]
    assert [worker.wait(timeout=120) for worker in workers] == [0] * 4
    assert len(json.loads(path.read_text())["entries"]) == 24
    assert not list(tmp_path.glob("*.tmp"))


# --- datasets --------------------------------------------------------------------------------------------


def _idx(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _mnist_folder(root: Path, images: bytes, labels: bytes) -> Path:
    root.mkdir(exist_ok=True)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    return root


GOOD_IMAGES = np.zeros((3, 28, 28), np.uint8)
GOOD_LABELS = np.array([0, 1, 9], np.uint8)
MNIST_CASES: list[tuple[str, bytes, bytes, str]] = [
    ("5x5 images", _idx(np.zeros((3, 5, 5), np.uint8), 0x08), _idx(GOOD_LABELS, 0x08), r"shape \(N, 28, 28\)"),
    ("float pixels", _idx(np.zeros((3, 28, 28), np.float32), 0x0D), _idx(GOOD_LABELS, 0x08), "uint8 images"),
    ("label 200", _idx(GOOD_IMAGES, 0x08), _idx(np.array([0, 200, 1], np.uint8), 0x08), "digits 0-9, found 200"),
    ("too few labels", _idx(GOOD_IMAGES, 0x08), _idx(GOOD_LABELS[:2], 0x08), "expected 3 uint8 labels"),
    ("int32 labels", _idx(GOOD_IMAGES, 0x08), _idx(GOOD_LABELS.astype(np.int32), 0x0C), "uint8 labels"),
    ("labels as images", _idx(GOOD_IMAGES, 0x08), _idx(GOOD_IMAGES, 0x08), "uint8 labels"),
]


@pytest.mark.parametrize(("images", "labels", "message"), [c[1:] for c in MNIST_CASES], ids=[c[0] for c in MNIST_CASES])
def test_load_mnist_refuses_files_that_are_not_mnist(
    tmp_path: Path, images: bytes, labels: bytes, message: str
) -> None:
    folder = _mnist_folder(tmp_path / "data", images, labels)
    with pytest.raises(ValueError, match=message):
        load_mnist(folder, "test")


def test_load_mnist_reads_a_well_formed_folder(tmp_path: Path) -> None:
    """The positive control of the table above: the same builder, right contents, loads exactly."""
    pixels = np.arange(3 * 784, dtype=np.int64).reshape(3, 28, 28) % 256
    folder = _mnist_folder(tmp_path / "data", _idx(pixels.astype(np.uint8), 0x08), _idx(GOOD_LABELS, 0x08))
    images, labels = load_mnist(folder, "test")
    np.testing.assert_array_equal(images, (pixels.reshape(3, 784) / 255).astype(np.float32))
    np.testing.assert_array_equal(labels, [0, 1, 9])


def _corrupt_deflate() -> bytes:
    good = gzip.compress(_idx(GOOD_IMAGES, 0x08))
    return good[:10] + bytes(b ^ 0x5A for b in good[10:-8]) + good[-8:]


IDX_CASES: list[tuple[str, bytes, str]] = [
    ("corrupt deflate", _corrupt_deflate(), "not a readable IDX file"),
    ("not gzip at all", b"PK\x03\x04 a zip", "not a readable IDX file"),
    ("bad magic", gzip.compress(b"\x01\x02\x03\x04"), "bad magic number"),
    ("unknown type code", gzip.compress(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7])), "bad magic number"),
    ("header cut in the dimensions", gzip.compress(bytes([0, 0, 8, 3, 0, 0])), "header ends after 0 of 3"),
    ("header product overflows int64", gzip.compress(bytes([0, 0, 8, 4]) + b"\xff\xff\xff\xff" * 4), "max_bytes"),
    ("data short", gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9]) + b"\x01" * 4), "4 data bytes, expected 9"),
    ("trailing data", gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2]) + b"\x01" * 9), r"3 data bytes\+, expected 2"),
]


@pytest.mark.parametrize(("content", "message"), [c[1:] for c in IDX_CASES], ids=[c[0] for c in IDX_CASES])
def test_read_idx_refuses_corrupt_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "file-idx1-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_download_refetches_a_corrupt_local_file_instead_of_crashing(tmp_path: Path) -> None:
    from tnlayers.datasets import _already_verified

    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(_corrupt_deflate())
    assert _already_verified(path, "0" * 64) is False  # not a zlib.error: download fetches it again


def test_download_refuses_a_mirror_serving_corrupt_deflate(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for stem in tnlayers.datasets.DATASETS["mnist"]["sha256"]:
        (mirror / f"{stem}.gz").write_bytes(_corrupt_deflate())
    target = tmp_path / "data"
    with pytest.raises(ValueError, match="is not a gzip file"):
        tnlayers.datasets.download(target, base_url=mirror.as_uri())
    assert not list(target.iterdir())  # nothing half-written is left


BOMBS = {
    # a header declaring 4 GiB: refused before anything past it is inflated
    "declares 4 GiB": "gzip.compress(bytes([0, 0, 8, 1]) + (1 << 32).to_bytes(8, 'big')[4:] + b'\\0' * 1000)",
    # a header declaring 4 bytes, followed by 800 MB of zeros (an 800 kB file): only 5 bytes are inflated
    "small header, 800 MB of zeros": "bomb()",
}


@pytest.mark.parametrize("make", BOMBS.values(), ids=BOMBS.keys())
def test_a_gzip_bomb_fails_cleanly_under_a_memory_cap(tmp_path: Path, make: str) -> None:
    """Run in a subprocess capped at 512 MiB of address space: a regression that inflates the whole
    file fails this test with a MemoryError instead of taking CI down."""
    script = textwrap.dedent(
        f"""
        import gzip, resource, zlib
        from pathlib import Path

        def bomb():
            packer = zlib.compressobj(9, zlib.DEFLATED, 31)
            chunks = [packer.compress(bytes([0, 0, 8, 1, 0, 0, 0, 4]))]
            zeros = bytes(1 << 24)
            chunks += [packer.compress(zeros) for _ in range(48)]
            return b"".join(chunks) + packer.flush()

        path = Path({str(tmp_path / "bomb-idx1-ubyte.gz")!r})
        path.write_bytes({make})
        from tnlayers.datasets import read_idx
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
        try:
            read_idx(path)
        except ValueError as err:
            print("refused:", err)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "bomb-idx1-ubyte.gz" in done.stdout


# --- torch -----------------------------------------------------------------------------------------------

KitCase = tuple[str, Callable[[Any], Any], type[Exception], str]
"""A case whose call takes the framework kit (a namespace of the framework's module and ready layers)."""


@pytest.fixture(scope="module")
def torch_kit() -> Any:
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from tnlayers.backends.torch import MPOConv2d, MPOLinear, compress

    return SimpleNamespace(
        torch=torch,
        MPOLinear=MPOLinear,
        MPOConv2d=MPOConv2d,
        compress=compress,
        layer=MPOLinear((2, 3), (3, 2), 2),
        conv=MPOConv2d(2, 3, 3, in_modes=(2, 3, 3), out_modes=(1, 3, 1), rank=2),
        meta=torch.nn.Sequential(torch.nn.Linear(256, 256)).to("meta"),
    )


TORCH_CASES: list[KitCase] = [
    ("int64 dtype", lambda t: t.MPOLinear((2, 3), (3, 2), 2, dtype=t.torch.int64), TypeError, "floating-point"),
    ("bool dtype", lambda t: t.MPOLinear((2, 3), (3, 2), 2, dtype=t.torch.bool), TypeError, "torch.bool"),
    ("numpy dtype", lambda t: t.MPOLinear((2, 3), (3, 2), 2, dtype=np.float32), TypeError, "torch.dtype"),
    ("conv int32 dtype", lambda t: t.MPOConv2d(2, 3, 3, rank=2, dtype=t.torch.int32), TypeError, "floating-point"),
    ("compress on meta", lambda t: t.compress(t.meta, rank=4), ValueError, "layer '0' is on the meta device"),
    ("compress of a non-module", lambda t: t.compress([1, 2], rank=4), TypeError, "nn.Module, got list"),
    ("compress without rank or tol", lambda t: t.compress(t.meta), ValueError, "rank=.*tol="),
    ("input on meta", lambda t: t.layer(t.torch.ones(2, 6, device="meta")), ValueError, "input is on meta"),
    ("numpy input", lambda t: t.layer(np.ones((2, 6), np.float32)), TypeError, "torch.Tensor, got ndarray"),
    ("float64 input", lambda t: t.layer(t.torch.ones(2, 6, dtype=t.torch.float64)), TypeError, "torch.float64"),
    ("int input", lambda t: t.layer(t.torch.ones(2, 6, dtype=t.torch.int64)), TypeError, "torch.int64"),
    ("wrong width", lambda t: t.layer(t.torch.ones(2, 5)), ValueError, r"shape \(\.\.\., 6\), got \(2, 5\)"),
    ("0-d input", lambda t: t.layer(t.torch.tensor(1.0)), ValueError, r"got \(\)"),
    ("conv 5-D input", lambda t: t.conv(t.torch.ones(1, 1, 2, 8, 8)), ValueError, r"\(batch, 2, height, width\)"),
    ("conv wrong channels", lambda t: t.conv(t.torch.ones(1, 3, 8, 8)), ValueError, r"got \(1, 3, 8, 8\)"),
    ("conv image below kernel", lambda t: t.conv(t.torch.ones(1, 2, 2, 2)), ValueError, "smaller than the dilated"),
    ("freeze core out of range", lambda t: t.layer.freeze([5]), ValueError, "5"),
    ("unknown strategy", lambda t: t.MPOLinear((2, 3), (3, 2), 2, strategy="bogus"), ValueError, "bogus"),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in TORCH_CASES], ids=[c[0] for c in TORCH_CASES])
def test_torch_refuses_with_a_clear_message(
    torch_kit: Any, call: Callable[[Any], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call(torch_kit)


def test_a_bfloat16_torch_layer_saves_and_loads_exactly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear

    layer = MPOLinear((2, 3), (3, 2), 2, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.bias.normal_()
    layer.save(tmp_path / "bf16.safetensors")
    cores, bias = tnlayers.load(tmp_path / "bf16.safetensors")
    assert all(c.dtype == np.float32 for c in cores)  # widened: bfloat16 -> float32 loses nothing
    for stored, original in zip([*cores, bias], [*layer.cores, layer.bias]):
        np.testing.assert_array_equal(stored, original.detach().float().numpy())
    again = MPOLinear.load(tmp_path / "bf16.safetensors").to(torch.bfloat16)
    for a, b in zip(again.parameters(), layer.parameters()):
        assert torch.equal(a, b)


# --- Keras -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_kit() -> Any:
    pytest.importorskip("keras")
    from types import SimpleNamespace

    from tnlayers.backends.keras import MPOConv2D, MPODense

    dense = MPODense(units=6, rank=2)
    dense(np.zeros((2, 6), np.float32))
    return SimpleNamespace(MPODense=MPODense, MPOConv2D=MPOConv2D, dense=dense, conv=MPOConv2D(8, 5, rank=2))


KERAS_CASES: list[KitCase] = [
    ("built dense, wrong width", lambda k: k.dense(np.zeros((2, 12), np.float32)), ValueError, r"\(\.\.\., 6\)"),
    ("conv kernel larger than image", lambda k: k.conv(np.zeros((1, 3, 3, 4), np.float32)), ValueError, "smaller"),
    ("units 0", lambda k: k.MPODense(units=0), ValueError, "units must be a positive int, got 0"),
    ("neither units nor modes", lambda k: k.MPODense(), ValueError, "units or out_modes"),
    ("filters 0", lambda k: k.MPOConv2D(0, 3), ValueError, "filters must be a positive int, got 0"),
    ("padding full", lambda k: k.MPOConv2D(4, 3, padding="full"), ValueError, "'valid' or 'same', got 'full'"),
    ("strides and dilation", lambda k: k.MPOConv2D(4, 3, strides=2, dilation_rate=2), ValueError, "cannot both"),
    ("unknown kernel_init", lambda k: k.MPODense(units=4, kernel_init="xavier"), ValueError, "xavier"),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in KERAS_CASES], ids=[c[0] for c in KERAS_CASES])
def test_keras_refuses_with_a_clear_message(
    keras_kit: Any, call: Callable[[Any], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call(keras_kit)


# --- the command line ------------------------------------------------------------------------------------

CLI_CASES: dict[str, tuple[list[str], str]] = {
    "ranks 0": (["basics", "--ranks", "0"], "--ranks: expected a positive int, got '0'"),
    "repeats 0": (["basics", "--repeats", "0"], "--repeats: expected a positive int"),
    "batches 0": (["basics", "--batches", "0"], "--batches: expected a positive int"),
    "batches abc": (["basics", "--batches", "abc"], "--batches: expected a positive int, got 'abc'"),
    "negative seed": (["basics", "--seed", "-1"], "--seed: expected a non-negative int"),
    "plan batch 0": (["plan", "4x4", "4x4", "--batch", "0"], "--batch: expected a positive int"),
    "plan rank 0": (["plan", "4x4", "4x4", "--rank", "0"], "--rank: expected a positive int"),
    "plan zero mode": (["plan", "4x0", "4x4"], "modes must be positive ints"),
    "plan words": (["plan", "abc", "4x4"], "like 4x7x7x4, got 'abc'"),
    "plan unknown strategy": (["plan", "4x4", "4x4", "--strategy", "nope"], "unknown strategy 'nope'"),
    "plan optimal too big": (["plan", "x".join("2" * 10), "x".join("2" * 10), "--strategy", "optimal"], "8 cores"),
    "demo epochs 0": (["demo", "--epochs", "0"], "--epochs: expected a positive int"),
    "demo one bond": (["demo", "--bonds", "4"], "--bonds: expected 2 arguments"),
    "no command": ([], "required"),
}


@pytest.mark.parametrize(("argv", "message"), CLI_CASES.values(), ids=CLI_CASES.keys())
def test_the_command_line_refuses_bad_arguments_with_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_a_layer_called_from_threads_at_once_gives_each_caller_its_own_right_answer(framework: str) -> None:
    """Threads with different batch sizes (so different plans, and torch's W cache in eval) share one layer."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(batch, 784)).astype(np.float32) for batch in (1, 7, 64, 300) * 4]
    if framework == "numpy":
        from tnlayers.backends.numpy import MPOLinear

        layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 8, seed=0)
        run, cores, bias = layer, layer.cores, layer.bias
    else:
        torch = pytest.importorskip("torch")
        from tnlayers.backends.torch import MPOLinear as TorchMPOLinear

        module = TorchMPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 8).eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        cores = [c.detach().numpy() for c in module.cores]
        bias = module.bias.detach().numpy()
    weight = dense_reference([c.astype(np.float64) for c in cores])
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(run, inputs))
    for x, y in zip(inputs, outputs):
        np.testing.assert_allclose(y, x @ weight + bias, rtol=1e-4, atol=1e-4)
