"""``strategy="autotune"``: time the cost model's best few plans on the real hardware, once, and remember.

The first call for a ``(spec, batch bucket, key)`` (``key`` names the backend, device, dtype and
whether gradients are needed) times the ``top`` cheapest distinct candidates of ``"auto"``
round-robin and keeps the fastest. Winners live in memory and in a JSON file in
:func:`cache_dir` (``$TNLAYERS_CACHE_DIR``, else ``$XDG_CACHE_HOME/tnlayers``, else
``~/.cache/tnlayers``). The file is safe to delete; a corrupt file or entry is ignored with a
warning and tuned again, never trusted: each cached path is re-planned and checked against the spec.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .plan import DEFAULT_COST_MODEL, ContractionPlan, CostModel, auto_candidates, batch_bucket, plan
from .spec import MPOSpec
from .timing import calls_per_sample, round_robin

__all__ = ["cache_dir", "cache_file", "cached", "clear", "tune"]

FORMAT_VERSION = 1
_memory: dict[str, dict[str, Any]] = {}
"""Entries as stored in the file."""
_resolved: dict[tuple[Any, ...], ContractionPlan] = {}
"""Plans already rebuilt from entries, for the per-call lookup."""
_loaded_from: Path | None = None


def cache_dir() -> Path:
    """Where autotune results are kept (created on first write)."""
    if os.environ.get("TNLAYERS_CACHE_DIR"):
        return Path(os.environ["TNLAYERS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tnlayers"


def cache_file() -> Path:
    return cache_dir() / "autotune.json"


def _entry_key(spec: MPOSpec, batch: int | None, key: Sequence[str]) -> str:
    return json.dumps([list(spec.in_modes), list(spec.out_modes), list(spec.ranks), batch_bucket(batch), *key])


def _load() -> None:
    """Read the cache file once per location; anything malformed is dropped with a warning."""
    global _loaded_from
    path = cache_file()
    if _loaded_from == path:
        return
    _loaded_from = path
    _memory.clear()
    _resolved.clear()
    if not path.is_file():
        return
    try:
        content = json.loads(path.read_text())
        if not isinstance(content, dict) or content.get("version") != FORMAT_VERSION:
            raise ValueError(f"expected a JSON object with version {FORMAT_VERSION}")
        entries = content.get("entries")
        if not isinstance(entries, dict):
            raise ValueError("no 'entries' object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        warnings.warn(f"ignoring the corrupt autotune cache {path} ({err}); it will be rewritten", stacklevel=3)
        return
    _memory.update({k: v for k, v in entries.items() if isinstance(v, dict)})


def _save() -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump({"version": FORMAT_VERSION, "entries": _memory}, out, indent=1)
        os.replace(temporary, path)
    except OSError as err:  # a read-only home still tunes, it just cannot remember across runs
        warnings.warn(f"could not write the autotune cache {path}: {err}", stacklevel=3)


def _plan_from_entry(spec: MPOSpec, batch: int | None, entry: dict[str, Any]) -> ContractionPlan | None:
    try:
        path = [tuple(int(i) for i in pair) for pair in entry["path"]]
        found = plan(spec, batch, path)
    except (KeyError, TypeError, ValueError) as err:
        warnings.warn(f"ignoring a malformed autotune cache entry for {spec} ({err!r}); tuning again", stacklevel=4)
        return None
    return dataclasses.replace(found, strategy="autotune", method=str(entry.get("method", "path")))


def cached(spec: MPOSpec, batch: int | None, key: Sequence[str]) -> ContractionPlan | None:
    """The remembered winner, without timing anything (``None`` if there is none)."""
    fast_key = (spec, batch_bucket(batch), tuple(key), str(cache_file()))
    if fast_key in _resolved:
        return _resolved[fast_key]
    _load()
    entry = _memory.get(_entry_key(spec, batch, key))
    found = None if entry is None else _plan_from_entry(spec, batch, entry)
    if found is not None:
        _resolved[fast_key] = found
    return found


def tune(
    spec: MPOSpec,
    batch: int | None,
    make_run: Callable[[ContractionPlan], Callable[[], object]],
    key: Sequence[str],
    cost_model: CostModel = DEFAULT_COST_MODEL,
    top: int = 4,
    repeats: int = 5,
) -> ContractionPlan:
    """The fastest of the ``top`` cheapest candidate plans, timed with ``make_run(plan)()`` (or remembered).

    ``make_run`` turns a plan into a call that runs it once on representative inputs (forward, or
    forward and backward when gradients are needed); ``key`` must tell apart everything that
    changes the answer (backend, device, dtype, whether gradients are taken).
    """
    known = cached(spec, batch, key)
    if known is not None:
        return known
    candidates: list[ContractionPlan] = []
    for candidate in sorted(auto_candidates(spec, batch, cost_model), key=lambda p: (p.cost, p.flops)):
        if all(candidate.path != other.path for other in candidates):
            candidates.append(candidate)
        if len(candidates) == top:
            break
    runs = {str(k): make_run(candidate) for k, candidate in enumerate(candidates)}
    inner = min(calls_per_sample(run, 2e-3) for run in runs.values())  # samples of >= 2 ms for the slowest
    times = round_robin(runs, repeats, inner, warmup=0)  # calls_per_sample warmed each one up
    medians = {int(k): statistics.median(samples) for k, samples in times.items()}
    best = min(medians, key=medians.__getitem__)
    _memory[_entry_key(spec, batch, key)] = {
        "path": [list(pair) for pair in candidates[best].path],
        "method": candidates[best].method,
        "median_s": {candidates[k].method: medians[k] for k in medians},
    }
    _save()
    return dataclasses.replace(candidates[best], strategy="autotune")


def clear(disk: bool = False) -> None:
    """Forget the winners in memory, and delete the cache file too with ``disk=True``."""
    global _loaded_from
    _memory.clear()
    _resolved.clear()
    _loaded_from = None
    if disk:
        cache_file().unlink(missing_ok=True)
