"""Reading IDX files, the download with checksum verification (against local files only), synthetic digits."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from tnlayers import datasets
from tnlayers.datasets import download, load_mnist, read_idx, synthetic_digits


def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, written here from the format's definition (not tnlayers code)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_split(folder: Path, images: np.ndarray, labels: np.ndarray, split: str) -> None:
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]  # fmt: skip
    (folder / f"{stems[0]}.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (folder / f"{stems[1]}.gz").write_bytes(gzip.compress(_idx_bytes(labels)))


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    _write_split(tmp_path, images, labels, "train")
    _write_split(tmp_path, images[:2], labels[:2], "test")
    return tmp_path, images, labels


def test_load_mnist_reads_images_and_labels(tiny_mnist: tuple[Path, np.ndarray, np.ndarray]) -> None:
    folder, images, labels = tiny_mnist
    x, y = load_mnist(folder, "train")
    assert x.shape == (5, 784) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), images.reshape(5, 784))
    np.testing.assert_array_equal(y, labels)
    assert load_mnist(folder, "test")[0].shape == (2, 784)


def test_load_mnist_uses_the_environment_variable(
    tiny_mnist: tuple[Path, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TNLAYERS_DATA", str(tiny_mnist[0]))
    assert load_mnist(split="test")[1].tolist() == tiny_mnist[2][:2].tolist()
    monkeypatch.delenv("TNLAYERS_DATA")
    monkeypatch.setattr(datasets, "KNOWN_FOLDERS", {"mnist": (tiny_mnist[0] / "nowhere",)})
    with pytest.raises(FileNotFoundError, match=r"no mnist IDX files found; looked in \$TNLAYERS_DATA \(unset\)"):
        load_mnist()


def test_fashion_mnist_never_reads_the_mnist_variable(
    tiny_mnist: tuple[Path, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TNLAYERS_DATA", str(tiny_mnist[0]))
    monkeypatch.setattr(datasets, "KNOWN_FOLDERS", {"mnist": (), "fashion-mnist": ()})
    assert datasets.find_folder("fashion-mnist") is None  # the same file names: MNIST would pass for it
    assert datasets.find_folder("mnist") == tiny_mnist[0]
    with pytest.raises(FileNotFoundError, match="no mnist IDX files"):
        datasets.find_folder("mnist", tiny_mnist[0] / "empty")


def test_real_mnist_when_present(real_mnist_dir: Path) -> None:
    x, y = load_mnist(real_mnist_dir, "test")
    assert x.shape == (10000, 784) and y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the published first labels
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "bad magic"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated or corrupt"),  # says 5 labels, holds 2
        (b"\x12\x34\x08\x01", "bad magic"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\xff\xff", "truncated or corrupt"),  # trailing bytes
    ],
)
def test_corrupt_idx_files_are_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def test_a_broken_gzip_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.arange(10, dtype=np.uint8)))[:-12])
    with pytest.raises(ValueError, match="not a readable IDX file"):
        read_idx(path)


def test_missing_files_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="'valid'"):
        load_mnist(tmp_path, "valid")


@pytest.fixture
def mirror(tiny_mnist: tuple[Path, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny data set as a 'mirror' folder, registered with its true checksums as data set 'tiny'."""
    folder = tiny_mnist[0]
    checksums = {
        path.name[:-3]: hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() for path in folder.glob("*.gz")
    }
    monkeypatch.setitem(datasets.DATASETS, "tiny", {"url": folder.as_uri(), "sha256": checksums})  # local only
    return folder


def test_download_from_a_local_mirror_verifies_and_writes(mirror: Path, tmp_path: Path) -> None:
    target = tmp_path / "downloaded"
    assert download(target, "tiny", base_url=mirror.as_uri()) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in mirror.glob("*.gz"))
    np.testing.assert_array_equal(load_mnist(target, "train")[0], load_mnist(mirror, "train")[0])
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    download(target, "tiny", base_url=(tmp_path / "nowhere").as_uri())  # all present and verified: no fetch
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_download_rejects_a_wrong_checksum_and_keeps_nothing(mirror: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad_mirror"
    bad.mkdir()
    for path in mirror.glob("*.gz"):
        (bad / path.name).write_bytes(path.read_bytes())
    tampered = gzip.decompress((bad / "train-labels-idx1-ubyte.gz").read_bytes())
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(tampered[:-1] + bytes([(tampered[-1] + 1) % 10])))
    target = tmp_path / "downloaded"
    with pytest.raises(ValueError, match="checksum mismatch"):
        download(target, "tiny", base_url=bad.as_uri())
    assert not (target / "train-labels-idx1-ubyte.gz").exists()
    assert not list(target.glob("*.part"))


def test_download_rejects_a_file_that_is_not_gzip(mirror: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad_mirror"
    bad.mkdir()
    for path in mirror.glob("*.gz"):
        (bad / path.name).write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not a gzip file"):
        download(tmp_path / "downloaded", "tiny", base_url=bad.as_uri())
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        download(tmp_path, "cifar")


def test_the_registered_checksums_match_the_verified_local_copy(real_mnist_dir: Path) -> None:
    for stem, expected in datasets.DATASETS["mnist"]["sha256"].items():
        assert hashlib.sha256(gzip.decompress((real_mnist_dir / f"{stem}.gz").read_bytes())).hexdigest() == expected


def test_synthetic_digits_are_deterministic_and_learnable() -> None:
    x, y = synthetic_digits(2000, seed=3)
    again, _ = synthetic_digits(2000, seed=3)
    np.testing.assert_array_equal(x, again)
    assert x.shape == (2000, 784) and x.min() >= 0 and x.max() <= 1 and set(np.unique(y)) == set(range(10))
    # a nearest-class-mean classifier, fitted on half, must beat chance (10%) by far on the other half
    means = np.stack([x[:1000][y[:1000] == c].mean(0) for c in range(10)])
    predicted = np.argmin(((x[1000:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y[1000:]).mean() > 0.3


# From the mutation run (docs/mutation-survivors.md).


def test_idx_files_named_with_a_dot_are_found(tiny_mnist: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """Some mirrors unpack to ``train-images.idx3-ubyte``: found and read like the ``-idx`` names."""
    folder, images, labels = tiny_mnist
    dotted = tmp_path / "dotted"
    dotted.mkdir()
    for path in folder.glob("*.gz"):
        (dotted / path.name[:-3].replace("-idx", ".idx")).write_bytes(gzip.decompress(path.read_bytes()))
    x, y = load_mnist(dotted, "train")
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), images.reshape(5, 784))
    np.testing.assert_array_equal(y, labels)
    assert datasets.find_folder("mnist", dotted) == dotted
    with pytest.raises(FileNotFoundError, match=r"^train-images-idx3-ubyte\(\.gz\) not found in "):
        datasets._find(tmp_path / "nowhere", "train-images-idx3-ubyte")


def test_find_folder_defaults_to_mnist_and_names_the_datasets(
    tiny_mnist: tuple[Path, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TNLAYERS_DATA", str(tiny_mnist[0]))
    assert datasets.find_folder() == tiny_mnist[0]
    expected = ", ".join(datasets.DATASETS)
    for call in (datasets.find_folder, lambda name: download(None, name)):
        with pytest.raises(ValueError, match=rf"^unknown dataset 'digits'; expected one of {expected}$"):
            call("digits")


def test_resolve_folder_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "KNOWN_FOLDERS", {"mnist": (tmp_path / "a", tmp_path / "b")})
    monkeypatch.setenv("TNLAYERS_DATA", str(tmp_path / "c"))
    looked = f"{tmp_path / 'c'}, {tmp_path / 'a'}, {tmp_path / 'b'}"
    with pytest.raises(FileNotFoundError, match=rf"^no mnist IDX files found; looked in {looked}; pass a folder$"):
        datasets.resolve_folder()


def test_download_into_the_environment_folder_and_what_it_needs(
    mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TNLAYERS_DATA", raising=False)
    with pytest.raises(ValueError, match=r"^pass the folder to download into, or set TNLAYERS_DATA$"):
        download(None, "tiny", base_url=mirror.as_uri())
    nested = tmp_path / "a" / "b"  # folders made as needed
    monkeypatch.setenv("TNLAYERS_DATA", str(nested))
    assert download(None, "tiny", base_url=mirror.as_uri() + "/") == nested
    assert sorted(p.name for p in nested.iterdir()) == sorted(p.name for p in mirror.glob("*.gz"))


def test_download_fetches_what_is_missing_after_a_file_it_keeps(mirror: Path, tmp_path: Path) -> None:
    target = tmp_path / "partial"
    target.mkdir()
    first = sorted(mirror.glob("*.gz"))[0]
    (target / first.name).write_bytes(first.read_bytes())  # already there and verified
    download(target, "tiny", base_url=mirror.as_uri())
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in mirror.glob("*.gz"))


def test_labels_above_nine_and_magic_bytes_are_rejected(tiny_mnist: tuple[Path, np.ndarray, np.ndarray]) -> None:
    folder, _, labels = tiny_mnist
    bad = labels.copy()
    bad[0] = 10
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(bad)))
    with pytest.raises(ValueError, match="labels must be digits 0-9, found 10"):
        load_mnist(folder, "train")
    for magic in (b"\x01\x00\x08\x01", b"\x00\x01\x08\x01"):
        path = folder / "magic-idx1-ubyte"
        path.write_bytes(magic + (1).to_bytes(4, "big") + b"\x05")
        with pytest.raises(ValueError, match="bad magic"):
            read_idx(path)


def test_read_idx_messages_and_the_size_limit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^no IDX file at "):
        read_idx(tmp_path / "missing-idx1-ubyte")
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big"))  # 2 of 3 dimensions
    with pytest.raises(ValueError, match="its header ends after 2 of 3 dimensions"):
        read_idx(path)
    exact = tmp_path / "exact-idx1-ubyte"
    exact.write_bytes(_idx_bytes(np.arange(6, dtype=np.uint8)))
    np.testing.assert_array_equal(read_idx(exact, max_bytes=6), np.arange(6))  # the data at the limit is allowed


def test_synthetic_digits_stay_in_the_frame() -> None:
    images, labels = synthetic_digits(300)
    assert images.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, synthetic_digits(300, seed=0)[0])  # the default seed is 0
    assert set(labels.tolist()) == set(range(10)) and images.min() >= 0.0 and images.max() <= 1.0
    strokes = images.reshape(300, 28, 28) > 0.7  # ink, above most of the noise
    rows = strokes.sum(axis=2) >= 2
    for inked in rows:  # one band of rows: the glyph is drawn top to bottom, never wrapped around
        found = np.flatnonzero(inked)
        assert found.size >= 5 and found[-1] - found[0] <= 22
