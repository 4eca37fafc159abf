"""Coverage-guided fuzzing of one target of ``fuzz_targets.py`` with atheris (libFuzzer).

    python tests/unit/atheris_driver.py TARGET [libFuzzer flags...] [CORPUS_DIR...]

hotrelay's modules are imported under atheris's instrumentation, so libFuzzer sees
their branch coverage. A crash (an exception the target does not allow) or a hang
(-timeout) makes libFuzzer write the input as ``crash-*``/``timeout-*`` under
-artifact_prefix and exit non-zero: copy that file to ``tests/data/crashes/TARGET/``
and it becomes a regression test (``test_fuzz_corpus.py``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    atheris = importlib.import_module("atheris")
    sys.path.insert(0, str(Path(__file__).parent))
    with atheris.instrument_imports(include=["hotrelay", "fuzz_targets"]):
        fuzz_targets = importlib.import_module("fuzz_targets")
    target = fuzz_targets.TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
