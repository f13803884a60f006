"""Reports: the compression table (every figure and column, written out by hand) and the cost table."""

from __future__ import annotations

import re

import pytest

import tnlayers
from tnlayers.reports import CompressionReport, LayerReport

ROWS = (
    LayerReport("fc1", "Linear", 784, 256, (4, 7, 7, 4), (4, 4, 4, 4), (1, 4, 4, 4, 1), 200704, 1024, 0.25),
    LayerReport("features.conv2", "Conv2d", 150, 16, (2, 75), (4, 4), (1, 3, 1), 2400, 624, 0.0125, 0.003),
)


def _report() -> CompressionReport:
    return CompressionReport(ROWS, 203_530, 2_074, skipped=(("head", "fewer than 4 features"),))


def test_compression_report_counts() -> None:
    report = _report()
    assert (report.params_before, report.params_after) == (203_104, 1_648)
    assert report.compression_ratio == pytest.approx(1_648 / 203_104, rel=1e-15)
    assert report.network_compression_ratio == pytest.approx(2_074 / 203_530, rel=1e-15)
    assert ROWS[1].compression_ratio == pytest.approx(0.26, rel=1e-15)
    assert CompressionReport((), 10, 10).compression_ratio == 1.0  # nothing replaced
    first, second = report.as_dicts()
    assert first["name"] == "fc1" and first["ranks"] == [1, 4, 4, 4, 1] and first["output_error"] is None
    assert first["compression_ratio"] == pytest.approx(1024 / 200704, rel=1e-15)
    assert second["kind"] == "Conv2d" and second["output_error"] == 0.003 and second["params_after"] == 624


def test_compression_report_table_exactly() -> None:
    header = (
        "layer                    kind          shape                     modes max D              params     rho error"
    )
    expected = [
        header,
        "-" * len(header),
        "fc1                      Linear      784x256          4x7x7x4->4x4x4x4     4      200,704->1,024  0.0051"
        " 2.50e-01",
        "features.conv2           Conv2d       150x16                 2x75->4x4     3          2,400->624  0.2600"
        " 1.25e-02 (outputs 3.00e-03)",
        "-" * len(header),
        "replaced layers: 203,104 -> 1,648 params, rho 0.0081; whole network: 203,530 -> 2,074 (98.13x smaller)",
        "kept dense: head (fewer than 4 features)",
    ]
    assert str(_report()) == "\n".join(expected)


def test_cost_report_table() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 16)
    cost = tnlayers.report(spec, 1000, backend="torch")
    assert cost.dense_flops == 2 * 1024 * 784 * 256 and cost.backend == "torch"
    lines = str(cost).splitlines()
    assert lines[0] == (
        f"{spec}: 14,848 params of 200,704 dense (rho 0.07398, 13.5x smaller); batch 1024, torch cost model; "
        f"auto picks {cost.chosen.method}"
    )
    assert lines[1].split() == ["strategy", "flops", "vs", "dense", "largest", "interm.", "model", "cost"]
    assert lines[-1] == f"dense x @ W: {2 * 1024 * 784 * 256:.3e} flops; model cost is relative to the chosen plan"
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert list(rows) == ["zipper", "reverse-zipper", "materialize", "greedy", "dp", "optimal"]
    for plan in cost.plans:
        fields = rows[plan.strategy].split()
        assert float(fields[1]) == pytest.approx(plan.flops, rel=1e-3)
        assert float(fields[2]) == pytest.approx(plan.flops / (2 * 1024 * 784 * 256), abs=6e-4)
        assert int(fields[3].replace(",", "")) == plan.largest_intermediate
        assert float(fields[4]) == pytest.approx(plan.cost / cost.chosen.cost, abs=6e-3)
        assert rows[plan.strategy].endswith("  <- auto") == (plan.path == cost.chosen.path)
    chosen = [row for row in cost.as_dicts() if row["chosen"]]
    assert chosen and all(row["flops"] == cost.chosen.flops for row in chosen)
    assert set(cost.as_dicts()[0]) == {
        "strategy",
        "method",
        "flops",
        "largest_intermediate",
        "memory_traffic",
        "cost",
        "chosen",
    }


def test_report_leaves_out_optimal_beyond_six_cores_and_checks_the_backend() -> None:
    seven = tnlayers.MPOSpec((2,) * 7, (2,) * 7, 2)
    assert [p.strategy for p in tnlayers.report(seven, 8).plans] == [
        "zipper",
        "reverse-zipper",
        "materialize",
        "greedy",
        "dp",
    ]
    six = tnlayers.MPOSpec((2,) * 6, (2,) * 6, 2)
    assert tnlayers.report(six, 8).plans[-1].strategy == "optimal"
    with pytest.raises(ValueError, match=re.escape("unknown backend 'cuda'; expected one of numpy, ")):
        tnlayers.report(six, 8, backend="cuda")
    cores = tnlayers.init_cores(six, seed=0)
    assert tnlayers.report(cores, 8).spec == six and tnlayers.report(cores, 3).batch_size == 4


def test_report_defaults_and_its_cost_model() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 16)
    assert tnlayers.report(spec).batch_size == 1 and tnlayers.report(spec).backend == "numpy"
    torch_model = tnlayers.cost.cost_model_for("torch")
    for found in tnlayers.report(spec, 1000, backend="torch").plans:
        assert found.cost == tnlayers.plan(spec, 1000, found.strategy, cost_model=torch_model).cost
    long_kind = LayerReport("emb", "Embedding", 4, 2, (2, 2), (1, 2), (1, 1, 1), 8, 4, 0.5)
    assert str(CompressionReport((long_kind,), 8, 4)).splitlines()[2].startswith("emb" + " " * 22 + "Embeddi ")
