"""The framework-free layer kit (tnlayers.layer): one rule for every adapter, checked here once."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import BOUNDED_MODEL, reference_patches

import tnlayers
from tnlayers import layer as kit
from tnlayers.decompose import DecompositionReport
from tnlayers.plan import auto_candidates, weight_step_sizes


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


@pytest.mark.parametrize(
    ("strategy", "in_modes", "out_modes", "batch", "flops_vs_dense", "traffic_vs_w", "reuses"),
    [
        ("auto", (32, 64), (32, 32), 4, 1.0, 0.0, True),  # exactly the dense flops; W exactly the cached size
        ("auto", (64, 64), (32, 32), 2, 1.0, 1.0, True),  # W above the cached size, but the plan moves as much
        ("auto", (64, 64), (32, 32), 2, 1.0, 0.5, False),  # ... and moves less: W would be read from memory
        ("autotune", (32, 32), (32, 32), 1, 1.5, 0.0, True),
        ("zipper", (32, 32), (32, 32), 1, 1.5, 0.0, False),  # an explicit ordering runs as asked
    ],
)
def test_inference_reuses_w_where_the_plan_needs_the_dense_flops_and_w_stays_cached(
    strategy: str,
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    batch: int,
    flops_vs_dense: float,
    traffic_vs_w: float,
    reuses: bool,
) -> None:
    import dataclasses

    spec = tnlayers.MPOSpec(in_modes, out_modes, 2)
    weight = spec.in_features * spec.out_features
    assert (weight <= kit.CACHED_WEIGHT_ELEMENTS) == (weight <= 2**21)
    flops = int(flops_vs_dense * 2 * batch * weight)  # one step of (1, 1, flops / 2): exactly these flops
    real = tnlayers.plan(spec, batch, "zipper")
    plan = dataclasses.replace(real, step_sizes=((1, 1, flops // 2, int(traffic_vs_w * weight)),))
    assert not plan.builds_weight and plan.flops == flops and plan.batch_size == batch
    assert kit.LayerPlanner.make(spec, strategy, "numpy").reuses_weight(plan) == reuses
    assert kit.LayerPlanner.make(spec, strategy, "numpy").reuses_weight(tnlayers.plan(spec, batch, "materialize"))


@pytest.mark.parametrize(
    ("modes", "batch", "steps", "reuses"),
    [  # W 256 x 256: small (SMALL_WEIGHT_ELEMENTS), read from the fast caches
        ((16, 16), 1, [(1, 16, 16, 0)] * 4, True),  # a fraction of the flops in four products: their fixed costs win
        ((16, 16), 64, [(64, 64, 256, 0)], False),  # a quarter of the flops in one product: the plan is cheaper
        ((16, 16), 64, [(64, 64, 256, 0)] * 4, True),  # the dense flops in four products: W, as before
        ((16, 16), 1, [(1, 1, 1, 0)], False),  # one trivial product: no cheaper than the one with W
        ((32, 32), 1, [(1, 16, 16, 0)] * 4, False),  # W 1024 x 1024: read from memory, so the plan's few flops win
    ],
)
def test_inference_reuses_a_small_w_where_the_cost_model_rates_the_plan_dearer(
    modes: tuple[int, int],
    batch: int,
    steps: list[tuple[int, int, int, int]],
    reuses: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan with fewer flops than dense still loses to one product with a small kept ``W`` when its
    products' fixed costs add up to more (small batches). By the torch model: 11 us for the one product
    at batch 1 against 40 us for the four small ones; 37 us at batch 64 against 17 us for the quarter-flops
    product."""
    import dataclasses

    spec = tnlayers.MPOSpec(modes, modes, 2)
    assert (spec.in_features * spec.out_features <= kit.SMALL_WEIGHT_ELEMENTS) == (modes == (16, 16))
    plan = dataclasses.replace(tnlayers.plan(spec, batch, "zipper"), step_sizes=tuple(steps))
    model = dataclasses.replace(tnlayers.cost.COST_MODELS["torch"], parallel_overhead=1e-6)  # the default policy's
    monkeypatch.setitem(tnlayers.cost.COST_MODELS, "torch", model)
    planner = kit.LayerPlanner.make(spec, "auto", "torch")
    assert planner.reuses_weight(plan) == reuses
    dense_flops = plan.flops >= 2 * batch * spec.in_features * spec.out_features
    assert kit.LayerPlanner.make(spec, "auto", "numpy").reuses_weight(plan) == dense_flops  # its model only ranks


# --- the survivors of a mutation run over layer.py (docs/mutation-survivors.md) ------------------------------


def test_compress_choice_applies_include_and_exclude_patterns() -> None:
    assert kit.compress_choice("encoder.fc1", 64, 64, include="encoder.*")
    assert kit.compress_choice("encoder.fc1", 64, 64, include=["head", "*.fc1"])
    assert not kit.compress_choice("encoder.fc1", 64, 64, include="decoder.*")
    assert not kit.compress_choice("encoder.fc1", 64, 64, include="encoder.*", exclude="*fc1")
    assert not kit.compress_choice("encoder.fc1", 64, 16)  # the smaller side under min_features


def test_a_compress_call_without_rank_or_tol_says_which_arguments_it_needs() -> None:
    expected = r"^compress needs a bond cap \(rank=\.\.\.\) or an error tolerance \(tol=\.\.\.\), got neither$"
    with pytest.raises(ValueError, match=expected):
        kit.check_compress_budget(None, None)
    kit.check_compress_budget(4, None)
    kit.check_compress_budget(None, 0.1)


def test_conv_route_follows_the_cost_model_it_is_given() -> None:
    from tnlayers.cost import CostModel

    spec = tnlayers.MPOSpec((3, 3, 4), (2, 4, 4), 4)
    assert kit.conv_route(spec, 256)[1]  # the NumPy model builds the kernel at 256 positions
    flops_bound = CostModel(peak_flops=1e3, bandwidth=1e20)  # only flops count: W's build is never worth it
    assert not kit.conv_route(spec, 256, cost_model=flops_bound)[1]
    planner = kit.LayerPlanner.make(spec, "auto", "numpy")
    assert planner.conv_route(1)[0].batch_size == 1 and planner.conv_route(300)[0].batch_size == 512


def test_describe_states_the_compression_factor() -> None:
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 16)
    factor = (784 * 256) / sum(int(np.prod(s)) for s in spec.core_shapes)
    assert f"(compression {factor:.1f}x)" in kit.describe(spec, True)


@pytest.mark.parametrize("value", ["2x3", 6])
def test_modes_must_be_a_sequence_of_ints_and_the_error_names_them(value: Any) -> None:
    with pytest.raises(TypeError, match=r"in_modes must be a sequence of positive integers or None, got"):
        kit.modes_or_none(value, "in_modes")


def test_a_decomposition_with_as_many_parameters_as_the_dense_matrix_saves_nothing() -> None:
    weight = np.random.default_rng(0).normal(size=(4, 4))
    _, report = tnlayers.from_dense(weight, (2, 2), (2, 2), max_rank=2)
    assert report.num_params == report.dense_params == 16  # 2*2*2 + 2*2*2
    assert kit.no_saving(report) is not None and "no saving" in kit.no_saving(report)


def _layer_classes() -> list[Any]:
    from tnlayers.backends.numpy import MPOLinear as NumpyMPOLinear

    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOLinear as TorchMPOLinear

    assert torch is not None
    return [NumpyMPOLinear, TorchMPOLinear]


def _bias_of(layer: Any) -> np.ndarray | None:
    bias = layer.bias
    return None if bias is None else np.asarray(bias.detach() if hasattr(bias, "detach") else bias)


def test_auto_layers_take_four_cores_of_rank_8_unless_told_and_pass_the_rest_on() -> None:
    for cls in _layer_classes():
        default = cls.auto(784, 256)
        assert default.spec.n_cores == 4 and max(default.spec.ranks) == 8
        assert _bias_of(default) is not None
        told = cls.auto(784, 256, n_cores=3, rank=3, bias=False)
        assert told.spec.n_cores == 3 and max(told.spec.ranks) == 3 and told.bias is None


def test_freeze_without_arguments_freezes_the_central_core_and_keeps_the_bias_trainable() -> None:
    spec = tnlayers.MPOSpec((2, 3, 4, 2), (2, 2, 3, 2), 3)
    for cls in _layer_classes():
        layer = cls(spec.in_modes, spec.out_modes, 3)
        layer.freeze()
        assert set(layer.frozen_cores) == spec.select_cores("central") == {spec.central_core}
        trainable = layer.bias_frozen is False if hasattr(layer, "bias_frozen") else layer.bias.requires_grad
        assert trainable
        layer.unfreeze()
        assert not set(layer.frozen_cores)


def test_load_picks_the_named_layer_and_passes_keywords_to_from_cores(tmp_path: Any) -> None:
    from tnlayers.checkpoint import save_layers

    rng = np.random.default_rng(0)
    first = tnlayers.init_cores(tnlayers.MPOSpec((2, 3), (3, 2), 2), seed=1)
    second = tnlayers.init_cores(tnlayers.MPOSpec((4, 2), (2, 4), 2), seed=2)
    path = tmp_path / "two.safetensors"
    biases = rng.normal(size=6).astype(np.float32), rng.normal(size=8).astype(np.float32)
    save_layers(path, {"a": (first, biases[0]), "b": (second, biases[1])})
    for cls in _layer_classes():
        layer = cls.load(path, name="b", strategy="zipper")
        assert layer.spec.in_modes == (4, 2) and layer.strategy == "zipper"
        np.testing.assert_array_equal(_bias_of(layer), biases[1])
        with pytest.raises(ValueError, match="pass name= to choose one"):
            cls.load(path)


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "rank"),
    [((4, 2), (3, 7), 3), ((2, 4, 2), (5, 3, 3), 4), ((2, 2, 4, 2), (3, 5, 2, 3), 3)],  # inputs of 2^k: exact ratios
)
@pytest.mark.parametrize("trained", ["all", "all but the first", "only the first", "none"])
def test_the_halves_of_w_are_kept_exactly_when_they_fit_beside_the_input(
    in_modes: tuple[int, ...], out_modes: tuple[int, ...], rank: int, trained: str
) -> None:
    from tnlayers.contract import get_ops, weight_halves

    spec = tnlayers.MPOSpec(in_modes, out_modes, rank)
    core_needs = tuple(
        {"all": True, "all but the first": k > 0, "only the first": k == 0, "none": False}[trained]
        for k in range(spec.n_cores)
    )
    needs = (True, *core_needs)
    rows = 32
    plan = tnlayers.plan(spec, rows, "materialize")
    halves = weight_halves(tnlayers.init_cores(spec, seed=0), get_ops("numpy"))
    kept = sum(h.size for h in halves) + (rows * spec.in_features if any(core_needs) else 0)
    exact = kept / (rows * spec.in_features)  # the budget (in input sizes) at which they just fit
    assert kit.keeps_weight_halves(plan, rows, needs, exact)
    assert not kit.keeps_weight_halves(plan, rows, needs, exact * (1 - 1e-9))
    assert not kit.keeps_weight_halves(tnlayers.plan(spec, rows, "zipper"), rows, needs, 1e9)  # W is never built
    one_core = tnlayers.MPOSpec((6,), (4,), 1)
    assert not kit.keeps_weight_halves(tnlayers.plan(one_core, rows, "materialize"), rows, (True, True), 1e9)


def test_an_autotuning_planner_uses_the_tuner_cost_model_and_gradients_it_is_given(tmp_path: Any) -> None:
    import time

    from tnlayers.autotune import Autotuner
    from tnlayers.plan import auto_candidates

    spec = tnlayers.MPOSpec((4, 4, 4), (4, 4, 4), 4)
    planner = kit.LayerPlanner.make(spec, "autotune", "torch")
    tuner = Autotuner(tmp_path / "autotune.json")
    seen: list[Any] = []

    def timer(candidate: Any) -> Any:
        seen.append(candidate)
        slow = len(seen) != 2  # the candidates come cheapest first: the second one wins, not the model's pick

        def run() -> None:
            if slow:
                time.sleep(0.0005)

        return run

    cheapest_last = sorted(auto_candidates(spec, 8, planner.cost_model, "cores"), key=lambda p: (p.cost, p.flops))
    tuned = planner.plan(8, "cores", ("cpu",), timer, tuner)
    assert len(seen) >= 2
    assert [p.path for p in seen] == list(dict.fromkeys(p.path for p in cheapest_last))[: len(seen)]
    assert tuned.path == seen[1].path != planner.plan(8, "cores").path and tuned.gradients == "cores"
    assert tuner.cached(spec, 8, ("cpu",)) is not None  # written to the tuner given, not the default one
    assert planner.plan(8, "cores", ("cpu",), None, tuner).path == tuned.path  # remembered for bucket 8


def test_conv_channels_splits_the_kernel_matrix_rows_into_positions_and_channels() -> None:
    spec = tnlayers.MPOSpec((3, 3, 4), (2, 4, 4), 2)  # 36 rows = 4 channels x 3 x 3
    assert kit.conv_channels(spec, 3) == ((3, 3), 4) and type(kit.conv_channels(spec, 3)[1]) is int
    assert kit.conv_channels(spec, (1, 3)) == ((1, 3), 12)
    with pytest.raises(ValueError, match=r"^kernel_size must be"):
        kit.conv_channels(spec, (0, 3))
    with pytest.raises(ValueError, match=r"the cores map 36 inputs, not a multiple of the kernel's 5\*5 positions"):
        kit.conv_channels(spec, 5)


# --- planning for training under the bound on what it keeps -------------------------------------------------


def test_training_cost_adds_the_steps_the_planned_backward_recomputes() -> None:
    """Zipper on 8^4 at 256 rows: every intermediate is 8x the input, so under a 1.5x budget nothing is kept
    and the cores' gradients read the first three step outputs again (the last one is y)."""
    spec = tnlayers.MPOSpec((8, 8, 8, 8), (8, 8, 8, 8), 8)
    plan = tnlayers.plan(spec, 256, "zipper", cost_model=BOUNDED_MODEL, gradients="cores")
    needs = (False, True, True, True, True)
    assert kit.training_cost(plan, 256, needs, None, BOUNDED_MODEL) == plan.cost  # no bound: autograd's backward
    assert kit.training_cost(plan, 16, needs, 1.5, BOUNDED_MODEL) == plan.cost  # below 32 rows nothing is bounded
    recomputed = sum(BOUNDED_MODEL.step_cost(*plan.step_sizes[k]) for k in range(3))
    expected = plan.cost + 4 * 6e-5 + recomputed
    assert kit.training_cost(plan, 256, needs, 1.5, BOUNDED_MODEL) == pytest.approx(expected, rel=1e-12)


def test_training_cost_of_a_plan_that_builds_w_counts_rebuilding_it() -> None:
    """A materialising plan that may not keep W keeps its halves: the backward rebuilds W from them (the
    last weight product) for x's gradient only; without the halves it rebuilds them for the cores too."""
    spec = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 16)
    plan = tnlayers.plan(spec, 256, "materialize", cost_model=BOUNDED_MODEL, gradients="all")
    sizes = weight_step_sizes(spec)
    overhead = len(plan.steps) * 6e-5
    with_input = (True, True, True, True, True)
    assert kit.keeps_weight_halves(plan, 256, with_input, 1.5)
    expected = plan.cost + overhead + BOUNDED_MODEL.step_cost(*sizes[-1])
    assert kit.training_cost(plan, 256, with_input, 1.5, BOUNDED_MODEL) == pytest.approx(expected, rel=1e-12)
    assert not kit.keeps_weight_halves(plan, 256, with_input, 1.0)  # x alone fills a 1.0 budget
    rebuilt = sum(BOUNDED_MODEL.step_cost(*size) for size in [*sizes, *sizes[:-1]])
    expected = plan.cost + overhead + rebuilt
    assert kit.training_cost(plan, 256, with_input, 1.0, BOUNDED_MODEL) == pytest.approx(expected, rel=1e-12)


def test_auto_plans_training_within_the_bound_with_what_recomputing_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """LeNet's 120 -> 84 layer at batch 32: the plain choice recomputes under the 1.5x bound; the bounded
    choice is one whose backward reads only what fits, so it runs on autograd's backward."""
    monkeypatch.setattr(kit, "cost_model_for", lambda backend: BOUNDED_MODEL)
    spec = tnlayers.MPOSpec((2, 5, 6, 2), (2, 3, 7, 2), 4)
    planner = kit.LayerPlanner.make(spec, "auto", "torch")
    needs = (False, True, True, True, True)
    plain = planner.plan(32, "cores")
    bounded = planner.plan(32, "cores", saved_budget=1.5)
    assert kit.kept_for_backward(plain, 32, needs, 1.5) is not None  # the plain choice would recompute
    assert kit.kept_for_backward(bounded, 32, needs, 1.5) is None
    candidates = auto_candidates(spec, 32, BOUNDED_MODEL, "cores")
    costs = {p.method: kit.training_cost(p, 32, needs, 1.5, BOUNDED_MODEL) for p in candidates}
    assert costs[bounded.method] <= (1 + BOUNDED_MODEL.tolerance) * min(costs.values())
    assert planner.plan(32, "cores", saved_budget=None) == plain  # no bound: as before
    assert planner.plan(16, "cores", saved_budget=1.5) == planner.plan(16, "cores")  # below 32 rows: as before
    assert planner.plan(32, "none", saved_budget=1.5) == planner.plan(32, "none")  # inference: as before
