"""hotrelay.core is pure: no module under it may do I/O or reach the OS.

Effectors, runtimes and the daemon do I/O; the core only parses, matches and plans, so
it can be driven by replayed bytes in tests with no root. This keeps that split honest.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hotrelay.core

CORE = Path(hotrelay.core.__file__).parent
FORBIDDEN_MODULES = {
    "asyncio", "ctypes", "fcntl", "io", "mmap", "multiprocessing", "os", "pathlib",
    "pyroute2", "pyudev", "select", "selectors", "shutil", "signal", "socket",
    "subprocess", "sys", "tempfile", "threading", "time", "trio",
}  # fmt: skip
FORBIDDEN_CALLS = {"open", "exec", "eval", "compile", "__import__", "input", "print"}


def core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def impurities(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_CALLS
        ):
            found.append(f"line {node.lineno}: calls {node.func.id}()")
            continue
        else:
            continue
        found += [
            f"line {node.lineno}: imports {name}"
            for name in names
            if name.split(".")[0] in FORBIDDEN_MODULES
        ]
    return found


def test_core_has_modules() -> None:
    assert any(p.name == "uevent.py" for p in core_modules())


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_is_pure(path: Path) -> None:
    assert impurities(path.read_text()) == []


def test_the_checker_catches_impurity() -> None:
    bad = "import os\nfrom socket import socket\nimport trio.lowlevel\nopen('x')\n"
    assert impurities(bad) == [
        "line 1: imports os",
        "line 2: imports socket",
        "line 3: imports trio.lowlevel",
        "line 4: calls open()",
    ]
