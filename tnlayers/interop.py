"""The MPO as a network of the ``tensornetwork`` package, and back.

``tensornetwork`` is imported only when these functions are called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from .decompose import cores_of, spec_from_cores

__all__ = ["MPONetwork", "from_tensornetwork", "to_tensornetwork"]


class MPONetwork(NamedTuple):
    """``tensornetwork`` nodes of the cores, connected along their bonds, and their dangling legs."""

    nodes: list[Any]
    input_edges: list[Any]
    """``i1 .. in``: contract these with the input (sizes ``in_modes``)."""
    output_edges: list[Any]
    """``j1 .. jn``: the output legs (sizes ``out_modes``)."""


def _axis_names(k: int, n: int) -> list[str]:
    names = [f"bond{k}", f"in{k + 1}", f"out{k + 1}", f"bond{k + 1}"]
    if k == n - 1:
        names.pop(3)
    if k == 0:
        names.pop(0)
    return names


def to_tensornetwork(source: Any, backend: str = "numpy") -> MPONetwork:
    """Nodes ``core1 .. coren`` with axes named ``in{k}``, ``out{k}`` and ``bond{k}``.

    The bonds are connected edges named ``bond{k}``; the size-1 outer bonds are dropped, so the
    only dangling edges are the input legs ``in{k}`` and output legs ``out{k}``. Contracting the
    network with ``output_edge_order=input_edges + output_edges`` gives ``W.reshape(*in_modes,
    *out_modes)``. ``source`` is a list of cores or a layer of any backend.
    """
    import tensornetwork as tn

    arrays = cores_of(source)
    spec = spec_from_cores(arrays)
    n = spec.n_cores
    nodes = []
    for k, core in enumerate(arrays):
        tensor = core
        if k == n - 1:
            tensor = tensor[..., 0]
        if k == 0:
            tensor = tensor[0]
        nodes.append(tn.Node(tensor, name=f"core{k + 1}", axis_names=_axis_names(k, n), backend=backend))
    for k in range(n - 1):
        edge = nodes[k][f"bond{k + 1}"] ^ nodes[k + 1][f"bond{k + 1}"]
        edge.set_name(f"bond{k + 1}")
    input_edges = [node[f"in{k + 1}"] for k, node in enumerate(nodes)]
    output_edges = [node[f"out{k + 1}"] for k, node in enumerate(nodes)]
    for edge in input_edges + output_edges:
        edge.set_name(edge.node1.axis_names[edge.axis1])
    return MPONetwork(nodes, input_edges, output_edges)


def from_tensornetwork(nodes: Sequence[Any] | MPONetwork) -> list[NDArray[Any]]:
    """Cores ``(r, in, out, r')`` from nodes laid out as :func:`to_tensornetwork` makes them.

    Axes are found by name (``in{k}``, ``out{k}``, ``bond{k}``), so nodes whose axes were reordered
    still convert; a node without those names is an error.
    """
    if isinstance(nodes, MPONetwork):
        nodes = nodes.nodes
    nodes = list(nodes)
    n = len(nodes)
    if n == 0:
        raise ValueError("from_tensornetwork needs at least one node, got none")
    cores = []
    for k, node in enumerate(nodes):
        wanted = _axis_names(k, n)
        names = list(getattr(node, "axis_names", []))
        if sorted(names) != sorted(wanted):
            raise ValueError(f"node {k} ({getattr(node, 'name', node)!r}) has axes {names}, expected {wanted}")
        tensor = np.asarray(node.tensor).transpose([names.index(name) for name in wanted])
        if k == 0:
            tensor = tensor[None]
        if k == n - 1:
            tensor = tensor[..., None]
        cores.append(np.ascontiguousarray(tensor))
    spec_from_cores(cores)  # the bonds must chain
    return cores
