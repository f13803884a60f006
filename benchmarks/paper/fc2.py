"""FC2 on MNIST (Gao et al. 2020, Fig. 2): dense 784-256-10 against MPO-FC2 at several bond dimensions.

MPO-FC2 is ``M^{4,4,4,4}_{4,7,7,4}(D)``, ReLU, ``M^{1,1,10,1}_{4,4,4,4}(4)``; bonds are capped at their
exact maximum (as the paper's plot shows). rho counts the two replaced weight matrices only (Eq. 9).

    python -m benchmarks.paper.fc2 [--dataset fashion-mnist] [--epochs 20] [--seeds 3] [--bonds 2 4 8 16 22]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from functools import partial

import torch
from tnlayers.backends.torch import MPOLinear
from torch import nn

import tnlayers

from . import common

DENSE_WEIGHTS = 784 * 256 + 256 * 10
PAPER_DENSE = 98.35
PAPER_MPO = {2: 97.57, 4: 97.80, 6: 97.95, 8: 97.99, 10: 98.15, 12: 98.17, 14: 98.24, 16: 98.35, 18: 98.40,
             20: 98.41, 22: 98.41}  # fmt: skip
"""Fig. 2, read off the plot (±0.03 points); MNIST only."""


def dense_fc2() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def mpo_fc2(bond: int) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tnlayers.RankClippedWarning)  # D > 16 is capped on the outer bonds
        return nn.Sequential(
            MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), bond), nn.ReLU(), MPOLinear((4, 4, 4, 4), (1, 1, 10, 1), 4)
        )


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_arguments(parser, epochs=20, seeds=3)
    parser.add_argument("--bonds", type=int, nargs="+", default=[2, 4, 8, 16, 22])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = common.budget_from(args)
    data = common.load_data(args.dataset, args.data, args.limit)
    rows = []
    model, runs = common.run_seeds(dense_fc2, data, budget, args.seeds, "dense FC2")
    rows.append({"model": "dense FC2", "bond": None, "replaced_params": DENSE_WEIGHTS, "rho": 1.0,
                 "network_params": common.weight_params(model)[1], **common.summarise(runs)})  # fmt: skip
    for bond in args.bonds:
        model, runs = common.run_seeds(partial(mpo_fc2, bond), data, budget, args.seeds, f"MPO-FC2 D={bond}")
        replaced, total = common.weight_params(model)
        rows.append({"model": "MPO-FC2", "bond": bond, "replaced_params": replaced, "rho": replaced / DENSE_WEIGHTS,
                     "network_params": total, **common.summarise(runs)})  # fmt: skip
    labels = [row["model"] if row["bond"] is None else f"{row['model']} D={row['bond']}" for row in rows]
    references = [PAPER_DENSE if row["bond"] is None else PAPER_MPO.get(row["bond"]) for row in rows]
    paper = [f"{r:.2f}" if args.dataset == "mnist" and r is not None else "-" for r in references]
    return common.report("fc2", "FC2", args, budget, rows, labels, paper)


if __name__ == "__main__":
    main()
