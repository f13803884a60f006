"""Reading the MNIST family of data sets from the standard IDX files (gzip or raw), from a local folder."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["load_mnist", "read_idx"]

_IDX_TYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike[str]) -> NDArray[Any]:
    """The array stored in one IDX file (``.gz`` files are decompressed). A malformed file is a ``ValueError``."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no IDX file at {source}")
    opener: Any = gzip.open if source.suffix == ".gz" else open
    try:
        with opener(source, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{source} is not a readable IDX file: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{source} is not an IDX file (bad magic number {data[:4]!r})")
    dtype, ndim = np.dtype(_IDX_TYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{source} is truncated or corrupt: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{stem}(.gz) not found in {folder}")


def load_mnist(
    folder: str | os.PathLike[str] | None = None, split: str = "train"
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """MNIST (or Fashion-MNIST) images as float32 in [0, 1] of shape ``(N, 784)``, and int64 labels.

    ``folder`` defaults to the ``TNLAYERS_DATA`` environment variable.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if folder is None:
        if "TNLAYERS_DATA" not in os.environ:
            raise ValueError("pass the folder holding the IDX files, or set TNLAYERS_DATA")
        folder = os.environ["TNLAYERS_DATA"]
    root = Path(folder)
    images = read_idx(_find(root, _FILES[split][0]))
    labels = read_idx(_find(root, _FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images of shape {images.shape} do not match labels of shape {labels.shape}")
    return (images.reshape(len(images), -1) / np.float32(255)).astype(np.float32), labels.astype(np.int64)
