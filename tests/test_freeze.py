"""Freezing cores (MPOP-style recovery trains only the auxiliary cores): frozen ones stay bit-identical."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import tnlayers


def test_central_core_is_the_largest() -> None:
    spec = tnlayers.MPOSpec((2, 8, 8, 8, 2), (2, 8, 8, 8, 2), 4)
    sizes = [int(np.prod(s)) for s in spec.core_shapes]
    assert spec.central_core == 1 == sizes.index(max(sizes))  # the first of the three equal middle cores
    assert spec.select_cores("auxiliary") == {0, 2, 3, 4}
    assert spec.select_cores("all") == set(range(5)) and spec.select_cores([-1, 0]) == {0, 4}
    assert spec.select_cores([-5, 4]) == {0, 4}  # both ends of [-n, n - 1]


@pytest.mark.parametrize("index", [3, -4])
def test_a_core_index_just_outside_the_range_is_refused_naming_the_range(index: int) -> None:
    with pytest.raises(ValueError, match=rf"an int in \[-3, 2\] for 3 cores, got {index}$"):
        tnlayers.MPOSpec((2, 3, 4), (2, 3, 4), 2).select_cores([index])


@pytest.mark.parametrize(("cores", "message"), [("middle", "'middle'"), ([5], "got 5"), ([True], "got True")])
def test_bad_core_selections_are_clear_errors(cores: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tnlayers.MPOSpec((2, 3, 4), (2, 3, 4), 2).select_cores(cores)


def test_frozen_cores_stay_bit_identical_through_an_optimiser_step(layer_harness: Any) -> None:
    layer = layer_harness.make((2, 3, 4), (3, 2, 2), 3, "auto", np.float32)
    spec = tnlayers.decompose.spec_from_cores(layer_harness.weights(layer)[0])
    layer_harness.set_bias(layer, np.linspace(-1, 1, 12).astype(np.float32))
    layer.freeze("central", bias=True)
    before, bias_before = layer_harness.weights(layer)
    layer_harness.train_step(layer, np.random.default_rng(0).normal(size=(8, 24)).astype(np.float32))
    after, bias_after = layer_harness.weights(layer)
    assert np.array_equal(bias_before, bias_after), "the frozen bias moved"
    for k, (old, new) in enumerate(zip(before, after)):
        if k == spec.central_core:
            assert np.array_equal(old, new), "the frozen central core moved"
        else:
            assert not np.array_equal(old, new), f"trainable core {k} did not move"


def test_unfreeze_makes_everything_trainable_again(layer_harness: Any) -> None:
    layer = layer_harness.make((2, 3, 4), (3, 2, 2), 3, "auto", np.float32)
    layer.freeze("all", bias=True).unfreeze()
    layer_harness.set_bias(layer, np.linspace(-1, 1, 12).astype(np.float32))
    before, bias_before = layer_harness.weights(layer)
    layer_harness.train_step(layer, np.random.default_rng(0).normal(size=(8, 24)).astype(np.float32))
    after, bias_after = layer_harness.weights(layer)
    assert all(not np.array_equal(old, new) for old, new in zip(before, after))
    assert not np.array_equal(bias_before, bias_after)


def test_torch_freeze_cores_over_a_model() -> None:
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear, freeze_cores

    model = torch.nn.Sequential(MPOLinear((4, 4, 4), (4, 4, 4), 4), torch.nn.ReLU(), MPOLinear((4, 4, 4), (2, 5, 1), 2))
    trainable, frozen = freeze_cores(model)
    central = [m.cores[m.spec.central_core].numel() for m in (model[0], model[2])]
    assert frozen == sum(central) and trainable + frozen == sum(
        c.numel() for m in (model[0], model[2]) for c in m.cores
    )
    with pytest.raises(ValueError, match="no MPO layers"):
        freeze_cores(torch.nn.Linear(3, 3))
