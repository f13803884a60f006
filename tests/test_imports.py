"""The core never imports a deep-learning framework, and the package installs as asked."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str, cwd: str | None = None) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd).stdout


def test_core_and_numpy_backend_import_no_framework() -> None:
    code = (
        "import sys, tnlayers, tnlayers.backends.numpy, tnlayers.cli, tnlayers.datasets\n"
        "import numpy as np\n"
        "cores = tnlayers.init_cores(tnlayers.MPOSpec((2, 3), (3, 2), 2), seed=0)\n"
        "tnlayers.contract(np.ones((1, 6), np.float32), cores)\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax', 'jaxlib') if m in sys.modules))\n"
    )
    assert _python(code).strip() == "[]"


def test_the_core_imports_only_numpy_and_opt_einsum() -> None:
    code = (
        "import sys; before = set(sys.modules); import tnlayers\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'_distutils_hack'}))\n"
    )
    assert _python(code).strip() == "['numpy', 'opt_einsum', 'tnlayers']"


def test_backends_are_a_subpackage_of_tnlayers() -> None:
    code = "import tnlayers.backends.numpy as m; print(m.__name__, m.MPOLinear.__module__)"
    assert _python(code, cwd="/").split() == ["tnlayers.backends.numpy", "tnlayers.backends.numpy"]
