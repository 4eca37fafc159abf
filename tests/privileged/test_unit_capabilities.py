"""The shipped systemd unit's limits, applied to the real daemon.

``units/hotrelay.service`` confines the daemon to ``CapabilityBoundingSet=``. A missing
capability only shows when the daemon really runs under that set, so this runs
``hotrelay run`` under ``setpriv --bounding-set -all,+...`` with exactly the unit's
capabilities (root then has those and no others, as under systemd), plugs a real zram
device and checks, from inside a privileged and a user-namespaced sandbox, that the
node is there, owned as the rule says, and opens.

The socket_group test runs the daemon with the default layout (the control socket in
the state directory, which the daemon creates) in a private directory, and connects as
a non-root member of the group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest
from adversarial_support import inside_state, zram_rules

from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import stat_inside
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

UNIT = Path(__file__).resolve().parents[2] / "units" / "hotrelay.service"
USERNS = IdMap(0, 100000, 65536)
NOBODY = 65534
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def unit_capabilities() -> list[str]:
    """The capabilities in the unit's CapabilityBoundingSet= lines, as setpriv names them."""
    caps: list[str] = []
    for line in UNIT.read_text().splitlines():
        match = re.fullmatch(r"CapabilityBoundingSet=(.*)", line.strip())
        if match:
            caps += match.group(1).split()
    assert caps, f"{UNIT} has no CapabilityBoundingSet="
    assert all(re.fullmatch(r"CAP_[A-Z_]+", cap) for cap in caps), caps
    return [cap.removeprefix("CAP_").lower() for cap in caps]


def setpriv_prefix(caps: list[str]) -> tuple[str, ...]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return ("setpriv", "--bounding-set", ",".join(["-all", *(f"+{c}" for c in caps)]), "--")


def node_is(box: Sandbox, node: str, state: str) -> bool:
    return inside_state(box, [node])[node] == state


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def test_the_unit_names_only_known_capabilities() -> None:
    known = set(
        subprocess.run(["capsh", "--decode=0x1ffffffffff"], capture_output=True, text=True)
        .stdout.partition("=")[2]
        .strip()
        .split(",")
    )
    caps = unit_capabilities()
    assert {f"cap_{c}" for c in caps} <= known


def test_daemon_relays_with_exactly_the_units_capabilities(stack: ExitStack) -> None:
    caps = unit_capabilities()
    prefix = setpriv_prefix(caps)
    privileged = Sandbox.create(devices="default-deny", name_prefix="capp")
    stack.callback(privileged.close)
    userns = Sandbox.create(userns=USERNS, devices="default-deny", name_prefix="capu")
    stack.callback(userns.close)
    daemon = stack.enter_context(
        RunningDaemon(
            zram_rules(f"pid:{privileged.pid}", f"pid:{userns.pid}", group=6),
            command_prefix=prefix,
        )
    )
    assert daemon.process is not None
    # The daemon really runs with that bounding set (and no more).
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    bounding = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    decoded = subprocess.run(
        ["capsh", f"--decode={bounding:x}"], capture_output=True, text=True, check=True
    ).stdout
    assert set(decoded.partition("=")[2].strip().split(",")) == {f"cap_{c}" for c in caps}
    zram = stack.enter_context(ZramDevice())
    node = f"/dev/disks/{zram.name}"
    for box in (privileged, userns):
        eventually(partial(node_is, box, node, "ok"), timeout=10)
        info = stat_inside(box, node)
        assert info.st_gid == 6, (box.name, info)
        assert info.st_mode & 0o777 == 0o640
    failing = daemon.status()["failing"]
    assert not [key for key in failing if f" {zram.devpath} " in key], failing
    zram.remove()
    for box in (privileged, userns):
        eventually(partial(node_is, box, node, "absent"), timeout=10)


# -- socket_group with the default layout --------------------------------------------------

PEER = """\
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect_errno": exc.errno}))
    sys.exit(0)
sock.sendall(b'{"id": 1, "verb": "status"}\\n')
buffer = b""
while b"\\n" not in buffer:
    chunk = sock.recv(65536)
    if not chunk:
        break
    buffer += chunk
print(buffer.decode().strip())
"""


def as_nobody(socket_path: Path, *, gid: int | None) -> dict[str, object]:
    groups = ["--clear-groups"] if gid is None else ["--groups", str(gid)]
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *groups, "--",
         PYTHON, "-I", "-c", PEER, str(socket_path)],
        capture_output=True, text=True, timeout=30, check=True, cwd="/",
    )  # fmt: skip
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_socket_group_reaches_the_socket_in_the_default_layout(stack: ExitStack) -> None:
    group = 54321
    base = Path(tempfile.mkdtemp(prefix="hotrelay-layout-"))
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    base.chmod(0o755)  # stands for /run
    state = base / "hotrelay"  # stands for /run/hotrelay, made by the daemon
    socket_path = state / "control.sock"
    (base / "work").mkdir()
    daemon = RunningDaemon({}, config=f"socket_group = {group}\n", workdir=base / "work")
    daemon.state_dir, daemon.socket = state, socket_path
    stack.enter_context(daemon)
    info = state.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, group, 0o710)
    answer = eventually(lambda: as_nobody(socket_path, gid=group), timeout=10)
    assert answer.get("ok") is True, answer
    refused = as_nobody(socket_path, gid=None)
    assert refused.get("connect_errno") == 13, refused  # EACCES: not through the directory
    # What the group can reach is the socket, not the daemon's state next to it.
    peek = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--groups", str(group),
         "ls", str(state)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert peek.returncode != 0
    for sub in ("ledger", "nodes"):
        path = state / sub
        if path.exists():
            assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
