"""The README's main command and the plan command run and print what they promise."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tnlayers


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tnlayers.apps", *args], capture_output=True, text=True, timeout=300)


def test_basics() -> None:
    result = _run("basics", "--ranks", "2", "8", "--batches", "1", "256", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "blur 28x28 -> 16x16" in out and "gaussian random" in out
    assert "(1, 16, 448, 16, 1)" in out  # the exact decomposition of the random matrix has full bonds
    auto_1 = tnlayers.plan(tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8), 1).method
    assert f"auto ({auto_1})" in out
    for strategy in ("zipper", "reverse-zipper", "materialize", "greedy", "dp", "optimal"):
        assert f" {strategy} |" in out


def test_plan_command() -> None:
    result = _run("plan", "4x7x7x4", "4x4x4x4", "--rank", "8", "--batch", "1024", "--strategy", "zipper")
    assert result.returncode == 0, result.stderr
    plan = tnlayers.plan(tnlayers.MPOSpec((4, 7, 7, 4), (4, 4, 4, 4), 8), 1024, "zipper")
    assert result.stdout.strip() == plan.describe()  # what the command prints is the plan's own text
    assert "1. G1 * x over i1: (32 x 4) @ (4 x 200704) product" in result.stdout  # 4*8 by 1024*7*7*4, by hand


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "4x7", "4x4x4", "--rank", "2"], "same length"),
        (["plan", "4xseven", "4x4"], "modes must be positive ints joined by x, like 4x7x7x4"),
        (["plan", "4x7", "4x4", "--strategy", "fastest"], "unknown strategy 'fastest'"),
    ],
)
def test_plan_command_errors(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_every_command_line_option_has_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    from tnlayers.apps.cli import main

    for command in ("demo", "basics", "plan"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  -") and "--help" not in line]
        assert options, command
        for line in text.splitlines():
            if line.startswith("  --") and len(line.split()) <= 2:  # an option alone on its line: no help after it
                continuation = text.splitlines()[text.splitlines().index(line) + 1]
                assert continuation.startswith(" " * 10), f"{command}: {line.strip()} has no help text"
