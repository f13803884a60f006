"""LeNet-5 on MNIST (Gao et al. 2020, Table I): dense against MPO-Net with rho = 0.05.

The MPO-Net replaces the last convolution (5x5 over the 5x5 map: a 400 -> 120 linear map) by
``M^{2,5,6,2}_{2,10,10,2}(4)``, and the two dense layers by ``M^{2,3,7,2}_{2,5,6,2}(4)`` and
``M^{1,5,2,1}_{2,3,7,2}(2)``.

    python -m benchmarks.paper.lenet5 [--dataset fashion-mnist] [--epochs 20] [--seeds 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from tnlayers.backends.torch import MPOConv2d, MPOLinear
from torch import nn

from . import common

REPLACED_WEIGHTS = 16 * 5 * 5 * 120 + 120 * 84 + 84 * 10
PAPER = {"dense": "99.17 ± 0.04", "mpo": "99.17 ± 0.08"}  # MNIST, Table I


def _features(conv3: nn.Module) -> list[nn.Module]:
    return [
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        conv3, nn.ReLU(), nn.Flatten(),
    ]  # fmt: skip


def dense_lenet5() -> nn.Module:
    return nn.Sequential(*_features(nn.Conv2d(16, 120, 5)), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def mpo_lenet5() -> nn.Module:
    return nn.Sequential(
        *_features(MPOConv2d(16, 120, 5, (2, 10, 10, 2), (2, 5, 6, 2), 4)),
        MPOLinear((2, 5, 6, 2), (2, 3, 7, 2), 4), nn.ReLU(),
        MPOLinear((2, 3, 7, 2), (1, 5, 2, 1), 2),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, epochs=20, seeds=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = common.budget_from(args)
    data = common.load_data(args.dataset, args.data, args.limit)
    rows = []
    for name, build in (("dense LeNet-5", dense_lenet5), ("MPO LeNet-5", mpo_lenet5)):
        model, runs = common.run_seeds(build, data, budget, args.seeds, name)
        replaced, total = common.weight_params(model)
        replaced = replaced or REPLACED_WEIGHTS
        rows.append({"model": name, "replaced_params": replaced, "rho": replaced / REPLACED_WEIGHTS,
                     "network_params": total, **common.summarise(runs)})  # fmt: skip
    paper = [PAPER["dense"], PAPER["mpo"]] if args.dataset == "mnist" else ["-", "-"]
    return common.report("lenet5", "LeNet-5", args, budget, rows, [row["model"] for row in rows], paper)


if __name__ == "__main__":
    main()
