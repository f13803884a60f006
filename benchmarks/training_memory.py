"""What a Keras ``MPODense`` keeps for its backward in training, against ``Dense``, and what the bound costs.

    python -m benchmarks.training_memory                          # TensorFlow (KERAS_BACKEND picks JAX too)
    KERAS_BACKEND=jax python -m benchmarks.training_memory
    python -m benchmarks.training_memory --quick                  # one small case, a smoke run

Kept bytes are counted by each backend itself after one ``layer(x, training=True)``: TensorFlow's
allocator (``get_memory_info``) with the tape alive, JAX's ``vjp`` residuals, torch's saved-tensor
hooks (distinct storages); ``x`` is counted when
kept, the weights and the output are not (TensorFlow's count is exact from about 1 MB: smaller
tensors share 1 MB regions). The dense layer keeps ``x``. Times are medians of
round-robin repeats of forward+backward (gradients of ``x`` and every weight) inside ``tf.function``
or ``jax.jit``; the torch layers' figures come from ``python -m benchmarks.orderings``.
"""

from __future__ import annotations

import argparse
import gc
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
from tnlayers.backends.keras import MPODense

import tnlayers
from benchmarks.records import torch_saved_bytes, write_records
from tnlayers.timing import calls_per_sample, round_robin

BACKEND = keras.backend.backend()
CASES = [  # (in modes, out modes, bond dimension, batch): the training-memory issue's table
    ((4, 7, 7, 4), (4, 4, 4, 4), 16, 1024),
    ((8, 8, 8, 8), (8, 8, 8, 8), 8, 256),
    ((16, 16, 16), (16, 16, 16), 8, 256),
    ((6, 6, 6, 6), (6, 6, 6, 6), 12, 256),
    ((2,) * 10, (2,) * 10, 16, 128),
]
QUICK_CASES = [((8, 8, 8), (8, 8, 8), 8, 1024)]  # TensorFlow counts tensors under 1 MB in shared regions


def kept_bytes(layer: Any, x: np.ndarray) -> int:
    """Bytes the backend keeps after ``layer(x, training=True)`` for the backward (see the module doc)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def current() -> int:
            return int(tf.config.experimental.get_memory_info("CPU:0")["current"])

        gc.collect()  # tensors of earlier calls held in reference cycles: freed now, not during the count
        before = current()
        x_t = tf.random.uniform(x.shape, dtype=x.dtype)  # allocated by TensorFlow (a NumPy constant may alias)
        with tf.GradientTape() as tape:
            y = layer(x_t, training=True)
        del x_t  # now held only if the tape keeps it
        kept = current() - before - int(np.prod(y.shape)) * y.dtype.size
        del tape
        return int(kept)
    if BACKEND == "jax":
        import jax

        values = [v.value for v in layer.trainable_variables]
        x_j = jax.numpy.asarray(x)  # a JAX array: kept, it is one of the residuals
        _, vjp = jax.vjp(lambda x, values: layer.stateless_call(values, [], x, training=True)[0], x_j, values)
        weights = {id(v) for v in values}
        return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp) if id(leaf) not in weights))
    import torch

    return torch_saved_bytes(lambda: layer(torch.from_numpy(x), training=True), [v.value for v in layer.weights])


def _train_step(layer: Any, x: np.ndarray) -> Callable[[], object]:
    """Forward+backward (gradients of x and every trainable weight), compiled."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x_t = tf.constant(x)

        @tf.function  # type: ignore[untyped-decorator]
        def step(x: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, [x, *layer.trainable_variables])

        return lambda: [g.numpy() for g in step(x_t)]
    if BACKEND != "jax":
        raise ValueError(f"this benchmark times the tensorflow and jax Keras backends, not {BACKEND!r}")
    import jax

    values = [v.value for v in layer.trainable_variables]
    grad = jax.jit(jax.grad(lambda x, v: layer.stateless_call(v, [], x, training=True)[0].sum(), argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(x, values))  # type: ignore[no-untyped-call]


def measure(cases: Sequence[Any], repeats: int) -> list[dict[str, Any]]:
    records = []
    for in_modes, out_modes, rank, batch in cases:
        x = np.random.default_rng(0).normal(size=(batch, int(np.prod(in_modes)))).astype("float32")
        layers = {
            "dense": keras.layers.Dense(int(np.prod(out_modes))),
            "bounded": MPODense(in_modes, out_modes, rank),
            "unbounded": MPODense(in_modes, out_modes, rank, saved_budget=None),
        }
        for layer in layers.values():
            layer(x[:2])
            kept_bytes(layer, x)  # warm: plans, the allocator's first chunks
        kept = {name: kept_bytes(layer, x) for name, layer in layers.items()}
        runs = {name: _train_step(layer, x) for name, layer in layers.items()}
        times = round_robin(runs, repeats, calls_per_sample(runs["bounded"]), warmup=2)
        median = {name: statistics.median(samples) for name, samples in times.items()}
        row = {
            "case": f"{'x'.join(map(str, in_modes))} D{rank}",
            "batch": batch,
            "backend": BACKEND,
            "kept_bytes": kept,
            "seconds": median,
        }
        records.append(row)
        print(_line(row), flush=True)
    return records


def _line(row: dict[str, Any]) -> str:
    kept, seconds = row["kept_bytes"], row["seconds"]
    dense = kept["dense"]
    return (
        f"| {row['case']} | {row['batch']} | {dense / 1e6:.2f} MB | {kept['unbounded'] / dense:.2f} | "
        f"{kept['bounded'] / dense:.2f} | {seconds['unbounded'] / seconds['dense']:.2f} | "
        f"{seconds['bounded'] / seconds['dense']:.2f} | {seconds['bounded'] / seconds['unbounded']:.2f} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="one small case, 2 repeats")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per case here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
    print(f"Keras {keras.__version__} on {BACKEND}; kept bytes as x Dense's, times forward+backward as x Dense's")
    print("| layer | batch | Dense keeps | kept, unbounded | kept, bounded | time, unbounded | time, bounded | cost |")
    print("|---|---|---|---|---|---|---|---|")
    records = measure(QUICK_CASES if args.quick else CASES, 2 if args.quick else args.repeats)
    write_records(args.out, records, {"keras": keras.__version__, "backend": BACKEND})


if __name__ == "__main__":
    main()
