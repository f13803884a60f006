"""``MPOEmbedding`` in every framework against the dense table, built here in plain NumPy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import _param, dense_reference, make_layer_harness

from tnlayers import layer as kit
from tnlayers.spec import factorize_balanced, padded_size

FRAMEWORKS = ("numpy", "torch", "keras")


class _Adapter:
    """Build an embedding from a table or from cores, and look rows up, in one framework."""

    def __init__(self, name: str) -> None:
        make_layer_harness(name)  # skips (or fails under TNLAYERS_REQUIRE_ALL) when the framework is missing
        self.name = name

    def from_table(self, table: np.ndarray, **kwargs: Any) -> Any:
        if self.name == "numpy":
            from tnlayers.backends.numpy import MPOEmbedding

            return MPOEmbedding.from_dense(table, **kwargs)
        if self.name == "torch":
            import torch
            from tnlayers.backends.torch import MPOEmbedding as TorchEmbedding

            dense = torch.nn.Embedding(*table.shape, dtype=torch.float64)
            with torch.no_grad():
                dense.weight.copy_(torch.from_numpy(table))
            return TorchEmbedding.from_embedding(dense, **kwargs)
        import keras
        from tnlayers.backends.keras import MPOEmbedding as KerasEmbedding

        dense = keras.layers.Embedding(*table.shape, dtype="float64")
        dense.build((None,))
        dense.embeddings.assign(table)
        return KerasEmbedding.from_dense(dense, **kwargs)

    def fresh(self, rows: int, dim: int, rank: int, n_cores: int) -> Any:
        module = __import__(f"tnlayers.backends.{self.name}", fromlist=["MPOEmbedding"])
        return module.MPOEmbedding(rows, dim, rank, n_cores, seed=3)

    def from_cores(self, cores: list[np.ndarray], rows: int) -> Any:
        module = __import__(f"tnlayers.backends.{self.name}", fromlist=["MPOEmbedding"])
        return module.MPOEmbedding.from_cores(cores, rows)

    def lookup(self, layer: Any, indices: np.ndarray) -> np.ndarray:
        if self.name == "torch":
            import torch

            return layer(torch.from_numpy(indices)).detach().numpy()
        return np.asarray(layer(indices))

    def cores(self, layer: Any) -> list[np.ndarray]:
        if self.name == "torch":
            return [c.detach().numpy() for c in layer.cores]
        return [np.asarray(c) for c in layer.cores]


@pytest.fixture(params=[_param(name) for name in FRAMEWORKS])
def adapter(request: pytest.FixtureRequest) -> _Adapter:
    return _Adapter(request.param)


def test_padded_size_gives_balanced_factors_and_pads_only_awkward_counts() -> None:
    assert padded_size(1000, 3) == 1000 and padded_size(784, 4) == 784  # already balanced: no padding
    assert padded_size(30522, 4) == 30576 and factorize_balanced(30576, 4) == (12, 14, 14, 13)
    assert padded_size(1009, 2) > 1009  # a prime
    for n in (1009, 30522, 50257, 97):
        m = padded_size(n, 3)
        assert m >= n and max(factorize_balanced(m, 3)) <= 2 * int(np.ceil(m ** (1 / 3)))
        assert all(max(factorize_balanced(k, 3)) > 2 * int(np.ceil(k ** (1 / 3))) for k in range(n, m))


def test_rows_equal_the_dense_table_padding_included(adapter: _Adapter) -> None:
    """1,009 rows (a prime: padded to factorable modes), exact TT-SVD: every looked-up row is the table's,
    the last real row included, and the padded rows cannot be looked up."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(1009, 12))
    layer = adapter.from_table(table, n_cores=3)
    padded = padded_size(1009, 3)
    assert padded > 1009 and layer.spec.in_features == padded
    indices = np.array([[0, 1008, 5], [1007, 17, 0]])
    np.testing.assert_allclose(adapter.lookup(layer, indices), table[indices], rtol=1e-9, atol=1e-9)
    for bad in (1009, padded - 1, -1):
        with pytest.raises(ValueError, match=f"embedding index {bad} is out of range: expected 0 <= index < 1009"):
            adapter.lookup(layer, np.array([3, bad]))


def test_lookup_of_random_cores_matches_the_einsum_reference(adapter: _Adapter) -> None:
    layer = adapter.fresh(300, 24, 5, 3)
    cores = adapter.cores(layer)
    table = dense_reference([c.astype(np.float64) for c in cores])[:300]
    indices = np.random.default_rng(1).integers(0, 300, size=(4, 6))
    got = adapter.lookup(layer, indices)
    assert got.shape == (4, 6, 24)
    np.testing.assert_allclose(got, table[indices], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ranks", [(1, 3, 7, 2, 1), (1, 6, 2, 2, 1), (1, 2, 2, 6, 1), (1, 4, 4, 4, 1)], ids=str)
def test_lookups_meet_at_the_largest_bond_wherever_it_is(adapter: _Adapter, ranks: tuple[int, ...]) -> None:
    """Four cores of uneven bonds (the lookup's two chains meet at the largest; the first of equal ones):
    every row against the table built here by einsum, repeated indices included."""
    rows, cols = (3, 4, 2, 5), (2, 3, 2, 2)
    rng = np.random.default_rng(4)
    cores = [rng.normal(size=(ranks[k], rows[k], cols[k], ranks[k + 1])) for k in range(4)]
    table = np.einsum("aiAb,bjBc,ckCd,dlDe->ijklABCD", *cores).reshape(120, 24)
    layer = adapter.from_cores(cores, 120)
    indices = np.array([[0, 119, 37, 37], [64, 5, 0, 118]])
    np.testing.assert_allclose(adapter.lookup(layer, indices), table[indices], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [1, 3, 40], ids=lambda n: f"{n} rows")
def test_both_lookup_routes_give_the_tables_rows(adapter: _Adapter, count: int) -> None:
    """256 x 16 over four cores with a large middle bond: one row goes through the chains, many through the
    table's two halves (the route is checked), and every row equals the table built here by einsum."""
    rows, cols, ranks = (4, 4, 4, 4), (2, 2, 2, 2), (1, 8, 64, 8, 1)
    shapes = tuple((ranks[k], rows[k], cols[k], ranks[k + 1]) for k in range(4))
    assert kit.embedding_lookup_route(shapes, count)[0] == ("chains" if count == 1 else "halves")
    rng = np.random.default_rng(5)
    cores = [rng.normal(size=shape) / np.sqrt(shape[0]) for shape in shapes]
    table = np.einsum("aiAb,bjBc,ckCd,dlDe->ijklABCD", *cores).reshape(256, 16)
    layer = adapter.from_cores(cores, 256)
    indices = rng.permutation(256)[:count]
    np.testing.assert_allclose(adapter.lookup(layer, indices), table[indices], rtol=1e-5, atol=1e-5)


def test_the_lookup_route_weighs_gathered_slices_against_the_halves_products() -> None:
    """Few rows: the chains; many rows and a large middle bond: the halves; equal bonds put the split after
    the first core, where one half is nearly the whole table, so the chains stay cheaper (the choices the
    timings quoted in ``_GATHERED_CHAIN_WEIGHT``'s comment made)."""
    bert = ((1, 12, 4, 48), (48, 14, 4, 768), (768, 14, 6, 52), (52, 13, 4, 1))
    assert [kit.embedding_lookup_route(bert, n) for n in (1, 8, 64)] == [("chains", 2), ("chains", 2), ("halves", 2)]
    even = ((1, 12, 4, 48), (48, 14, 4, 48), (48, 14, 6, 48), (48, 13, 4, 1))
    assert kit.embedding_lookup_route(even, 200) == ("chains", 1)  # measured: 3.5 ms against 54 ms
    assert kit.embedding_lookup_route(bert, None) == ("chains", 2)  # a symbolic batch
    assert kit.embedding_lookup_route(((1, 6, 4, 3), (3, 5, 2, 1)), 10**6) == ("chains", 1)  # two cores


def test_cores_are_portable_between_frameworks(adapter: _Adapter) -> None:
    """Cores written by NumPy give the same rows in every framework."""
    from tnlayers.backends.numpy import MPOEmbedding

    source = MPOEmbedding(500, 16, rank=4, n_cores=2, seed=5)
    layer = adapter.from_cores(source.cores, 500)
    indices = np.arange(0, 500, 7)
    np.testing.assert_allclose(adapter.lookup(layer, indices), source(indices), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(source.to_dense(), dense_reference(source.cores)[:500], rtol=1e-5, atol=1e-6)


def test_torch_embedding_gradients_follow_the_chain_rule() -> None:
    """d(sum(rows * g))/d(core) equals the gradient through the dense table, built by einsum in torch."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOEmbedding

    layer = MPOEmbedding(60, 12, rank=3, n_cores=2, dtype=torch.float64, seed=1)
    indices = torch.tensor([[1, 59, 1], [30, 0, 7]])
    weights = torch.randn(2, 3, 12, dtype=torch.float64)
    (layer(indices) * weights).sum().backward()
    mine = [c.grad.clone() for c in layer.cores]
    cores = [c.detach().clone().requires_grad_(True) for c in layer.cores]
    table = torch.einsum("aijc,cxyd->ixjy", *cores).reshape(60, 12)
    (table[indices] * weights).sum().backward()
    for got, core in zip(mine, cores):
        torch.testing.assert_close(got, core.grad, rtol=1e-10, atol=1e-12)


def test_embedding_spec_and_index_checks_name_what_was_given() -> None:
    with pytest.raises(ValueError, match=r"row_modes \(4, 4\) multiply to 16 < num_embeddings = 20"):
        kit.embedding_spec(20, 8, 2, row_modes=(4, 4))
    with pytest.raises(TypeError, match="embedding indices must be integers, got dtype float64"):
        kit.check_indices(np.array([1.0]), 10)
    with pytest.raises(ValueError, match="num_embeddings must be >= 1, got 0"):
        kit.embedding_spec(0, 8, 2)


def test_a_compressed_embedding_reloads_into_the_original_architecture() -> None:
    """compress, save the state_dict, rebuild the dense model, restructure, load: the same outputs."""
    torch = pytest.importorskip("torch")
    from tnlayers.backends.torch import MPOEmbedding, compress, restructure

    def build() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(101, 48), torch.nn.Linear(48, 48))

    model = build()
    report = compress(model, rank=4, n_cores=2, include="0")
    assert [row.kind for row in report.layers] == ["Embedding"] and isinstance(model[0], MPOEmbedding)
    state = model.state_dict()
    fresh = build()
    assert restructure(fresh, state) == ["0"]
    fresh.load_state_dict(state)
    indices = torch.tensor([[0, 100, 7]])
    torch.testing.assert_close(fresh(indices), model(indices), rtol=0, atol=0)
