"""Hotplug-to-usable latency for ``python -m bench headline``: hotrelay and the tools
users would pick instead, on the same containers, in one run.

A *plug* is one zram ``hot_add``: the clock starts just before the read(2) of
/sys/class/zram-control/hot_add that creates the device (and its add uevent), and
stops when the probe inside the container (bench/headline_probe.py, the same program
in every container for every method) opens the node as a block device with the
right numbers. After each plug the device is hot-removed and the node must be gone
inside before the next plug, so every plug starts from the same state.

Containers: a privileged and a user-namespaced sandbox (hotrelay.testing.sandbox,
default-deny device cgroup), an unprivileged and a privileged LXC container (busybox;
the privileged one with a default-deny device cgroup), a runc container (OCI default
device whitelist) and an LXD instance (unprivileged, LXD's defaults). Methods:

- ``hotrelay``: the real daemon (``hotrelay run``) with one rule naming the container
  (its own runtime's target: ``lxc:``, ``lxd:``, ``runc:``; ``pid:`` for sandboxes),
  state dir on a tmpfs as /run is on a normal host, log level info. The rule set is
  switched by ``hotrelay reload`` between cells; the daemon keeps running (with no
  rule) while the other methods are measured.
- ``hotrelay, state on ext4``: the same with the state dir on this VM's disk (its
  /run is not a tmpfs): the ledger's fsyncs are then part of the latency.
- ``naive shell relay``: ``busybox uevent /bin/sh -c SCRIPT``, where SCRIPT runs, per
  add event, ``nsenter -t PID -m -- mknod`` and ``echo 'b M:N rwm' > devices.allow``.
- ``lxc-device``: the same ``busybox uevent`` loop running ``lxc-device add /dev/zramN``
  (LXC's own tool) per add event.
- ``LXD unix-block``: LXD's own hotplug: a ``unix-block`` device with
  ``required=false`` and ``source=/dev/zramN``, N predicted (hot_add takes the lowest
  free index, so the next N is known; a plug whose N differs is discarded).
- ``kernel only``: the host's own devtmpfs node /dev/zramN (no relay, no container):
  the floor, what the kernel and the probe cost by themselves.

Cells (container x method) are interleaved in rounds, each visit starting with one
discarded warm-up plug, so a noisy minute hurts every method alike.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hotrelay.testing.containers import (
    BusyboxRootfs,
    EngineError,
    LxcHost,
    LxdEngine,
    Reaped,
    RuncRoot,
    SessionDirs,
)
from hotrelay.testing.daemon import RunningDaemon
from hotrelay.testing.sandbox import IdMap, Sandbox, helper_env

ZRAM_CONTROL = Path("/sys/class/zram-control")
ZRAM_NAME = re.compile(r"zram(\d+)\Z")
SETTLE = 0.01  # seconds between a plug's cleanup and the next plug
PLUG_TIMEOUT = 5.0
LXD_TIMEOUT = 15.0
FAIL_TIMEOUT = 3.0

# One line per privileged LXC container config: a device cgroup like the OCI default.
LXC_DEFAULT_DENY = (
    "lxc.cgroup.devices.deny = a\n"
    "lxc.cgroup.devices.allow = c *:* m\n"
    "lxc.cgroup.devices.allow = b *:* m\n"
    "lxc.cgroup.devices.allow = c 1:3 rwm\n"
    "lxc.cgroup.devices.allow = c 1:5 rwm\n"
    "lxc.cgroup.devices.allow = c 1:7 rwm\n"
    "lxc.cgroup.devices.allow = c 1:8 rwm\n"
    "lxc.cgroup.devices.allow = c 1:9 rwm\n"
    "lxc.cgroup.devices.allow = c 5:0 rwm\n"
    "lxc.cgroup.devices.allow = c 5:1 rwm\n"
    "lxc.cgroup.devices.allow = c 5:2 rwm\n"
    "lxc.cgroup.devices.allow = c 136:* rwm\n"
)

HOTRELAY = "hotrelay"
HOTRELAY_EXT4 = "hotrelay, state on ext4"
NAIVE = "naive shell relay"
LXC_DEVICE = "lxc-device"
LXD_HOTPLUG = "LXD unix-block"
KERNEL = "kernel only (host devtmpfs node)"


def log(text: str) -> None:
    print(f"  [headline] {text}", file=sys.stderr, flush=True)


# -- zram ---------------------------------------------------------------------------------


def zram_major() -> int:
    for line in Path("/proc/devices").read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[1] == "zram":
            return int(words[0])
    raise RuntimeError("no zram major in /proc/devices (modprobe zram)")


class Zram:
    """hot_add/hot_remove, timing the hot_add; removes whatever it added on close."""

    def __init__(self) -> None:
        self.major = zram_major()
        self.mine: set[int] = set()
        self.foreign = sorted(self.present())  # not ours: never touched

    @staticmethod
    def present() -> set[int]:
        return {
            int(m.group(1)) for name in os.listdir("/sys/block") if (m := ZRAM_NAME.match(name))
        }

    def predict(self) -> int:
        """hot_add takes the lowest free index (idr_alloc from 0)."""
        present = self.present()
        index = 0
        while index in present:
            index += 1
        return index

    def add(self) -> tuple[float, int]:
        """(CLOCK_MONOTONIC just before the read that creates the device, its index)."""
        fd = os.open(ZRAM_CONTROL / "hot_add", os.O_RDONLY | os.O_CLOEXEC)
        try:
            start = time.monotonic()
            index = int(os.read(fd, 64))
        finally:
            os.close(fd)
        self.mine.add(index)
        return start, index

    def remove(self, index: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            fd = os.open(ZRAM_CONTROL / "hot_remove", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(index).encode())
                break
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    break
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            finally:
                os.close(fd)
            time.sleep(0.002)
        self.mine.discard(index)

    def close(self) -> None:
        for index in sorted(self.mine):
            with contextlib.suppress(OSError):
                self.remove(index)


# -- the probe ------------------------------------------------------------------------------


class ProbeError(RuntimeError):
    pass


class Probe:
    """bench.headline_probe running inside one container (see that module)."""

    def __init__(self, pid: int, interval: float, log_file: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.headline_probe", str(pid), repr(interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=helper_env(),
            cwd="/",
        )
        self._buffer = b""
        ready = self.line(30)
        if ready != "ready":
            self.close()
            raise ProbeError(f"probe in pid {pid}: {ready}")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise ProbeError(f"probe silent for {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise ProbeError(f"probe exited ({self.proc.wait()})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()

    def arm(self, path: str, major: int, minor: int, timeout: float) -> None:
        self.send(f"arm {path} {major} {minor} {timeout}")
        answer = self.line(10)
        if answer != "armed":
            raise ProbeError(f"arm: {answer}")

    def gone(self, path: str, timeout: float) -> bool:
        self.send(f"gone {path} {timeout}")
        return self.line(timeout + 10).startswith("gone")

    def calibrate(self, seconds: float) -> tuple[int, float, float]:
        self.send(f"calib /dev/hrbench-never {seconds}")
        _, attempts, cpu, wall = self.line(seconds + 10).split()
        return int(attempts), float(cpu), float(wall)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("quit")
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# -- the containers -----------------------------------------------------------------------


@dataclass
class Box:
    key: str
    label: str
    pid: int
    target: str  # hotrelay's target for it
    userns: bool
    lxc_name: str | None = None
    lxd_name: str | None = None
    probe: Probe | None = None

    @property
    def devices_cgroup(self) -> Path:
        for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "devices" in controllers.split(","):
                return Path("/sys/fs/cgroup/devices") / path.lstrip("/")
        raise RuntimeError(f"{self.label}: no devices cgroup")


def _unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 10000}{os.urandom(2).hex()}"


class Lab:
    """Every container, engine, daemon and probe of the latency run; close() undoes it."""

    def __init__(self, interval: float, *, lxd: bool = True) -> None:
        self.stack = contextlib.ExitStack()
        self.dirs = SessionDirs()
        self.stack.callback(self.dirs.close)
        self.log_path = self.dirs.base / "headline.log"
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by the stack
        self.stack.callback(self.log_file.close)
        self.boxes: list[Box] = []
        self.lxc: LxcHost | None = None
        self.lxd: LxdEngine | None = None
        self.runc: RuncRoot | None = None
        self.interval = interval
        self.with_lxd = lxd
        self.tmpfs = self.dirs.run / "tmpfs"

    def build(self) -> None:
        rootfs = BusyboxRootfs(self.dirs.base)
        started = time.monotonic()
        privileged = Sandbox.create(devices="default-deny", name_prefix="hlp")
        self.stack.callback(privileged.close)
        self._add(Box("sbx", "privileged sandbox", privileged.pid, f"pid:{privileged.pid}", False))
        userns = Sandbox.create(
            userns=IdMap(0, 100000, 65536), devices="default-deny", name_prefix="hlu"
        )
        self.stack.callback(userns.close)
        self._add(Box("sbxu", "userns sandbox", userns.pid, f"pid:{userns.pid}", True))

        self.lxc = LxcHost(self.dirs, rootfs)
        self.stack.callback(self.lxc.close)
        unprivileged = self.lxc.create(_unique("hu"), unprivileged=True)
        unprivileged.start()
        pid = _pid(unprivileged.pid())
        self._add(
            Box(
                "lxcu", "unprivileged LXC", pid, f"lxc:{unprivileged.name}", True, unprivileged.name
            )
        )
        lxc_privileged = self.lxc.create(_unique("hp"))
        with open(lxc_privileged.path / "config", "a") as config:
            config.write(LXC_DEFAULT_DENY)
        lxc_privileged.start()
        pid = _pid(lxc_privileged.pid())
        self._add(
            Box("lxcp", "privileged LXC", pid, f"lxc:{lxc_privileged.name}", False,
                lxc_privileged.name)
        )  # fmt: skip

        self.runc = RuncRoot(self.dirs, rootfs)
        self.stack.callback(self.runc.close)
        runc_id = _unique("hr")
        self.runc.run_container(runc_id)
        pid = int(str(self.runc.state(runc_id)["pid"]))
        self._add(Box("runc", "runc", pid, f"runc:{runc_id}", False))

        if self.with_lxd:
            self.lxd = LxdEngine(self.dirs, rootfs)
            self.stack.callback(self.lxd.close)
            name = _unique("hx")
            self.lxd.launch(name)
            pid = self.lxd.pid(name)
            self._add(Box("lxd", "LXD (unprivileged)", pid, f"lxd:{name}", True, lxd_name=name))
        # The host itself, for the kernel-only floor.
        self._add(Box("host", "host (no container)", os.getpid(), "", False))
        log(f"containers and probes up in {time.monotonic() - started:.1f} s")

    def _add(self, box: Box) -> None:
        box.probe = Probe(box.pid, self.interval, self.log_file)
        self.stack.callback(box.probe.close)
        self.boxes.append(box)

    def daemon(self, *, on_tmpfs: bool) -> RunningDaemon:
        """hotrelay run watching this lab's runtimes, with no rule yet."""
        runtimes = ['enabled = ["lxc", "runc"' + (', "lxd"' if self.lxd else "") + "]"]
        assert self.lxc is not None
        assert self.runc is not None
        runtimes.append(f'lxc.paths = ["{self.lxc.lxcpath}"]')
        runtimes.append(f'runc.roots = ["{self.runc.root}"]')
        if self.lxd is not None:
            runtimes.append(f'lxd.socket = "{self.lxd.socket}"')
        config = "[runtimes]\n" + "\n".join(runtimes) + "\n"
        workdir = None
        if on_tmpfs:
            if not self.tmpfs.is_dir():
                self.tmpfs.mkdir()
                subprocess.run(
                    [
                        "mount",
                        "-t",
                        "tmpfs",
                        "-o",
                        "mode=0755,size=64m",
                        "hrbench",
                        str(self.tmpfs),
                    ],
                    check=True,
                )
                self.stack.callback(_unmount, self.tmpfs)
            workdir = self.tmpfs / "daemon"
            workdir.mkdir()
        daemon = RunningDaemon(
            {}, config=config, workdir=workdir, extra_args=("--log-level", "info")
        )
        daemon.start(timeout=60)
        self.stack.callback(_close_quietly, daemon)
        return daemon

    def close(self) -> None:
        self.stack.close()


def _pid(pid: int | None) -> int:
    if pid is None:
        raise EngineError("container has no init pid")
    return pid


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)
    with contextlib.suppress(OSError):
        path.rmdir()


def _close_quietly(daemon: RunningDaemon) -> None:
    """RunningDaemon.close() without dumping the whole log on stderr."""
    daemon.stop()
    subprocess.run(["rm", "-rf", "--one-file-system", str(daemon.workdir)], check=False)


# -- the methods --------------------------------------------------------------------------


class Method:
    """How one relay is switched on for one container and one zram index, and how a
    plug is cleaned up. Every method acts on that one index only: other sessions on
    this machine hot-add zram devices too, and those must not be relayed."""

    name = ""
    timeout = PLUG_TIMEOUT

    def start(self, box: Box, index: int) -> None:
        pass

    def stop(self) -> None:
        pass

    def path(self, index: int) -> str:
        raise NotImplementedError

    def cleanup(self, box: Box, index: int, zram: Zram) -> None:
        """Unplug; the node is then gone inside (probe), or the plug fails."""
        zram.remove(index)

    def failure(self) -> str:
        """Why a plug failed, from the method's own log."""
        return "no node within the timeout"


class Hotrelay(Method):
    def __init__(self, daemon: RunningDaemon, name: str) -> None:
        self.daemon = daemon
        self.name = name
        self.offset = 0

    def start(self, box: Box, index: int) -> None:
        self.offset = len(self.daemon.log())
        self.daemon.write_rules(
            {
                "10-headline.toml": (
                    "[[rule]]\n"
                    'name = "headline"\n'
                    f'target = ["{box.target}"]\n'
                    "[rule.match]\n"
                    'subsystem = "block"\n'
                    f'kernel = "zram{index}"\n'
                    "[rule.device]\n"
                    'path = "/dev/hrb-{kernel}"\n'
                    'mode = "0640"\n'
                )
            }
        )
        self.daemon.request("reload")

    def stop(self) -> None:
        self.daemon.write_rules({})
        self.daemon.request("reload")

    def path(self, index: int) -> str:
        return f"/dev/hrb-zram{index}"

    def failure(self) -> str:
        text = self.daemon.log()[self.offset :]
        lines = [ln for ln in text.splitlines() if "failed" in ln or "ERROR" in ln]
        return lines[0][-300:] if lines else "no node within the timeout"


class UeventLoop(Method):
    """``busybox uevent /bin/sh -c SCRIPT``: a small udev-like loop, one shell per event."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.loop: Reaped | None = None
        self.log_path = lab.dirs.base / f"{type(self).__name__.lower()}.log"
        self.offset = 0

    def script(self, box: Box, index: int) -> str:
        raise NotImplementedError

    def argv(self, box: Box, index: int) -> list[str]:
        return ["busybox", "uevent", "/bin/sh", "-c", self.script(box, index)]

    def start(self, box: Box, index: int) -> None:
        self.offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.loop = Reaped(self.argv(box, index), log_path=self.log_path)
        time.sleep(0.3)  # until it listens; a discarded warm-up plug follows anyway

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.stop(grace=5)
            self.loop.close()
            self.loop = None

    def failure(self) -> str:
        try:
            text = self.log_path.read_bytes()[self.offset :].decode(errors="replace")
        except FileNotFoundError:
            return "no output"
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines[0][-300:] if lines else "no node within the timeout, nothing logged"


class NaiveShell(UeventLoop):
    name = NAIVE

    def script(self, box: Box, index: int) -> str:
        cgroup = shlex.quote(str(box.devices_cgroup))
        return (
            'case "$ACTION:$SUBSYSTEM:$DEVNAME" in\n'
            f"add:block:zram{index})\n"
            f'  nsenter -t {box.pid} -m -- mknod "/dev/hrn-$DEVNAME" b "$MAJOR" "$MINOR" &&\n'
            f'  echo "b $MAJOR:$MINOR rwm" > {cgroup}/devices.allow ;;\n'
            f"remove:block:zram{index})\n"
            f'  nsenter -t {box.pid} -m -- rm "/dev/hrn-$DEVNAME" &&\n'
            f'  echo "b $MAJOR:$MINOR rwm" > {cgroup}/devices.deny ;;\n'
            "esac\n"
        )

    def path(self, index: int) -> str:
        return f"/dev/hrn-zram{index}"


class LxcDevice(UeventLoop):
    """``lxc-device -n NAME add /dev/zramN`` per add event.

    Two quirks of the tool, worked around outside the timed path: it stats the
    destination path on the host (so the node keeps the host's name, /dev/zramN),
    and before anything else it checks whether the name is a network interface in
    the netns of /proc/1, which this VM's pid 1 does not let root open. The loop
    therefore runs in a private mount namespace where /proc/1 is a directory whose
    ns/net is the host's network namespace (set up once, not per event). It cannot
    react to a removal (``lxc-device del`` stats the host node, already gone), so the
    cleanup removes the node and the grant directly.
    """

    name = LXC_DEVICE

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.fake_proc1 = lab.dirs.base / "fake-proc1"

    def script(self, box: Box, index: int) -> str:
        assert self.lab.lxc is not None
        assert box.lxc_name is not None
        return (
            'case "$ACTION:$SUBSYSTEM:$DEVNAME" in\n'
            f"add:block:zram{index}) lxc-device -P {shlex.quote(str(self.lab.lxc.lxcpath))} "
            f'-n {box.lxc_name} add "/dev/$DEVNAME" ;;\n'
            "esac\n"
        )

    def argv(self, box: Box, index: int) -> list[str]:
        (self.fake_proc1 / "ns").mkdir(parents=True, exist_ok=True)
        (self.fake_proc1 / "ns" / "net").touch()
        fake = shlex.quote(str(self.fake_proc1))
        setup = (
            f"mount --bind /proc/self/ns/net {fake}/ns/net && mount --rbind {fake} /proc/1 && "
            'exec "$@"'
        )
        return ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", setup, "lxc-device",
                *super().argv(box, index)]  # fmt: skip

    def path(self, index: int) -> str:
        return f"/dev/zram{index}"

    def cleanup(self, box: Box, index: int, zram: Zram) -> None:
        try:
            os.unlink(f"/proc/{box.pid}/root/dev/zram{index}")
        except FileNotFoundError:
            pass  # lxc-device failed: it made no node and granted nothing
        else:
            # What lxc-device granted. Never a deny where nothing was allowed: in an
            # allow-all v1 cgroup it would become a hidden exception.
            _write(box.devices_cgroup / "devices.deny", f"b {zram.major}:{index} rwm")
        zram.remove(index)


class LxdHotplug(Method):
    name = LXD_HOTPLUG
    timeout = LXD_TIMEOUT
    DEVICE = "hrl"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.instance: str | None = None
        self.offset = 0

    def start(self, box: Box, index: int) -> None:
        assert self.lab.lxd is not None
        assert box.lxd_name is not None
        self.instance = box.lxd_name
        self.offset = self.lab.lxd.log_path.stat().st_size
        self.lab.lxd.cli(
            "config", "device", "add", self.instance, self.DEVICE, "unix-block",
            f"source=/dev/zram{index}", f"path={self.path(index)}", "required=false",
        )  # fmt: skip

    def stop(self) -> None:
        if self.instance is not None and self.lab.lxd is not None:
            self.lab.lxd.cli("config", "device", "remove", self.instance, self.DEVICE, check=False)
        self.instance = None

    def path(self, index: int) -> str:
        return f"/dev/hrl-zram{index}"

    def failure(self) -> str:
        assert self.lab.lxd is not None
        text = self.lab.lxd.log_path.read_bytes()[self.offset :].decode(errors="replace")
        lines = [ln for ln in text.splitlines() if "level=error" in ln or "level=warn" in ln]
        return lines[0][-300:] if lines else "no node within the timeout"


class KernelOnly(Method):
    name = KERNEL

    def path(self, index: int) -> str:
        return f"/dev/zram{index}"


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Cell:
    box: Box
    method: Method
    samples: list[float] = field(default_factory=list)  # seconds
    attempts: list[int] = field(default_factory=list)  # probe open() calls per plug
    probe_cpu: list[float] = field(default_factory=list)  # probe CPU seconds per plug
    failed: int = 0
    discarded: int = 0  # plugs whose zram index was taken by another process meanwhile
    error: str | None = None  # why the method cannot serve this container at all
    seconds: float = 0.0  # wall time spent on this cell

    @property
    def label(self) -> str:
        return f"{self.method.name} / {self.box.label}"


class PlugFailed(RuntimeError):
    pass


def plug(cell: Cell, zram: Zram, index: int) -> tuple[float, int, float] | None:
    """One plug of zram ``index``; (latency s, probe attempts, probe cpu s), or None
    if hot_add handed out another index (another process took ours meanwhile)."""
    box, method = cell.box, cell.method
    probe = box.probe
    assert probe is not None
    probe.arm(method.path(index), zram.major, index, method.timeout)
    start, got = zram.add()
    try:
        if got != index:
            probe.send("cancel")
            probe.line(10)
            return None
        outcome = probe.line(method.timeout + 10).split()
        if outcome[0] != "ok":
            raise PlugFailed(" ".join(outcome))
        return float(outcome[1]) - start, int(outcome[2]), float(outcome[3])
    finally:
        method.cleanup(box, got, zram)
        if got == index and not probe.gone(method.path(index), method.timeout):
            log(f"{cell.label}: node still there after unplug")
        time.sleep(SETTLE)


def run_cell(cell: Cell, zram: Zram, count: int, *, warmup: bool = True) -> None:
    if cell.error is not None or count <= 0:
        return
    started = time.monotonic()
    index = zram.predict()
    cell.method.start(cell.box, index)
    try:
        done = 0
        warm = warmup
        while done < count:
            try:
                result = plug(cell, zram, index)
            except PlugFailed as exc:
                cell.failed += 1
                if not cell.samples:
                    # Never worked on this container: say why and stop trying.
                    cell.error = f"{cell.method.failure()} ({exc})"
                    return
                done += 1
                continue
            if result is None:
                cell.discarded += 1
                cell.method.stop()
                index = zram.predict()
                cell.method.start(cell.box, index)
                warm = warmup
                continue
            if warm:
                warm = False
                continue
            cell.samples.append(result[0])
            cell.attempts.append(result[1])
            cell.probe_cpu.append(result[2])
            done += 1
    finally:
        cell.method.stop()
        cell.seconds += time.monotonic() - started


@dataclass
class LatencyResult:
    cells: list[Cell]
    calibration: dict[str, tuple[int, float, float]]
    interval: float
    plugs: int
    lxd_plugs: int
    rounds: int
    seconds: float
    notes: list[str]
    loadavg: tuple[str, str]  # /proc/loadavg before and after


def measure(
    *,
    plugs: int,
    lxd_plugs: int,
    rounds: int,
    interval: float,
    with_lxd: bool = True,
    with_ext4: bool = True,
) -> LatencyResult:
    started = time.monotonic()
    load_before = Path("/proc/loadavg").read_text().strip()
    zram = Zram()
    lab = Lab(interval, lxd=with_lxd)
    notes: list[str] = []
    try:
        lab.build()
        calibration = {}
        for box in lab.boxes:
            assert box.probe is not None
            calibration[box.key] = box.probe.calibrate(1.0)
        hotrelay = Hotrelay(lab.daemon(on_tmpfs=True), HOTRELAY)
        by_key = {box.key: box for box in lab.boxes}
        cells: list[Cell] = []
        for box in lab.boxes:
            if box.key != "host":
                cells.append(Cell(box, hotrelay))
        if with_ext4:
            ext4 = Hotrelay(lab.daemon(on_tmpfs=False), HOTRELAY_EXT4)
            cells.append(Cell(by_key["sbx"], ext4))
        naive = NaiveShell(lab)
        for box in lab.boxes:
            if box.key != "host":
                cells.append(Cell(box, naive))
        lxc_device = LxcDevice(lab)
        cells += [Cell(by_key["lxcp"], lxc_device), Cell(by_key["lxcu"], lxc_device)]
        if "lxd" in by_key:
            cells.append(Cell(by_key["lxd"], LxdHotplug(lab)))
        cells.append(Cell(by_key["host"], KernelOnly()))

        # Methods that cannot work in a user namespace are tried once there.
        once = [c for c in cells if isinstance(c.method, UeventLoop) and c.box.userns]
        for cell in once:
            run_cell(cell, zram, 1, warmup=False)
            if cell.error is None:
                notes.append(f"{cell.label}: expected to fail, but worked")
        for round_ in range(rounds):
            for cell in cells:
                if cell.error is not None or cell in once:
                    continue
                total = lxd_plugs if isinstance(cell.method, LxdHotplug) else plugs
                share = total // rounds + (1 if round_ < total % rounds else 0)
                run_cell(cell, zram, share)
                log(
                    f"round {round_ + 1}/{rounds}: {cell.label}: {len(cell.samples)} plugs"
                    + (f", failing: {cell.error}" if cell.error else "")
                )
        load_after = Path("/proc/loadavg").read_text().strip()
        return LatencyResult(
            cells, calibration, interval, plugs, lxd_plugs, rounds,
            time.monotonic() - started, notes, (load_before, load_after),
        )  # fmt: skip
    finally:
        lab.close()
        zram.close()


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def by_method(result: LatencyResult) -> dict[str, list[Cell]]:
    grouped: dict[str, list[Cell]] = {}
    for cell in result.cells:
        grouped.setdefault(cell.method.name, []).append(cell)
    return grouped


def find(result: LatencyResult, method: str, box: str) -> Cell | None:
    for cell in result.cells:
        if cell.method.name == method and cell.box.key == box:
            return cell
    return None


def p99_ms(cell: Cell | None) -> float | None:
    if cell is None or not cell.samples:
        return None
    return percentile(cell.samples, 0.99) * 1000
