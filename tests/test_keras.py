"""The Keras layers: against NumPy references, serialisation, portability, XLA, MirroredStrategy, errors.

These tests run on the Keras backend of the process (TensorFlow by default); one of them re-runs
this file and the shared layer tests under KERAS_BACKEND=jax and KERAS_BACKEND=torch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, dense_reference, real_mnist

import tnlayers

keras = pytest.importorskip("keras", reason="keras is not installed")
from tnlayers.backends.keras import MPOConv2D, MPODense  # noqa: E402

from benchmarks.training_memory import kept_bytes  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::tnlayers.RankClippedWarning", "ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()
tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason=f"needs the TensorFlow Keras backend, not {BACKEND}"
)


def _np(value: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


def test_weights_are_tracked_and_shapes_inferred() -> None:
    layer = MPODense(units=256, n_cores=4, rank=8)
    y = layer(np.zeros((2, 3, 784), "float32"))
    assert tuple(y.shape) == (2, 3, 256)
    assert layer.spec == tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8)
    assert len(layer.trainable_weights) == 4 + 1
    no_bias = MPODense((2, 3), (3, 2), 2, use_bias=False)
    no_bias.build((None, 6))
    assert len(no_bias.trainable_weights) == 2
    assert layer.compute_output_shape((None, 5, 784)) == (None, 5, 256)
    cores, _ = layer.numpy_weights()
    assert_close(_np(layer.to_dense()), dense_reference(cores), np.float32)


def test_get_config_roundtrip_and_dot_keras_file_is_bit_exact(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 3))
    hidden = MPOConv2D(8, 3, (3, 3, 3), (2, 2, 2), 3, padding="same", activation="relu")(inputs)
    flat = keras.layers.Flatten()(hidden)
    outputs = MPODense((8, 4, 4), (1, 5, 2), (2, 4), activation="softmax", strategy="zipper")(flat)
    model = keras.Model(inputs, outputs)
    for layer in model.layers[1:]:
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        assert json.loads(json.dumps(config)) == config
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 3)).astype("float32")
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights()))
    np.testing.assert_array_equal(_np(loaded(x)), _np(model(x)))
    assert isinstance(loaded.layers[1], MPOConv2D) and isinstance(loaded.layers[-1], MPODense)


def _trained_keras_model() -> Any:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            MPODense((4, 7, 7, 4), (4, 4, 4, 4), 6, activation="relu", name="hidden"),
            MPODense((4, 4, 4, 4), (1, 1, 10, 1), 4, name="logits"),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(3)
    model.fit(rng.normal(size=(64, 784)).astype("float32"), rng.integers(0, 10, 64), epochs=2, verbose=0)
    return model


@tensorflow_only
def test_xla_and_tf_function_match_eager_without_autograph_warnings(caplog: pytest.LogCaptureFixture) -> None:
    import tensorflow as tf

    model = _trained_keras_model()
    conv = MPOConv2D(4, 3, (1, 3, 3), (2, 1, 2), 3)
    x = tf.constant(np.random.default_rng(7).normal(size=(8, 784)).astype("float32"))
    images = tf.constant(np.random.default_rng(8).normal(size=(2, 6, 6, 1)).astype("float32"))
    eager, eager_conv = model(x).numpy(), conv(images).numpy()
    with caplog.at_level(logging.WARNING):
        xla = tf.function(lambda v: model(v), jit_compile=True)
        np.testing.assert_allclose(xla(x).numpy(), eager, rtol=1e-5, atol=1e-5)
        unknown = tf.function(lambda v: model(v), input_signature=[tf.TensorSpec((None, 784), tf.float32)])
        np.testing.assert_allclose(unknown(x).numpy(), eager, rtol=1e-5, atol=1e-5)
        conv_xla = tf.function(lambda v: conv(v), jit_compile=True)
        np.testing.assert_allclose(conv_xla(images).numpy(), eager_conv, rtol=1e-5, atol=1e-5)
    assert not [r for r in caplog.records if "AutoGraph" in r.getMessage()]


def test_keras_mpo_network_learns_mnist(mnist_dir: Path) -> None:
    from tnlayers.datasets import load_mnist

    images, labels = load_mnist(mnist_dir, "train")
    test_images, test_labels = load_mnist(mnist_dir, "test")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            MPODense((4, 7, 7, 4), (4, 4, 4, 4), 8, activation="relu", kernel_init="he"),
            MPODense((4, 4, 4, 4), (1, 1, 10, 1), 4),
        ]
    )
    model.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    model.fit(images[:30000], labels[:30000], batch_size=64, epochs=3, verbose=0)
    _, accuracy = model.evaluate(test_images, test_labels, verbose=0)
    assert accuracy > (0.93 if real_mnist() else 0.85), accuracy  # the generated stand-in: 0.92 measured


MIRRORED = """
import json, os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
keras.config.set_floatx("float64")
from tnlayers.backends.keras import MPODense

def build():
    model = keras.Sequential([keras.Input((12,)), MPODense((2, 3, 2), (2, 2, 2), 3, activation="tanh", seed=1),
                              MPODense((2, 2, 2), (1, 2, 2), 2, seed=2)])
    model.compile(keras.optimizers.SGD(0.2, momentum=0.9), "mse")
    return model

rng = np.random.default_rng(0)
x, y = rng.normal(size=(16, 12)), rng.normal(size=(16, 4))
single = build()
start = [w.copy() for w in single.get_weights()]
single.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = build()
mirrored.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
gap = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), mirrored.get_weights()))
moved = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), start))
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "gap": gap, "moved": moved}))
"""


@tensorflow_only
def test_mirrored_strategy_on_two_devices_matches_one(tmp_path: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["replicas"] == 2
    assert outcome["moved"] > 1e-3  # training changed the weights
    assert outcome["gap"] < 1e-10


@tensorflow_only
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_same_tests_pass_on_other_keras_backends(backend: str) -> None:
    pytest.importorskip(backend)
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_ENABLE_X64": "1",
        "TNLAYERS_TEST_BACKENDS": "keras",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    tests = ["tests/test_keras.py", "tests/test_layers.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests, "-k", "not mnist"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:]


def _cores(in_modes: tuple[int, ...], out_modes: tuple[int, ...]) -> list[np.ndarray]:
    return tnlayers.init_cores(tnlayers.MPOSpec(in_modes, out_modes, 2), seed=0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: MPODense((2, 3), None, 2), ValueError, "needs units or out_modes, got neither"),
        (lambda: MPODense((2, 3), (3, 2), 2, units=7), ValueError, r"multiply to 6, not units=7"),
        (lambda: MPODense((2, 3), (3, 2), 2)(np.ones((4, 7), "float32")), ValueError, "multiply to 6.*= 7"),
        (lambda: MPODense("2x3", (3, 2), 2), TypeError, "in_modes must be a sequence.*'2x3'"),
        (lambda: MPODense((2, 3), (3, 2), 2, kernel_init="xavier"), ValueError, "unknown kernel_init 'xavier'"),
        (lambda: MPODense((2, 3), (3, 2), 2, strategy="fastest").build((None, 6)), ValueError, "unknown strategy"),
        (lambda: MPODense(units=0), ValueError, "units must be a positive int, got 0"),
        (lambda: MPOConv2D(8, 3, (3, 3, 2), (2, 2, 2), 2)(np.ones((1, 5, 5, 3), "float32")), ValueError, "= 27"),
        (lambda: MPOConv2D(8, 3, padding="full"), ValueError, "'valid' or 'same', got 'full'"),
        (lambda: MPOConv2D(8, 3, strides=2, dilation_rate=2), ValueError, "cannot both exceed 1"),
        (lambda: MPOConv2D(8, 3)(np.ones((5, 5, 3), "float32")), ValueError, r"\(batch, height, width, channels\)"),
        (lambda: MPODense.from_dense(keras.layers.Dense(4)), TypeError, "expects a built keras.layers.Dense"),
        (lambda: MPODense((2, 3), (3, 2), 2).to_dense(), RuntimeError, "not built yet"),
        (
            lambda: MPODense.from_cores(
                tnlayers.init_cores(tnlayers.MPOSpec((2, 3), (3, 2), 2), seed=0)
            ).set_numpy_weights(tnlayers.init_cores(tnlayers.MPOSpec((3, 2), (3, 2), 2), seed=0)),
            ValueError,
            "do not fit this layer's cores",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_keras_plans_for_training_when_keras_trains() -> None:
    """A train step (``training=True``) plans for the backward too; inference and frozen layers do not."""
    layer = MPODense((4, 7, 7, 4), (4, 4, 4, 4), 8)
    x = keras.ops.convert_to_tensor(np.zeros((64, 784), "float32"))
    layer(x)
    assert layer._plan(x, 64, training=True).gradients == "all"
    assert layer._plan(x, 64, training=None).gradients == "none"
    layer.freeze("all")
    assert layer._plan(x, 64, training=True).gradients == "none"


@pytest.mark.skipif(BACKEND == "torch", reason="Keras exports SavedModels from the TensorFlow and JAX backends")
def test_model_export_serves_every_batch_size_like_eager(tmp_path: Path) -> None:
    """``model.export`` (a SavedModel with a symbolic batch: jax shape polymorphism or tf.function) on the
    TensorFlow and JAX backends, checked against the eager model at several batch sizes."""
    tf = pytest.importorskip("tensorflow")
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            MPOConv2D(4, 3, in_modes=(2, 3, 3), out_modes=(1, 2, 2), rank=3, padding="same", seed=0),
            keras.layers.Flatten(),
            MPODense(out_modes=(2, 2, 2), rank=3, seed=1),
        ]
    )
    model.export(str(tmp_path / "served"), format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    for batch in (1, 3, 64, 300):
        x = np.random.default_rng(batch).normal(size=(batch, 8, 8, 2)).astype("float32")
        np.testing.assert_allclose(served.serve(x).numpy(), _np(model(x)), rtol=1e-5, atol=1e-5)


@tensorflow_only
def test_a_tflite_conversion_of_the_exported_model_matches_eager(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            MPOConv2D(4, 3, rank=3, padding="same", seed=0),
            keras.layers.Flatten(),
            MPODense(units=8, rank=3, seed=1),
        ]
    )
    model.export(str(tmp_path / "served"), format="tf_saved_model", verbose=False)
    interpreter = tf.lite.Interpreter(
        model_content=tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "served")).convert()
    )
    given, produced = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    for batch in (1, 5):
        x = np.random.default_rng(batch).normal(size=(batch, 8, 8, 2)).astype("float32")
        interpreter.resize_tensor_input(given["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(given["index"], x)
        interpreter.invoke()
        np.testing.assert_allclose(interpreter.get_tensor(produced["index"]), _np(model(x)), rtol=1e-5, atol=1e-5)


def test_compress_a_keras_model_with_low_rank_weights_keeps_its_outputs() -> None:
    """Dense and Conv2D kernels set to exact rank-3 MPOs: ``compress(rank=3)`` reproduces the model, shares the
    layers it leaves alone, keeps the 10-way head dense, and reports what it did."""
    from tnlayers.backends.keras import compress

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 16)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="fc"),
            keras.layers.Dense(10, name="head"),
        ]
    )
    conv, fc = model.get_layer("conv"), model.get_layer("fc")
    conv_cores = tnlayers.init_cores(tnlayers.MPOSpec.auto(16 * 9, 32, 4, 3), seed=1)
    kernel = dense_reference(conv_cores).reshape(16, 3, 3, 32).transpose(1, 2, 0, 3)  # rows (channel, kh, kw)
    fc_cores = tnlayers.init_cores(tnlayers.MPOSpec.auto(6 * 6 * 32, 64, 4, 3), seed=2)
    conv.kernel.assign(kernel.astype("float32"))
    fc.kernel.assign(dense_reference(fc_cores).astype("float32"))
    x = np.random.default_rng(3).normal(size=(4, 6, 6, 16)).astype("float32")
    compressed, report = compress(model, rank=3)
    assert [row.name for row in report.layers] == ["conv", "fc"] and report.skipped == ()
    assert max(row.relative_error for row in report.layers) < 1e-5
    assert [type(layer).__name__ for layer in compressed.layers] == ["MPOConv2D", "Flatten", "MPODense", "Dense"]
    assert compressed.layers[-1] is model.get_layer("head")  # shared, not copied
    assert report.network_params_after == compressed.count_params() < model.count_params()
    np.testing.assert_allclose(_np(compressed(x)), _np(model(x)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"rank=.*tol=.*got neither"):
        compress(model)
    with pytest.raises(TypeError, match=r"keras\.Model, got Dense"):
        compress(keras.layers.Dense(4), rank=2)


# Training memory (issue 19): what each Keras backend keeps for the backward, by that backend's own count
# (benchmarks.training_memory.kept_bytes: TensorFlow's allocator, JAX's vjp residuals, torch's saved-tensor hooks).
KERAS_MEMORY_CASES = [  # inputs of 2 MB and more: TensorFlow's allocator counts small tensors in 1 MB regions
    ((4, 7, 7, 4), (4, 4, 4, 4), 16, 1024),
    ((8, 8, 8, 8), (8, 8, 8, 8), 8, 256),
    ((6, 6, 6, 6), (6, 6, 6, 6), 12, 512),
    ((2,) * 10, (2,) * 10, 16, 512),
]


@pytest.mark.parametrize("strategy", ["dp", "materialize", "auto"])
@pytest.mark.parametrize(("in_modes", "out_modes", "rank", "batch"), KERAS_MEMORY_CASES, ids=str)
def test_training_keeps_at_most_one_and_a_half_times_what_dense_keeps(
    in_modes: Any, out_modes: Any, rank: int, batch: int, strategy: str
) -> None:
    x = np.random.default_rng(0).normal(size=(batch, int(np.prod(in_modes)))).astype("float32")
    dense = keras.layers.Dense(int(np.prod(out_modes)))
    bounded = MPODense(in_modes, out_modes, rank, strategy=strategy)
    unbounded = MPODense(in_modes, out_modes, rank, strategy=strategy, saved_budget=None)
    for layer in (dense, bounded, unbounded):
        layer(x[:2])
        kept_bytes(layer, x)  # warm: plans and the allocator's first chunks
    dense_bytes = kept_bytes(dense, x)
    assert dense_bytes >= x.nbytes  # the dense layer keeps its input: the count sees what is kept
    # TensorFlow's allocator counts the chunks it hands out, which round a tensor up (a few percent here);
    # JAX's residuals and torch's saved tensors are counted in exact bytes
    assert kept_bytes(bounded, x) <= (1.6 if BACKEND == "tensorflow" else 1.5) * dense_bytes
    if in_modes != (4, 7, 7, 4) and strategy == "dp":  # where autodiff keeps many times more, the count shows it
        assert kept_bytes(unbounded, x) > 3 * dense_bytes


@pytest.mark.parametrize("strategy", ["zipper", "reverse-zipper", "materialize", "dp"])
@pytest.mark.parametrize("budget", [1.0, 1.5, None])
def test_training_gradients_match_the_dense_reference_whatever_is_recomputed(strategy: str, budget: Any) -> None:
    """Batch 96 (from 32 rows the bound applies): the planned backward recomputes, and must still be exact."""
    layer = MPODense((4, 4, 4), (4, 4, 4), 4, strategy=strategy, saved_budget=budget, dtype="float64")
    layer.build((None, 64))
    rng = np.random.default_rng(3)
    cores, _ = layer.numpy_weights()
    weight = dense_reference(cores)
    x, g = rng.normal(size=(2, 48, 64)), rng.normal(size=(2, 48, 64))
    from conftest import KerasLayerHarness, reference_core_gradients

    grad_x, core_grads, bias_grad = KerasLayerHarness().grads(layer, x, g)
    np.testing.assert_allclose(grad_x, g @ weight.T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bias_grad, g.reshape(-1, 64).sum(axis=0), rtol=1e-10, atol=1e-10)
    for actual, expected in zip(core_grads, reference_core_gradients(cores, x, g)):
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)


def _penalty_gradients(layer: Any, x: np.ndarray) -> list[np.ndarray]:
    """d/dcores of sum((dy/dx)²) for y = sum(sin(layer(x))): a gradient penalty, a second derivative."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x_t = tf.constant(x)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x_t)
                y = tf.reduce_sum(tf.sin(layer(x_t, training=True)))
            penalty = tf.reduce_sum(inner.gradient(y, x_t) ** 2)
        return [_np(g) for g in outer.gradient(penalty, layer.cores)]
    import jax

    def penalty(values: Any) -> Any:
        def output(x: Any) -> Any:
            return jax.numpy.sin(layer.stateless_call(values, [], x, training=True)[0]).sum()

        return (jax.grad(output)(x) ** 2).sum()

    grads = jax.grad(penalty)([v.value for v in layer.trainable_variables])
    return [np.asarray(g) for g in grads[: len(layer.cores)]]


@pytest.mark.skipif(BACKEND == "torch", reason="torch's own planned backward runs there (test_saved_memory)")
@pytest.mark.parametrize("strategy", ["zipper", "materialize"])
@pytest.mark.parametrize("budget", [1.5, 100.0], ids=["recomputing", "keeping all it reads"])
def test_second_derivatives_through_the_planned_backward_match_the_backends_autodiff(
    strategy: str, budget: float
) -> None:
    """The planned backward (bounded) against the backend's own autodiff of the same plan (no bound)."""
    x = np.random.default_rng(4).normal(size=(64, 64))
    results = []
    for saved_budget in (budget, None):
        layer = MPODense((4, 4, 4), (4, 4, 4), 4, strategy=strategy, saved_budget=saved_budget, dtype="float64", seed=1)
        layer.build((None, 64))
        results.append(_penalty_gradients(layer, x))
    for bounded, unbounded in zip(*results):
        assert np.abs(unbounded).max() > 1e-3  # the penalty depends on every core
        np.testing.assert_allclose(bounded, unbounded, rtol=1e-9, atol=1e-12)
