"""Reports: what compressing a model did (per layer and in total), and what a layer costs per strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cost import COST_MODELS, cost_model_for
from .plan import ContractionPlan, batch_bucket, plan
from .spec import MPOSpec

__all__ = ["CompressionReport", "CostReport", "LayerReport", "report"]


@dataclass(frozen=True)
class LayerReport:
    """One dense layer replaced by an MPO."""

    name: str
    kind: str
    in_features: int
    out_features: int
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    params_before: int
    """Weights of the dense layer (the bias, kept as it is, is not counted)."""
    params_after: int
    relative_error: float
    """``||W - W_mpo||_F / ||W||_F`` of the decomposition."""
    output_error: float | None = None
    """``||X (W - W_mpo)||_F / ||X W||_F`` on the calibration inputs ``X``, where the layer was fitted to them."""

    @property
    def compression_ratio(self) -> float:
        """``params_after / params_before`` (the paper's rho for this layer)."""
        return self.params_after / self.params_before


@dataclass(frozen=True)
class CompressionReport:
    """The replaced layers, and parameter counts of the whole network before and after."""

    layers: tuple[LayerReport, ...]
    network_params_before: int
    network_params_after: int
    skipped: tuple[tuple[str, str], ...] = ()
    """``(name, reason)`` of matching layers left dense."""

    @property
    def params_before(self) -> int:
        """Dense weights of the replaced layers."""
        return sum(row.params_before for row in self.layers)

    @property
    def params_after(self) -> int:
        """MPO parameters of the replaced layers."""
        return sum(row.params_after for row in self.layers)

    @property
    def compression_ratio(self) -> float:
        """rho over the replaced layers only (Gao et al. 2020, Eq. 9); 1.0 if nothing was replaced."""
        return self.params_after / self.params_before if self.layers else 1.0

    @property
    def network_compression_ratio(self) -> float:
        """All parameters after / before, the untouched layers and biases included."""
        return self.network_params_after / self.network_params_before

    def as_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per replaced layer (for JSON or a data frame)."""
        return [
            {**row.__dict__, "compression_ratio": row.compression_ratio, "ranks": list(row.ranks)}
            for row in self.layers
        ]

    def __str__(self) -> str:
        header = f"{'layer':<24} {'kind':<7} {'shape':>11} {'modes':>25} {'max D':>5} {'params':>19} {'rho':>7} error"
        lines = [header, "-" * len(header)]
        for row in self.layers:
            modes = f"{'x'.join(map(str, row.in_modes))}->{'x'.join(map(str, row.out_modes))}"
            lines.append(
                f"{row.name:<24} {row.kind[:7]:<7} {f'{row.in_features}x{row.out_features}':>11} {modes:>25} "
                f"{max(row.ranks):>5} {f'{row.params_before:,}->{row.params_after:,}':>19} "
                f"{row.compression_ratio:>7.4f} {row.relative_error:>8.2e}"
                + ("" if row.output_error is None else f" (outputs {row.output_error:.2e})")
            )
        lines.append("-" * len(header))
        lines.append(
            f"replaced layers: {self.params_before:,} -> {self.params_after:,} params, "
            f"rho {self.compression_ratio:.4f}; "
            f"whole network: {self.network_params_before:,} -> {self.network_params_after:,} "
            f"({1 / self.network_compression_ratio:.2f}x smaller)"
        )
        lines += [f"kept dense: {name} ({reason})" for name, reason in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class CostReport:
    """What one MPO layer costs at one batch size under every strategy, and which one ``auto`` picks."""

    spec: MPOSpec
    batch_size: int
    backend: str
    plans: tuple[ContractionPlan, ...]
    """One plan per strategy, in the order of :data:`REPORTED_STRATEGIES`."""
    chosen: ContractionPlan

    @property
    def dense_flops(self) -> int:
        return 2 * self.batch_size * self.spec.in_features * self.spec.out_features

    def as_dicts(self) -> list[dict[str, Any]]:
        keys = ("strategy", "method", "flops", "largest_intermediate", "memory_traffic", "cost")
        return [{**{k: getattr(p, k) for k in keys}, "chosen": p.path == self.chosen.path} for p in self.plans]

    def __str__(self) -> str:
        spec = self.spec
        lines = [
            f"{spec}: {spec.num_params:,} params of {spec.dense_params:,} dense (rho {spec.compression_ratio:.4g}, "
            f"{1 / spec.compression_ratio:.1f}x smaller); batch {self.batch_size}, {self.backend} cost model; "
            f"auto picks {self.chosen.method}",
            f"{'strategy':<15} {'flops':>11} {'vs dense':>8} {'largest interm.':>15} {'model cost':>10}",
        ]
        for p in self.plans:
            mark = "  <- auto" if p.path == self.chosen.path else ""
            lines.append(
                f"{p.strategy:<15} {p.flops:>11.3e} {p.flops / self.dense_flops:>8.3f} {p.largest_intermediate:>15,} "
                f"{p.cost / self.chosen.cost:>10.2f}{mark}"
            )
        lines.append(f"dense x @ W: {self.dense_flops:.3e} flops; model cost is relative to the chosen plan")
        return "\n".join(lines)


REPORTED_STRATEGIES = ("zipper", "reverse-zipper", "materialize", "greedy", "dp", "optimal")


def report(layer_or_spec: Any, batch_size: int = 1, backend: str = "numpy") -> CostReport:
    """Per-strategy flops, largest intermediate and model cost of one layer (or spec) at ``batch_size``.

    ``layer_or_spec`` is an :class:`MPOSpec`, a list of cores or any backend's MPO layer; ``backend``
    picks the calibrated cost model (see :func:`tnlayers.cost.cost_model_for`). ``print`` it for a table.
    """
    if isinstance(layer_or_spec, MPOSpec):
        spec = layer_or_spec
    else:
        from .decompose import cores_of, spec_from_cores

        spec = spec_from_cores(cores_of(layer_or_spec))
    if backend not in COST_MODELS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(COST_MODELS)}")
    model = cost_model_for(backend)
    strategies = [s for s in REPORTED_STRATEGIES if s != "optimal" or spec.n_cores <= 6]
    plans = tuple(plan(spec, batch_size, s, cost_model=model) for s in strategies)
    return CostReport(spec, batch_bucket(batch_size), backend, plans, plan(spec, batch_size, "auto", cost_model=model))
