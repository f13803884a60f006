"""Build the tutorial: write ``tutorial.ipynb`` from the cells below, execute it, render ``tutorial.md``.

    .venv/bin/python docs/make_tutorial.py

The cells live here, in one reviewable file; the notebook and its Markdown rendering (with the
figures in ``tutorial_files/``) are generated and committed. A test executes the notebook.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import MarkdownExporter

DOCS = Path(__file__).resolve().parent

CELLS: list[tuple[str, str]] = [
    (
        "md",
        """# Tensor networks with tnlayers: a tutorial

This notebook teaches matrix product operators (MPOs, also called tensor-train matrices) as they are
used to compress neural networks (Gao et al., *Phys. Rev. Research* 2, 023300, 2020):

1. what an MPO is, and how many parameters it saves;
2. how TT-SVD compresses a matrix, and how the error falls with the bond dimension;
3. why the order in which the network is contracted matters;
4. entanglement across the bonds of a trained layer, and shrinking the bonds afterwards;
5. the same layer in PyTorch, Keras and NumPy.

It runs on a CPU in about a minute.""",
    ),
    (
        "code",
        """%matplotlib inline
import os, tempfile, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet TensorFlow start-up logs (section 5)
from pathlib import Path
import numpy as np
import matplotlib.pyplot as plt
import tnlayers

workdir = Path(tempfile.mkdtemp())  # checkpoints written below go here""",
    ),
    (
        "md",
        """## 1. What an MPO is

A dense layer computes `y = x @ W` with `W` of shape `(in_features, out_features)`. Factor both sizes,
784 = 4·7·7·4 and 256 = 4·4·4·4, and read `W` as a tensor `W[i1 i2 i3 i4, j1 j2 j3 j4]`. An MPO writes
that tensor as a chain of small cores, one per pair of legs `(i_k, j_k)`, joined by *bonds* of
dimension `D`:

`W[i1..i4, j1..j4] = Σ G1[i1, j1, a] G2[a, i2, j2, b] G3[b, i3, j3, c] G4[c, i4, j4]`

In tnlayers core `k` has shape `(D_k, in_k, out_k, D_{k+1})` with `D_0 = D_n = 1`.""",
    ),
    (
        "code",
        """spec = tnlayers.MPOSpec(in_modes=(4, 7, 7, 4), out_modes=(4, 4, 4, 4), ranks=8)
print(spec)
print("core shapes:", spec.core_shapes)
print(f"{spec.num_params:,} parameters instead of {spec.dense_params:,} ({1 / spec.compression_ratio:.0f}x fewer)")
print()
print(tnlayers.draw_ascii(spec))""",
    ),
    (
        "code",
        """tnlayers.draw(spec)
plt.show()""",
    ),
    (
        "md",
        """The bond dimension `D` is the only knob: the parameters grow as `D²`, while the largest possible
bond at a cut is the smaller of the two sides' sizes (tnlayers clips larger requests, with a warning).""",
    ),
    (
        "code",
        """for d in (1, 2, 4, 8, 16, 32):
    s = tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), d)
    print(f"D={d:>2}: ranks {s.ranks}, {s.num_params:>6,} parameters, rho = {s.compression_ratio:.4f}")""",
    ),
    (
        "md",
        """## 2. TT-SVD: compressing a matrix you already have

`from_dense` splits `W` one leg pair at a time with SVDs and keeps the largest singular values at
each bond. Whether that loses anything depends on the matrix: a smooth operator (here a Gaussian blur
that downsamples a 28x28 image to 16x16) has small bonds, a random matrix has none.""",
    ),
    (
        "code",
        """from tnlayers.apps.cli import blur_matrix

smooth = blur_matrix(28, 16, width=1.5)  # (784, 256): blur and downsample
noise = np.random.default_rng(0).normal(size=(784, 256))
bonds = [1, 2, 4, 8, 12, 16, 32, 64]
errors = {"blur": [], "random": []}
for name, matrix in (("blur", smooth), ("random", noise)):
    for d in bonds:
        _, report = tnlayers.from_dense(matrix, (4, 7, 7, 4), (4, 4, 4, 4), max_rank=d)
        errors[name].append(report.relative_error)
    print(name, " ".join(f"D={d}: {e:.1e}" for d, e in zip(bonds, errors[name])))

plt.semilogy(bonds, errors["blur"], "o-", label="Gaussian blur (smooth)")
plt.semilogy(bonds, errors["random"], "s-", label="random Gaussian")
plt.xlabel("bond dimension D")
plt.ylabel("relative error ||W - W_mpo|| / ||W||")
plt.legend()
plt.title("TT-SVD of a 784 x 256 matrix as 4x7x7x4 -> 4x4x4x4")
plt.show()""",
    ),
    (
        "md",
        """Trained weights sit between these two extremes. That is why networks are usually *trained* in MPO
form (section 4), or decomposed and then fine-tuned.""",
    ),
    (
        "md",
        """## 3. The contraction order matters

Computing `x @ W` from the cores is contracting a network of `n + 1` tensors. The order is free,
and the costs are not: sweep the input through the cores one by one (`zipper`), or build `W` first
(`materialize`), or anything in between. tnlayers turns each order into a *plan*: plain data listing
the pairwise products, their flops and their intermediates. Red numbers are the steps.""",
    ),
    (
        "code",
        """fig, axes = plt.subplots(3, 1, figsize=(8, 10))
for ax, strategy in zip(axes, ("zipper", "materialize", "greedy")):
    tnlayers.draw(spec, tnlayers.plan(spec, 256, strategy), ax=ax)
plt.show()
print(tnlayers.draw_ascii(spec, tnlayers.plan(spec, 256, "zipper")))""",
    ),
    (
        "md",
        """Which order is fastest depends on the batch size: at batch 1 the input is a thin vector and the
zipper never forms anything large; at batch 1024 one big matrix product with `W` uses the hardware
best. Flops alone do not decide it: the time of each step also depends on its shape.""",
    ),
    (
        "code",
        """cores = tnlayers.init_cores(spec, seed=0)
print(f"{'batch':>5} {'ordering':>14} {'flops':>12} {'largest interm.':>16} {'NumPy ms':>9}")
for batch in (1, 32, 1024):
    x = np.random.default_rng(1).normal(size=(batch, 784)).astype(np.float32)
    for strategy in ("zipper", "reverse-zipper", "materialize", "greedy", "dp", "auto"):
        p = tnlayers.plan(spec, batch, strategy)
        tnlayers.contract(x, cores, strategy=p)  # warm-up
        start = time.perf_counter()
        for _ in range(5):
            tnlayers.contract(x, cores, strategy=p)
        ms = (time.perf_counter() - start) / 5 * 1e3
        name = f"auto ({p.method})" if strategy == "auto" else strategy
        print(f"{batch:>5} {name:>14} {p.flops:>12,} {p.largest_intermediate:>16,} {ms:>9.3f}")""",
    ),
    (
        "md",
        """## 4. Entanglement across the bonds of a trained layer

Cut the chain at bond `k`: `W` becomes a matrix from the legs left of the cut to those right of it.
Its singular values `s` (the Schmidt values) say how much the two halves are correlated; the
entanglement entropy `S = -Σ p log p` with `p = s² / Σ s²` condenses them into one number, at most
`log D`. A bond with low entropy can be cut down. `tnlayers.entanglement` brings the cores to
canonical form and takes one small SVD per bond, never forming `W`.

We train the paper's MPO-FC2 (784 -> 256 -> 10, the first layer an MPO with D = 16) in PyTorch for
one epoch on MNIST: `TNLAYERS_DATA`, else the copy beside this project (`tnlayers.datasets.find_folder`).
Without either, it trains on synthetic digits drawn from a font (`tnlayers.datasets.synthetic_digits`,
*not* MNIST), and the cell says so; the accuracies below are then those of that easier stand-in.""",
    ),
    (
        "code",
        """import torch
from torch import nn
from tnlayers.backends.torch import MPOLinear
from tnlayers.datasets import find_folder, load_mnist, synthetic_digits

data = find_folder("mnist")
if data is not None:
    print(f"data: MNIST from {data}")
    images, labels = load_mnist(data, "train")
    test_images, test_labels = load_mnist(data, "test")
    images, labels = images[:20000], labels[:20000]
else:
    print("data: no MNIST found (set TNLAYERS_DATA); synthetic font digits instead, NOT MNIST")
    images, labels = synthetic_digits(20000, seed=0)
    test_images, test_labels = synthetic_digits(5000, seed=1)

torch.manual_seed(0)
mpo = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), rank=16, init="he")
model = nn.Sequential(mpo, nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.Adam(model.parameters(), lr=2e-3)
x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
for batch in torch.randperm(len(x_all)).split(64):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x_all[batch]), y_all[batch]).backward()
    opt.step()


def accuracy(net):
    with torch.no_grad():
        return (net(torch.from_numpy(test_images)).argmax(1).numpy() == test_labels).mean()


print(mpo)
print(f"test accuracy after one epoch: {accuracy(model):.4f}")""",
    ),
    (
        "code",
        """report = tnlayers.entanglement(mpo)
print(report)
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
left.bar(range(1, 4), report.entropies, label="entropy S")
left.plot(range(1, 4), report.max_entropies, "k_", markersize=30, label="bound log D")
left.set(xticks=range(1, 4), xlabel="bond", ylabel="nats", title="entanglement per bond")
left.set_ylim(0, 1.35 * max(report.max_entropies))  # room above the bars for the legend
left.legend(loc="upper left", ncols=2, fontsize=8)
for k, s in enumerate(report.singular_values, start=1):
    right.semilogy(range(1, len(s) + 1), s / s[0], "o-", label=f"bond {k}")
right.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # Schmidt indices are whole numbers
right.set(xlabel="Schmidt index", ylabel="s / s_max", title="Schmidt spectra")
right.legend(loc="lower left", fontsize=8)
plt.show()""",
    ),
    (
        "md",
        """The pixel index is `i1 i2 i3 i4` in C order, so `(i1, i2)` is the pixel's row and `(i3, i4)` its
column: the middle bond separates rows from columns, and it carries the most entanglement, because
what the layer does with a pixel's row depends on its column. The outer bonds are capped by their
legs (`4 x 4 = 16`). `truncate` rounds a trained MPO to smaller bonds (canonical form, then
truncated SVDs) and reports the error it made, exactly:""",
    ),
    (
        "code",
        """for max_rank in (12, 8, 4):
    small_cores, rounding = tnlayers.truncate(mpo, max_rank=max_rank)
    smaller = MPOLinear.from_cores(small_cores, mpo.bias)
    net = nn.Sequential(smaller, nn.ReLU(), model[2])
    print(
        f"D<={max_rank:>2}: ranks {rounding.ranks}, {rounding.num_params:>5,} params, "
        f"relative error {rounding.relative_error:.3f}, test accuracy {accuracy(net):.4f}"
    )""",
    ),
    (
        "md",
        """## 5. One layer, three frameworks

The cores have one layout everywhere, `(D_k, in_k, out_k, D_{k+1})`, and one checkpoint format
(safetensors, no pickle). The layer trained in PyTorch above loads into Keras and NumPy and gives
the same outputs; it also converts to a `tensornetwork` network whose contraction is `W`.""",
    ),
    (
        "code",
        """import keras
from tnlayers.backends.keras import MPODense
from tnlayers.backends.numpy import MPOLinear as NumpyMPOLinear

mpo.save(workdir / "fc2.safetensors")
keras_layer = MPODense.load(workdir / "fc2.safetensors")
numpy_layer = NumpyMPOLinear.load(workdir / "fc2.safetensors")
x = test_images[:8]
with torch.no_grad():
    y_torch = mpo(torch.from_numpy(x)).numpy()
y_keras = keras.ops.convert_to_numpy(keras_layer(x))
y_numpy = numpy_layer(x)
print("keras vs torch:", np.abs(y_keras - y_torch).max(), " numpy vs torch:", np.abs(y_numpy - y_torch).max())""",
    ),
    (
        "code",
        """import tensornetwork as tn

network = tnlayers.to_tensornetwork(mpo)
print([node.name for node in network.nodes], [edge.name for edge in network.input_edges])
result = tn.contractors.auto(network.nodes, output_edge_order=network.input_edges + network.output_edges)
W = result.tensor.reshape(784, 256)
contracted = tnlayers.to_dense(tnlayers.decompose.cores_of(mpo))
print("tensornetwork's contraction equals W:", np.allclose(W, contracted, atol=1e-5))""",
    ),
    (
        "md",
        """## Where next

- `tnlayers.plan(spec, batch).describe()` prints any plan; `strategy=` on every layer picks one.
- `tnlayers.backends.torch.compress(model, rank=...)` turns the dense layers of a trained model into MPOs.
- `python -m benchmarks.orderings --backends torch` times every ordering on your machine.""",
    ),
]


def build() -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for number, (kind, source) in enumerate(CELLS):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        cell.id = f"cell-{number}"  # stable ids: rebuilding changes only what changed
        notebook.cells.append(cell)
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(DOCS)}}
    ).execute()
    return notebook


def _is_startup_log(output: nbformat.NotebookNode) -> bool:
    if output.get("name") != "stderr":
        return False
    noise = ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard", "To enable the following")
    return all(any(mark in line for mark in noise) for line in output.get("text", "").splitlines() if line.strip())


def main() -> None:
    notebook = execute(build())
    for cell in notebook.cells:  # no timings, and no TensorFlow start-up chatter, in the committed notebook
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [output for output in cell.outputs if not _is_startup_log(output)]
    nbformat.write(notebook, DOCS / "tutorial.ipynb")
    body, resources = MarkdownExporter().from_notebook_node(notebook, resources={"output_files_dir": "tutorial_files"})
    shutil.rmtree(DOCS / "tutorial_files", ignore_errors=True)
    (DOCS / "tutorial_files").mkdir()
    for name, data in resources["outputs"].items():
        (DOCS / name).write_bytes(data)
    (DOCS / "tutorial.md").write_text(body)
    print(f"wrote {DOCS / 'tutorial.ipynb'}, {DOCS / 'tutorial.md'} and {len(resources['outputs'])} figures")


if __name__ == "__main__":
    main()
