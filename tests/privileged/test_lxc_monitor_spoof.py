"""A host user impersonates a stopped LXC container's monitor: the real daemon is not fooled.

LXC's tools (``lxc-ls``, ``lxc-info``) learn a container's state and init pid from its
monitor, over the abstract unix socket ``@LXCPATH/NAME/command``. Abstract socket names
belong to whoever binds them first, so for a STOPPED container any host user can bind
that name and answer. Here uid 65534, in a user namespace and a mount namespace of its
own (with a tmpfs over its /dev), and in a devices cgroup of the test's making, does so
with LXC 5.0's command protocol (request ``=iiQ`` cmd/datalen/data, then ``datalen``
bytes; response ``=iiQ`` ret/datalen/data, then ``datalen`` bytes): GET_STATE (3) is
RUNNING (2), GET_INIT_PID (4) is a child of its own, GET_CONFIG_ITEM (7) is empty.

LXC's own tools believe it (checked). A rule targets that container and a real running
LXC container; a zram disk is plugged. The real one gets its node; the impostor's
child gets no node in its root, no devices.list entry, no grant, no ledger entry, and
the daemon logs why it did not believe the claim.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from adversarial_support import ledger_for, zram_rules

from hotrelay.testing.containers import LxcHost, SessionDirs
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice

pytestmark = pytest.mark.privileged

NOBODY = 65534
PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
CGROUPS = Path("/sys/fs/cgroup")

# Binds the command socket name, forks the "init" it will name, answers LXC's commands.
FAKE_MONITOR = """\
import os, socket, struct, sys, time
HEADER = struct.Struct("=iiQ")
child = os.fork()
if child == 0:
    while True:
        time.sleep(3600)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind("\\0" + sys.argv[1])
server.listen(64)
print("ready", child, flush=True)
while True:
    conn, _ = server.accept()
    try:
        conn.settimeout(5)
        request = b""
        while len(request) < HEADER.size:
            chunk = conn.recv(HEADER.size - len(request))
            if not chunk:
                break
            request += chunk
        if len(request) < HEADER.size:
            continue
        cmd, datalen, _ = HEADER.unpack(request)
        if datalen > 0:
            conn.recv(datalen)
        if cmd == 3:                       # LXC_CMD_GET_STATE
            conn.sendall(HEADER.pack(0, 0, 2))       # RUNNING
        elif cmd == 4:                     # LXC_CMD_GET_INIT_PID
            conn.sendall(HEADER.pack(0, 0, child))
        elif cmd == 7:                     # LXC_CMD_GET_CONFIG_ITEM
            conn.sendall(HEADER.pack(0, 1, 0) + b"\\0")
        else:
            conn.sendall(HEADER.pack(-38, 0, 0))     # -ENOSYS
    except OSError:
        pass
    finally:
        conn.close()
"""


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def make_cgroup(path: Path, stack: ExitStack, *, deny_all: bool) -> Path:
    path.mkdir(parents=True)
    stack.callback(remove_cgroup, path)
    if deny_all:
        (path / "devices.deny").write_text("a")
        for rule in ("c 1:3 rwm", "c 1:5 rwm", "c 1:9 rwm", "c 5:0 rwm"):
            (path / "devices.allow").write_text(rule)
    return path


def remove_cgroup(path: Path) -> None:
    deadline = time.monotonic() + 10
    while path.exists():
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_impostor(socket_name: str, devices: Path, unified: Path, stack: ExitStack) -> int:
    """The fake monitor as uid 65534 in its own user + mount namespaces; the pid it names."""
    inner = f'mount -t tmpfs -o mode=755 impostor /dev && exec {PYTHON} -I -c "$0" "$1"'
    outer = (
        'echo $$ > "$D/cgroup.procs" && echo $$ > "$U/cgroup.procs" && '
        f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups -- "
        "unshare -U -r -m --propagation private -- sh -c "
        f'\'{inner}\' "$0" "$1"'
    )
    process = subprocess.Popen(
        ["sh", "-c", outer, FAKE_MONITOR, socket_name],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "D": str(devices), "U": str(unified)},
        cwd="/",
    )
    child: list[int] = []

    def stop() -> None:
        for pid in child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()
        # The child was the impostor's: reparented, reaped by whoever reaps orphans here
        # (the session's subreaper, or nobody on this VM); it is dead either way.

    stack.callback(stop)
    assert process.stdout is not None
    line = process.stdout.readline().decode().split()
    assert line[:1] == ["ready"], line
    child.append(int(line[1]))
    return child[0]


def lxc_tool(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def test_impostor_monitor_of_a_stopped_container_gets_no_device(
    lxc_host: LxcHost, runtime_dirs: SessionDirs, stack: ExitStack
) -> None:
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("setpriv/unshare (util-linux) are not installed")
    path = str(lxc_host.lxcpath)
    victim = lxc_host.create(runtime_dirs.name("sv"))  # stays stopped
    stack.callback(victim.destroy)
    real = lxc_host.create(runtime_dirs.name("sr"))
    stack.callback(real.destroy)
    real.start()
    real_pid = real.pid()
    assert real_pid is not None

    token = f"spoof-{os.getpid()}-{victim.name}"
    devices = make_cgroup(CGROUPS / "devices" / "hotrelay-test" / token, stack, deny_all=True)
    unified = make_cgroup(CGROUPS / "unified" / "hotrelay-test" / token, stack, deny_all=False)
    fake_init = start_impostor(f"{path}/{victim.name}/command", devices, unified, stack)

    # The attack is real: LXC's own tools take the impostor for the container.
    info = lxc_tool("lxc-info", "-P", path, "-n", victim.name, "-s", "-p", "-H")
    assert info.split() == ["State:", "RUNNING", "PID:", str(fake_init)], info
    listed = lxc_tool("lxc-ls", "-P", path, "--running", "-f", "-F", "NAME,STATE,PID")
    assert f"{victim.name} RUNNING {fake_init}" in " ".join(listed.split()), listed
    assert os.stat(f"/proc/{fake_init}").st_uid == NOBODY

    config = f'[runtimes]\nenabled = ["lxc"]\n[runtimes.lxc]\npaths = ["{path}"]\n'
    # group 0: an id the impostor's one-id map (0 -> 65534) maps, so only the check of
    # the claim stands between it and the device.
    rules = zram_rules(f"lxc:{victim.name}", f"lxc:{real.name}", group=0)
    daemon = stack.enter_context(RunningDaemon(rules, config=config))
    zram = stack.enter_context(ZramDevice())
    node = f"disks/{zram.name}"

    def real_has_node() -> bool:
        try:
            return stat.S_ISBLK(os.stat(f"/proc/{real_pid}/root/dev/{node}").st_mode)
        except FileNotFoundError:
            return False

    eventually(real_has_node, timeout=10)
    entry = f"b {zram.major}:{zram.minor} "
    time.sleep(2.5)  # several polls (1 s) and resolves: still nothing for the impostor
    assert not os.path.lexists(f"/proc/{fake_init}/root/dev/{node}")
    assert os.listdir(f"/proc/{fake_init}/root/dev") == []
    assert entry not in (devices / "devices.list").read_text()
    assert not [g for g in daemon.grants() if g["container"] == f"lxc:{victim.name}"]
    assert not [e for e in ledger_for(daemon, zram.devpath) if f"lxc:{victim.name}" in e["key"]]
    # The daemon says why, once, naming the container, the pid and the failed check.
    warning = (
        f"lxc:{victim.name}: not believing that pid {fake_init} is its init (LXC's tools say "
        f"so, but its command socket is held by uid {NOBODY}, not root or the lxcpath owner)"
    )
    assert daemon.log().count(warning) == 1, daemon.log()[-3000:]
    zram.remove()
    eventually(lambda: not real_has_node(), timeout=10)
