"""Hostile containers against the real daemon: nothing written outside, no hang, a true ledger.

A container owns its /dev and its /etc and may plant anything there; its init may die
at any moment and its pid be taken by another process. The daemon acts as host root
in there, so each test gives it a container that tries one of those things, next to
a well-behaved one, and checks (from inside the containers and on the host) that:

- nothing is created or changed outside the container's /dev (the host directories
  its symlinks point at are compared before and after, file by file);
- the hostile container's binding fails with an error that says why, promptly, and
  the well-behaved container gets its device all the same;
- the ledger ends up holding exactly the bindings of running containers, and the
  daemon has no zombie children.

test_devnode.py and test_names_in_root.py check the effectors and the name lookup on
their own; here it is the whole daemon, with its retries and its heal pass.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from adversarial_support import (
    children,
    fd_count,
    grant_listed,
    inside_state,
    ledger,
    ledger_for,
    ours,
    status_counters,
    zram_rules,
)

from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import stat_inside
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

USERNS = IdMap(0, 100000, 65536)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Closes every sandbox, device, daemon and directory a test made, newest first."""
    with ExitStack() as exits:
        yield exits


def sandbox(stack: ExitStack, *, userns: IdMap | None = None, prefix: str = "hostile") -> Sandbox:
    box = Sandbox.create(userns=userns, devices="default-deny", name_prefix=prefix)
    stack.callback(box.close)
    return box


@contextmanager
def host_dir(prefix: str = "hr-hostile-") -> Iterator[Path]:
    """A directory of ours on the host (never a system one), with a canary file."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        (path / "canary").write_text("the host's, not the container's\n")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tree(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below path: (mode, size, mtime in ns), to compare before and after."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            info = os.lstat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), path)] = (
                info.st_mode,
                info.st_size,
                info.st_mtime_ns,
            )
    info = os.lstat(path)
    found["."] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


def failing_for(daemon: RunningDaemon, box: Sandbox, zram: ZramDevice) -> list[str] | None:
    """The errors of this container's bindings of this device that keep failing (the
    host may have other zram devices, which the rules match too); None if none."""
    failing: dict[str, str] = daemon.status()["failing"]
    prefix = f"pid:{box.pid} {zram.devpath} "
    return [error for key, error in failing.items() if key.startswith(prefix)] or None


def all_in_state(box: Sandbox, paths: Iterable[str], state: str) -> bool:
    return set(inside_state(box, paths).values()) == {state}


def forgotten(daemon: RunningDaemon, zram: ZramDevice) -> bool:
    return ledger_for(daemon, zram.devpath) == []


def failing_about(daemon: RunningDaemon, *devices: ZramDevice) -> list[str]:
    failing: dict[str, str] = daemon.status()["failing"]
    return [key for key in failing if any(f" {d.devpath} " in key for d in devices)]


def node_state(box: Sandbox, path: str) -> str:
    return inside_state(box, [path])[path]


def no_zombies(daemon: RunningDaemon) -> bool:
    assert daemon.process is not None
    return not [c for c in children(daemon.process.pid) if c.state == "Z"]


def helper_children(daemon: RunningDaemon) -> list[Any]:
    """The namespace helpers: children of the daemon's fork server (its one child
    running hotrelay.effectors.nshelper)."""
    assert daemon.process is not None
    servers = [c for c in children(daemon.process.pid) if "nshelper" in c.cmdline]
    return [helper for server in servers for helper in children(server.pid)]


# -- symlinks planted in /dev -----------------------------------------------------------------


def test_symlinked_dev_directories_are_refused_and_nothing_outside_is_written(
    stack: ExitStack,
) -> None:
    target = stack.enter_context(host_dir())
    good = sandbox(stack)
    # /dev/disks is a symlink: to a host directory of ours, and (user namespace) to /etc.
    to_host = sandbox(stack)
    to_host.run(["ln", "-s", str(target), "/dev/disks"])
    to_etc = sandbox(stack, userns=USERNS)
    to_etc.run(["ln", "-s", "/etc", "/dev/disks"])
    # A real /dev/disks whose every possible node name is a symlink to the host.
    leaves = sandbox(stack)
    plant = f'mkdir /dev/disks; for i in $(seq 0 63); do ln -s "{target}/zram$i" /dev/disks; done'
    leaves.run(["sh", "-c", plant])
    hostile = (to_host, to_etc, leaves)
    before = tree(target)
    etc_before = sorted(os.listdir("/etc"))
    etc_mtime = os.stat("/etc").st_mtime_ns
    rules = zram_rules(*(f"pid:{box.pid}" for box in (good, *hostile)))
    daemon = stack.enter_context(RunningDaemon(rules))
    zram = stack.enter_context(ZramDevice())
    node = f"/dev/disks/{zram.name}"
    eventually(lambda: node_state(good, node) == "ok", timeout=5)
    for box in hostile:
        errors = eventually(partial(failing_for, daemon, box, zram), timeout=5)
        assert "symlink" in " ".join(errors), errors
    time.sleep(2.5)  # the failed bindings are retried (after 1 s, then 2 s): still nothing
    assert tree(target) == before
    assert sorted(os.listdir("/etc")) == etc_before
    assert os.stat("/etc").st_mtime_ns == etc_mtime
    assert not os.path.lexists(f"/etc/{zram.name}")
    assert inside_state(leaves, [node]) == {node: "symlink"}
    assert os.readlink(f"/proc/{leaves.pid}/root{node}") == f"{target}/{zram.name}"
    for box in hostile:
        assert not grant_listed(box, zram), "a failed binding keeps its grant"
        assert [e for e in ledger_for(daemon, zram.devpath) if f"pid:{box.pid} " in e["key"]] == []
    assert "UnsafePathError" not in daemon.log()  # an expected failure, not a traceback
    assert "Traceback" not in daemon.log()
    # The daemon goes on: another device reaches the good container.
    second = stack.enter_context(ZramDevice())
    eventually(lambda: node_state(good, f"/dev/disks/{second.name}") == "ok", timeout=5)
    second.remove()
    zram.remove()
    eventually(lambda: node_state(good, node) == "absent", timeout=5)
    eventually(lambda: failing_about(daemon, zram, second) == [], timeout=5)
    assert tree(target) == before
    assert no_zombies(daemon), children(daemon.process.pid) if daemon.process else None


# -- /etc/group planted to hurt the name lookup ------------------------------------------------

GROUP_NAME = "hrgrp"
GROUP_ID = 4321


def private_etc(where: Path, group: str) -> Path:
    etc = where / "etc"
    etc.mkdir(parents=True)
    where.chmod(0o755)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text(group)
    if os.path.exists("/etc/ld.so.cache"):
        shutil.copy("/etc/ld.so.cache", etc / "ld.so.cache")
    return etc


def test_hostile_etc_group_is_refused_without_a_hang(stack: ExitStack) -> None:
    work = stack.enter_context(host_dir())
    host_only = stack.enter_context(host_dir())
    (host_only / "group").write_text(f"{GROUP_NAME}:x:999:\n")  # what a host lookup would find
    fifo = work / "fifo"
    os.mkfifo(fifo)
    huge = work / "huge"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse
    good_etc = private_etc(work / "good", f"root:x:0:\n{GROUP_NAME}:x:{GROUP_ID}:\n")

    good = sandbox(stack)
    good.run(["mount", "--bind", str(good_etc), "/etc"])
    # /etc/group -> a host path. Inside the container that path is an empty tmpfs: only
    # a lookup made on the host would find the file there.
    link_etc = private_etc(work / "link", "")
    (link_etc / "group").unlink()
    (link_etc / "group").symlink_to(host_only / "group")
    to_host = sandbox(stack)
    to_host.run(["mount", "--bind", str(link_etc), "/etc"])
    to_host.run(["mount", "-t", "tmpfs", "empty", str(host_only)])
    # /etc/group -> /proc/1/root/...: a magic link, out of any root.
    magic_etc = private_etc(work / "magic", "")
    (magic_etc / "group").unlink()
    (magic_etc / "group").symlink_to(f"/proc/1/root{host_only}/group")
    magic = sandbox(stack)
    magic.run(["mount", "--bind", str(magic_etc), "/etc"])
    # /etc/group is a FIFO (a blocking open would hang whoever reads it).
    as_fifo = sandbox(stack)
    as_fifo.run(["mount", "--bind", str(good_etc), "/etc"])
    as_fifo.run(["mount", "--bind", str(fifo), "/etc/group"])
    # /etc/group is a 1 GiB file (reading it whole would take the daemon's memory).
    as_huge = sandbox(stack)
    as_huge.run(["mount", "--bind", str(good_etc), "/etc"])
    as_huge.run(["mount", "--bind", str(huge), "/etc/group"])
    hostile = {
        to_host: "never on the host",
        magic: "magic link",
        as_fifo: "not a regular file",
        as_huge: "byte limit",
    }
    rules = zram_rules(*(f"pid:{b.pid}" for b in (good, *hostile)), group=GROUP_NAME)
    daemon = stack.enter_context(RunningDaemon(rules))
    assert daemon.process is not None
    rss_before = _rss_kib(daemon.process.pid)
    zram = stack.enter_context(ZramDevice())
    node = f"/dev/disks/{zram.name}"
    start = time.monotonic()
    eventually(lambda: node_state(good, node) == "ok", timeout=5)
    assert time.monotonic() - start < 3, "the good container waited on the hostile ones"
    assert stat_inside(good, node).st_gid == GROUP_ID  # the container's own group file
    for box, reason in hostile.items():
        errors = eventually(partial(failing_for, daemon, box, zram), timeout=5)
        assert reason in " ".join(errors), errors
        assert node_state(box, node) == "absent"
        assert not grant_listed(box, zram)
    start = time.monotonic()
    daemon.status()
    assert time.monotonic() - start < 1, "the control socket is held up"
    assert _rss_kib(daemon.process.pid) - rss_before < 64 * 1024  # the 1 GiB file: not read
    zram.remove()
    eventually(lambda: node_state(good, node) == "absent", timeout=5)
    eventually(lambda: failing_about(daemon, zram) == [], timeout=5)
    assert ledger_for(daemon, zram.devpath) == []
    assert no_zombies(daemon), children(daemon.process.pid) if daemon.process else None


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- the container deletes or replaces our node ------------------------------------------------


def test_a_deleted_node_is_healed_and_a_replaced_one_is_left_alone(stack: ExitStack) -> None:
    box = sandbox(stack)
    ubox = sandbox(stack, userns=USERNS)
    daemon = stack.enter_context(
        RunningDaemon(
            zram_rules(f"pid:{box.pid}", f"pid:{ubox.pid}"), config="heal_interval = 0.3\n"
        )
    )
    deleted, replaced, renumbered = (stack.enter_context(ZramDevice()) for _ in range(3))
    paths = {z: f"/dev/disks/{z.name}" for z in (deleted, replaced, renumbered)}
    for container in (box, ubox):
        eventually(partial(all_in_state, container, paths.values(), "ok"), timeout=5)
    heals = status_counters(daemon)["heals"]
    # Delete: a plain rm, or (user namespace, where our node is a bind mount) umount + rm.
    box.run(["rm", paths[deleted]])
    ubox.run(["sh", "-c", f"umount {paths[deleted]} && rm {paths[deleted]}"])
    # Replace with the container's own file, and (privileged) with another device's node.
    for container, unmount in ((box, ""), (ubox, f"umount {paths[replaced]} && ")):
        container.run(
            ["sh", "-c", f"{unmount}rm {paths[replaced]} && echo mine > {paths[replaced]}"]
        )
    box.run(["sh", "-c", f"rm {paths[renumbered]} && mknod {paths[renumbered]} c 1 3"])
    for container in (box, ubox):
        eventually(partial(all_in_state, container, [paths[deleted]], "ok"), timeout=5)
    assert status_counters(daemon)["heals"] >= heals + 2
    time.sleep(1)  # a few more heal passes: what the container put there stays
    for container in (box, ubox):
        assert container.run(["cat", paths[replaced]]).stdout == b"mine\n"
    assert inside_state(box, [paths[renumbered]])[paths[renumbered]] == "ok"  # /dev/null
    assert (os.stat(f"/proc/{box.pid}/root{paths[renumbered]}").st_rdev) == os.makedev(1, 3)
    # Unplug: ours is removed, theirs is not, and the ledger forgets all of it.
    for zram in (deleted, replaced, renumbered):
        zram.remove()
    for zram in (deleted, replaced, renumbered):
        eventually(partial(forgotten, daemon, zram), timeout=5)
    for container in (box, ubox):
        assert node_state(container, paths[deleted]) == "absent"
        assert container.run(["cat", paths[replaced]]).stdout == b"mine\n"
        assert not any(grant_listed(container, z) for z in (deleted, replaced, renumbered))
    assert os.stat(f"/proc/{box.pid}/root{paths[renumbered]}").st_rdev == os.makedev(1, 3)
    assert no_zombies(daemon), children(daemon.process.pid) if daemon.process else None


# -- containers that exit in the middle of actions ---------------------------------------------

CHURN_RULE = """
[[rule]]
name = "churn"
target = ["{victims}", "{survivors}"]
[rule.match]
subsystem = "block"
kernel = "zram*"
[rule.device]
path = "/dev/churn/{kernel}"
mode = "0660"
symlinks = ["churn-by-name/{kernel}", "churn-by-number/{major}-{minor}"]
uevent = "both"
"""


def test_containers_exiting_mid_action_leave_a_true_ledger_and_no_zombies(
    stack: ExitStack,
) -> None:
    """Victims die at random moments while devices come and go: in the middle of a
    grant, a node, a symlink, an injected uevent or an undo. Afterwards the ledger
    holds the survivor's bindings and nothing else, and every helper is reaped."""
    rng = random.Random(int(os.environ.get("HOTRELAY_SEED", "0")) or time.time_ns())
    survivor = sandbox(stack, prefix="survivor")
    churn = CHURN_RULE.replace("{victims}", ours("victim")).replace("{survivors}", ours("survivor"))
    daemon = stack.enter_context(RunningDaemon({"10-churn.toml": churn}))
    assert daemon.process is not None
    devices: list[ZramDevice] = []

    def plug() -> None:
        devices.append(ZramDevice().add())

    def unplug_all() -> None:
        for device in devices:
            device.remove()

    stack.callback(unplug_all)
    for round_ in range(6):
        victim = Sandbox.create(
            userns=USERNS if round_ % 2 else None, devices="default-deny", name_prefix="victim"
        )
        try:
            for _ in range(2):
                plug()
            if len(devices) > 3 and rng.random() < 0.5:
                devices.pop(rng.randrange(len(devices))).remove()
            time.sleep(rng.uniform(0, 1.5))  # the cgroup watcher polls every second
        finally:
            victim.close()

    def settled() -> bool:
        # Only our own devices: the host (or another test session) may plug zram
        # devices of its own meanwhile, which the rule relays too.
        entries = [e for e in ledger(daemon) if "churn" in e["key"]]
        mine = {d.devpath for d in devices if d.present}
        by_device = {e["key"].split(" ")[1]: e for e in entries if e["key"].split(" ")[1] in mine}
        return (
            {e["record"]["container"]["pid"] for e in entries} <= {survivor.pid}
            and by_device.keys() == mine
            and all(e["record"]["complete"] for e in by_device.values())
        )

    eventually(settled, timeout=20)
    paths = [f"/dev/churn/{d.name}" for d in devices if d.present]
    states = inside_state(survivor, paths)
    assert set(states.values()) == {"ok"}, states
    with contextlib.suppress(TimeoutError):
        eventually(partial(no_zombies, daemon), timeout=5)
    assert no_zombies(daemon), children(daemon.process.pid)
    assert len(helper_children(daemon)) <= 1  # the survivor's, at most
    assert daemon.process.poll() is None
    assert "Traceback" not in daemon.log()


def test_the_helper_of_a_container_that_exits_while_idle_is_reaped(stack: ExitStack) -> None:
    """The namespace helper exits by itself when its container dies. If the container
    holds no binding by then, nothing ever calls on that helper again: before the fix it
    stayed a zombie (and its socket open in the daemon) until the daemon exited, one
    per container that had ever had a device."""
    zram = stack.enter_context(ZramDevice())
    daemon = stack.enter_context(RunningDaemon(zram_rules(ours("idle"), kernel=zram.name)))
    assert daemon.process is not None
    fds = fd_count(daemon.process.pid)
    box = Sandbox.create(devices="default-deny", name_prefix="idle")
    try:
        node = f"/dev/disks/{zram.name}"
        eventually(partial(all_in_state, box, [node], "ok"), timeout=5)
        assert len(helper_children(daemon)) == 1
        zram.remove()  # its binding is undone through the helper, which stays
        eventually(partial(all_in_state, box, [node], "absent"), timeout=5)
    finally:
        box.close()  # the helper exits on its own; nobody calls it again
    time.sleep(2)
    assert no_zombies(daemon), children(daemon.process.pid)
    assert helper_children(daemon) == []
    assert fd_count(daemon.process.pid) <= fds


# -- pid reuse -----------------------------------------------------------------------------------


@contextmanager
def impostor_at(pid: int, canary: ZramDevice | None) -> Iterator[subprocess.Popen[bytes]]:
    """A process that takes ``pid`` (now free) with a mount namespace of its own whose
    /dev holds /dev/disks/<canary> with the canary's device numbers: exactly what the
    daemon would remove if it took this process for the container that had that pid."""
    script = "mount -t tmpfs hr-impostor /dev && mkdir /dev/disks"
    if canary is not None:
        script += f" && mknod /dev/disks/{canary.name} b {canary.major} {canary.minor}"
    script += " && echo ready && exec sleep 600"
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
        )
        if proc.pid == pid:
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"could not get pid {pid} back for the impostor")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def impostor_disks(pid: int) -> list[str]:
    return sorted(os.listdir(f"/proc/{pid}/root/dev/disks"))


def test_a_reused_pid_is_not_the_container(stack: ExitStack) -> None:
    """pid:N names the process that was N when the rule was loaded: once it exits, a
    new process at N gets nothing, even when the daemon is asked to look again."""
    box = sandbox(stack)
    pid = box.pid
    daemon = stack.enter_context(RunningDaemon(zram_rules(f"pid:{pid}")))
    zram = stack.enter_context(ZramDevice())
    eventually(lambda: node_state(box, f"/dev/disks/{zram.name}") == "ok", timeout=5)
    box.close()
    eventually(lambda: ledger_for(daemon, zram.devpath) == [], timeout=5)
    with impostor_at(pid, None):
        daemon.request("refresh", runtime="pid", name=str(pid))
        second = stack.enter_context(ZramDevice())
        time.sleep(1.5)
        assert impostor_disks(pid) == []
        assert ledger_for(daemon, zram.devpath) == ledger_for(daemon, second.devpath) == []
        assert daemon.status()["containers"] == []
    assert no_zombies(daemon), children(daemon.process.pid) if daemon.process else None


def test_pid_reuse_while_the_daemon_is_down_touches_only_the_dead_container(
    stack: ExitStack,
) -> None:
    """kill -9 the daemon, the container exits, another process takes its pid (with a
    node of the same device numbers at the same path), the daemon restarts: the ledger
    entry of the dead container goes, and the impostor's node stays."""
    box = sandbox(stack, prefix="reuse")
    pid = box.pid
    daemon = stack.enter_context(RunningDaemon(zram_rules(ours("reuse"))))
    zram = stack.enter_context(ZramDevice())
    eventually(lambda: node_state(box, f"/dev/disks/{zram.name}") == "ok", timeout=5)
    entry = eventually(
        lambda: [e for e in ledger_for(daemon, zram.devpath) if e["record"]["complete"]] or None,
        timeout=5,
    )
    assert [e["record"]["container"]["pid"] for e in entry] == [pid]
    daemon.kill9()
    box.close()
    with impostor_at(pid, zram):
        assert impostor_disks(pid) == [zram.name]
        daemon.start()
        eventually(lambda: ledger_for(daemon, zram.devpath) == [], timeout=5)
        time.sleep(0.5)
        assert impostor_disks(pid) == [zram.name]
        info = os.stat(f"/proc/{pid}/root/dev/disks/{zram.name}")
        assert stat.S_ISBLK(info.st_mode)
        assert info.st_rdev == zram.devnum
        assert daemon.status()["containers"] == []
    assert no_zombies(daemon), children(daemon.process.pid) if daemon.process else None
