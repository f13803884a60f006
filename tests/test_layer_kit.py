"""The framework-free layer kit (tnlayers.layer): one rule for every adapter, checked here once."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import reference_patches

import tnlayers
from tnlayers import layer as kit
from tnlayers.decompose import DecompositionReport


@pytest.mark.parametrize(("value", "expected"), [(3, (3, 3)), ((2, 5), (2, 5)), ([1, 4], (1, 4))])
def test_pair_accepts_an_int_or_two(value: Any, expected: tuple[int, int]) -> None:
    assert kit.pair(value, "stride") == expected


@pytest.mark.parametrize("value", [0, (1, 0), (1, 2, 3), "3", 2.0, (True, 1), None])
def test_pair_rejects_the_rest_naming_the_value(value: Any) -> None:
    with pytest.raises(ValueError, match=rf"stride must be an int >= 1 or a pair of them, got {value!r}"[:40]):
        kit.pair(value, "stride")


def test_padding_pairs_may_be_zero() -> None:
    assert kit.pair(0, "padding", minimum=0) == (0, 0)


def test_every_conv_layer_follows_the_one_pair_rule(conv_harness: Any) -> None:
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1 or a pair of them, got 0"):
        conv_harness.make_conv(3, 8, 0, None, None, 2, 1, "valid", 1, "auto", np.float32)


def test_seeds_are_drawn_below_one_limit_and_given_ones_kept() -> None:
    asked: list[int] = []
    assert kit.draw_seed(None, lambda high: asked.append(high) or high - 1) == kit.SEED_LIMIT - 1
    assert asked == [2**31 - 1]
    assert kit.draw_seed(7, lambda high: pytest.fail("a given seed is not drawn")) == 7
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        kit.draw_seed(-1, lambda high: 0)


GEOMETRIES = [(3, 1, "same", 1), ((2, 3), 2, "valid", 1), (4, 1, "same", 1), (3, 1, "valid", 2),
              (3, 2, "same", 1), (5, 3, "same", 1), (3, 2, 1, 1)]  # fmt: skip


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), GEOMETRIES)
def test_conv_output_size_matches_the_reference_im2col(kernel: Any, stride: Any, padding: Any, dilation: Any) -> None:
    geometry = kit.ConvGeometry.make(kernel, stride, padding, dilation)
    kh, kw = geometry.kernel_size
    for height, width in [(9, 11), (8, 8), (5, 7)]:
        _, size, pads = reference_patches(np.zeros((1, 1, height, width)), (kh, kw), stride, padding, dilation)
        assert geometry.output_size(height, width) == size
        assert geometry.pads(height, width) == pads


def test_a_kernel_larger_than_the_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"input of spatial size \(2, 2\) is smaller than the dilated kernel \(5, 5\)"):
        kit.ConvGeometry.make(3, 1, "valid", 2).output_size(2, 2)


def test_layer_spec_balances_missing_modes_and_names_what_does_not_fit() -> None:
    spec = kit.layer_spec(784, 256, None, None, 8)
    assert (spec.in_modes, spec.out_modes) == ((4, 7, 7, 4), (4, 4, 4, 4))
    assert kit.layer_spec(24, 6, (2, 3, 4), None, 2).out_modes == (1, 3, 2)  # as many cores as the modes given
    with pytest.raises(ValueError, match=r"in_modes \(3, 3, 2\) multiply to 18, but in_channels\*kh\*kw = 27"):
        kit.layer_spec(27, 8, (3, 3, 2), None, 2, what="in_channels*kh*kw = 27")
    with pytest.raises(ValueError, match=r"out_modes \(2, 2\) multiply to 4, but units = 5"):
        kit.layer_spec(4, 5, None, (2, 2), 2, out_what="units")


def test_gradients_needed_and_the_tune_key() -> None:
    assert kit.gradients_needed(False, True, True) == "none"
    assert kit.gradients_needed(True, False, True) == "none"
    assert kit.gradients_needed(True, True, False) == "cores"
    assert kit.gradients_needed(True, True, True) == "all"
    assert kit.tune_key("torch", "cuda:0", "float32", "all") == ("torch", "cuda:0", "float32", "all")
    with pytest.raises(ValueError, match="gradients must be one of"):
        kit.tune_key("torch", "cpu", "float32", "train")


def test_the_planner_checks_the_strategy_at_once_and_plans_per_bucket() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
        kit.LayerPlanner.make(spec, "fastest", "torch")
    planner = kit.LayerPlanner.make(spec, [[0, 1], [0, 3], [0, 2], [0, 1]], "torch")
    assert planner.strategy == ((0, 1), (0, 3), (0, 2), (0, 1)) and hash(planner)
    chosen = planner.plan(100, "cores")
    assert chosen.batch_size == 128 and chosen.path == planner.strategy and chosen.gradients == "cores"


def test_freeze_flags() -> None:
    spec = tnlayers.MPOSpec((2, 8, 8, 2), (2, 8, 8, 2), 4)
    assert kit.freeze_flags(spec) == ([True, False, True, True], True)
    assert kit.freeze_flags(spec, "auxiliary", bias=True) == ([False, True, False, False], False)


@pytest.mark.parametrize(
    ("name", "shape", "include", "exclude", "chosen"),
    [
        ("encoder.fc1", (784, 256), None, None, True),
        ("head", (256, 10), None, None, False),  # 10 outputs: a head stays dense
        ("conv", (16 * 9, 32), None, None, True),  # Conv2d(16, 32, 3): 144 -> 32
        ("narrow", (4096, 31), None, None, False),
        ("small", (100, 10), None, None, False),
        ("encoder.fc1", (784, 256), "decoder.*", None, False),
        ("encoder.fc1", (784, 256), ["decoder.*", "encoder.*"], "*.fc1", False),
    ],
)
def test_compress_choice(name: str, shape: tuple[int, int], include: Any, exclude: Any, chosen: bool) -> None:
    assert kit.compress_choice(name, *shape, include, exclude) is chosen


def test_report_rows_and_no_saving() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    row = kit.layer_report("fc", "Linear", DecompositionReport(spec, 0.25, ()))
    assert (row.in_features, row.out_features, row.params_before, row.params_after) == (784, 256, 784 * 256, 3840)
    assert kit.no_saving(DecompositionReport(spec, 0.25, ())) is None
    full = tnlayers.MPOSpec((2, 2), (2, 2), 4)
    assert kit.no_saving(DecompositionReport(full, 0.0, ())) == "no saving at ranks (1, 4, 1): 32 >= 16"
