"""What the paper scripts share: data, the training loop, parameter counting, tables and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tnlayers.apps.training import standardised, train_classifier
from tnlayers.backends.torch import MPOConv2d, MPOLinear
from torch import nn

import tnlayers
from tnlayers.datasets import load_mnist, resolve_folder

PROJECT = Path(__file__).resolve().parents[2]


@dataclass
class Budget:
    """The training budget, stated beside every table (the paper's was 300,000 steps of batch 100)."""

    epochs: int
    batch_size: int = 100
    lr: float = 1e-2
    """Peak learning rate of the MPO networks."""
    dense_lr: float = 5e-3
    """Peak learning rate of the dense networks."""
    weight_decay: float = 1e-4
    optimizer: str = "AdamW, cosine decay to 0, no warm-up"

    def describe(self) -> str:
        return (
            f"{self.epochs} epochs of batch {self.batch_size}, {self.optimizer}, peak lr {self.lr:g} (MPO) / "
            f"{self.dense_lr:g} (dense), weight decay {self.weight_decay:g}; final-epoch test accuracy"
        )


@dataclass
class RunResult:
    """One training run (one seed)."""

    seed: int
    final_accuracy: float
    best_accuracy: float
    accuracy_per_epoch: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


def common_arguments(parser: argparse.ArgumentParser, epochs: int, seeds: int) -> None:
    parser.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    parser.add_argument(
        "--data", type=Path, default=None, help="folder of the IDX files (default: see tnlayers.datasets.find_folder)"
    )
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seeds", type=int, default=seeds, help="independent runs per model")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate of the MPO networks")
    parser.add_argument("--dense-lr", type=float, default=5e-3, help="peak learning rate of the dense networks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 lets two runs share 2 cores)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke runs)")
    parser.add_argument("--out", type=Path, default=PROJECT / "results" / "paper")


def load_data(
    dataset: str, folder: Path | None, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised ``(N, 784)`` float32 images and int64 labels: train then test."""
    root = resolve_folder(folder, dataset)
    x_train, y_train = load_mnist(root, "train")
    x_test, y_test = load_mnist(root, "test")
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] = standardised(x_train, y_train, x_test, y_test)
    return data


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    budget: Budget,
    seed: int,
    label: str = "",
) -> RunResult:
    """Train with AdamW and a cosine schedule; test accuracy after every epoch (the last one is reported)."""
    is_mpo = any(isinstance(module, (MPOLinear, MPOConv2d)) for module in model.modules())
    lr = budget.lr if is_mpo else budget.dense_lr
    cpu, wall = time.process_time(), time.perf_counter()
    history = train_classifier(model, data, budget.epochs, lr, budget.batch_size, budget.weight_decay, seed, label)
    return RunResult(seed, history[-1], max(history), history, time.process_time() - cpu, time.perf_counter() - wall)


def weight_params(model: nn.Module) -> tuple[int, int]:
    """``(replaced, total)``: MPO core parameters, and all parameters of the model (biases included)."""
    replaced = sum(
        sum(core.numel() for core in module.cores)
        for module in model.modules()
        if isinstance(module, (MPOLinear, MPOConv2d))
    )
    return replaced, sum(p.numel() for p in model.parameters())


def summarise(runs: Sequence[RunResult]) -> dict[str, Any]:
    finals = [100 * run.final_accuracy for run in runs]
    bests = [100 * run.best_accuracy for run in runs]
    return {
        "accuracy_mean": statistics.mean(finals),
        "accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "best_epoch_accuracy_mean": statistics.mean(bests),
        "cpu_seconds": sum(run.cpu_seconds for run in runs),
        "wall_seconds": sum(run.wall_seconds for run in runs),
        "runs": [run.__dict__ for run in runs],
    }


def run_seeds(
    build: Callable[[], nn.Module],
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    budget: Budget,
    seeds: int,
    label: str,
) -> tuple[nn.Module, list[RunResult]]:
    runs, model = [], nn.Module()
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = build()
        runs.append(train(model, data, budget, seed, f"{label} seed {seed}"))
    return model, runs


def budget_from(args: argparse.Namespace) -> Budget:
    return Budget(args.epochs, args.batch_size, args.lr, args.dense_lr)


def environment(threads: int) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "tnlayers": tnlayers.__version__,
        "numpy": np.__version__,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def write_result(out: Path, name: str, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_cell(summary: dict[str, Any]) -> str:
    return f"{summary['accuracy_mean']:.2f} ± {summary['accuracy_std']:.2f}"


HEADERS = ["model", "params (replaced)", "rho", "rho (network)", "test acc. % (final)", "best epoch %", "paper %"]


def report(
    experiment: str,
    title: str,
    args: argparse.Namespace,
    budget: Budget,
    rows: list[dict[str, Any]],
    labels: Sequence[str],
    paper: Sequence[str],
) -> dict[str, Any]:
    """Print the table beside the paper's figures (``rows[0]`` is the dense network), write the JSON result."""
    dense_total = rows[0]["network_params"]
    lines = [
        [label, f"{row['replaced_params']:,}", f"{row['rho']:.4f}", f"{row['network_params'] / dense_total:.4f}",
         accuracy_cell(row), f"{row['best_epoch_accuracy_mean']:.2f}", reference]
        for row, label, reference in zip(rows, labels, paper)
    ]  # fmt: skip
    print(f"\n{title} on {args.dataset}, {args.seeds} seeds, {budget.describe()}\n")
    print(table(HEADERS, lines))
    print(f"\nCPU time {sum(row['cpu_seconds'] for row in rows) / 60:.1f} min ({args.threads} thread(s))")
    result = {"experiment": experiment, "dataset": args.dataset, "budget": budget.describe(), "seeds": args.seeds,
              "rows": rows, "environment": environment(args.threads)}  # fmt: skip
    write_result(args.out, f"{experiment}-{args.dataset}", result)
    return result
