"""Writing benchmark records: one JSON line per measurement, with the run's environment."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_records"]


def write_records(path: Path | None, records: Sequence[Mapping[str, Any]], environment: Mapping[str, Any]) -> None:
    """One JSON line per record (with the environment's fields added), if ``path`` is given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps({**record, **environment}) + "\n")
    print(f"wrote {len(records)} records to {path}")
