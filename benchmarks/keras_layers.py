"""MPODense against keras.layers.Dense and TensorNetwork's tn_keras DenseMPO, inside tf.function.

    python -m benchmarks.keras_layers              # 1024 -> 1024 as 4^5 (D 8, 16), 4096 -> 4096 as 16^3 (D 8)
    python -m benchmarks.keras_layers --quick      # a smoke run of a few seconds

All three layers hold the same W (DenseMPO gets our cores, permuted to its layout) and their
outputs are checked against each other before timing. Times are medians of round-robin repeats of
the forward pass and of forward+backward (gradients of every weight), each a traced tf.function.
Ratios are to the dense layer: below 1 is faster than Dense.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from tnlayers.backends.keras import MPODense

import tnlayers
from benchmarks.records import write_records
from tnlayers.timing import calls_per_sample, round_robin

CASES = [  # (label, modes, rank)
    ("1024 as 4^5", (4,) * 5, 8),
    ("1024 as 4^5", (4,) * 5, 16),
    ("4096 as 16^3", (16,) * 3, 8),
]
BATCHES = (1, 32, 512)
QUICK_CASES, QUICK_BATCHES = [CASES[0]], (1, 32)


def _peer(cores: list[np.ndarray], bias: np.ndarray) -> Any:
    """tn_keras DenseMPO holding the same cores: nodes (in, r, out), (in, r, r', out), (in, r, out)."""
    try:
        from tensornetwork.tn_keras.layers import DenseMPO
    except ImportError:
        return None
    n, rank = len(cores), cores[0].shape[-1]
    layer = DenseMPO(int(np.prod([c.shape[2] for c in cores])), num_nodes=n, bond_dim=int(rank))
    layer.build((None, int(np.prod([c.shape[1] for c in cores]))))
    nodes = [cores[0][0].transpose(0, 2, 1)]
    nodes += [c.transpose(1, 0, 3, 2) for c in cores[1:-1]]
    nodes += [cores[-1][..., 0].transpose(1, 0, 2)]
    for variable, value in zip(layer.nodes, nodes):
        variable.assign(value)
    layer.bias_var.assign(bias)
    return layer


def _timed(layer: Any, x: tf.Tensor) -> dict[str, Callable[[], object]]:
    forward = tf.function(lambda v: layer(v))

    @tf.function  # type: ignore[untyped-decorator]
    def forward_backward(v: tf.Tensor) -> Any:
        with tf.GradientTape() as tape:
            y = layer(v)
        return tape.gradient(y, layer.trainable_weights)

    return {"forward": lambda: forward(x).numpy(), "forward+backward": lambda: [g.numpy() for g in forward_backward(x)]}


def measure(cases: Sequence[Any], batches: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    records = []
    for label, modes, rank in cases:
        spec = tnlayers.MPOSpec(modes, modes, rank)
        cores = tnlayers.init_cores(spec, seed=0)
        bias = np.linspace(-1, 1, spec.out_features).astype(np.float32)
        layers: dict[str, Any] = {"mpo": MPODense.from_cores(cores, bias)}
        dense = keras.layers.Dense(spec.out_features)
        dense.build((None, spec.in_features))
        dense.set_weights([tnlayers.to_dense(cores), bias])
        layers["dense"] = dense
        peer = _peer(cores, bias)
        if peer is not None:
            layers["tn_keras"] = peer
        for batch in batches:
            x = tf.constant(np.random.default_rng(batch).normal(size=(batch, spec.in_features)).astype(np.float32))
            reference = x.numpy().astype(np.float64) @ tnlayers.to_dense(cores).astype(np.float64) + bias
            for name, layer in layers.items():
                error = np.abs(layer(x).numpy() - reference).max() / np.abs(reference).max()
                if error > 1e-4:
                    raise RuntimeError(f"{name} is wrong on {label} D {rank} B {batch}: relative error {error:.2e}")
            row: dict[str, Any] = {"case": label, "rank": rank, "batch": batch}
            row["plan"] = tnlayers.plan(spec, batch).method
            for mode in ("forward", "forward+backward"):
                runs = {name: _timed(layer, x)[mode] for name, layer in layers.items()}
                inner = calls_per_sample(runs["mpo"])
                row[mode] = {
                    name: statistics.median(t) for name, t in round_robin(runs, repeats, inner, warmup=2).items()
                }
            records.append(row)
            print(_line(row), flush=True)
    return records


def _line(row: dict[str, Any]) -> str:
    cells = []
    for mode in ("forward", "forward+backward"):
        times = row[mode]
        ratios = " ".join(f"{name}={times[name] / times['dense']:.2f}" for name in times if name != "dense")
        cells.append(f"dense {1e3 * times['dense']:8.3f} ms, {ratios}")
    return f"{row['case']:<13} D{row['rank']:<3} B{row['batch']:<5} {row['plan']:<12} " + " | ".join(cells)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.keras_layers", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one shape at batch 1 and 32, 2 repeats")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per case and batch here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}; ratios are time / Dense time (below 1: faster)")
    print("case          D    batch  auto plan    forward | forward+backward")
    cases, batches = (QUICK_CASES, QUICK_BATCHES) if args.quick else (CASES, BATCHES)
    records = measure(cases, batches, 2 if args.quick else args.repeats)
    write_records(args.out, records, {"tensorflow": tf.__version__, "keras": keras.__version__})


if __name__ == "__main__":
    main()
