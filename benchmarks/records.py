"""Writing benchmark records (one JSON line per measurement, with the run's environment), and the one
count of what torch autograd keeps for a backward."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_allocator_option",
    "apply_allocator_option",
    "torch_environment",
    "torch_environment_line",
    "torch_saved_bytes",
    "write_records",
]


def add_allocator_option(parser: argparse.ArgumentParser) -> None:
    """``--reuse-freed-memory``: measure the second allocator configuration (see :func:`apply_allocator_option`)."""
    parser.add_argument(
        "--reuse-freed-memory",
        action="store_true",
        help="call tnlayers.reuse_freed_memory() first (glibc keeps the memory it frees; a second configuration)",
    )


def apply_allocator_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Call :func:`tnlayers.reuse_freed_memory` if ``--reuse-freed-memory`` was given (a usage error without glibc)."""
    import tnlayers

    if args.reuse_freed_memory and not tnlayers.reuse_freed_memory():
        parser.error("--reuse-freed-memory needs glibc's allocator, which this process does not use")


def torch_environment() -> dict[str, Any]:
    """What a torch timing depends on, for the records and the header line: torch's version and threads, the
    CPU, ``OMP_WAIT_POLICY`` (``unset`` when it is) and glibc's allocator setting."""
    import os
    import platform

    import torch

    from tnlayers.allocator import allocator_setting

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "allocator": allocator_setting(),
    }


def torch_environment_line(environment: Mapping[str, Any]) -> str:
    """The header line of a torch benchmark: what :func:`torch_environment` found."""
    return (
        f"torch {environment['torch']}, {environment['threads']} threads, "
        f"OMP_WAIT_POLICY={environment['OMP_WAIT_POLICY']}, allocator {environment['allocator']}"
    )


def write_records(path: Path | None, records: Sequence[Mapping[str, Any]], environment: Mapping[str, Any]) -> None:
    """One JSON line per record (with the environment's fields added), if ``path`` is given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps({**record, **environment}) + "\n")
    print(f"wrote {len(records)} records to {path}")


def torch_saved_bytes(run: Callable[[], object], owned: Iterable[Any]) -> int:
    """Bytes of the distinct storages torch autograd saves for the backward during ``run()`` (counted with
    ``saved_tensors_hooks``), the storages of the ``owned`` tensors (the parameters) excluded."""
    import torch

    excluded = {tensor.untyped_storage().data_ptr() for tensor in owned}
    storages: dict[int, int] = {}

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())
