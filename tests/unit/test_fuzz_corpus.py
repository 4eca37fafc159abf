"""Regression corpus: every input that once crashed or hung a parser, replayed.

The files live in tests/data/crashes/<target>/ (see the README there for what each one
broke); the targets are those of fuzz_targets.py, shared with the atheris run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fuzz_targets import TARGETS

CRASHES = Path(__file__).parent.parent / "data" / "crashes"
CORPUS = sorted(p for p in CRASHES.glob("*/*") if p.is_file())


def test_the_corpus_names_known_targets() -> None:
    assert CORPUS, "the crash corpus is empty"
    assert {p.parent.name for p in CORPUS} <= set(TARGETS)


@pytest.mark.parametrize("path", CORPUS, ids=[f"{p.parent.name}/{p.name}" for p in CORPUS])
def test_a_past_crash_is_handled(path: Path) -> None:
    start = time.perf_counter()
    TARGETS[path.parent.name](path.read_bytes())
    assert time.perf_counter() - start < 1.0, "the input that once hung is slow again"
