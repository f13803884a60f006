"""Teaching tools: entanglement, tensornetwork interop, diagrams, and the tutorial notebook."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import dense_reference

import tnlayers

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _dense_schmidt_values(cores: list[np.ndarray], bond: int) -> np.ndarray:
    """Singular values of W cut after core ``bond`` (1-based): rows (i1 j1 .. ik jk), from the dense matrix."""
    n = len(cores)
    in_modes = [c.shape[1] for c in cores]
    out_modes = [c.shape[2] for c in cores]
    tensor = dense_reference(cores).reshape(*in_modes, *out_modes)
    order = [axis for k in range(n) for axis in (k, n + k)]
    rows = math.prod(in_modes[:bond]) * math.prod(out_modes[:bond])
    return np.linalg.svd(tensor.transpose(order).reshape(rows, -1), compute_uv=False)


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "ranks"),
    [((2, 3, 4), (3, 2, 2), (2, 3)), ((4, 7, 7, 4), (4, 1, 4, 2), 5), ((2, 2, 2, 2, 2), (2, 2, 2, 2, 2), 3)],
)
def test_entanglement_matches_the_dense_svd_at_every_bond(in_modes: Any, out_modes: Any, ranks: Any) -> None:
    spec = tnlayers.MPOSpec(in_modes, out_modes, ranks)
    cores = tnlayers.init_cores(spec, seed=1, dtype=np.float64)
    report = tnlayers.entanglement(cores)
    assert report.bond_dimensions == spec.ranks[1:-1]
    for bond, (found, entropy) in enumerate(zip(report.singular_values, report.entropies), start=1):
        dense = _dense_schmidt_values(cores, bond)
        kept = dense[: len(found)]
        np.testing.assert_allclose(found, kept, rtol=1e-9, atol=1e-12 * dense[0])
        assert np.all(dense[len(found) :] < 1e-10 * dense[0])
        p = dense**2 / np.sum(dense**2)
        p = p[p > 1e-30]
        np.testing.assert_allclose(entropy, -np.sum(p * np.log(p)), rtol=1e-9, atol=1e-12)
        assert 0 <= entropy <= math.log(spec.ranks[bond]) + 1e-12


def test_a_product_mpo_has_zero_entropy() -> None:
    rng = np.random.default_rng(2)
    factors = [rng.normal(size=(1, 3, 2, 1)), rng.normal(size=(1, 4, 4, 1)), rng.normal(size=(1, 2, 5, 1))]
    report = tnlayers.entanglement(factors)
    assert report.entropies == (0.0, 0.0)
    padded = []  # the same product, carried by bonds of dimension 3 with one direction used
    for k, factor in enumerate(factors):
        core = np.zeros((1 if k == 0 else 3, *factor.shape[1:3], 1 if k == 2 else 3))
        core[0, :, :, 0] = factor[0, :, :, 0]
        padded.append(core)
    padded_report = tnlayers.entanglement(padded)
    assert padded_report.bond_dimensions == (3, 3)
    assert max(padded_report.entropies) < 1e-12
    assert "entropy" in str(padded_report)


def test_entanglement_and_truncate_accept_layers_of_every_backend() -> None:
    from tnlayers.backends.numpy import MPOLinear

    numpy_layer = MPOLinear((2, 3, 4), (3, 2, 2), 3, seed=0, dtype=np.float64)
    expected = tnlayers.entanglement(numpy_layer.cores).entropies
    layers: list[Any] = [numpy_layer]
    if importlib_available("torch"):
        from tnlayers.backends.torch import MPOLinear as TorchMPOLinear

        layers.append(TorchMPOLinear.from_cores(numpy_layer.cores))
    if importlib_available("keras"):
        from tnlayers.backends.keras import MPODense

        layers.append(MPODense.from_cores(numpy_layer.cores, dtype="float64"))
    for layer in layers:
        np.testing.assert_allclose(tnlayers.entanglement(layer).entropies, expected, rtol=1e-9)
        _, report = tnlayers.truncate(layer, max_rank=2)
        cores, _ = tnlayers.truncate(numpy_layer.cores, max_rank=2)
        measured = np.linalg.norm(tnlayers.to_dense(cores) - numpy_layer.to_dense()) / np.linalg.norm(
            numpy_layer.to_dense()
        )
        np.testing.assert_allclose(report.relative_error, measured, rtol=1e-9)


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_to_tensornetwork_contracts_to_the_dense_matrix_and_comes_back() -> None:
    tn = pytest.importorskip("tensornetwork")
    for spec in (tnlayers.MPOSpec((2, 3, 4), (3, 2, 2), (2, 3)), tnlayers.MPOSpec((5,), (3,), 1)):
        cores = tnlayers.init_cores(spec, seed=3, dtype=np.float64)
        network = tnlayers.to_tensornetwork(cores)
        assert [e.name for e in network.input_edges] == [f"in{k + 1}" for k in range(spec.n_cores)]
        assert [e.name for e in network.output_edges] == [f"out{k + 1}" for k in range(spec.n_cores)]
        dangling = {id(e) for node in network.nodes for e in node.edges if e.is_dangling()}
        assert dangling == {id(e) for e in network.input_edges + network.output_edges}
        back = tnlayers.from_tensornetwork(network)
        assert all(np.array_equal(a, b) for a, b in zip(back, cores))
        result = tn.contractors.greedy(network.nodes, output_edge_order=network.input_edges + network.output_edges)
        matrix = np.asarray(result.tensor).reshape(spec.in_features, spec.out_features)
        np.testing.assert_allclose(matrix, dense_reference(cores), rtol=1e-12, atol=1e-14)


def test_from_tensornetwork_reads_axes_by_name_and_rejects_strangers() -> None:
    tn = pytest.importorskip("tensornetwork")
    cores = tnlayers.init_cores(tnlayers.MPOSpec((2, 3), (3, 2), 2), seed=4, dtype=np.float64)
    network = tnlayers.to_tensornetwork(cores)
    first = network.nodes[0]
    first.reorder_axes([2, 0, 1])  # (bond1, in1, out1)
    assert all(np.array_equal(a, b) for a, b in zip(tnlayers.from_tensornetwork(network.nodes), cores))
    stranger = tn.Node(np.ones((2, 3, 2)), axis_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"node 0 .* has axes \['a', 'b', 'c'\], expected \['in1', 'out1', 'bond1'\]"):
        tnlayers.from_tensornetwork([stranger, network.nodes[1]])
    with pytest.raises(ValueError, match="at least one node"):
        tnlayers.from_tensornetwork([])


def test_ascii_diagram_and_numbered_steps() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    text = tnlayers.draw_ascii(spec)
    for label in ("i1=4", "i2=7", "j4=4", "[G1]--8--[G2]--8--[G3]--8--[G4]"):
        assert label in text
    zipper = tnlayers.draw_ascii(spec, tnlayers.plan(spec, 64, "zipper"))
    assert "1. G1 * x over i1: (32 x 4) @ (4 x 12544) product" in zipper
    assert "4. (x G1 G2 G3) * G4 over i4, b3:" in zipper
    materialize = tnlayers.draw_ascii(spec, tnlayers.plan(spec, 64, "materialize"))
    assert "4. x * (G1 G2 G3 G4) over i1, i2, i3, i4: (64 x 784) @ (784 x 256) product" in materialize
    assert tnlayers.draw_ascii(tnlayers.init_cores(spec, seed=0)) == text


def test_ascii_diagram_exactly() -> None:
    """The whole picture and step list of a small uneven MPO, worked out by hand: step 1 is ``(3*4, 2) @
    (2, 8*13*3)`` (G1's legs first, so that step 2 reads the result in place), step 2 ``(8*3*3, 13*4) @
    (13*4, 2*6)``, step 3 ``(8*3*2, 3*6) @ (3*6, 2)``; flops twice their multiply-adds."""
    spec = tnlayers.MPOSpec((2, 13, 3), (3, 2, 2), (1, 4, 6, 1))
    picture = [
        "i1=2     i2=13     i3=3",
        " |         |        |",
        "[G1]--4---[G2]--6--[G3]",
        " |         |        |",
        "j1=3      j2=2     j3=2",
    ]
    assert tnlayers.draw_ascii(spec) == "\n".join(picture)
    steps = [
        "",
        "zipper -> zipper at batch 8: 108,288 flops",
        "  1. G1 * x over i1: (12 x 2) @ (2 x 312) product",
        "  2. (x G1) * G2 over i2, b1: (72 x 52) @ (52 x 12) product",
        "  3. (x G1 G2) * G3 over i3, b2: (48 x 18) @ (18 x 2) product",
    ]
    assert tnlayers.draw_ascii(spec, tnlayers.plan(spec, 8, "zipper")) == "\n".join(picture + steps)


def test_matplotlib_diagram(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    plan = tnlayers.plan(spec, 256, "zipper")
    ax = tnlayers.draw(spec, plan)
    texts = [t.get_text() for t in ax.texts]
    assert {"G1", "G4", "D=8", "i2=7", "j1=4"} <= set(texts)
    numbers = [t for t in texts if t.isdigit()]
    assert sorted(numbers) == ["1", "2", "2", "3", "3", "4", "4"]  # 4 input legs and 3 bonds, by step
    ax.figure.savefig(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 1000
    assert "G3" in [t.get_text() for t in tnlayers.draw(tnlayers.init_cores(spec, seed=0)).texts]
    chosen = tnlayers.plan(spec, 32)  # "auto": the title says what it chose
    assert tnlayers.draw(spec, chosen).get_title().startswith(f"auto -> {chosen.method} at batch 32")
    assert tnlayers.draw(spec, tnlayers.plan(spec, 32, "zipper")).get_title().startswith("zipper at batch 32")


def test_the_tutorial_runs_top_to_bottom(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # undone after the test
    record = tmp_path / "tutorial.npz"  # the values the tutorial ends with, written by one cell added here
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            f"np.savez({str(record)!r}, W=W, accuracy=accuracy(model), *tnlayers.decompose.cores_of(mpo))"
        )
    )
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(DOCS)}}
    )
    client.execute()
    with np.load(record, allow_pickle=False) as values:
        cores = [values[f"arr_{k}"] for k in range(len(values.files) - 2)]
        # tensornetwork's contraction of the tutorial's MPO against the plain NumPy dense matrix
        np.testing.assert_allclose(values["W"], dense_reference(cores), rtol=1e-5, atol=1e-6)
        assert float(values["accuracy"]) > 0.5  # one epoch learns (MNIST 0.94, the stand-in less)
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "data: MNIST from " in outputs or "data: no MNIST found" in outputs  # it says which data it trained on


def test_the_rendered_tutorial_shows_the_notebook_code() -> None:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    rendered = (DOCS / "tutorial.md").read_text()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.source in rendered  # regenerate with: python docs/make_tutorial.py
    for image in ("tutorial_files/" + name for name in os.listdir(DOCS / "tutorial_files")):
        assert image in rendered


def test_tensornetwork_names_and_what_is_not_a_node() -> None:
    pytest.importorskip("tensornetwork")
    network = tnlayers.to_tensornetwork(tnlayers.init_cores(tnlayers.MPOSpec((2, 3, 2), (2, 2, 3), 2), seed=0))
    assert [node.name for node in network.nodes] == ["core1", "core2", "core3"]
    assert [node[f"bond{k + 1}"].name for k, node in enumerate(network.nodes[:-1])] == ["bond1", "bond2"]
    assert network.nodes[0].backend.name == "numpy"

    class Stranger:  # neither axis names nor a name: named by its repr, not a TypeError
        def __repr__(self) -> str:
            return "<stranger>"

    with pytest.raises(ValueError, match=r"^node 0 \(<stranger>\) has axes \[\], expected \['in1', 'out1'\]"):
        tnlayers.from_tensornetwork([Stranger()])
    with pytest.raises(ValueError, match=r"^from_tensornetwork needs at least one node, got none$"):
        tnlayers.from_tensornetwork([])


def test_matplotlib_diagram_geometry() -> None:
    """Where things are drawn, read back from the Axes: boxes in a row, input legs and labels above them,
    output legs below, bond labels between, step numbers on the edges they contract, all inside the view."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    spec = tnlayers.MPOSpec((2, 3, 2), (3, 2, 2), (1, 3, 4, 1))  # bonds told apart by their labels
    plan = tnlayers.plan(spec, 16, "zipper")
    for drawn_plan in (None, plan):
        ax = tnlayers.draw(spec, drawn_plan)
        texts = {t.get_text(): t.get_position() for t in ax.texts if not t.get_text().isdigit()}
        centres = [texts[f"G{k + 1}"] for k in range(3)]
        assert all(y == 0 for _, y in centres)
        xs = [x for x, _ in centres]
        assert xs[0] < xs[1] < xs[2] and xs[1] - xs[0] == pytest.approx(xs[2] - xs[1])
        boxes = [p for p in ax.patches if abs(p.get_y() + p.get_height() / 2) < 1e-9]
        assert len(boxes) == 3
        for box, x in zip(boxes, xs):
            assert box.get_x() + box.get_width() / 2 == pytest.approx(x)
            assert box.get_width() < xs[1] - xs[0]  # boxes do not touch
        top, bottom = boxes[0].get_y() + boxes[0].get_height(), boxes[0].get_y()
        for k, x in enumerate(xs):
            above, below = texts[f"i{k + 1}={spec.in_modes[k]}"], texts[f"j{k + 1}={spec.out_modes[k]}"]
            assert abs(above[0] - x) < 0.3 and above[1] > top
            assert abs(below[0] - x) < 0.3 and below[1] < bottom
        for k in range(2):
            label = texts[f"D={spec.ranks[k + 1]}"]
            assert xs[k] < label[0] < xs[k + 1] and abs(label[1]) < 0.3
        legs = [line for line in ax.lines if line.get_xdata()[0] == line.get_xdata()[1]]
        assert sorted({round(float(line.get_xdata()[0]), 9) for line in legs}) == [round(float(x), 9) for x in xs]
        ups = [line for line in legs if min(line.get_ydata()) >= top - 1e-9]
        downs = [line for line in legs if max(line.get_ydata()) <= bottom + 1e-9]
        assert len(ups) == 3 and len(downs) == 3
        assert all(min(line.get_ydata()) == pytest.approx(top, abs=0.05) for line in ups)  # from the box's edge
        assert all(max(line.get_ydata()) == pytest.approx(bottom, abs=0.05) for line in downs)
        for k, line in enumerate(sorted(downs, key=lambda line: line.get_xdata()[0])):  # its label just below it
            end, label = min(line.get_ydata()), texts[f"j{k + 1}={spec.out_modes[k]}"][1]
            assert end - 0.3 < label < end and end < bottom - 0.3
        bonds = [line for line in ax.lines if list(line.get_ydata()) == [0, 0]]
        assert len(bonds) == 2
        for k, bond in enumerate(sorted(bonds, key=lambda line: line.get_xdata()[0])):
            left, right = bond.get_xdata()
            assert left == pytest.approx(xs[k] + boxes[k].get_width() / 2)
            assert right == pytest.approx(xs[k + 1] - boxes[k + 1].get_width() / 2)
        (x_low, x_high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()
        for x, y in [t.get_position() for t in ax.texts]:
            assert x_low < x < x_high and y_low < y < y_high
        if drawn_plan is None:
            assert ax.get_title() == str(spec) and max(line.get_ydata().max() for line in ups) < y_high
            continue
        x_box = texts["x  (batch 16)"]
        assert x_box[0] == pytest.approx((xs[0] + xs[2]) / 2)
        assert x_box[1] > max(y for text, (_, y) in texts.items() if text != "x  (batch 16)")  # x above it all
        (frame,) = [p for p in ax.patches if p not in boxes]  # x's box spans the row and meets the input legs
        assert frame.get_x() == pytest.approx(boxes[0].get_x()) and frame.get_y() < x_box[1]
        assert frame.get_x() + frame.get_width() == pytest.approx(boxes[2].get_x() + boxes[2].get_width())
        assert all(max(line.get_ydata()) == pytest.approx(frame.get_y(), abs=0.05) for line in ups)
        numbers = sorted((int(t.get_text()), t.get_position()) for t in ax.texts if t.get_text().isdigit())
        expected = []
        for number, (_, _, edges) in enumerate(tnlayers.diagram.contraction_steps(plan), start=1):
            for edge in edges:
                k = int(edge[1:]) - 1
                expected.append((number, edge[0], k))
        assert len(numbers) == len(expected)
        for number, kind, k in expected:  # on the input leg between the box and x, or under the bond
            assert any(
                n == number
                and (
                    (abs(x - xs[k]) < 0.3 and top < y < x_box[1]) if kind == "i" else (xs[k] < x < xs[k + 1] and y < 0)
                )
                for n, (x, y) in numbers
            ), (number, kind, k, numbers)


def test_entropy_and_the_entanglement_table() -> None:
    from tnlayers.decompose import EntanglementReport, _entropy

    assert _entropy(np.full(4, 0.5)) == pytest.approx(math.log(4), rel=1e-15)  # the sum of s^2 is exactly 1
    assert _entropy(np.zeros(3)) == 0.0
    spectra = (np.array([3.0, 2.0, 1.0, 0.5, 0.25]), np.array([1.0]), np.array([4.0, 3.0, 2.0, 1.0]))
    report = EntanglementReport(spectra, (0.5, 0.0, 1.25), (5, 1, 4))
    assert str(report).splitlines() == [
        "bond | dimension | entropy | bound log(D) | largest singular values",
        "   1 |         5 |  0.5000 |       1.6094 | 3, 2, 1, 0.5, ...",
        "   2 |         1 |  0.0000 |       0.0000 | 1",
        "   3 |         4 |  1.2500 |       1.3863 | 4, 3, 2, 1",
    ]
