"""Reports of what compressing a model did: one row per replaced layer and network totals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CompressionReport", "LayerReport"]


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
