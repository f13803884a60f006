"""The README's and the docs' Python examples run as printed, and every page they link to exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import dense_reference

import tnlayers

ROOT = Path(__file__).resolve().parents[1]
#: tutorial.md is generated from docs/make_tutorial.py, whose notebook test_teaching.py executes.
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "tutorial.md")]


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)], ids=lambda p: p.name)
def test_python_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile("\n".join(_python_blocks(page)), str(page), "exec"), namespace)


def test_the_readme_example_writes_the_checkpoints_it_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile("\n".join(_python_blocks(ROOT / "README.md")), "README.md", "exec"), namespace)
    assert (tmp_path / "layer.safetensors").is_file() and (tmp_path / "torch_layer.safetensors").is_file()
    assert namespace["same"].built_spec == namespace["model"][0].spec  # type: ignore[attr-defined, index]


def test_the_readme_shows_what_its_code_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The values the README's comments state: the printed spec, and ``y == x @ W`` of shape (32, 256)."""
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(ROOT / "README.md")
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    (shown,) = re.findall(r"print\(spec\)  # (.*)", blocks[0])
    assert str(namespace["spec"]) == shown
    x, y = namespace["x"], namespace["y"]
    initial = tnlayers.init_cores(namespace["spec"], init="he", seed=0)  # the cores y was computed from
    assert y.shape == (32, 256)
    np.testing.assert_allclose(y, x.astype(np.float64) @ dense_reference(initial), rtol=1e-4, atol=1e-5)
    report = namespace["report"]
    weight = dense_reference(namespace["cores"])
    trained = namespace["trained"]
    measured = np.linalg.norm(weight - trained) / np.linalg.norm(trained)
    assert report.relative_error == pytest.approx(measured, rel=1e-4) and measured <= 0.5  # tol=0.5 as asked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert missing == []


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def _resolve(dotted: str) -> object:
    """The object a dotted name stands for: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_name_the_docs_give_lives_where_they_say(page: Path) -> None:
    names = set(re.findall(r"`(tnlayers(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", page.read_text()))
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert missing == []
