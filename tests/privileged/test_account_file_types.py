"""A container's /etc/group that is not a file: the real daemon never opens it.

The daemon reads a container's /etc/passwd and /etc/group as host root, outside the
container's device cgroup. A container without a user namespace can put a device node
there (a watchdog's: opening it arms a host reboot) or a FIFO (a blocking open parks
whoever opens it). Here privileged sandboxes bind a character device node (1:3, made by
the test, so the open is harmless but visible) and a FIFO with no writer over their
/etc/group, next to a well-behaved sandbox. The test watches both inodes with inotify:
any open() that is not O_PATH reports IN_OPEN, whatever the flags, so "never opened"
is the kernel's word, not the daemon's.

A regular file can block too: on a FUSE mount whose server never answers a READ, the
reader waits in the kernel for good, unkillably. The daemon has the container's
namespace helper read the files, so that reader is a helper, never a thread of the
daemon (which would then not even exit). The second test serves such a file itself (a
few dozen lines of the FUSE protocol on /dev/fuse) as a sandbox's /etc/group.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest
from adversarial_support import grant_listed, inside_state, ledger_for, zram_rules

from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import stat_inside
from hotrelay.testing.sandbox import Sandbox

pytestmark = pytest.mark.privileged

GROUP_NAME = "hrgrp"
GROUP_ID = 4321
IN_OPEN = 0x20
IN_ACCESS = 0x01
_libc = ctypes.CDLL(None, use_errno=True)


class OpenWatch:
    """inotify IN_OPEN|IN_ACCESS on some files: did anyone open (not O_PATH) them?"""

    def __init__(self, *paths: Path) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.names: dict[int, Path] = {}
        for path in paths:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), "inotify_add_watch", str(path))
            self.names[wd] = path

    def events(self) -> list[tuple[Path, int]]:
        found = []
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                found.append((self.names[wd], mask))
        return found

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def failing_for(daemon: RunningDaemon, box: Sandbox, zram: ZramDevice) -> list[str] | None:
    failing: dict[str, str] = daemon.status()["failing"]
    prefix = f"pid:{box.pid} {zram.devpath} "
    return [error for key, error in failing.items() if key.startswith(prefix)] or None


def test_device_node_or_fifo_as_etc_group_is_never_opened(stack: ExitStack) -> None:
    work = Path(tempfile.mkdtemp(prefix="hr-acctype-"))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    work.chmod(0o755)
    etc = work / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text(f"root:x:0:\n{GROUP_NAME}:x:{GROUP_ID}:\n")
    node = work / "watchdog-standin"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    fifo = work / "fifo"
    os.mkfifo(fifo, 0o600)

    boxes = []
    for prefix in ("acgood", "acnode", "acfifo"):
        box = Sandbox.create(devices="default-deny", name_prefix=prefix)
        stack.callback(box.close)
        box.run(["mount", "--bind", str(etc), "/etc"])
        boxes.append(box)
    good, as_node, as_fifo = boxes
    as_node.run(["mount", "--bind", str(node), "/etc/group"])
    as_fifo.run(["mount", "--bind", str(fifo), "/etc/group"])
    assert stat.S_ISCHR(os.stat(f"/proc/{as_node.pid}/root/etc/group").st_mode)
    watch = OpenWatch(node, fifo)
    stack.callback(watch.close)

    rules = zram_rules(*(f"pid:{b.pid}" for b in boxes), group=GROUP_NAME)
    daemon = stack.enter_context(RunningDaemon(rules))
    zram = stack.enter_context(ZramDevice())
    devnode = f"/dev/disks/{zram.name}"
    start = time.monotonic()
    eventually(lambda: inside_state(good, [devnode])[devnode] == "ok", timeout=5)
    assert time.monotonic() - start < 3, "the good container waited on the hostile ones"
    assert stat_inside(good, devnode).st_gid == GROUP_ID
    for box in (as_node, as_fifo):
        errors = " ".join(eventually(partial(failing_for, daemon, box, zram), timeout=5))
        # The error names the container and the file, and says what it is.
        assert f"pid:{box.pid}" in errors, errors
        assert "/etc/group" in errors, errors
        assert "not a regular file" in errors, errors
        assert inside_state(box, [devnode])[devnode] == "absent"
        assert not grant_listed(box, zram)
    time.sleep(2.5)  # failed bindings are retried (after 1 s, then 2 s): still never opened
    assert watch.events() == []
    for box, kind in ((as_node, "a character device node"), (as_fifo, "a FIFO")):
        errors = " ".join(failing_for(daemon, box, zram) or [])
        assert f"not a regular file ({kind}); never opened" in errors, errors
    # Nothing holds the FIFO open either: a writer finds no reader.
    with pytest.raises(OSError, match="No such device or address") as raised:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert raised.value.errno == errno.ENXIO
    start = time.monotonic()
    daemon.status()
    assert time.monotonic() - start < 1
    # The daemon goes on relaying to the good container.
    second = stack.enter_context(ZramDevice())
    eventually(
        lambda: (
            inside_state(good, [f"/dev/disks/{second.name}"])[f"/dev/disks/{second.name}"] == "ok"
        ),
        timeout=5,
    )
    assert "Traceback" not in daemon.log()
    second.remove()
    zram.remove()
    eventually(lambda: ledger_for(daemon, zram.devpath) == [], timeout=5)
    assert watch.events() == []


# -- a FUSE file whose reads never return ------------------------------------------------------

_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
FUSE_IN = struct.Struct("=IIQQIIIHH")  # fuse_in_header
FUSE_OUT = struct.Struct("=IiQ")  # fuse_out_header
FUSE_ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # fuse_attr
FUSE_LOOKUP, FUSE_GETATTR, FUSE_OPEN, FUSE_READ, FUSE_INIT, FUSE_OPENDIR = 1, 3, 14, 15, 26, 27
FUSE_FORGET, FUSE_BATCH_FORGET = 2, 42
MS_NOSUID, MS_NODEV = 0x2, 0x4


class StuckFuse:
    """One regular file, ``group``, whose every READ is left unanswered (counted)."""

    def __init__(self, mountpoint: Path, content: bytes) -> None:
        self.mountpoint = mountpoint
        self.content = content
        self.reads = 0
        self.fd: int | None = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        flags = MS_NOSUID | MS_NODEV
        if _libc.mount(b"hrstuck", os.fsencode(mountpoint), b"fuse", flags, options) < 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(code, os.strerror(code), "mount -t fuse")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(self.fd,), daemon=True)
        self.thread.start()

    def _attr(self, node: int) -> bytes:
        if node == 1:
            return FUSE_ATTR.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
        size = len(self.content)
        return FUSE_ATTR.pack(2, size, 1, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096, 0)

    def _serve(self, fd: int) -> None:
        def reply(unique: int, error: int = 0, body: bytes = b"") -> None:
            with contextlib.suppress(OSError):
                os.write(fd, FUSE_OUT.pack(FUSE_OUT.size + len(body), -error, unique) + body)

        while not self.stop.is_set():
            # Polled, so that abort() can end this thread: a thread blocked in read()
            # would keep the device file, and so the connection, alive after close().
            if not select.select([fd], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(fd, (1 << 20) + 4096)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: the connection was aborted
            length, opcode, unique, node, *_ = FUSE_IN.unpack_from(data)
            body = data[FUSE_IN.size : length]
            if opcode == FUSE_INIT:
                readahead = struct.unpack_from("=III", body)[2]
                out = struct.pack("=IIIIHHIIHHI", 7, 31, readahead, 0, 16, 12, 65536, 1, 1, 0, 0)
                reply(unique, body=out.ljust(64, b"\0"))
            elif opcode == FUSE_LOOKUP:
                if node == 1 and body.split(b"\0", 1)[0] == b"group":
                    entry = struct.pack("=QQQQII", 2, 0, 3600, 3600, 0, 0)
                    reply(unique, body=entry + self._attr(2))
                else:
                    reply(unique, errno.ENOENT)
            elif opcode == FUSE_GETATTR:
                reply(unique, body=struct.pack("=QII", 3600, 0, 0) + self._attr(node))
            elif opcode in (FUSE_OPEN, FUSE_OPENDIR):
                reply(unique, body=struct.pack("=QII", 0, 0, 0))
            elif opcode == FUSE_READ:
                self.reads += 1  # and never answered
            elif opcode not in (FUSE_FORGET, FUSE_BATCH_FORGET):
                reply(unique, errno.ENOSYS)

    def abort(self) -> None:
        """Close the device: the kernel aborts the connection, every waiter gets ENOTCONN."""
        if self.fd is not None:
            self.stop.set()
            self.thread.join(5)
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.abort()
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


def fuse_waiters(pid: int) -> int:
    """Threads of ``pid`` asleep waiting for a FUSE answer."""
    count = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                if (
                    "fuse" in (task / "wchan").read_text()
                    or "request_wait" in (task / "wchan").read_text()
                ):
                    count += 1
    return count


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rpartition(")")[2].split()[1]
                )
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def helper_fuse_waiters(daemon_pid: int) -> int:
    """Processes the daemon spawned (its helpers) asleep waiting for a FUSE answer."""
    return sum(fuse_waiters(pid) for pid in descendants(daemon_pid))


def test_a_group_file_that_never_answers_costs_one_helper_and_a_failed_binding(
    stack: ExitStack,
) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    work = Path(tempfile.mkdtemp(prefix="hr-acfuse-"))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    work.chmod(0o755)
    etc = work / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text(f"root:x:0:\n{GROUP_NAME}:x:{GROUP_ID}:\n")
    mountpoint = work / "fuse"
    mountpoint.mkdir()
    fuse = StuckFuse(mountpoint, b"root:x:0:\n")
    stack.callback(fuse.close)
    good = Sandbox.create(devices="default-deny", name_prefix="afgood")
    stack.callback(good.close)
    stuck = Sandbox.create(devices="default-deny", name_prefix="afstuck")
    stack.callback(stuck.close)
    for box in (good, stuck):
        box.run(["mount", "--bind", str(etc), "/etc"])
    stuck.run(["mount", "--bind", str(mountpoint / "group"), "/etc/group"])

    rules = zram_rules(f"pid:{good.pid}", f"pid:{stuck.pid}", group=GROUP_NAME)
    daemon = stack.enter_context(RunningDaemon(rules))
    assert daemon.process is not None
    zram = stack.enter_context(ZramDevice())
    devnode = f"/dev/disks/{zram.name}"
    plugged = time.monotonic()
    eventually(lambda: inside_state(good, [devnode])[devnode] == "ok", timeout=5)
    assert time.monotonic() - plugged < 3, "the good container waited on the stuck one"
    # A helper stuck in a FUSE read cannot be killed: the hung server goes at the end.
    stack.callback(fuse.abort)
    timed_out = f"pid:{stuck.pid}: reading its /etc/passwd and /etc/group took longer than 5 s"
    eventually(lambda: timed_out in daemon.log(), timeout=10)
    failed_after = time.monotonic() - plugged
    assert 4.5 < failed_after < 9, failed_after
    # The host may have other zram devices, which the rule matches too: whichever binding
    # came first waited out the deadline, the others were refused at once.
    errors = " ".join(eventually(partial(failing_for, daemon, stuck, zram), timeout=5))
    assert "took longer than 5 s" in errors or "still stuck" in errors, errors
    start = time.monotonic()
    daemon.status()
    assert time.monotonic() - start < 1, "the control socket is held up"
    # Retries come (after 1, 2, 4 s) and are refused at once: one READ, one helper, ever,
    # and no thread of the daemon itself waits on the container's files.
    eventually(
        lambda: "still stuck" in " ".join(failing_for(daemon, stuck, zram) or []), timeout=10
    )
    assert fuse.reads == 1
    assert fuse_waiters(daemon.process.pid) == 0
    assert helper_fuse_waiters(daemon.process.pid) == 1
    # Another device still reaches the good container meanwhile.
    second = stack.enter_context(ZramDevice())
    second_node = f"/dev/disks/{second.name}"
    eventually(lambda: inside_state(good, [second_node])[second_node] == "ok", timeout=5)
    # The hung server goes away: the stuck helper ends, nothing is left waiting.
    fuse.abort()
    eventually(lambda: helper_fuse_waiters(daemon.process.pid) == 0, timeout=5)  # type: ignore[union-attr]
    assert inside_state(stuck, [devnode])[devnode] == "absent"
    assert not grant_listed(stuck, zram)
    assert "Traceback" not in daemon.log()
