"""One portable checkpoint format for MPO layers: safetensors, with each layer's spec in the metadata.

Tensors are named ``{layer}.core.{k}`` (layout ``(r, in, out, r')``) and ``{layer}.bias``; the
metadata holds ``format``, ``format_version`` and a JSON list of the layers with their modes and
ranks. Loading never runs code (no pickle), and the file is checked against its metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .decompose import _host_array, spec_from_cores
from .spec import MPOSpec

__all__ = ["MPOWeights", "load", "load_layers", "save", "save_layers"]

FORMAT = "tnlayers.mpo"
FORMAT_VERSION = "1"
DEFAULT_NAME = "mpo"


class MPOWeights(NamedTuple):
    """The cores and bias of one MPO layer, as NumPy arrays (unpacks as ``cores, bias``)."""

    cores: list[NDArray[Any]]
    bias: NDArray[Any] | None

    @property
    def spec(self) -> MPOSpec:
        return spec_from_cores(self.cores)


def _to_numpy(value: Any, what: str) -> NDArray[Any]:
    """``value`` as a contiguous NumPy float array; bfloat16 (torch, TF, JAX) is widened to float32, exactly."""
    try:
        array = np.asarray(_host_array(value))  # torch tensors leave autograd, the device and bfloat16
    except Exception as err:
        raise TypeError(f"{what} must be array-like, got {type(value).__name__}: {err}") from None
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (TF and JAX arrays): safetensors.numpy cannot write it
        array = array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{what} must hold floating-point numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array)


def _layer_tensors(name: str, cores: Sequence[Any], bias: Any) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"layer names must be non-empty strings, got {name!r}")
    spec = spec_from_cores(cores)
    tensors = {f"{name}.core.{k}": _to_numpy(core, f"core {k} of layer {name!r}") for k, core in enumerate(cores)}
    if bias is not None:
        array = _to_numpy(bias, f"bias of layer {name!r}")
        if array.shape != (spec.out_features,):
            raise ValueError(f"bias of layer {name!r} must have shape ({spec.out_features},), got {array.shape}")
        tensors[f"{name}.bias"] = array
    entry = {
        "name": name,
        "in_modes": list(spec.in_modes),
        "out_modes": list(spec.out_modes),
        "ranks": list(spec.ranks),
        "bias": bias is not None,
    }
    return entry, tensors


def save_layers(path: str | os.PathLike[str], layers: Mapping[str, tuple[Sequence[Any], Any]]) -> None:
    """Write several named layers (``{name: (cores, bias)}``) to one safetensors file.

    Arrays may be NumPy, torch, TensorFlow or JAX; they are stored as NumPy arrays in their dtype.
    The file is written to a temporary name and moved into place, so an existing checkpoint is never
    left half-written.
    """
    if not isinstance(layers, Mapping) or not layers:
        raise ValueError(f"layers must be a non-empty mapping name -> (cores, bias), got {layers!r}")
    entries, tensors = [], {}
    for name, value in layers.items():
        if not isinstance(value, tuple) or len(value) != 2:
            raise TypeError(f"layer {name!r} must be given as (cores, bias), got {type(value).__name__}")
        entry, layer_tensors = _layer_tensors(name, value[0], value[1])
        entries.append(entry)
        tensors.update(layer_tensors)
    from safetensors.numpy import save_file  # imported here: `import tnlayers` needs only numpy and opt_einsum

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": json.dumps(entries)}
    target = Path(path)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".tmp")  # beside it: os.replace is atomic
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save(path: str | os.PathLike[str], cores: Sequence[Any], bias: Any = None, *, name: str = DEFAULT_NAME) -> None:
    """Write one layer's cores (and bias) to ``path`` (safetensors, spec in the metadata)."""
    save_layers(path, {name: (cores, bias)})


def _register_bfloat16() -> None:
    """Let NumPy read BF16 tensors (as TensorFlow and JAX do, through ``ml_dtypes``) where it is installed."""
    with contextlib.suppress(ImportError):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)


def _widened(array: NDArray[Any]) -> NDArray[Any]:
    """A copy of a stored tensor; bfloat16 comes back as float32 (exact), the dtype every framework reads."""
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else np.array(array)


def _not_a_checkpoint(path: Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid tnlayers checkpoint: {why}")


def load_layers(path: str | os.PathLike[str]) -> dict[str, MPOWeights]:
    """Read every layer of a checkpoint written by :func:`save` or :func:`save_layers`."""
    from safetensors import SafetensorError, safe_open

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no checkpoint file at {source}")
    _register_bfloat16()
    try:
        with safe_open(str(source), framework="np") as handle:
            metadata = handle.metadata() or {}
            arrays = {key: _widened(handle.get_tensor(key)) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise _not_a_checkpoint(source, f"not a readable safetensors file ({err})") from None
    except TypeError as err:  # a dtype NumPy lacks: BF16 (written by safetensors.torch) without ml_dtypes
        raise _not_a_checkpoint(
            source, f"it holds tensors NumPy cannot read ({err}); install ml_dtypes, or re-save them as float32"
        ) from None
    if metadata.get("format") != FORMAT:
        raise _not_a_checkpoint(source, f"metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _not_a_checkpoint(source, f"format_version {metadata.get('format_version')!r} is not supported")
    try:
        entries = json.loads(metadata["layers"])
        layers: dict[str, MPOWeights] = {}
        for entry in entries:
            name = entry["name"]
            spec = MPOSpec(entry["in_modes"], entry["out_modes"], entry["ranks"], clip=False)
            cores = [arrays.pop(f"{name}.core.{k}") for k in range(spec.n_cores)]
            bias = arrays.pop(f"{name}.bias") if entry["bias"] else None
            if spec_from_cores(cores) != spec:
                raise ValueError(f"layer {name!r}: core shapes {[c.shape for c in cores]} do not match {spec}")
            if bias is not None and bias.shape != (spec.out_features,):
                raise ValueError(f"layer {name!r}: bias shape {bias.shape} does not match {spec.out_features}")
            for array in (*cores, *([] if bias is None else [bias])):
                if not np.issubdtype(array.dtype, np.floating):
                    raise TypeError(f"layer {name!r} holds {array.dtype} tensors; MPO weights are floating point")
            layers[name] = MPOWeights(cores, bias)
    except (KeyError, TypeError, ValueError, RecursionError) as err:  # RecursionError: deeply nested metadata
        raise _not_a_checkpoint(source, f"{type(err).__name__}: {err}") from None
    if arrays:
        raise _not_a_checkpoint(source, f"tensors not described by the metadata: {sorted(arrays)}")
    return layers


def load(path: str | os.PathLike[str], name: str | None = None) -> MPOWeights:
    """Read one layer (``name``, or the only layer in the file) as NumPy ``(cores, bias)``."""
    layers = load_layers(path)
    if name is None:
        if len(layers) != 1:
            raise ValueError(f"{path} holds {len(layers)} layers {sorted(layers)}; pass name= to choose one")
        return next(iter(layers.values()))
    if name not in layers:
        raise KeyError(f"{path} has no layer {name!r}; it holds {sorted(layers)}")
    return layers[name]
