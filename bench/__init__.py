"""hotrelay benchmarks: print comparison tables, never pass/fail."""

from __future__ import annotations
