"""The PyTorch layers: against NumPy references, torch.compile, DDP, compress, checkpoints, errors."""

from __future__ import annotations

import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_close, dense_reference

import tnlayers

torch = pytest.importorskip("torch", reason="torch is not installed")
nn = torch.nn
F = torch.nn.functional
from tnlayers.backends import numpy as numpy_backend  # noqa: E402
from tnlayers.backends.torch import MPOConv2d, MPOLinear, compress  # noqa: E402

from tnlayers.layer import conv_route  # noqa: E402
from tnlayers.plan import batch_bucket  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::tnlayers.RankClippedWarning")
STRATEGIES = ["auto", "zipper", "reverse-zipper", "materialize", "greedy", "dp"]


def _numpy_cores(layer: Any) -> list[np.ndarray]:
    return [c.detach().double().numpy() for c in layer.cores]


def _reference_kernel(layer: MPOConv2d) -> np.ndarray:
    """The conv kernel from the NumPy dense reference: rows of W are (channel, kh, kw)."""
    weight = dense_reference(_numpy_cores(layer))
    return weight.T.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_in_float64(strategy: str) -> None:
    layer = MPOLinear((2, 3, 2), (2, 1, 3), 3, strategy=strategy, dtype=torch.float64, seed=1)
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)

    def run(x: Any, *params: Any) -> Any:
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    assert torch.autograd.gradcheck(run, (x, *params))


def test_behaves_like_nn_linear() -> None:
    layer = MPOLinear((2, 3, 4), (3, 2, 2), 4, dtype=torch.float64, seed=3)
    assert (layer.in_features, layer.out_features) == (24, 12)
    assert not hasattr(layer, "weight")
    weight = dense_reference(_numpy_cores(layer))
    np.testing.assert_allclose(layer.to_dense().detach().numpy(), weight.T, rtol=1e-12, atol=1e-14)
    linear = layer.to_linear()
    x = torch.randn(7, 24, dtype=torch.float64)
    np.testing.assert_allclose(linear(x).detach().numpy(), layer(x).detach().numpy(), rtol=1e-10, atol=1e-12)
    assert "modes=2x3x4->3x2x2" in repr(layer) and "ranks=(1, 4, 4, 1)" in repr(layer) and "compression" in repr(layer)
    assert layer(torch.randn(24, dtype=torch.float64)).shape == (12,)
    assert layer(torch.randn(2, 0, 24, dtype=torch.float64)).shape == (2, 0, 12)
    half = layer.to(torch.float32)
    assert all(c.dtype == torch.float32 for c in half.parameters())
    assert half(x.float()).dtype == torch.float32


def test_a_remembered_call_still_checks_what_changed() -> None:
    """Calls like an earlier one skip its checks and plan lookup; what the checks read is part of what is
    remembered, so a changed layer or input is still refused with the same clear error."""
    layer = MPOLinear((2, 3, 4), (3, 2, 2), 4, seed=3)
    x = torch.randn(5, 24)
    layer(x)
    layer(x)  # remembered
    with pytest.raises(ValueError, match=r"24"):
        layer(torch.randn(5, 23))
    layer.double()  # the remembered float32 calls no longer hold
    with pytest.raises(TypeError, match=r"torch.float64 but the input has dtype torch.float32"):
        layer(x)
    layer.float()
    layer(x)  # remembered again
    layer.cores[0] = nn.Parameter(layer.cores[0].detach().double())  # a core replaced behind the layer's back
    with pytest.raises(TypeError, match=r"torch.float64 but the input has dtype torch.float32"):
        layer(x)


def test_remembered_calls_keep_each_route() -> None:
    """Training, inference and frozen cores in turn on the same input: each call equals the NumPy dense
    reference, inference (eval, no gradients) alone keeps ``W``, and only trainable operands get gradients."""
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 4, dtype=torch.float64, strategy="materialize", seed=2)
    nn.init.normal_(layer.bias)
    x = torch.randn(32, 784, dtype=torch.float64)
    bias = layer.bias.detach().numpy()
    modes = [(True, True), (True, False), (False, False), (False, True)] * 3  # (training, grad enabled)
    for step, (training, grad) in enumerate(modes):
        layer.train(training)
        layer.cores[1].requires_grad_(step % 5 < 3)  # frozen and thawed directly, not through freeze()
        layer._cached_weight = None
        xs = x.clone().requires_grad_(step % 3 == 0)
        with torch.set_grad_enabled(grad):
            y = layer(xs)
        assert (layer._cached_weight is not None) == (not training and not grad)
        weight = dense_reference(_numpy_cores(layer))
        np.testing.assert_allclose(y.detach().numpy(), x.numpy() @ weight + bias, rtol=1e-10, atol=1e-10)
        if grad:
            for core in layer.cores:
                core.grad = None
            g = torch.randn_like(y)
            y.backward(g)
            assert (layer.cores[1].grad is None) == (step % 5 >= 3)
            assert (xs.grad is not None) == xs.requires_grad
            if xs.grad is not None:
                np.testing.assert_allclose(xs.grad.numpy(), g.numpy() @ weight.T, rtol=1e-9, atol=1e-9)
    assert 0 < len(layer._known_calls) < len(modes)  # some calls were remembered ones


def test_a_remembered_plan_is_the_one_a_fresh_lookup_gives() -> None:
    """Frozen or trainable cores, an input with or without gradient, training or not: ``auto`` plans each
    differently, and a remembered call runs what the full lookup would pick now."""
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 16, seed=1)
    x = torch.randn(256, 784)
    for step in range(16):
        for core in layer.cores:
            core.requires_grad_(step % 2 == 0)
        xs = x.clone().requires_grad_(step % 4 < 2)
        with torch.set_grad_enabled(step % 8 < 4):
            layer(xs)
            key = layer._call_key(xs, layer._core_tensors())
            remembered, _ = layer._known_calls[key]
            assert remembered == layer._plan(xs, 256, layer._core_tensors())
    assert len(layer._known_calls) == 8  # 16 calls in 8 states: each state's second call was a remembered one


def test_remembered_calls_keep_each_batch_bucket_and_are_bounded() -> None:
    layer = MPOLinear((2, 3, 4), (3, 2, 2), 2, seed=0)
    for rows in (1, 4096):
        layer(torch.randn(rows, 24)).sum().backward()
    plans = sorted(plan.batch_size for plan, _ in layer._known_calls.values())
    assert plans == sorted({batch_bucket(1), batch_bucket(4096)}) and len(plans) == 2
    with torch.no_grad():
        for rows in range(1, 200):
            layer(torch.randn(rows, 24))
    assert 0 < len(layer._known_calls) <= 64


def test_reset_parameters_follows_torch_manual_seed() -> None:
    torch.manual_seed(5)
    first = MPOLinear((4, 4), (4, 4), 3)
    torch.manual_seed(5)
    second = MPOLinear((4, 4), (4, 4), 3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    before = [c.detach().clone() for c in first.cores]
    first.reset_parameters()
    assert not torch.equal(before[0], first.cores[0])
    expected = 2.0 / (16 + 16)  # glorot variance of W's entries, exact in norm
    np.testing.assert_allclose(float(first.to_dense().detach().pow(2).mean()), expected, rtol=1e-5)


def _low_rank_lenet() -> Any:
    """LeNet-5 whose conv3 and FC weights have small TT ranks, so compressing them loses nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 5), nn.ReLU(), nn.Flatten(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).double()  # fmt: skip
    shapes = {6: ((2, 10, 10, 2), (2, 5, 6, 2)), 9: ((2, 5, 6, 2), (2, 3, 7, 2)), 11: ((2, 3, 7, 2), (1, 5, 2, 1))}
    for index, (in_modes, out_modes) in shapes.items():
        module = net[index]
        cores = tnlayers.init_cores(tnlayers.MPOSpec(in_modes, out_modes, 3), seed=index, dtype=np.float64)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(dense_reference(cores).T).reshape(module.weight.shape))
    return net, shapes


def test_compress_lenet5_keeps_its_outputs() -> None:
    net, shapes = _low_rank_lenet()
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    before = net(x).detach()
    report = compress(net, rank=4, min_features=0, exclude=["0", "3"], modes=lambda name, i, o: shapes[int(name)])
    assert [row.name for row in report.layers] == ["6", "9", "11"]
    assert isinstance(net[6], MPOConv2d) and isinstance(net[9], MPOLinear) and isinstance(net[0], nn.Conv2d)
    assert max(row.relative_error for row in report.layers) < 1e-10
    assert report.params_before == 48_000 + 10_080 + 840
    assert report.params_after == sum(p.numel() for i in (6, 9, 11) for p in net[i].cores)
    assert report.network_params_after == sum(p.numel() for p in net.parameters())
    np.testing.assert_allclose(net(x).detach().numpy(), before.numpy(), rtol=1e-8, atol=1e-10)
    assert "rho" in str(report) and "6" in str(report)


def test_compress_with_truncation_stays_within_the_reported_error() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 64))
    originals = {name: module for name, module in net.named_children() if name in ("0", "3")}
    report = compress(net, rank=6, min_features=32)
    assert {row.name for row in report.layers} == {"0", "3"}
    x = torch.randn(4, 8, 4, 4)
    inputs = {"0": x, "3": torch.relu(originals["0"](x)).flatten(1)}
    for row in report.layers:
        original, replaced = originals[row.name], net.get_submodule(row.name)
        inp = inputs[row.name]
        gap = torch.linalg.norm(replaced(inp) - original(inp)).item()
        patches = F.unfold(inp, 3, padding=1) if row.name == "0" else inp
        bound = torch.linalg.norm(patches).item() * row.relative_error * torch.linalg.norm(original.weight).item()
        assert 0 < gap <= bound * 1.001


def test_compress_skips_what_it_cannot_shrink_and_needs_a_budget() -> None:
    net = nn.Sequential(nn.Linear(300, 4), nn.Linear(4, 4))
    report = compress(net, rank=64, min_features=0)
    assert report.layers == () and [name for name, _ in report.skipped] == ["0", "1"]
    assert isinstance(net[0], nn.Linear)
    with pytest.raises(ValueError, match=r"rank=.*tol=.*got neither"):
        compress(net)


def test_compress_leaves_multihead_attention_projections_alone() -> None:
    torch.manual_seed(4)
    block = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True)
    report = compress(block, rank=8, min_features=64)
    assert {row.name for row in report.layers} == {"linear1", "linear2"}
    assert [name for name, _ in report.skipped] == ["self_attn.out_proj"]
    assert block(torch.randn(2, 5, 64)).shape == (2, 5, 64)
    dense = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True)
    parts = {"self_attn": block.self_attn, "norm1": block.norm1, "norm2": block.norm2}
    parts.update(linear1=block.linear1.to_linear(), linear2=block.linear2.to_linear())
    dense.load_state_dict({k: v for name, part in parts.items() for k, v in part.state_dict(prefix=f"{name}.").items()})
    x = torch.randn(3, 7, 64)
    with torch.no_grad():  # eval + no_grad is where the fused fast path would have read linear1.weight
        np.testing.assert_allclose(block.eval()(x).numpy(), dense.eval()(x).numpy(), rtol=1e-4, atol=1e-5)


def test_conv_with_explicit_padding_matches_f_conv2d() -> None:
    """Numeric padding (a torch-only argument; the shared conv test covers 'same' and 'valid'), and unbatched input."""
    layer = MPOConv2d(3, 8, 3, (3, 3, 3), (2, 2, 2), 3, (1, 2), (2, 1), 2, dtype=torch.float64, seed=4)
    with torch.no_grad():
        layer.bias.normal_()
    kernel = torch.from_numpy(_reference_kernel(layer))
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    expected = F.conv2d(x, kernel, layer.bias.detach(), (1, 2), (2, 1), 2)
    assert_close(layer(x).detach().numpy(), expected.numpy(), np.float64)
    assert_close(layer(x[0]).detach().numpy(), expected[0].numpy(), np.float64)  # unbatched


def test_conv_route_follows_the_cost_model() -> None:
    spec = tnlayers.MPOSpec((2, 8, 8, 8, 2), (2, 8, 8, 8, 2), 4)  # the paper's VGG conv-as-MPO
    _, dense_at_1 = conv_route(spec, 1)
    _, dense_at_big = conv_route(spec, 1 << 16)
    assert (dense_at_1, dense_at_big) == (False, True)
    assert conv_route(spec, 1, "materialize")[1] and not conv_route(spec, 1 << 16, "dp")[1]


def test_from_conv_roundtrip() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    layer = MPOConv2d.from_conv(conv, (4, 3, 3), (1, 2, 3), max_rank=100)
    assert layer.decomposition is not None and layer.decomposition.relative_error < 1e-5
    x = torch.randn(2, 4, 7, 7)
    np.testing.assert_allclose(layer(x).detach().numpy(), conv(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    back = layer.to_conv()
    np.testing.assert_allclose(back(x).detach().numpy(), conv(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["materialize", "auto"])  # auto: the plan at batch 5 needs more than W's flops
def test_eval_reuses_w_and_never_serves_a_stale_one(strategy: str) -> None:
    layer = MPOLinear((2, 3, 4), (3, 2, 2), 3, strategy=strategy, dtype=torch.float64, seed=6).eval()
    x = torch.randn(5, 24, dtype=torch.float64)

    def reference() -> np.ndarray:
        return x.numpy() @ dense_reference(_numpy_cores(layer)) + layer.bias.detach().numpy()

    with torch.no_grad():
        assert_close(layer(x).numpy(), reference(), np.float64)
        cached = layer._cached_weight
        assert cached is not None
        layer(x)
        assert layer._cached_weight is cached  # reused
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(x).pow(2).sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        assert_close(layer(x).numpy(), reference(), np.float64)  # after an optimiser step
        other = MPOLinear((2, 3, 4), (3, 2, 2), 3, dtype=torch.float64, seed=7)
        layer.load_state_dict(other.state_dict())
        assert_close(layer(x).numpy(), reference(), np.float64)  # after load_state_dict
        layer.to(torch.float32)
        assert_close(layer(x.float()).numpy(), reference(), np.float32)  # after .to(dtype)
        layer.cores[0].data.mul_(2)  # .data edits do not bump torch's version counter
        assert_close(layer(x.float()).numpy(), reference(), np.float32)
        ema = MPOLinear((2, 3, 4), (3, 2, 2), 3, dtype=torch.float32, seed=8)
        for p, q in zip(layer.parameters(), ema.parameters()):  # the classic EMA update, through .data
            p.data.mul_(0.9).add_(q.data, alpha=0.1)
        assert_close(layer(x.float()).numpy(), reference(), np.float32)
    assert layer(x.float()).requires_grad  # with gradients on, W is not served from the cache


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "rank", "strategy", "reuses"),
    [
        ((4, 7, 7, 4), (4, 4, 4, 4), 16, "auto", True),  # at batch 1 the plan needs 2.7x the dense flops
        ((8, 8, 8, 8), (8, 8, 8, 8), 8, "auto", False),  # far fewer: W (64 MB) is never built
        ((8, 8, 8, 8), (8, 8, 8, 8), 32, "auto", False),  # 1.5x, but a W read from memory every call is slower
        ((4, 7, 7, 4), (4, 4, 4, 4), 16, "zipper", False),  # an explicit ordering runs as asked
    ],
)
def test_inference_reuses_w_where_the_plan_needs_at_least_the_dense_flops(
    in_modes: Any, out_modes: Any, rank: int, strategy: str, reuses: bool
) -> None:
    layer = MPOLinear(in_modes, out_modes, rank, strategy=strategy, dtype=torch.float64, seed=3).eval()
    x = torch.randn(1, layer.in_features, dtype=torch.float64)
    plan = layer.planner.plan(1, "none")
    weight = layer.in_features * layer.out_features
    needs_dense_flops = plan.flops >= 2 * weight
    assert reuses == (strategy == "auto" and needs_dense_flops and weight <= 2**21) == layer.planner.reuses_weight(plan)
    assert needs_dense_flops or rank == 8  # the D=32 case is decided by W's size alone
    with torch.no_grad():
        y = layer(x)
    assert (layer._cached_weight is not None) == reuses
    expected = x.numpy() @ dense_reference(_numpy_cores(layer)) + layer.bias.detach().numpy()
    assert_close(y.numpy(), expected, np.float64)


def test_conv_inference_serves_the_current_kernel() -> None:
    """eval() under no_grad builds the kernel once; it must follow every change of the cores."""
    layer = MPOConv2d(3, 8, 3, (3, 3, 3), (2, 2, 2), 3, padding=1, strategy="materialize", dtype=torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def reference() -> np.ndarray:
        kernel = torch.from_numpy(_reference_kernel(layer))
        return F.conv2d(x, kernel, layer.bias.detach(), 1, 1).numpy()

    layer.eval()
    with torch.no_grad():
        assert_close(layer(x).numpy(), reference(), np.float64)
        layer.cores[1].data.mul_(-3)
        assert_close(layer(x).numpy(), reference(), np.float64)
    layer.train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).pow(2).sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        assert_close(layer(x).numpy(), reference(), np.float64)  # after an optimiser step


def test_state_dict_and_checkpoint_roundtrips_are_bit_exact(tmp_path: Path) -> None:
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 5, seed=8)
    with torch.no_grad():
        layer.bias.normal_()
    torch.save(layer.state_dict(), tmp_path / "state.pt")
    fresh = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 5, seed=9)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), fresh.state_dict().values()))
    layer.save(tmp_path / "layer.safetensors")
    loaded = MPOLinear.load(tmp_path / "layer.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), loaded.state_dict().values()))
    x = np.random.default_rng(1).normal(size=(6, 784)).astype(np.float32)
    from_numpy = numpy_backend.MPOLinear.load(tmp_path / "layer.safetensors")
    np.testing.assert_allclose(from_numpy(x), layer(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    from_numpy.save(tmp_path / "back.safetensors")
    again = MPOLinear.load(tmp_path / "back.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), again.state_dict().values()))


def _small_convnet(seed: int) -> nn.Module:
    """An MPO convolution and an MPO linear layer, for the compiler and export tests (input (B, 2, 8, 8))."""
    torch.manual_seed(seed)
    return nn.Sequential(
        MPOConv2d(2, 4, 3, (2, 3, 3), (1, 2, 2), 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        MPOLinear((4, 8, 8), (2, 2, 2), 3),
    )


def test_torch_compile_fullgraph_matches_eager() -> None:
    model = _small_convnet(seed=3)
    x = torch.randn(3, 2, 8, 8)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    backend = "inductor" if shutil.which("g++") or shutil.which("cc") else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for batch in (3, 17):  # a second batch size recompiles (dynamic) without breaking the graph
        x = torch.randn(batch, 2, 8, 8, requires_grad=True)
        eager, fast = model(x), compiled(x)
        np.testing.assert_allclose(fast.detach().numpy(), eager.detach().numpy(), rtol=1e-4, atol=1e-5)
        (grad_fast,) = torch.autograd.grad(fast.sum(), x)
        (grad_eager,) = torch.autograd.grad(eager.sum(), x)
        np.testing.assert_allclose(grad_fast.numpy(), grad_eager.numpy(), rtol=1e-4, atol=1e-5)


def test_torch_export_with_a_dynamic_batch_serves_batches_1_to_4096() -> None:
    """One exported program for every batch size (no guards narrowing the range), equal to eager."""
    model = _small_convnet(seed=5).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.randn(9, 2, 8, 8),), dynamic_shapes=({0: batch},))
    exported = program.module()
    for size in (1, 7, 300, 4096):
        x = torch.randn(size, 2, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_onnx_export_through_dynamo_with_a_dynamic_batch_runs_in_onnxruntime(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _small_convnet(seed=6).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randn(9, 2, 8, 8),), str(path), dynamo=True, dynamic_shapes=({0: batch},))
    session = onnxruntime.InferenceSession(str(path))
    name = session.get_inputs()[0].name
    for size in (1, 7, 300):
        x = torch.randn(size, 2, 8, 8)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {name: x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)


def _ddp_model() -> Any:
    torch.manual_seed(11)
    return nn.Sequential(
        MPOConv2d(2, 4, 3, (2, 3, 3), (1, 2, 2), 3, dtype=torch.float64),
        nn.Tanh(),
        nn.Flatten(),
        MPOLinear((4, 3, 3), (2, 1, 2), 3, dtype=torch.float64),
    )


def _ddp_data() -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(12)
    return torch.randn(8, 2, 5, 5, generator=generator, dtype=torch.float64), torch.randn(8, 4, generator=generator)


def _train(model: Any, x: Any, y: Any, steps: int = 4) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x), y.double()).backward()
        optimizer.step()


def _ddp_worker(rank: int, world_size: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    model = nn.parallel.DistributedDataParallel(_ddp_model())
    x, y = _ddp_data()
    shard = slice(rank * 4, rank * 4 + 4)
    _train(model, x[shard], y[shard])
    if rank == 0:
        weights = {name: p.detach().numpy() for name, p in model.module.named_parameters()}
        np.savez(f"{folder}/cores.npz", **weights)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without Python's teardown: freeing the DDP reducer can deadlock in torch 2.13 (the gloo
    # process group's destructor joins a thread that waits for the GIL the destructor holds).
    os._exit(0)


def test_distributed_data_parallel_matches_one_process(tmp_path: Path) -> None:
    context = torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the 2 DDP workers did not finish within 120 s")
    single = _ddp_model()
    _train(single, *_ddp_data())
    with np.load(tmp_path / "cores.npz", allow_pickle=False) as saved:
        for name, p in single.named_parameters():
            np.testing.assert_allclose(saved[name], p.detach().numpy(), rtol=1e-10, atol=1e-12)
        moved = np.abs(saved["3.cores.0"] - _ddp_model()[3].cores[0].detach().numpy()).max()
    assert moved > 1e-3  # training changed the cores


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: MPOLinear((2, 3), (3, 2), 2)(torch.ones(4, 7)), ValueError, r"shape \(\.\.\., 6\), got \(4, 7\)"),
        (lambda: MPOLinear((2, 3), (3, 2), 2)(np.ones((4, 6))), TypeError, "expects a torch.Tensor, got ndarray"),
        (
            lambda: MPOLinear((2, 3), (3, 2), 2)(torch.ones(4, 6, dtype=torch.float64)),
            TypeError,
            "torch.float32 but the input has dtype torch.float64",
        ),
        (lambda: MPOLinear((2, 3), (3, 2), 2, init="xavier"), ValueError, "unknown init 'xavier'; expected one of"),
        (lambda: MPOLinear((2, 3), (3, 2), 2, strategy="fastest"), ValueError, "unknown strategy 'fastest'"),
        (
            lambda: MPOConv2d(3, 8, 3, (3, 3, 2), (2, 2, 2), 2),
            ValueError,
            r"multiply to 18.*in_channels\*kh\*kw = 3\*3\*3 = 27",
        ),
        (lambda: MPOConv2d(3, 8, 3, (3, 3, 3), (2, 2, 3), 2), ValueError, "out_modes .* to 12.*out_channels = 8"),
        (lambda: MPOConv2d(3, 8, (3, 3, 3)), ValueError, r"kernel_size must be .* pair.*\(3, 3, 3\)"),
        (lambda: MPOConv2d(3, 8, 3, padding="full"), ValueError, "padding must be .*'same', got 'full'"),
        (lambda: MPOConv2d(3, 8, 3, stride=2, padding="same"), ValueError, "'same' needs stride 1"),
        (
            lambda: MPOConv2d(3, 8, 3)(torch.ones(2, 4, 5, 5)),
            ValueError,
            r"\(batch, 3, height, width\).*\(2, 4, 5, 5\)",
        ),
        (lambda: MPOConv2d(3, 8, 5)(torch.ones(1, 3, 3, 3)), ValueError, r"spatial size \(3, 3\) is smaller"),
        (lambda: MPOConv2d(3, 8, 3)(np.ones((1, 3, 5, 5))), TypeError, "expects a torch.Tensor, got ndarray"),
        (lambda: MPOLinear.from_linear(nn.Conv2d(1, 1, 1)), TypeError, "expects an nn.Linear, got Conv2d"),
        (lambda: MPOConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2)), ValueError, "groups=1.*got groups=2"),
        (lambda: compress("model", rank=2), TypeError, "expects an nn.Module, got str"),
    ],
    ids=lambda v: v.replace("\\", "") if isinstance(v, str) else "",  # no backslash in a test id (mutmut runs ids)
)
def test_bad_input(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("train", [True, False])
def test_autocast_computes_like_nn_linear_and_keeps_float32_parameters(train: bool) -> None:
    torch.manual_seed(9)
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 8).train(train)
    linear = layer.to_linear().train(train)
    x = torch.randn(64, 784)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
        ours, theirs = layer(x), linear(x)
        again = layer(x)  # the same call again: autocast still casts it
        after_linear = layer(nn.Linear(784, 784)(x))  # a bf16 input, as autocast hands it on
        steps = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), 8, strategy="zipper").train(train)  # a bias added after them
        steps_again = [steps(x).dtype for _ in range(2)]
    assert ours.dtype == theirs.dtype == again.dtype == after_linear.dtype == torch.bfloat16
    assert steps_again == [torch.bfloat16] * 2
    with torch.set_grad_enabled(train):
        assert layer(x).dtype == layer(x).dtype == torch.float32  # and outside it, nothing is
    scale = float(theirs.float().abs().max())
    np.testing.assert_allclose(ours.float().detach().numpy(), theirs.float().detach().numpy(), atol=2e-2 * scale)
    if train:  # float32 gradients on float32 cores, near those of the same layer without autocast
        ours.float().sum().backward()
        exact = MPOLinear.from_cores(list(layer.cores), layer.bias)
        exact(x).sum().backward()
        for core, twin in zip(layer.cores, exact.cores):
            assert core.dtype == core.grad.dtype == torch.float32
            scale = float(twin.grad.abs().max())
            np.testing.assert_allclose(core.grad.numpy(), twin.grad.numpy(), atol=5e-2 * scale)


def test_autocast_convolution_matches_nn_conv2d() -> None:
    torch.manual_seed(10)
    layer = MPOConv2d(3, 8, 3, (3, 3, 3), (2, 2, 2), 4, padding=1)
    conv = layer.to_conv()
    x = torch.randn(2, 3, 9, 9)
    for strategy_layer in (layer, MPOConv2d.from_conv(conv, strategy="zipper", max_rank=100)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = strategy_layer(x), conv(x)
        assert ours.dtype == theirs.dtype == torch.bfloat16
        scale = float(theirs.float().abs().max())
        np.testing.assert_allclose(ours.float().detach().numpy(), theirs.float().detach().numpy(), atol=3e-2 * scale)
        assert all(c.dtype == torch.float32 for c in strategy_layer.parameters())


def _conv_net() -> nn.Module:
    """Convs and linears whose weights are rank-3 MPOs plus a little noise: compressible, as trained ones are."""
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, dilation=1, padding="valid"),
        nn.Flatten(),
        nn.Linear(32 * 3 * 3, 256),
        nn.ReLU(),
        nn.Linear(256, 300),
    )
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Conv2d):
                low_rank = MPOConv2d(module.in_channels, module.out_channels, module.kernel_size, rank=3).kernel()
            elif isinstance(module, nn.Linear):
                low_rank = MPOLinear.auto(module.in_features, module.out_features, rank=3).to_dense()
            else:
                continue
            module.weight.copy_(low_rank + 1e-3 * torch.randn_like(low_rank) * low_rank.std())
    return model


@pytest.mark.parametrize("how", [{"rank": 6}, {"tol": 0.3}], ids=["rank", "tol"])
def test_restructure_rebuilds_a_compressed_model_from_its_state_dict(tmp_path: Path, how: dict[str, Any]) -> None:
    """Rebuild the dense architecture, ``restructure`` it from the checkpoint, ``load_state_dict``: the outputs
    are the compressed model's, bit for bit, with ranks that depend on the weights (``tol``) too."""
    from safetensors.torch import load_file, save_file
    from tnlayers.backends.torch import restructure

    torch.manual_seed(0)
    compressed = _conv_net()
    report = compress(compressed, min_features=16, **how)
    assert {row.name for row in report.layers} == {"0", "2", "4", "6"}
    save_file(compressed.state_dict(), str(tmp_path / "model.safetensors"))
    state = load_file(str(tmp_path / "model.safetensors"))
    fresh = _conv_net()  # dense again, with other random weights
    with pytest.raises(RuntimeError, match=r"size mismatch|Missing key|Unexpected key"):
        fresh.load_state_dict(state)
    assert restructure(fresh, state) == ["0", "2", "4", "6"]
    fresh.load_state_dict(state)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(fresh(x), compressed(x))
    assert [type(m).__name__ for m in fresh] == [type(m).__name__ for m in compressed]
    assert restructure(fresh, state) == []  # already in shape: nothing to replace


def test_restructure_names_what_it_cannot_match() -> None:
    from tnlayers.backends.torch import restructure

    layer = MPOLinear((4, 4), (4, 4), 2)
    state = {f"head.{k}": v for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"MPO cores for 'head', which the model does not have"):
        restructure(nn.Sequential(nn.Linear(16, 16)), state)
    with pytest.raises(ValueError, match=r"16 -> 16 features for 'head', but the model has a Linear there"):
        restructure(nn.ModuleDict({"head": nn.Linear(16, 8)}), state)
