"""The examples in the backends' docstrings run, imported by their installed names.

(Collecting ``backends/`` directly would import each module a second time as ``backends.x``,
and Keras would register its layers twice.)
"""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["numpy", "torch", "keras"])
def test_backend_docstring_examples(name: str) -> None:
    pytest.importorskip(name)
    module = importlib.import_module(f"tnlayers.backends.{name}")
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0
