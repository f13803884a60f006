"""Let the process keep the memory it frees (glibc), so that large temporaries are reused, not faulted in again.

Training a layer allocates the same temporaries on every call: an MPO layer's ``W`` and its gradient, a
plan's intermediates, the dense layer's gradient. glibc serves a large allocation from fresh pages of the
kernel and hands the pages back when it is freed (``mmap``/``munmap``, or trimming the top of its heap),
so the next call writes to pages the kernel must fault in and zero again: in FC2's training call at
batch 256 the transposing copy of ``W``'s gradient took 321 us instead of 111 us (``python -m
benchmarks.allocator``). :func:`reuse_freed_memory` raises glibc's two thresholds, at run time, for the
whole process: what was freed stays with the process and is reused.

>>> import tnlayers
>>> tnlayers.reuse_freed_memory()  # once, before training; False where the C library is not glibc
True

The price is the process's resident memory: it does not shrink after a peak (up to ``max_bytes`` of
freed memory is kept). The library never calls this itself; the environment variables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do the same from outside the process.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

__all__ = ["allocator_setting", "reuse_freed_memory"]

#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The default of :func:`reuse_freed_memory`: 1 GiB, above any temporary of the layers benchmarked here.
DEFAULT_KEEP_BYTES = 1 << 30
#: ``mallopt`` takes a C ``int``.
_MOST_BYTES = 2**31 - 1
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_applied: int | None = None


def _glibc() -> Any:
    """glibc as a ``ctypes`` library, or ``None`` elsewhere (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reuse_freed_memory(max_bytes: int = DEFAULT_KEEP_BYTES) -> bool:
    """Keep up to ``max_bytes`` of freed memory in the process, and serve allocations up to ``max_bytes`` from it.

    Sets glibc's ``M_MMAP_THRESHOLD`` (allocations below it come from the heap, not fresh ``mmap`` pages)
    and ``M_TRIM_THRESHOLD`` (free memory at the heap's top up to it is not handed back) to ``max_bytes``.
    Returns ``True`` when both were set, ``False`` where the C library is not glibc (nothing is changed)
    or refused a value. Process-wide and lasting; call it once, before training.
    """
    global _applied
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be an int (bytes), got {type(max_bytes).__name__} {max_bytes!r}")
    if not 1 << 20 <= max_bytes <= _MOST_BYTES:
        raise ValueError(f"max_bytes must be from 1 MiB (1048576) to {_MOST_BYTES} bytes, got {max_bytes!r}")
    libc = _glibc()
    if libc is None:
        return False
    value = ctypes.c_int(max_bytes)
    if not (libc.mallopt(_M_MMAP_THRESHOLD, value) and libc.mallopt(_M_TRIM_THRESHOLD, value)):
        return False
    _applied = max_bytes
    return True


def allocator_setting() -> str:
    """How this process's allocator treats freed memory, for benchmark records: set by
    :func:`reuse_freed_memory`, by glibc's environment variables, or glibc's default."""
    if _applied is not None:
        return f"reuse_freed_memory({_applied})"
    given = [f"{name}={os.environ[name]}" for name in _ENVIRONMENT if name in os.environ]
    return " ".join(given) if given else "default"
