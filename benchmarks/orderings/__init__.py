"""Contraction orderings of MPO layers compared on the same hardware, and the planner's ``auto`` judged.

    python -m benchmarks.orderings                          # numpy, torch and tensorflow; the full grid
    python -m benchmarks.orderings --backends torch --cases paper --batches 1 32 1024
    python -m benchmarks.orderings --quick                  # a smoke run (< 60 s), used by a test
    python -m benchmarks.orderings --backends torch --fit   # also fit the torch cost model to the times

For each case (layer shape and bond dimension), batch size and backend, every ordering runs on the
same inputs: its output is checked against the dense product (NumPy, float64) first, then the
orderings are timed round-robin (warm-up, then ``--repeats`` samples), forward and
forward+backward (gradients of the cores, ``loss = y.sum()``). The dense layer and, where
installed, TensorLy-Torch's blockTT ``FactorizedLinear`` (torch) and TensorNetwork's tn_keras
``DenseMPO`` (tensorflow) run beside them. Output in ``--out``: ``records.jsonl`` (one line per
measurement, with versions, threads and CPU), ``summary.md`` and two PNG plots.

GPU: ``--device cuda`` runs torch on the GPU and synchronises before reading the clock (untested
here: this project's machines have no GPU).

The package: ``cases`` (the grid), ``runners`` (one per backend), ``peers`` (tltorch, tn_keras),
``measure`` (checking and timing a case, the environment), ``profiling`` (the per-call overhead, and
where ``--profile`` finds the time goes), ``analysis``
(ratios, per-path times, the cost-model fit), ``report`` (summary and plots), ``cli`` (the command).
"""

from .analysis import dense_ratios, fit_cost_model, path_times, planner_figures, ratio_table, score_cost_model
from .cases import BASELINES, CASES, ORDERINGS, Case

__all__ = [
    "BASELINES",
    "CASES",
    "ORDERINGS",
    "Case",
    "dense_ratios",
    "fit_cost_model",
    "path_times",
    "planner_figures",
    "ratio_table",
    "score_cost_model",
]
