"""The pure core: parsing, matching and planning, with no I/O.

Nothing under ``hotrelay.core`` may import an I/O module (os, socket, trio, ctypes,
subprocess, pyudev, pyroute2, ...); ``tests/unit/test_core_purity.py`` enforces it.
"""

from __future__ import annotations
