"""The import direction (benchmarks -> apps -> backends -> tnlayers): the core never imports a framework,
an adapter or an app, at any depth; and the package installs as asked."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "tnlayers"
FORBIDDEN = ("torch", "tensorflow", "keras", "jax", "jaxlib", "tqdm", "tnlayers.backends", "tnlayers.apps")
#: The only third-party imports the core may make besides numpy and opt_einsum, each in one module.
ALLOWED = {"safetensors": "checkpoint.py", "matplotlib": "diagram.py", "tensornetwork": "interop.py"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, at any depth (inside functions too), as absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "tnlayers" if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found += [(node.lineno, f"{module}.{alias.name}" if node.level else module) for alias in node.names]
    return sorted(found)


def _violations(path: Path) -> list[str]:
    bad = []
    for line, name in _imports(path):
        root = name.split(".")[0]
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            bad.append(f"{path.name}:{line} imports {name}")
        elif root in ALLOWED and ALLOWED[root] != path.name:
            bad.append(f"{path.name}:{line} imports {name} (allowed only in {ALLOWED[root]})")
    return bad


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_the_core_never_imports_a_framework_an_adapter_or_an_app(path: Path) -> None:
    assert _violations(path) == []


def test_the_scan_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "reports.py"
    source.write_text(
        "def f():\n    import torch.nn\n"
        "def g():\n    from .backends.torch import MPOLinear\n"
        "def h():\n    from ..apps import demo\n"
        "import matplotlib.pyplot\n"
    )
    assert _violations(source) == [
        "reports.py:2 imports torch.nn",
        "reports.py:4 imports tnlayers.backends.torch.MPOLinear",
        "reports.py:6 imports tnlayers.apps.demo",
        "reports.py:7 imports matplotlib.pyplot (allowed only in diagram.py)",
    ]


def _python(code: str, cwd: str | None = None) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd).stdout


def test_the_core_imports_only_numpy_and_opt_einsum() -> None:
    code = (
        "import sys; before = set(sys.modules); import tnlayers, tnlayers.layer, tnlayers.datasets\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'_distutils_hack'}))\n"
    )
    assert _python(code).strip() == "['numpy', 'opt_einsum', 'tnlayers']"


@pytest.mark.parametrize("package", ["backends", "apps"])
def test_adapters_and_apps_are_subpackages_of_tnlayers(package: str) -> None:
    module = "numpy" if package == "backends" else "tables"
    code = f"import tnlayers.{package}.{module} as m; print(m.__name__)"
    assert _python(code, cwd="/").split() == [f"tnlayers.{package}.{module}"]


def test_require_all_turns_a_skip_for_a_missing_package_into_a_failure(tmp_path: Path) -> None:
    """``make test`` sets TNLAYERS_REQUIRE_ALL=1: a framework missing from the environment fails the run."""
    (tmp_path / "test_needs_a_package.py").write_text(
        "import pytest\n\ndef test_it():\n    pytest.importorskip('tnlayers_no_such_package')\n"
    )
    tests = Path(__file__).resolve().parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(tmp_path)]
    outcomes = {}
    for value in ("1", "0"):
        env = {**os.environ, "PYTHONPATH": str(tests), "TNLAYERS_REQUIRE_ALL": value}
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        outcomes[value] = (result.returncode, result.stdout)
    assert outcomes["1"][0] == 1 and "1 failed" in outcomes["1"][1], outcomes["1"][1][-2000:]
    assert "could not import 'tnlayers_no_such_package'" in outcomes["1"][1]
    assert outcomes["0"][0] == 0 and "1 skipped" in outcomes["0"][1], outcomes["0"][1][-2000:]
