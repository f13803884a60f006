"""The peer libraries timed beside our orderings, each holding the same W: TensorLy-Torch's blockTT
``FactorizedLinear`` (torch) and TensorNetwork's tn_keras ``DenseMPO`` (TensorFlow)."""

from __future__ import annotations

from typing import Any

import numpy as np


def tltorch_blocktt(cores: list[np.ndarray], device: str) -> Any:
    """A blockTT ``FactorizedLinear`` with the cores' W, or ``None`` when tltorch is not installed."""
    try:
        import tltorch
        import torch
    except ImportError:
        return None
    in_modes = tuple(c.shape[1] for c in cores)
    out_modes = tuple(c.shape[2] for c in cores)
    ranks = [1, *(c.shape[3] for c in cores)]
    layer = tltorch.FactorizedLinear(
        in_modes, out_modes, bias=False, factorization="blocktt", rank=ranks, implementation="factorized"
    )
    with torch.no_grad():  # blockTT factors are (r, out, in, r')
        for factor, core in zip(layer.weight.factors, cores):
            factor.copy_(torch.from_numpy(core.transpose(0, 2, 1, 3)))
    return layer.to(device)


def tn_keras_dense_mpo(cores: list[np.ndarray]) -> Any:
    """tn_keras's ``DenseMPO`` with the cores' W, or ``None`` where it cannot hold them.

    DenseMPO needs in and out features that are perfect n-th powers and one bond dimension.
    """
    from benchmarks.keras_layers import _peer

    ranks = [c.shape[3] for c in cores[:-1]]
    try:
        layer = _peer(cores, np.zeros(int(np.prod([c.shape[2] for c in cores])), cores[0].dtype))
    except (ValueError, TypeError, AssertionError):
        return None
    if layer is None or len(set(ranks)) > 1:
        return None
    return layer
