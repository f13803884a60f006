"""``strategy="autotune"``: time the cost model's best few plans on the real hardware, once, and remember.

An :class:`Autotuner` keeps winners per ``(spec, batch bucket, key)`` (``key`` names the backend,
device, dtype and whether gradients are needed; see :func:`tnlayers.layer.tune_key`) in memory and
in one JSON file at an explicit path. :func:`default_tuner` is the one layers use: its file is
``$TNLAYERS_CACHE_DIR/autotune.json``, else ``$XDG_CACHE_HOME/tnlayers/autotune.json``, else
``~/.cache/tnlayers/autotune.json``, the environment read once when it is first asked for.

The file is safe to delete. A corrupt file or entry is ignored with a warning and tuned again, never
trusted: each stored path is re-planned and checked against the spec. Writes are atomic (a temporary
file, then a rename) and merge with what other processes wrote meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

try:  # an advisory lock between processes (POSIX); elsewhere the in-process lock and merge remain
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .cost import DEFAULT_COST_MODEL, CostModel
from .plan import ContractionPlan, auto_candidates, batch_bucket, plan
from .spec import MPOSpec
from .timing import calls_per_sample, round_robin

__all__ = ["Autotuner", "cache_dir_from", "default_tuner"]

FORMAT_VERSION = 1
#: Candidates timed: the cost model's four cheapest distinct paths. In the orderings benchmark (torch,
#: 87 cases) the winner among them was the fastest path at the median, 1.20x it at worst (docs/benchmarks.md).
TOP_CANDIDATES = 4
#: One timed sample lasts about this long, so short calls are not all timer noise.
SAMPLE_SECONDS = 2e-3
#: Path indices in a cache entry are operand positions: below twice this (no spec has more cores).
MAX_INDEX = 1024


def cache_dir_from(environ: Mapping[str, str]) -> Path:
    """The cache folder named by ``environ`` (see the module docstring)."""
    if environ.get("TNLAYERS_CACHE_DIR"):
        return Path(environ["TNLAYERS_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tnlayers"


def _entry_key(spec: MPOSpec, batch: int | None, key: Sequence[str]) -> str:
    return json.dumps([list(spec.in_modes), list(spec.out_modes), list(spec.ranks), batch_bucket(batch), *key])


class Autotuner:
    """Timed winners kept in memory and in the JSON file ``path``; safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._entries: dict[str, dict[str, Any]] | None = None
        """Entries as stored in the file (read on first use)."""
        self._resolved: dict[tuple[Any, ...], ContractionPlan] = {}
        """Plans already rebuilt from entries, for the per-call lookup."""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Autotuner:
        """A tuner whose file lies where the environment says (read now, once)."""
        return cls(cache_dir_from(os.environ if environ is None else environ) / "autotune.json")

    def __repr__(self) -> str:
        return f"Autotuner({str(self.path)!r})"

    def _read_file(self, warn: bool = True) -> dict[str, dict[str, Any]]:
        """The file's entries; anything malformed is dropped (with a warning if ``warn``)."""
        if not self.path.is_file():
            return {}
        try:
            content = json.loads(self.path.read_text())
            if not isinstance(content, dict) or content.get("version") != FORMAT_VERSION:
                raise ValueError(f"expected a JSON object with version {FORMAT_VERSION}")
            entries = content.get("entries")
            if not isinstance(entries, dict):
                raise ValueError("no 'entries' object")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: deep nesting
            if not warn:
                return {}
            warnings.warn(
                f"ignoring the corrupt autotune cache {self.path} ({err}); it will be rewritten",
                stacklevel=_callers_level(),
            )
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def _loaded(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._read_file()
        return self._entries

    @contextlib.contextmanager
    def _file_lock(self) -> Any:
        """Hold ``{path}.lock`` exclusively (POSIX ``flock``), so a read-merge-write is never interleaved."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _save(self, key: str, entry: dict[str, Any]) -> None:
        """Merge ``entry`` into what the file holds now (another process may have written), then replace it."""
        with self._lock:
            try:
                with self._file_lock():
                    self._write_merged(key, entry)
            except OSError as err:  # a read-only home still tunes, it just cannot remember across runs
                warnings.warn(f"could not write the autotune cache {self.path}: {err}", stacklevel=_callers_level())

    def _write_merged(self, key: str, entry: dict[str, Any]) -> None:
        entries = self._loaded()
        entries.update(self._read_file(warn=False))
        entries[key] = entry
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                json.dump({"version": FORMAT_VERSION, "entries": dict(entries)}, out, indent=1)
            os.replace(temporary, self.path)
        finally:
            Path(temporary).unlink(missing_ok=True)

    def cached(self, spec: MPOSpec, batch: int | None, key: Sequence[str]) -> ContractionPlan | None:
        """The remembered winner, without timing anything (``None`` if there is none)."""
        fast_key = (spec, batch_bucket(batch), tuple(key))
        found = self._resolved.get(fast_key)
        if found is not None:
            return found
        with self._lock:
            entry = self._loaded().get(_entry_key(spec, batch, key))
        found = None if entry is None else _plan_from_entry(spec, batch, entry)
        if found is not None:
            self._resolved[fast_key] = found
        return found

    def tune(
        self,
        spec: MPOSpec,
        batch: int | None,
        make_run: Callable[[ContractionPlan], Callable[[], object]],
        key: Sequence[str],
        cost_model: CostModel = DEFAULT_COST_MODEL,
        top: int = TOP_CANDIDATES,
        repeats: int = 5,
        gradients: str = "none",
    ) -> ContractionPlan:
        """The fastest of the ``top`` cheapest candidate plans, timed with ``make_run(plan)()`` (or remembered).

        ``make_run`` turns a plan into a call that runs it once on representative inputs (forward, or
        forward and backward when gradients are needed); ``key`` must tell apart everything that
        changes the answer (backend, device, dtype, whether gradients are taken). ``gradients`` is
        what the candidates are costed for (see :func:`tnlayers.plan`).
        """
        known = self.cached(spec, batch, key)
        if known is not None:
            return known
        candidates: list[ContractionPlan] = []
        for candidate in sorted(auto_candidates(spec, batch, cost_model, gradients), key=lambda p: (p.cost, p.flops)):
            if all(candidate.path != other.path for other in candidates):
                candidates.append(candidate)
            if len(candidates) == top:
                break
        runs = {str(k): make_run(candidate) for k, candidate in enumerate(candidates)}
        inner = min(calls_per_sample(run, SAMPLE_SECONDS) for run in runs.values())
        times = round_robin(runs, repeats, inner, warmup=0)  # calls_per_sample warmed each one up
        medians = {int(k): statistics.median(samples) for k, samples in times.items()}
        best = min(medians, key=medians.__getitem__)
        self._save(
            _entry_key(spec, batch, key),
            {
                "path": [list(pair) for pair in candidates[best].path],
                "method": candidates[best].method,
                "median_s": {candidates[k].method: medians[k] for k in medians},
            },
        )
        return dataclasses.replace(candidates[best], strategy="autotune")

    def clear(self, disk: bool = False) -> None:
        """Forget the winners in memory (the file is read again on next use); ``disk=True`` deletes the file."""
        with self._lock:
            self._entries = None
            self._resolved.clear()
            if disk:
                self.path.unlink(missing_ok=True)


def _path_of(entry: dict[str, Any]) -> list[tuple[int, ...]]:
    """The entry's path as pairs of small non-negative ints; anything else (``1e400``, ``10**30``) is a ValueError."""
    pairs = entry["path"]
    if not isinstance(pairs, list) or not all(isinstance(pair, list) for pair in pairs):
        raise TypeError(f"path must be a list of lists, got {pairs!r:.80}")
    limit = 2 * MAX_INDEX
    for index in (i for pair in pairs for i in pair):
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < limit:
            raise ValueError(f"path index {index!r:.40} is not an int in [0, {limit})")
    return [tuple(pair) for pair in pairs]


def _callers_level() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside tnlayers (the user's line),
    however many layers of tnlayers (a layer, its planner, the tuner) lie between."""
    frame: FrameType | None = sys._getframe(2)  # the caller of the function that warns: stacklevel 2
    level = 2
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("tnlayers"):
        frame, level = frame.f_back, level + 1
    return level


def _plan_from_entry(spec: MPOSpec, batch: int | None, entry: dict[str, Any]) -> ContractionPlan | None:
    try:
        found = plan(spec, batch, _path_of(entry))
    except (KeyError, TypeError, ValueError) as err:
        message = f"ignoring a malformed autotune cache entry for {spec} ({err!r}); tuning again"
        warnings.warn(message, stacklevel=_callers_level())
        return None
    return dataclasses.replace(found, strategy="autotune", method=str(entry.get("method", "path")))


@functools.cache
def default_tuner() -> Autotuner:
    """The tuner layers use, its file where the environment said when first asked (``cache_clear()`` re-reads)."""
    return Autotuner.from_environment()
