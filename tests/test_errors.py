"""Bad input gets a ValueError/TypeError that names the value given and what was expected."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from tnlayers.backends.numpy import SGD, MPOLinear

import tnlayers
from tnlayers.contract import get_ops

SPEC = tnlayers.MPOSpec((2, 3), (3, 2), 2)
CORES = tnlayers.init_cores(SPEC, seed=0)
X = np.ones((4, 6), np.float32)
W = np.ones((6, 6))
LAYER = MPOLinear((2, 3), (3, 2), 2, seed=0)

CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "modes as a string",
        lambda: tnlayers.MPOSpec("4x7", (4,), 2),
        TypeError,
        "sequence of positive integers, got '4x7'",
    ),
    (
        "mode lists of different length",
        lambda: tnlayers.MPOSpec((4, 7), (4,), 2),
        ValueError,
        r"same length.*\(4, 7\).*\(4,\)",
    ),
    ("zero-size mode", lambda: tnlayers.MPOSpec((4, 0), (4, 4), 2), ValueError, r"in_modes\[1\] must be >= 1, got 0"),
    (
        "float mode",
        lambda: tnlayers.MPOSpec((4, 2.5), (4, 4), 2),
        TypeError,
        r"in_modes\[1\] must be an integer, got 2.5",
    ),
    ("rank 0", lambda: tnlayers.MPOSpec((4, 4), (4, 4), 0), ValueError, "ranks must be >= 1, got 0"),
    ("bool rank", lambda: tnlayers.MPOSpec((4, 4), (4, 4), True), TypeError, "ranks must be an integer, got True"),
    (
        "wrong number of ranks",
        lambda: tnlayers.MPOSpec((4, 4, 4), (4, 4, 4), (2, 2, 2, 2)),
        ValueError,
        r"2 inner bond.*got \(2, 2, 2, 2\)",
    ),
    (
        "full ranks not ending in 1",
        lambda: tnlayers.MPOSpec((4, 4), (4, 4), (2, 2, 2)),
        ValueError,
        r"starting and ending with 1.*\(2, 2, 2\)",
    ),
    (
        "auto with zero features",
        lambda: tnlayers.MPOSpec.auto(0, 10, 4, 2),
        ValueError,
        "number of features must be >= 1, got 0",
    ),
    (
        "unknown init",
        lambda: tnlayers.init_cores(SPEC, "xavier"),
        ValueError,
        "unknown init 'xavier'; expected one of glorot, he, lecun, normal",
    ),
    (
        "integer init dtype",
        lambda: tnlayers.init_cores(SPEC, dtype=np.int32),
        TypeError,
        "floating-point type, got int32",
    ),
    ("init of a non-spec", lambda: tnlayers.init_cores((2, 3)), TypeError, "spec must be an MPOSpec, got tuple"),
    (
        "negative normal std",
        lambda: tnlayers.init_cores(SPEC, "normal", std=-1.0),
        ValueError,
        "std must be a positive finite number, got -1.0",
    ),
    (
        "unknown strategy",
        lambda: tnlayers.plan(SPEC, 8, "fastest"),
        ValueError,
        "unknown strategy 'fastest'; expected one of auto, autotune, zipper",
    ),
    ("negative batch size", lambda: tnlayers.plan(SPEC, -1), ValueError, "batch_size must be >= 0, got -1"),
    ("explicit path too short", lambda: tnlayers.plan(SPEC, 8, [(0, 1)]), ValueError, "needs 2 pairwise steps, got 1"),
    (
        "explicit path with a triple",
        lambda: tnlayers.plan(SPEC, 8, [(0, 1, 2), (0, 1)]),
        ValueError,
        r"pairs of ints, got step \(0, 1, 2\)",
    ),
    (
        "explicit path out of range",
        lambda: tnlayers.plan(SPEC, 8, [(0, 7), (0, 1)]),
        ValueError,
        "cannot plan strategy",
    ),
    ("strategy of a wrong type", lambda: tnlayers.plan(SPEC, 8, 3.5), TypeError, "got float"),
    (
        "input of wrong width",
        lambda: tnlayers.contract(np.ones((4, 100), np.float32), CORES),
        ValueError,
        r"last dimension 100 .* in_features = 6 = 2x3",
    ),
    ("scalar input", lambda: tnlayers.contract(np.float32(1.0), CORES), ValueError, "at least one dimension"),
    (
        "input dtype differs from cores",
        lambda: tnlayers.contract(X.astype(np.float64), CORES),
        TypeError,
        "x has dtype float64 but the cores have dtype float32",
    ),
    ("integer input", lambda: tnlayers.contract(np.ones((4, 6), np.uint8), CORES), TypeError, "x has dtype uint8"),
    (
        "cores of mixed dtypes",
        lambda: tnlayers.contract(X, [CORES[0], CORES[1].astype(np.float64)]),
        TypeError,
        r"one dtype, got \['float32', 'float64'\]",
    ),
    (
        "input as a list",
        lambda: tnlayers.contract([[1.0] * 6], CORES),
        TypeError,
        "array of numpy, torch, tensorflow or jax, got list",
    ),
    (
        "cores that do not chain",
        lambda: tnlayers.contract(X, [np.ones((1, 2, 3, 2), np.float32), np.ones((3, 3, 2, 1), np.float32)]),
        ValueError,
        r"do not chain: core 0 has shape \(1, 2, 3, 2\)",
    ),
    (
        "3-D core",
        lambda: tnlayers.contract(X, [np.ones((2, 3, 2), np.float32)]),
        ValueError,
        r"core 0 must be 4-D .*got shape \(2, 3, 2\)",
    ),
    ("outer bond not 1", lambda: tnlayers.contract(X, [np.ones((2, 6, 6, 1), np.float32)]), ValueError, "bond of 1"),
    (
        "zero-size core",
        lambda: tnlayers.to_dense([np.ones((1, 0, 2, 1))]),
        ValueError,
        r"zero-size dimension: shape \(1, 0, 2, 1\)",
    ),
    ("no cores", lambda: tnlayers.contract(X, []), ValueError, "at least one core"),
    (
        "a single array as cores",
        lambda: tnlayers.to_dense(np.ones((1, 2, 2, 1))),
        TypeError,
        "list or tuple of 4-D arrays",
    ),
    (
        "bias of wrong shape",
        lambda: tnlayers.contract(X, CORES, np.zeros(5, np.float32)),
        ValueError,
        r"bias must have shape \(6,\), got \(5,\)",
    ),
    (
        "plan for other cores",
        lambda: tnlayers.contract(X, CORES, strategy=tnlayers.plan(tnlayers.MPOSpec((3, 2), (2, 3), 2))),
        ValueError,
        "the plan was made for",
    ),
    ("unknown backend name", lambda: get_ops("mxnet"), ValueError, "unknown backend 'mxnet'"),
    (
        "from_dense modes not matching",
        lambda: tnlayers.from_dense(W, (2, 2), (3, 2)),
        ValueError,
        r"shape \(6, 6\) does not match in_modes \(2, 2\) \(product 4\)",
    ),
    (
        "from_dense 3-D",
        lambda: tnlayers.from_dense(np.ones((2, 3, 6)), (2, 3), (3, 2)),
        ValueError,
        r"must be 2-D .*got shape \(2, 3, 6\)",
    ),
    (
        "from_dense tol above 1",
        lambda: tnlayers.from_dense(W, (2, 3), (3, 2), tol=1.5),
        ValueError,
        r"tol must be a relative error in \[0, 1\), got 1.5",
    ),
    (
        "from_dense max_rank 0",
        lambda: tnlayers.from_dense(W, (2, 3), (3, 2), max_rank=0),
        ValueError,
        "max_rank must be >= 1, got 0",
    ),
    ("from_dense with NaN", lambda: tnlayers.from_dense(np.full((6, 6), np.nan), (2, 3), (3, 2)), ValueError, "NaN"),
    ("layer input as list", lambda: LAYER([[0.0] * 6]), TypeError, "numpy.ndarray, got list"),
    (
        "layer input of wrong width",
        lambda: LAYER(np.ones((2, 5), np.float32)),
        ValueError,
        r"shape \(\.\.\., 6\), got \(2, 5\)",
    ),
    (
        "layer input of wrong dtype",
        lambda: LAYER(np.ones((2, 6))),
        TypeError,
        r"dtype float64 but the layer has dtype float32",
    ),
    (
        "layer with unknown strategy",
        lambda: MPOLinear((2, 3), (3, 2), 2, strategy="bogus"),
        ValueError,
        "unknown strategy 'bogus'",
    ),
    (
        "optimiser with wrong gradients",
        lambda: SGD(LAYER.parameters()).step([np.ones(3)]),
        ValueError,
        "got 1 gradients for 3 parameters",
    ),
    (
        "layer from cores and a bias of another dtype",
        lambda: MPOLinear.from_cores(CORES, np.zeros(6)),
        TypeError,
        r"share one dtype, got \['float32', 'float32', 'bias float64'\]",
    ),
    (
        "checkpoint of integer cores",
        lambda: tnlayers.save("/nonexistent/x.safetensors", [np.ones((1, 2, 2, 1), np.int64)]),
        TypeError,
        "floating-point numbers, got dtype int64",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call: Callable[[], Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_layer_backward_with_wrong_gradient_shape() -> None:
    layer = MPOLinear((2, 3), (3, 2), 2, seed=0)
    layer(X)
    with pytest.raises(ValueError, match=r"grad_out must be an array of shape \(4, 6\), got \(4, 5\)"):
        layer.backward(np.ones((4, 5), np.float32))


def test_mixed_frameworks() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="core 0 is a ndarray but x is a Tensor"):
        tnlayers.contract(torch.ones(4, 6), CORES)
    with pytest.raises(TypeError, match=r"x has dtype torch\.float64 but the cores have dtype torch\.float32"):
        tnlayers.contract(torch.ones(4, 6, dtype=torch.float64), [torch.from_numpy(c) for c in CORES])
