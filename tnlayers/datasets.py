"""The MNIST family of data sets: read the standard IDX files (gzip or raw) from a folder, or download them.

Loading never touches the network. :func:`download` is for users who have internet: it fetches the
four files, checks the SHA-256 of their decompressed contents and writes them atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DATASETS",
    "KNOWN_FOLDERS",
    "download",
    "find_folder",
    "load_mnist",
    "read_idx",
    "resolve_folder",
    "synthetic_digits",
]

_IDX_TYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

DATASETS: dict[str, dict[str, Any]] = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        # SHA-256 of the decompressed files of the original release (LeCun, Cortes, Burges)
        "sha256": {
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    },
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        # SHA-256 of the decompressed files of Zalando's release
        "sha256": {
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
    },
}
"""Where each data set can be downloaded from, and the checksums its files must have."""


#: The largest IDX payload :func:`read_idx` inflates (MNIST's training images are 47 MB): a header
#: declaring more, e.g. a gzip bomb's, is refused before anything is decompressed past it.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: str | os.PathLike[str], max_bytes: int = MAX_IDX_BYTES) -> NDArray[Any]:
    """The array stored in one IDX file (``.gz`` files are decompressed). A malformed file is a ``ValueError``.

    The header is read first; at most the size it declares (and never more than ``max_bytes``) is
    decompressed, so a corrupt or hostile file cannot exhaust memory.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no IDX file at {source}")
    opener: Any = gzip.open if source.suffix == ".gz" else open
    try:
        with opener(source, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_TYPES:
                raise ValueError(f"{source} is not an IDX file (bad magic number {magic!r})")
            dtype, ndim = np.dtype(_IDX_TYPES[magic[2]]), magic[3]
            dims = handle.read(4 * ndim)
            shape = tuple(int.from_bytes(dims[4 * k : 4 * k + 4], "big") for k in range(len(dims) // 4))
            expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
            if len(dims) != 4 * ndim:
                raise ValueError(f"{source} is truncated: its header ends after {len(dims) // 4} of {ndim} dimensions")
            if expected > max_bytes:
                raise ValueError(
                    f"{source} declares shape {shape} ({expected:,} bytes), more than max_bytes={max_bytes:,}"
                )
            data = handle.read(expected + 1)  # one byte more tells a file with trailing data
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{source} is not a readable IDX file: {err}") from None
    if len(data) != expected:
        raise ValueError(
            f"{source} is truncated or corrupt: {len(data):,} data bytes{'+' if len(data) > expected else ''}, "
            f"expected {expected:,} for shape {shape}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{stem}(.gz) not found in {folder}")


#: Offline copies looked for when no folder is given: this project's MNIST beside the checkout (as
#: seen from the working directory and from the source tree) and Debian's ``dataset-fashion-mnist``.
KNOWN_FOLDERS: dict[str, tuple[Path, ...]] = {
    "mnist": (Path("../shared/data/mnist"), Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"),
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


def _holds(folder: Path, stem: str) -> bool:
    return any((folder / name).is_file() for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")))


def find_folder(dataset: str = "mnist", folder: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder of ``dataset``'s IDX files: ``folder`` if given (it must hold them), else ``$TNLAYERS_DATA``
    (MNIST only: Fashion-MNIST's files have the same names), else a known offline copy (:data:`KNOWN_FOLDERS`);
    ``None`` when no candidate holds them."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    stem = _FILES["test"][1]
    if folder is not None:
        if not _holds(Path(folder), stem):
            raise FileNotFoundError(f"no {dataset} IDX files ({stem}.gz) in {folder}")
        return Path(folder)
    variable = os.environ.get("TNLAYERS_DATA") if dataset == "mnist" else None
    from_environment = [Path(variable)] if variable else []
    for candidate in (*from_environment, *KNOWN_FOLDERS[dataset]):
        if _holds(candidate, stem):
            return candidate
    return None


def resolve_folder(folder: str | os.PathLike[str] | None = None, dataset: str = "mnist") -> Path:
    """:func:`find_folder`, or a ``FileNotFoundError`` naming where it looked."""
    found = find_folder(dataset, folder)
    if found is None:
        places = ["$TNLAYERS_DATA (unset)" if not os.environ.get("TNLAYERS_DATA") else os.environ["TNLAYERS_DATA"]]
        places += [str(p) for p in KNOWN_FOLDERS[dataset]]
        raise FileNotFoundError(f"no {dataset} IDX files found; looked in {', '.join(places)}; pass a folder")
    return found


def load_mnist(
    folder: str | os.PathLike[str] | None = None, split: str = "train"
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """MNIST (or Fashion-MNIST) images as float32 in [0, 1] of shape ``(N, 784)``, and int64 labels.

    ``folder`` defaults to what :func:`find_folder` finds.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = resolve_folder(folder)
    image_file, label_file = _find(root, _FILES[split][0]), _find(root, _FILES[split][1])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_file}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{label_file}: expected {len(images)} uint8 labels (one per image), got {labels.dtype} {labels.shape}"
        )
    if len(labels) and int(labels.max()) > 9:
        raise ValueError(f"{label_file}: labels must be digits 0-9, found {int(labels.max())}")
    return (images.reshape(len(images), -1) / np.float32(255)).astype(np.float32), labels.astype(np.int64)


def _sha256_of_gunzipped(path: Path) -> str:
    digest = hashlib.sha256()
    with gzip.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _already_verified(path: Path, expected: str) -> bool:
    try:
        return _sha256_of_gunzipped(path) == expected
    except (OSError, EOFError, zlib.error):
        return False  # a broken file from an interrupted copy: fetch it again


def download(
    folder: str | os.PathLike[str] | None = None,
    dataset: str = "mnist",
    base_url: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch the four IDX ``.gz`` files of ``dataset`` into ``folder`` and return it (needs internet).

    A file already present with the right checksum is kept. Each download is checked against the
    SHA-256 of the decompressed original before it is moved into place; a mismatch is a
    ``ValueError`` and leaves nothing behind. ``base_url`` overrides the mirror (``file://`` works).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if folder is None and not os.environ.get("TNLAYERS_DATA"):
        raise ValueError("pass the folder to download into, or set TNLAYERS_DATA")
    root = Path(folder if folder is not None else os.environ["TNLAYERS_DATA"])
    root.mkdir(parents=True, exist_ok=True)
    source = base_url if base_url is not None else DATASETS[dataset]["url"]
    for stem, expected in DATASETS[dataset]["sha256"].items():
        target = root / f"{stem}.gz"
        if target.is_file() and _already_verified(target, expected):
            continue
        url = source.rstrip("/") + f"/{stem}.gz"
        handle, temporary = tempfile.mkstemp(dir=root, suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out)
            try:
                actual = _sha256_of_gunzipped(Path(temporary))
            except (OSError, EOFError, zlib.error) as err:
                raise ValueError(f"{url} is not a gzip file: {err}") from None
            if actual != expected:
                raise ValueError(f"{url}: checksum mismatch (SHA-256 {actual}, expected {expected}); not saved")
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    return root


_GLYPHS = (
    ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
)


def synthetic_digits(count: int, seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """MNIST-shaped ``(count, 784)`` images in [0, 1] of the digits 0-9 drawn from a 5x7 font, and labels.

    An offline stand-in for MNIST (it is *not* MNIST): each glyph is scaled 2x or 3x, sheared, shifted,
    has strokes dropped and noise added, so a classifier has something to learn.
    """
    rng = np.random.default_rng(seed)
    glyphs = np.array([[[c == "1" for c in row] for row in glyph] for glyph in _GLYPHS], dtype=np.float32)
    labels = rng.integers(0, 10, size=count)
    images = np.zeros((count, 28, 28), dtype=np.float32)
    for k, label in enumerate(labels):
        scale = int(rng.integers(2, 4))
        glyph = np.kron(glyphs[label], np.ones((scale, scale), dtype=np.float32))
        glyph *= rng.random(glyph.shape) > 0.15  # dropped stroke pixels
        height, width = glyph.shape
        shear = rng.uniform(-0.3, 0.3)
        top = int(rng.integers(0, 28 - height + 1))
        for row in range(height):
            offset = round(shear * (row - height / 2))
            left = int(np.clip(int(rng.integers(0, 2)) + (28 - width) // 2 + offset, 0, 28 - width))
            images[k, top + row, left : left + width] = np.maximum(
                images[k, top + row, left : left + width], glyph[row]
            )
        images[k] = np.roll(images[k], int(rng.integers(-3, 4)), axis=1)
    images += rng.normal(0.0, 0.2, size=images.shape).astype(np.float32)
    return np.clip(images, 0.0, 1.0).reshape(count, 784), labels.astype(np.int64)
