"""A short coverage-guided (atheris/libFuzzer) run of every fuzz target.

Skipped when atheris is not installed (it is not in the ``test`` extra: it ships a
35 MB wheel and only for some Python versions; ``pip install atheris`` in the venv
turns these on). Each target runs for a few seconds from a seed corpus of real inputs
(the golden uevent captures, the example rules, ...) copied to a temporary directory,
so libFuzzer's new inputs never land in the repository. A crash or a hang (-timeout)
fails the test and names the input libFuzzer saved: add it to tests/data/crashes/.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hotrelay.control.protocol import encode_request
from hotrelay.core import bpf_program as bp
from hotrelay.core.device_access import DeviceRule

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("atheris") is None, reason="atheris is not installed"
    ),
]

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SECONDS_PER_TARGET = int(os.environ.get("HOTRELAY_ATHERIS_SECONDS", "5"))


def _seeds(target: str) -> dict[str, bytes]:
    if target == "uevent":
        return {p.name: p.read_bytes() for p in (REPO / "tests/data/uevents").glob("*.bin")}
    if target == "rules":
        return {p.name: p.read_bytes() for p in (REPO / "rules").glob("*.toml")}
    if target == "config":
        return {
            "full.toml": b'rules_dir = "/etc/hotrelay/rules.d"\nsource = "auto"\nrcvbuf = "64M"\n'
            b'heal_interval = 5\nmetrics = "127.0.0.1:9477"\n[runtimes]\n'
            b'enabled = ["lxc", "docker"]\n[runtimes.lxc]\npaths = ["/var/lib/lxc"]\n',
        }
    if target == "glob":
        return {
            "star.bin": b"ttyUSB*\0ttyUSB0",
            "class.bin": b"[!a-c]?x*|y\\*\0dx1",
            "stars.bin": b"*a*b*c\0aabbcc",
        }
    if target == "control":
        return {
            "status.bin": encode_request(1, "status", {}),
            "attach.bin": encode_request(
                2, "attach", {"target": "lxc:a", "device": "/dev/ttyUSB0", "mode": "0660"}
            ),
            "crlf.bin": b'{"id": 3, "verb": "list"}\r\n\n{"id": 4}\n',
        }
    assert target == "bpf"
    original = bp.assemble([DeviceRule.parse("a", allow=False), DeviceRule.parse("c 1:3 rwm")])
    granted = bp.prepend_grants(
        original, [DeviceRule.parse("b 253:0 rw"), DeviceRule.parse("c 188:* rwm")]
    )
    return {"runc.bin": bp.encode(original), "granted.bin": bp.encode(granted)}


@pytest.mark.parametrize("target", ["uevent", "rules", "config", "glob", "control", "bpf"])
def test_atheris_finds_no_crash(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in _seeds(target).items():
        (corpus / name).write_bytes(data)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "atheris_driver.py"),
            target,
            f"-max_total_time={SECONDS_PER_TARGET}",
            "-timeout=5",
            "-rss_limit_mb=2048",
            "-max_len=65536",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS_PER_TARGET + 120,
        check=False,
    )
    output = result.stderr + result.stdout
    found = sorted(p.name for p in artifacts.iterdir())
    assert not found, f"atheris on {target} saved {found} in {artifacts}: add them to the corpus"
    assert result.returncode == 0, (
        f"atheris on {target}: status {result.returncode}, saved {found} in {artifacts} "
        f"(copy them to tests/data/crashes/{target}/)\n{output[-4000:]}"
    )
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", output)
    print(f"atheris {target}: {runs and runs.group(1)} runs, coverage {coverage[-1:]}")
    assert runs is not None, output[-2000:]
    assert int(runs.group(1)) > 1000, output[-2000:]
