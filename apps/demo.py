"""The showcase (``tnlayers demo``): train, compress, share across frameworks, compare orderings, plot.

1. trains a dense FC2 (784-256-10) and the paper's MPO-FC2 at two bond dimensions in PyTorch;
2. compresses the trained dense FC2 with ``compress`` (TT-SVD), reports it, fine-tunes one epoch;
3. saves the MPO layers to one checkpoint and loads it into PyTorch, Keras and NumPy, which must
   predict the same labels;
4. times the contraction orderings of the MPO layer at a few batch sizes (forward+backward, torch);
5. writes ``results/demo.png`` (accuracy against compression, time per ordering) and ``demo.json``.

Data: MNIST from ``--data``, ``TNLAYERS_DATA`` or this project's ``../shared/data/mnist``; with none
of them, synthetic font digits generated offline (the output says which). Needs the ``torch`` and
``keras`` extras; the framework imports happen here, never in ``import tnlayers``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tnlayers.backends import numpy as numpy_backend
from tnlayers.backends.torch import MPOLinear, compress
from torch import nn

from tnlayers.checkpoint import load_layers, save_layers
from tnlayers.cost import cost_model_for
from tnlayers.datasets import find_folder, load_mnist, synthetic_digits
from tnlayers.plan import plan
from tnlayers.spec import MPOSpec, RankClippedWarning
from tnlayers.timing import calls_per_sample, round_robin

from .tables import format_table
from .training import accuracy, standardised, train_classifier

__all__ = ["run_demo"]

ORDERINGS = ("zipper", "reverse-zipper", "materialize", "greedy", "dp", "auto")


def _load_data(folder: str | None, quick: bool) -> tuple[tuple[Any, ...], str]:
    root = find_folder("mnist", folder)
    if root is not None:
        x_train, y_train = load_mnist(root, "train")
        x_test, y_test = load_mnist(root, "test")
        source = f"MNIST from {root}"
    else:
        x_train, y_train = synthetic_digits(20000, seed=1)
        x_test, y_test = synthetic_digits(4000, seed=2)
        source = "synthetic font digits (no MNIST found; set TNLAYERS_DATA to an MNIST folder)"
    if quick:
        x_train, y_train, x_test, y_test = x_train[:3000], y_train[:3000], x_test[:1000], y_test[:1000]
    tensors = standardised(x_train, y_train, x_test, y_test)
    return tensors, f"{source}: {len(x_train):,} training, {len(x_test):,} test images"


def _mpo_fc2(bond: int) -> Any:

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankClippedWarning)
        return nn.Sequential(
            MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), bond), nn.ReLU(), MPOLinear((4, 4, 4, 4), (1, 1, 10, 1), 4)
        )


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("\n".join("  " + line for line in format_table(headers, rows).splitlines()))


def _time_orderings(bond: int, batches: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Forward+backward of the 784 -> 256 MPO layer per ordering, against ``nn.Linear``, round-robin."""

    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankClippedWarning)
        spec = MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), bond)
        # the same seed gives every ordering the same cores
        layers: dict[str, nn.Module] = {
            name: MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), bond, strategy=name, seed=0) for name in ORDERINGS
        }
    layers["dense nn.Linear"] = nn.Linear(784, 256)
    for batch in batches:
        x = torch.randn(batch, 784)
        reference = layers["auto"](x)
        for name in ORDERINGS:
            torch.testing.assert_close(layers[name](x), reference, rtol=1e-4, atol=1e-4)

        def step(layer: nn.Module, x: torch.Tensor = x) -> None:
            layer.zero_grad(set_to_none=False)
            layer(x).sum().backward()

        contenders = {name: (lambda layer=layer: step(layer)) for name, layer in layers.items()}
        inner = calls_per_sample(contenders["auto"], 2e-3)
        times = round_robin(contenders, repeats, inner)
        chosen = plan(spec, batch, cost_model=cost_model_for("torch"), gradients="cores").method
        fastest = min(statistics.median(times[name]) for name in ORDERINGS)
        for name in layers:
            records.append(
                {"batch": batch, "ordering": name, "ms": 1e3 * statistics.median(times[name]),
                 "vs_fastest_mpo": statistics.median(times[name]) / fastest, "auto_chose": chosen}
            )  # fmt: skip
    return records


def _plot(models: list[dict[str, Any]], orderings: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in models:
        left.scatter(row["rho"], 100 * row["accuracy"], s=40)
        left.annotate(row["model"], (row["rho"], 100 * row["accuracy"]), fontsize=8, xytext=(4, 4),
                      textcoords="offset points")  # fmt: skip
    left.set_xscale("log")
    left.set_xlabel("rho: parameters of the replaced layers / dense")
    left.set_ylabel("test accuracy (%)")
    left.set_title("accuracy against compression")
    batches = sorted({r["batch"] for r in orderings})
    for name in [*ORDERINGS, "dense nn.Linear"]:
        ms = [next(r["ms"] for r in orderings if r["batch"] == b and r["ordering"] == name) for b in batches]
        right.plot(batches, ms, marker="o", label=name, linestyle="--" if name.startswith("dense") else "-")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("batch size")
    right.set_ylabel("forward+backward, ms (median)")
    right.set_title("784 -> 256 MPO layer: time per contraction ordering")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_demo(
    data: str | None = None,
    epochs: int = 3,
    bonds: Sequence[int] = (4, 16),
    batches: Sequence[int] = (1, 32, 1024),
    repeats: int = 7,
    out: str | os.PathLike[str] = "results",
    quick: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the five steps (see the module docstring); returns what ``demo.json`` holds."""
    started = time.perf_counter()
    output = Path(out)
    output.mkdir(parents=True, exist_ok=True)
    tensors, source = _load_data(data, quick)
    print(f"== 1. Train a dense FC2 and MPO-FC2 (D = {', '.join(map(str, bonds))}) in PyTorch ==")
    print(f"   data: {source}; {epochs} epoch(s), AdamW, cosine schedule\n")
    dense, models, trained_mpo = _train_models(tensors, epochs, bonds, seed)
    report = _compress_and_fine_tune(dense, tensors, max(bonds), models, seed)
    frameworks = _share_across_frameworks(trained_mpo[max(bonds)], tensors, output / "mpo_fc2.safetensors")

    print(f"\n== 4. Contraction orderings of the MPO layer 784 -> 256 at D = {max(bonds)} (forward+backward) ==\n")
    timings = _time_orderings(max(bonds), batches, repeats)
    _print_table(
        ["batch", "ordering", "ms (median)", "x fastest MPO ordering"],
        [[r["batch"], r["ordering"] + (f" -> {r['auto_chose']}" if r["ordering"] == "auto" else ""), f"{r['ms']:.3f}",
          f"{r['vs_fastest_mpo']:.2f}"] for r in timings],
    )  # fmt: skip
    print("   (torch, this machine; `python -m benchmarks.orderings` runs the full comparison)")

    figure = output / "demo.png"
    _plot(models, timings, figure)
    result = {"data": source, "epochs": epochs, "models": models, "compression": report.as_dicts(),
              "frameworks": frameworks, "orderings": timings, "seconds": time.perf_counter() - started}  # fmt: skip
    (output / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n== 5. Wrote {figure} and {output / 'demo.json'} ({result['seconds']:.0f} s in all) ==")
    return result


def _weights(layers: Sequence[Any]) -> int:
    """Weights of dense layers, or core parameters of MPO layers (biases left out, as rho counts them)."""
    return sum(p.numel() for layer in layers for name, p in layer.named_parameters() if name != "bias")


def _train_models(
    tensors: tuple[Any, ...], epochs: int, bonds: Sequence[int], seed: int
) -> tuple[Any, list[dict[str, Any]], dict[int, Any]]:
    """Step 1: the dense FC2 and MPO-FC2 at each bond dimension, trained; a table of their accuracy."""
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    dense_weights = _weights([dense[0], dense[2]])
    history = train_classifier(dense, tensors, epochs, 5e-3, seed=seed, label="dense FC2")
    models: list[dict[str, Any]] = [
        {"model": "dense FC2", "params": dense_weights, "rho": 1.0, "accuracy": history[-1]}
    ]
    trained_mpo: dict[int, Any] = {}
    for bond in bonds:
        torch.manual_seed(seed)
        trained_mpo[bond] = network = _mpo_fc2(bond)
        history = train_classifier(network, tensors, epochs, 1e-2, seed=seed, label=f"MPO-FC2 D={bond}")
        params = _weights([network[0], network[2]])
        models.append({"model": f"MPO-FC2 D={bond}", "params": params, "rho": params / dense_weights,
                       "accuracy": history[-1]})  # fmt: skip
    _print_table(
        ["model", "weights", "rho", "compression", "test accuracy"],
        [[m["model"], f"{m['params']:,}", f"{m['rho']:.4f}", f"{1 / m['rho']:.0f}x", f"{100 * m['accuracy']:.2f}%"]
         for m in models],
    )  # fmt: skip
    return dense, models, trained_mpo


def _compress_and_fine_tune(
    dense: Any, tensors: tuple[Any, ...], rank: int, models: list[dict[str, Any]], seed: int
) -> Any:
    """Step 2: ``compress`` a copy of the trained dense FC2, then one epoch of fine-tuning."""
    print(f"\n== 2. Compress the trained dense FC2 with compress(rank={rank}) (TT-SVD, no retraining) ==\n")
    compressed = copy.deepcopy(dense)
    report = compress(compressed, rank=rank, min_features=256)
    print(report)
    after = accuracy(compressed, tensors[2], tensors[3])
    tuned = train_classifier(compressed, tensors, 1, 1e-3, seed=seed, label="fine-tune")[-1]
    print(f"\ntest accuracy: dense {100 * models[0]['accuracy']:.2f}% -> compressed {100 * after:.2f}% "
          f"-> after one epoch of fine-tuning {100 * tuned:.2f}%")  # fmt: skip
    models.append({"model": f"compress(dense, rank={rank}) + 1 epoch fine-tuning", "params": report.params_after,
                   "rho": report.compression_ratio, "accuracy": tuned})  # fmt: skip
    return report


def _share_across_frameworks(network: Any, tensors: tuple[Any, ...], checkpoint: Path) -> list[dict[str, Any]]:
    """Step 3: one checkpoint loaded by PyTorch, Keras and NumPy; per framework, how far it is from PyTorch."""
    print(f"\n== 3. One checkpoint, three frameworks: {checkpoint} ==\n")
    save_layers(checkpoint, {name: (list(network[k].cores), network[k].bias) for name, k in (("fc1", 0), ("fc2", 2))})
    layers = load_layers(checkpoint)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    from tnlayers.backends.keras import MPODense

    x_test, y_test = tensors[2], tensors[3]
    torch_net = nn.Sequential(MPOLinear.load(checkpoint, "fc1"), nn.ReLU(), MPOLinear.load(checkpoint, "fc2")).eval()
    keras_net = keras.Sequential(
        [MPODense.load(checkpoint, "fc1"), keras.layers.ReLU(), MPODense.load(checkpoint, "fc2")]
    )
    numpy_fc1 = numpy_backend.MPOLinear.load(checkpoint, "fc1")
    numpy_fc2 = numpy_backend.MPOLinear.load(checkpoint, "fc2")
    images = x_test.numpy()
    with torch.no_grad():
        logits = {"PyTorch": torch_net(x_test).numpy()}
    logits["Keras"] = np.asarray(keras_net.predict(images, batch_size=1000, verbose=0))
    logits["NumPy"] = numpy_fc2(np.maximum(numpy_fc1(images), 0))
    labels = {name: value.argmax(1) for name, value in logits.items()}
    records: list[dict[str, Any]] = [
        {
            "framework": name,
            "same_labels_as_pytorch": float((labels[name] == labels["PyTorch"]).mean()),
            "max_logit_gap": float(np.abs(value - logits["PyTorch"]).max()),
            "accuracy": float((labels[name] == y_test.numpy()).mean()),
        }
        for name, value in logits.items()
    ]
    rows = [[r["framework"], keras.backend.backend() if r["framework"] == "Keras" else "",
             f"{100 * r['same_labels_as_pytorch']:.2f}%", f"{r['max_logit_gap']:.1e}", f"{100 * r['accuracy']:.2f}%"]
            for r in records]  # fmt: skip
    print(f"   layers in the file: {', '.join(f'{k} {v.spec}' for k, v in layers.items())}\n")
    _print_table(["framework", "Keras backend", "same labels as PyTorch", "max |logit gap|", "test accuracy"], rows)
    same = all(np.array_equal(labels[name], labels["PyTorch"]) for name in labels)
    print(f"\n   all three frameworks predict the same labels: {same}")
    return records
