"""tnlayers: matrix-product-operator (tensor-train matrix) layers with planned contractions.

The core (this package) imports only NumPy and opt_einsum; framework layers live in
``tnlayers.backends.<framework>``.
"""

from . import autotune
from .checkpoint import MPOWeights, load, load_layers, save, save_layers
from .contract import ArrayOps, contract, dense_weight, get_ops
from .decompose import (
    DecompositionReport,
    EntanglementReport,
    cores_of,
    entanglement,
    frobenius_norm,
    from_dense,
    spec_from_cores,
    to_dense,
    truncate,
)
from .diagram import draw, draw_ascii
from .init import INITIALIZERS, init_cores
from .interop import MPONetwork, from_tensornetwork, to_tensornetwork
from .plan import (
    COST_MODELS,
    DEFAULT_COST_MODEL,
    STRATEGIES,
    ContractionPlan,
    CostModel,
    auto_candidates,
    batch_bucket,
    conv_route,
    cost_model_for,
    dense_cost,
    plan,
)
from .reports import CompressionReport, CostReport, LayerReport, report
from .spec import MPOSpec, RankClippedWarning

__version__ = "0.1.0"

__all__ = [
    "COST_MODELS",
    "DEFAULT_COST_MODEL",
    "INITIALIZERS",
    "STRATEGIES",
    "ArrayOps",
    "CompressionReport",
    "CostReport",
    "ContractionPlan",
    "CostModel",
    "DecompositionReport",
    "MPONetwork",
    "EntanglementReport",
    "LayerReport",
    "MPOSpec",
    "MPOWeights",
    "RankClippedWarning",
    "__version__",
    "auto_candidates",
    "autotune",
    "cost_model_for",
    "batch_bucket",
    "contract",
    "to_tensornetwork",
    "from_tensornetwork",
    "entanglement",
    "draw_ascii",
    "draw",
    "cores_of",
    "conv_route",
    "dense_cost",
    "dense_weight",
    "from_dense",
    "frobenius_norm",
    "get_ops",
    "init_cores",
    "load",
    "load_layers",
    "plan",
    "report",
    "save",
    "save_layers",
    "spec_from_cores",
    "to_dense",
    "truncate",
]
