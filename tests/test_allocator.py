"""``tnlayers.reuse_freed_memory``: glibc then serves a large allocation from its heap and keeps it when freed.

Checked by glibc's own counters (``mallinfo2``) in a fresh interpreter, so this test process's
allocator is left as it was; no time is measured."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any

import pytest

import tnlayers
from tnlayers import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_PROBE = """
import ctypes, json, numpy as np, tnlayers
from tnlayers.allocator import allocator_setting

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
SIZE = 48 << 20  # above glibc's largest default mmap threshold (32 MiB): mmapped unless told otherwise

def allocate_and_free():
    mapped = libc.mallinfo2().hblkhd
    array = np.ones(SIZE // 8)
    grew = libc.mallinfo2().hblkhd - mapped
    del array
    return {"mapped_bytes": grew, "heap_after_free": libc.mallinfo2().arena}

found = {"setting_before": allocator_setting(), "before": allocate_and_free()}
found["returned"] = tnlayers.reuse_freed_memory()
found["setting_after"] = allocator_setting()
found["after"] = allocate_and_free()
print(json.dumps(found))
"""


def _probe() -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_a_large_allocation_comes_from_the_heap_and_stays_after_free() -> None:
    found = _probe()
    size = 48 << 20
    assert found["setting_before"] == "default" and found["returned"] is True
    assert found["before"]["mapped_bytes"] >= size  # glibc's default: fresh pages from the kernel, every time
    assert found["after"]["mapped_bytes"] == 0  # now from the heap ...
    assert found["after"]["heap_after_free"] >= size  # ... which keeps it when freed (no trim)
    assert found["setting_after"] == f"reuse_freed_memory({1 << 30})"


def test_the_setting_names_the_environment_variables_when_they_are_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert allocator.allocator_setting() == "default"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000000")
    assert allocator.allocator_setting() == "MALLOC_TRIM_THRESHOLD_=1000000000"


def test_without_glibc_nothing_is_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert tnlayers.reuse_freed_memory() is False
    assert allocator.allocator_setting() == "default"


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (0, ValueError, "must be from 1 MiB .* got 0"),
        (-1, ValueError, "must be from 1 MiB .* got -1"),
        ((1 << 20) - 1, ValueError, "must be from 1 MiB .* got 1048575"),
        (2**31, ValueError, "to 2147483647 bytes, got 2147483648"),
        (True, TypeError, "must be an int .* got bool True"),
        (1.5e9, TypeError, r"must be an int .* got float 1500000000\.0"),
        ("1GB", TypeError, "must be an int .* got str '1GB'"),
        (None, TypeError, "must be an int .* got NoneType None"),
    ],
)
def test_a_bad_size_is_a_clear_error(bad: object, error: type[Exception], message: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("checked before glibc is touched"))
    with pytest.raises(error, match=message):
        tnlayers.reuse_freed_memory(bad)  # type: ignore[arg-type]
