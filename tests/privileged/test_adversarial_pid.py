"""A process that takes a dead container's pid, against the real daemon.

A ``pid:`` target names a sandbox the test started. The sandbox exits, and another
process of the test takes the very same pid (the host's ``ns_last_pid`` is set to
pid - 1 before it is forked). That process has a devices cgroup of its own, made by
the test (default deny, like a container's), and a mount namespace whose /dev holds
a node of the relayed device. It must get nothing: no ``devices.list`` entry, its
node does not open (EPERM), no ledger entry; whether the rule pins the start time
(``pid:PID@STARTTIME``) or the daemon pinned it at first sight (``pid:PID``), and
across a restart of the daemon, which is exactly when the first process found with
the pid used to win.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from adversarial_support import ledger_for, zram_rules

from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.sandbox import (
    DEVICES_PARENT,
    OCI_DEFAULT_ALLOW,
    Sandbox,
    remove_cgroup_tree,
)

pytestmark = pytest.mark.privileged


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def node_opens(box: Sandbox, path: str) -> bool:
    result = box.run(["dd", f"if={path}", "of=/dev/null", "bs=512", "count=1"], check=False)
    return result.returncode == 0


def impostor_cgroup(stack: ExitStack) -> Path:
    """A devices cgroup of ours, default deny as a container's."""
    path = DEVICES_PARENT / f"impostor-{os.getpid()}-{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    stack.callback(remove_cgroup_tree, path)
    (path / "devices.deny").write_text("a")
    for rule in OCI_DEFAULT_ALLOW:
        (path / "devices.allow").write_text(rule)
    return path


@contextmanager
def impostor_at(pid: int, cgroup: Path, zram: ZramDevice) -> Iterator[int]:
    """A process of ours at ``pid`` (now free), in ``cgroup``, whose private /dev holds
    /dev/disks/<zram> as the container's did: what the daemon would hand the device
    to if it took this process for the container."""
    inner = (
        "mount -t tmpfs hr-impostor /dev && mkdir /dev/disks && "
        f"mknod /dev/disks/{zram.name} b {zram.major} {zram.minor} && "
        "echo ready && exec sleep 600"
    )
    script = (
        f"echo $$ > {cgroup}/cgroup.procs && exec unshare -m --propagation private sh -c '{inner}'"
    )
    for _ in range(100):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
        if proc.pid == pid:
            break
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    else:
        pytest.fail(f"could not get pid {pid} back for the impostor")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def impostor_opens(pid: int, cgroup: Path, zram: ZramDevice) -> str:
    """Open a node of the device from the impostor's cgroup and mount namespace (made
    there if missing, as its root could): "ok", or dd's complaint."""
    node = f"/dev/disks/{zram.name}"
    inside = (
        f"[ -e {node} ] || mknod {node} b {zram.major} {zram.minor}; "
        f"exec dd if={node} of=/dev/null bs=512 count=1"
    )
    result = subprocess.run(
        [
            "sh",
            "-c",
            f'echo $$ > {cgroup}/cgroup.procs && exec nsenter -t {pid} -m -- sh -c "$1"',
            "open",
            inside,
        ],
        capture_output=True,
        timeout=10,
    )
    return "ok" if result.returncode == 0 else result.stderr.decode()


def assert_impostor_has_nothing(
    daemon: RunningDaemon, pid: int, cgroup: Path, zrams: list[ZramDevice]
) -> None:
    listed = (cgroup / "devices.list").read_text()
    for zram in zrams:
        assert f"b {zram.major}:{zram.minor} " not in listed, listed
        assert "Operation not permitted" in impostor_opens(pid, cgroup, zram)
        assert ledger_for(daemon, zram.devpath) == []
    assert daemon.status()["containers"] == []
    # (The host may have other zram devices, which the rule matches too.)
    ours = {str(z.devnode) for z in zrams}
    assert [g for g in daemon.grants() if g["device"] in ours] == []


@pytest.mark.parametrize(
    "pinned", [True, False], ids=["pid@starttime", "pid-pinned-at-first-sight"]
)
def test_a_reused_pid_never_gets_the_device_even_across_a_restart(
    stack: ExitStack, pinned: bool
) -> None:
    box = Sandbox.create(devices="default-deny", name_prefix="pidreuse")
    stack.callback(box.close)
    pid, start = box.pid, box.ref().start_time
    target = f"pid:{pid}@{start}" if pinned else f"pid:{pid}"
    daemon = RunningDaemon(zram_rules(target))
    stack.callback(daemon.close)
    daemon.start()
    zram = stack.enter_context(ZramDevice())
    path = f"/dev/disks/{zram.name}"
    eventually(lambda: node_opens(box, path), timeout=5)
    # Listed as the one process it is, whichever form the rule used.
    shown = f"pid:{pid}@{start}"
    eventually(
        lambda: (
            [g["container"] for g in daemon.grants() if g["device"] == str(zram.devnode)] == [shown]
        )
    )
    assert [c["target"] for c in daemon.status()["containers"]] == [shown]
    if not pinned:
        pins = json.loads((daemon.state_dir / "pid-pins.json").read_text())
        assert pins["pins"] == {str(pid): start}

    # The daemon goes down, the container exits, another process takes its pid.
    daemon.stop()
    box.close()
    cgroup = impostor_cgroup(stack)
    with impostor_at(pid, cgroup, zram) as impostor:
        assert impostor == pid
        daemon.start()
        second = stack.enter_context(ZramDevice())
        daemon.request("refresh", runtime="pid", name=str(pid))
        daemon.request("reload")
        time.sleep(1.5)
        assert_impostor_has_nothing(daemon, pid, cgroup, [zram, second])
        log = daemon.log()
        refusal = f"pid:{pid}: refusing process {pid} started at "
        assert log.count(refusal) == 1, log  # logged once, however often it is seen
        assert f"the target is pid:{pid}@{start} (the pid was reused" in log


def test_an_unpinned_pid_is_pinned_while_the_daemon_runs(stack: ExitStack) -> None:
    box = Sandbox.create(devices="default-deny", name_prefix="pidreuse")
    stack.callback(box.close)
    pid, start = box.pid, box.ref().start_time
    daemon = RunningDaemon(zram_rules(f"pid:{pid}"))
    stack.callback(daemon.close)
    daemon.start()
    zram = stack.enter_context(ZramDevice())
    eventually(lambda: node_opens(box, f"/dev/disks/{zram.name}"), timeout=5)
    box.close()
    eventually(lambda: ledger_for(daemon, zram.devpath) == [], timeout=5)
    cgroup = impostor_cgroup(stack)
    with impostor_at(pid, cgroup, zram):
        daemon.request("refresh", runtime="pid", name=str(pid))
        second = stack.enter_context(ZramDevice())
        time.sleep(1.5)
        assert_impostor_has_nothing(daemon, pid, cgroup, [zram, second])
        assert f"the target is pid:{pid}@{start}" in daemon.log()
