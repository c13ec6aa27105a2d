"""What no test run on this machine's one Python can show: that the package is valid for every
Python it claims (``requires-python >= 3.9``: no syntax, module or member newer than 3.9 outside
a version guard) and that its type hints hold (``py.typed``: ``mypy --strict``)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A tool installed beside this interpreter (scripts/python-env installs both)."""
    exe = pathlib.Path(sys.executable).parent / tool
    return subprocess.run([str(exe), *args], capture_output=True, text=True)


def test_every_module_runs_on_python_3_9() -> None:
    # typing_extensions is the declared backport below 3.11 (pyproject's dependencies).
    out = run(
        "vermin", "-t=3.9-", "--no-tips", "--violations", "--eval-annotations",
        "--backport", "typing_extensions", str(SRC),
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_type_hints_hold_under_mypy_strict() -> None:
    out = run("mypy", "--strict", "--no-incremental", str(SRC / "rxd"))
    assert out.returncode == 0, out.stdout + out.stderr
