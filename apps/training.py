"""The one training loop of the apps and the paper reproductions: AdamW with cosine decay, in torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from tqdm.auto import tqdm

__all__ = ["accuracy", "standardised", "train_classifier"]


def standardised(
    x_train: NDArray[np.float32], y_train: NDArray[np.int64], x_test: NDArray[np.float32], y_test: NDArray[np.int64]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` as tensors, the images shifted and scaled by the training
    set's mean and standard deviation: the ``data`` :func:`train_classifier` takes."""
    mean, std = float(x_train.mean()), float(x_train.std())
    return (
        torch.from_numpy((x_train - mean) / std),
        torch.from_numpy(y_train),
        torch.from_numpy((x_test - mean) / std),
        torch.from_numpy(y_test),
    )


def train_classifier(
    model: Any,
    data: tuple[Any, Any, Any, Any],
    epochs: int,
    lr: float,
    batch_size: int = 100,
    weight_decay: float = 1e-4,
    seed: int = 0,
    label: str = "",
) -> list[float]:
    """Train a torch classifier with AdamW and cosine decay; returns the test accuracy after each epoch.

    ``data`` is ``(x_train, y_train, x_test, y_test)`` as tensors; a tqdm bar shows the progress.
    """
    x_train, y_train, x_test, y_test = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(x_train) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * steps_per_epoch))
    history = []
    with tqdm(total=epochs * steps_per_epoch, desc=label, leave=False, mininterval=0.5) as bar:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            for start in range(0, len(x_train), batch_size):
                batch = order[start : start + batch_size]
                loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
                bar.update()
            history.append(accuracy(model, x_test, y_test))
            bar.set_postfix(loss=f"{loss.item():.3f}", test=f"{history[-1]:.4f}")
    return history


def accuracy(model: Any, x: Any, y: Any, batch_size: int = 1000) -> float:
    """Fraction of ``x`` that a torch classifier labels as ``y`` (in eval mode, without gradients)."""
    model.eval()
    with torch.no_grad():
        hits = sum(
            int((model(x[k : k + batch_size]).argmax(-1) == y[k : k + batch_size]).sum())
            for k in range(0, len(x), batch_size)
        )
    return hits / len(x)
