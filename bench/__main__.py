"""``python -m bench [NAME ...] [--OPTION ...]``: run benchmarks, print and save their tables.

Each benchmark measures its baseline in the same run, so ratios hold on noisy machines.
Tables are written to bench/results/NAME.md as well as printed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import cgroups, devnode, helpers, rules, runtimes, source

BENCHMARKS: dict[str, Callable[[Sequence[str] | None], str]] = {
    "source": source.main,
    "rules": rules.main,
    "cgroups": cgroups.main,
    "runtimes": runtimes.main,
    "devnode": devnode.main,
    "helpers": helpers.main,
    "headline": __import__("bench.headline", fromlist=["main"]).main,
}
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: Sequence[str]) -> int:
    split = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, extra = list(argv[:split]) or list(BENCHMARKS), list(argv[split:])
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        report = BENCHMARKS[name](extra)
        (RESULTS / f"{name}.md").write_text(report + "\n")
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
