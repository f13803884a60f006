"""The README's main command (``tnlayers demo``) in its quick mode, and the paper scripts' smoke runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("keras")

PROJECT = Path(__file__).resolve().parents[1]


def _param_count(in_modes: tuple[int, ...], out_modes: tuple[int, ...], bond: int) -> int:
    """Eq. 6 of Gao et al. 2020, with each bond capped at its exact maximum (written out here, not tnlayers code)."""
    n = len(in_modes)
    sizes = [i * j for i, j in zip(in_modes, out_modes)]
    ranks = [1]
    for k in range(1, n):
        left = 1
        for size in sizes[:k]:
            left *= size
        right = 1
        for size in sizes[k:]:
            right *= size
        ranks.append(min(bond, left, right))
    ranks.append(1)
    return sum(ranks[k] * sizes[k] * ranks[k + 1] for k in range(n))


def test_demo_quick_runs_all_five_steps(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tnlayers.apps", "demo", "--quick", "--batches", "1", "64", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "demo.json").read_text())
    # step 3, as recorded: the checkpoint PyTorch wrote gives the same logits in Keras and NumPy
    assert [f["framework"] for f in record["frameworks"]] == ["PyTorch", "Keras", "NumPy"]
    for framework in record["frameworks"]:
        assert framework["same_labels_as_pytorch"] == 1.0 and framework["max_logit_gap"] < 1e-4
        assert framework["accuracy"] == record["frameworks"][0]["accuracy"]
    assert [m["model"] for m in record["models"]][:3] == ["dense FC2", "MPO-FC2 D=4", "MPO-FC2 D=16"]
    assert record["models"][1]["params"] == _param_count((4, 7, 7, 4), (4, 4, 4, 4), 4) + 736
    if record["data"].startswith("MNIST"):
        assert all(model["accuracy"] > 0.5 for model in record["models"])  # even one short epoch learns
    else:  # no MNIST here: the harder synthetic digits, where the quick run's small MPOs barely start
        assert record["data"].startswith("synthetic") and record["models"][0]["accuracy"] > 0.3
    assert {r["batch"] for r in record["orderings"]} == {1, 64}
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "mpo_fc2.safetensors").is_file()


def test_demo_without_mnist_says_it_uses_synthetic_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tnlayers.apps import demo

    monkeypatch.setattr(demo, "find_folder", lambda dataset, folder=None: None)
    tensors, source = demo._load_data(None, quick=True)
    assert source.startswith("synthetic font digits") and "TNLAYERS_DATA" in source
    assert tuple(tensors[0].shape) == (3000, 784) and tuple(tensors[2].shape) == (1000, 784)


def test_demo_rejects_a_data_folder_without_mnist(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "tnlayers.apps",
        "demo",
        "--quick",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=PROJECT)
    assert result.returncode == 2 and f"no mnist IDX files (t10k-labels-idx1-ubyte.gz) in {tmp_path}" in result.stderr


def test_console_command_lists_the_subcommands() -> None:
    script = Path(sys.executable).with_name("tnlayers")
    if not script.is_file():
        pytest.skip("the tnlayers console script is not installed in this environment")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "basics" in out and "plan" in out


def test_paper_fc2_counts_parameters_as_the_paper_does(tmp_path: Path, mnist_dir: Path) -> None:
    sys.path.insert(0, str(PROJECT))
    from benchmarks.paper import fc2

    args = ["--data", str(mnist_dir), "--limit", "400", "--epochs", "1", "--seeds", "2", "--bonds", "2", "22"]
    result = fc2.main([*args, "--out", str(tmp_path)])
    rows = {row["bond"]: row for row in result["rows"]}  # type: ignore[attr-defined]
    dense = 784 * 256 + 256 * 10
    assert rows[2]["replaced_params"] == 1024  # the paper: "only 1024 parameters" at D = 2
    expected_22 = _param_count((4, 7, 7, 4), (4, 4, 4, 4), 22) + _param_count((4, 4, 4, 4), (1, 1, 10, 1), 4)
    assert rows[22]["replaced_params"] == expected_22 and abs(rows[22]["rho"] - expected_22 / dense) < 1e-12
    assert abs(rows[22]["rho"] - 0.1031) < 5e-4  # the paper's Fig. 2 (capped bonds)
    assert len(rows[2]["runs"]) == 2 and (tmp_path / "fc2-mnist.json").is_file()


def test_paper_lenet5_has_the_papers_rho(tmp_path: Path, mnist_dir: Path) -> None:
    sys.path.insert(0, str(PROJECT))
    from benchmarks.paper import lenet5

    result = lenet5.main(["--data", str(mnist_dir), "--limit", "200", "--epochs", "1", "--seeds", "1",
                          "--out", str(tmp_path)])  # fmt: skip
    mpo = result["rows"][1]  # type: ignore[index]
    expected = (_param_count((2, 10, 10, 2), (2, 5, 6, 2), 4) + _param_count((2, 5, 6, 2), (2, 3, 7, 2), 4)
                + _param_count((2, 3, 7, 2), (1, 5, 2, 1), 2))  # fmt: skip
    assert mpo["replaced_params"] == expected == 2860 and abs(mpo["rho"] - 0.0485) < 1e-3


@pytest.mark.parametrize(
    "args",
    [["--model", "vgg16"], ["--model", "vgg19"], ["--model", "resnet", "--depth", "20", "--mpo-last-unit"],
     ["--model", "densenet"], ["--model", "resnet", "--depth", "14", "--dense"]],
    ids=["vgg16", "vgg19", "resnet20-last-unit", "densenet40", "resnet14-dense"],
)  # fmt: skip
def test_cifar_models_build_run_and_learn(args: list[str]) -> None:
    sys.path.insert(0, str(PROJECT))
    from benchmarks.paper import cifar

    result = cifar.main([*args, "--smoke", "4"])
    losses = result["smoke_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]  # type: ignore[index,operator]
    if "--dense" not in args:
        assert 0 < result["mpo_params"] < result["params"] < result["dense_params"]  # type: ignore[operator]


def test_vgg16_mpo_matches_the_papers_replaced_parameter_count() -> None:
    sys.path.insert(0, str(PROJECT))
    from benchmarks.paper import cifar

    model = cifar.vgg("vgg16", mpo=True)
    cores = sum(p.numel() for name, p in model.named_parameters() if ".cores." in name)
    assert cores == 10_944  # PAPER.md: 3,104 x 2 + 1,376 + 2,432 + 928


def test_cifar_reader_rejects_a_wrong_file(tmp_path: Path) -> None:
    sys.path.insert(0, str(PROJECT))
    from benchmarks.paper import cifar

    (tmp_path / "test_batch.bin").write_bytes(bytes(3073 * 2 + 5))
    with pytest.raises(ValueError, match="multiple of 3073"):
        cifar.read_cifar_binary(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"data_batch_1\.bin"):
        cifar.read_cifar_binary(tmp_path, "train")
