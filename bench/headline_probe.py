"""The "usable inside" probe of ``python -m bench headline``.

One probe process per container, the same program for every container and every
method, so its own cost is identical across them. It starts on the host as root,
imports everything it will ever need, joins the container's devices (v1) and
unified cgroups (the device-cgroup check applies to the process calling open()),
enters the container's user namespace (becoming the container's root) and mount
namespace, and then waits for commands on stdin:

    arm PATH MAJOR MINOR TIMEOUT   -> "armed", then polls open(PATH) until it opens a
                                      block device MAJOR:MINOR: "ok T ATTEMPTS CPU" (T is
                                      CLOCK_MONOTONIC, not namespaced, so comparable to
                                      the host's clock) or "timeout ATTEMPTS ERRNO CPU"
    (while armed) retarget PATH MAJOR MINOR   the device got another number than
                                      predicted: poll for that one instead
    (while armed) cancel           -> "cancelled" (ignored when not armed: the arm has
                                      answered already)
    gone PATH TIMEOUT              -> polls until open(PATH) fails with ENOENT: "gone T"
    calib PATH SECONDS             -> the arm loop on a missing PATH for SECONDS:
                                      "calib ATTEMPTS CPU WALL"
    quit

Polling is open(), fstat() on success (a bind-mount placeholder is an empty regular
file: that is not the device yet), close(), then a wait of INTERVAL seconds in select()
on stdin with a 1 ns timer slack, so the probe uses a few percent of a CPU while it
waits instead of competing for one of the two CPUs with the relay it measures.

Run as ``python -m bench.headline_probe PID INTERVAL``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import sys
import time
from pathlib import Path

from hotrelay.kernel import libc

PR_SET_TIMERSLACK = 29
OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


class Commands:
    """Lines from stdin (fd 0), read without a buffer that select() cannot see."""

    def __init__(self) -> None:
        self._buffer = b""

    def _take(self) -> list[str] | None:
        line, sep, rest = self._buffer.partition(b"\n")
        if not sep:
            return None
        self._buffer = rest
        return line.decode().split()

    def next(self, timeout: float | None) -> list[str] | None:
        """The next command; None if none came within timeout; ["quit"] at EOF."""
        while (words := self._take()) is None:
            # select(), not poll(): poll() takes whole milliseconds.
            if not select.select([0], [], [], timeout)[0]:
                return None
            chunk = os.read(0, 4096)
            if not chunk:
                return ["quit"]
            self._buffer += chunk
            timeout = 0
        return words


def _cgroups(pid: int) -> list[Path]:
    """The container init's devices (v1) and unified cgroup directories."""
    found = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            found.append(Path("/sys/fs/cgroup/unified") / path.lstrip("/"))
        elif "devices" in controllers.split(","):
            found.append(Path("/sys/fs/cgroup/devices") / path.lstrip("/"))
    return found


def enter(pid: int) -> None:
    """Become a process of the container whose init has host pid ``pid``."""
    for cgroup in _cgroups(pid):
        fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    userns = os.fstat(user).st_ino != os.stat("/proc/self/ns/user").st_ino
    if userns:
        libc.setns(user, libc.CLONE_NEWUSER)
    libc.setns(mnt, libc.CLONE_NEWNS)
    os.close(user)
    os.close(mnt)
    if userns:
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    os.chdir("/")


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def arm(commands: Commands, words: list[str], interval: float) -> str:
    path, devnum, timeout = words[1], os.makedev(int(words[2]), int(words[3])), float(words[4])
    attempts = 0
    last = 0
    cpu = _cpu()
    deadline = time.monotonic() + timeout
    while True:
        attempts += 1
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError as exc:
            last = exc.errno or 0
        else:
            now = time.monotonic()
            st = os.fstat(fd)
            os.close(fd)
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == devnum:
                return f"ok {now:.9f} {attempts} {_cpu() - cpu:.6f}"
            last = -1  # the bind-mount placeholder, or a stale node of another device
        if time.monotonic() > deadline:
            return f"timeout {attempts} {last} {_cpu() - cpu:.6f}"
        command = commands.next(interval)
        if command is None:
            continue
        if command[0] == "retarget":
            path, devnum = command[1], os.makedev(int(command[2]), int(command[3]))
        elif command[0] in ("cancel", "quit"):
            return "cancelled"


def gone(path: str, timeout: float, interval: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return f"gone {time.monotonic():.9f}"
        else:
            os.close(fd)
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(interval)


def main(argv: list[str]) -> int:
    pid, interval = int(argv[0]), float(argv[1])
    ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        enter(pid)
    except OSError as exc:
        print(f"error enter: {exc}", flush=True)
        return 1
    print("ready", flush=True)
    commands = Commands()
    while True:
        words = commands.next(None)
        if not words:
            continue
        if words[0] == "quit":
            return 0
        if words[0] == "arm":
            print("armed", flush=True)
            print(arm(commands, words, interval), flush=True)
        elif words[0] == "gone":
            print(gone(words[1], float(words[2]), interval), flush=True)
        elif words[0] == "calib":
            # The very loop arm() runs, on a path that never appears.
            start = time.monotonic()
            result = arm(commands, ["arm", words[1], "0", "0", words[2]], interval).split()
            wall = time.monotonic() - start
            print(f"calib {result[1]} {result[3]} {wall:.6f}", flush=True)
        elif words[0] in ("cancel", "retarget"):
            pass  # meant for an arm that has already answered
        else:
            print(f"error unknown command {words[0]}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
