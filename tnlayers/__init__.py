"""tnlayers: matrix-product-operator (tensor-train matrix) layers with planned contractions.

The core (this package) imports only NumPy and opt_einsum; framework layers live in
``tnlayers.backends.<framework>``, applications (the CLI, the demo) in ``tnlayers.apps``.
This namespace holds the user API; the plumbing stays importable from its submodule
(``tnlayers.plan``, ``tnlayers.cost``, ``tnlayers.contract``, ``tnlayers.layer`` ...).
"""

from . import autotune
from .allocator import reuse_freed_memory
from .calibrate import Gram, calibrated_fit, low_rank_fit
from .checkpoint import load, load_layers, save, save_layers
from .contract import contract
from .cost import CostModel
from .decompose import entanglement, from_dense, to_dense, truncate
from .diagram import draw, draw_ascii
from .init import init_cores
from .interop import from_tensornetwork, to_tensornetwork
from .plan import ContractionPlan, plan
from .reports import report
from .spec import MPOSpec, RankClippedWarning

__version__ = "0.1.0"

__all__ = [
    "ContractionPlan",
    "CostModel",
    "Gram",
    "MPOSpec",
    "RankClippedWarning",
    "__version__",
    "autotune",
    "calibrated_fit",
    "contract",
    "draw",
    "draw_ascii",
    "entanglement",
    "from_dense",
    "from_tensornetwork",
    "init_cores",
    "load",
    "load_layers",
    "low_rank_fit",
    "plan",
    "report",
    "reuse_freed_memory",
    "save",
    "save_layers",
    "to_dense",
    "to_tensornetwork",
    "truncate",
]
