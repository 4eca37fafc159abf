"""A container plants code that a host-root Python would run: the real daemon must not run it.

A Python process that has joined a container's mount namespace resolves every path it
opens there. Printing a traceback re-reads each frame's source file by its absolute
path, honours that file's PEP 263 coding cookie and imports ``encodings.<name>`` from
the stdlib directory, all as the container sees them. So container root plants copies
of hotrelay's sources (and of the stdlib modules a traceback may show) at their host
paths, each starting with ``# -*- coding: hotrelayevil -*-``, plus
``encodings/hotrelayevil.py``: any traceback in a host-root process that joined the
container's mount namespace then runs that module as host root.

Each sandbox here gets a root filesystem of its own (a tmpfs, with the host's /usr
bound read-only and the attack planted on tmpfs mounts inside the sandbox's mount
namespace), so nothing the container or the planted module writes reaches a host
file. The planted module writes ``/hotrelay-escaped`` (in whatever mount namespace it
runs) and tries a marker in a host directory of the test's; neither may ever appear,
while the daemon is pushed into tracebacks three ways:

1. SIGINT to every process the daemon spawned (found through /proc ppid chains),
   idle and in the middle of actions; then the device must still reach the container;
2. SIGKILL of the daemon while its helpers are busy with a burst of plugs and unplugs
   (the reply then meets a closed socket), restarted on the same state each time; the
   end state must be what the rules say;
3. removal replies too big for the helper's socket: the container replaces the
   directories the daemon made with symlinks whose 4095-byte targets a reply quotes.
   The daemon must stay up, and the container must lose the device on unplug (EPERM
   from inside on a node of that device, no devices.list entry).

Every test runs against a privileged and a user-namespaced sandbox.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import random
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from adversarial_support import devices_list, grant_listed, inside_state

import hotrelay
from hotrelay.control.client import ControlError
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

USERNS = IdMap(0, 100000, 65536)
CODEC = "hotrelayevil"
COOKIE = f"# -*- coding: {CODEC} -*-\n".encode()
MARKER = "/hotrelay-escaped"  # in the mount namespace the planted module runs in
# Stdlib packages a traceback of the daemon's helpers may show (all of the stdlib
# directory is planted; these must be among it).
STDLIB_PACKAGES = ("json", "ctypes", "collections", "encodings", "importlib")
# No runtime watchers: the sandboxes are pid:/cgroup: targets, and a killed daemon
# must not leave watcher processes behind.
CONFIG = "heal_interval = 1\n[runtimes]\nenabled = []\n"
PR_SET_CHILD_SUBREAPER = 36

EVIL = '''\
"""Planted by a container. Imported only if a host-root process looked up this codec."""
import codecs
import os
import sys

_NOTE = "pid=%d uid=%d euid=%d\\n" % (os.getpid(), os.getuid(), os.geteuid())


def _mark(path):
    try:
        with open(path, "a") as file:
            file.write(_NOTE)
        return
    except OSError:
        pass
    # Host root may not create files on a filesystem of the container's user namespace
    # (EOVERFLOW): as the owner of the directory, then back to root.
    try:
        owner = os.stat(os.path.dirname(path))
        os.setegid(owner.st_gid)
        os.seteuid(owner.st_uid)
        try:
            with open(path, "a") as file:
                file.write(_NOTE)
        finally:
            os.seteuid(0)
            os.setegid(0)
    except OSError:
        pass


for _path in ({marker!r}, {host_marker!r}):
    _mark(_path)
sys.stderr.write("HOTRELAY-ESCAPE: planted codec module ran: " + _NOTE)


def getregentry():
    return codecs.lookup("utf-8")
'''


# -- what the daemon's interpreter reads ---------------------------------------------------


@dataclass(frozen=True)
class Interpreter:
    """Where the daemon's Python finds hotrelay and its stdlib (absolute host paths)."""

    packages: tuple[Path, ...]
    stdlib: Path


def daemon_interpreter() -> Interpreter:
    """Asked of the very interpreter (and environment, and cwd) RunningDaemon starts."""
    probe = (
        "import os, sysconfig, hotrelay\n"
        "print(os.path.dirname(hotrelay.__file__))\n"
        "print(sysconfig.get_paths()['stdlib'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, check=True, text=True
    ).stdout.split("\n")
    packages = {Path(out[0]), Path(hotrelay.__file__).parent}
    packages |= {p.resolve() for p in packages}
    return Interpreter(tuple(sorted(packages)), Path(out[1]))


def _cookie_copy(tar: tarfile.TarFile, source: Path, at: Path) -> None:
    _add_file(tar, at, COOKIE + source.read_bytes())


def _add_file(tar: tarfile.TarFile, at: Path, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(str(at).lstrip("/"))
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def attack_tarball(interp: Interpreter, host_marker: Path) -> tuple[bytes, int]:
    """The planted files, as a tar to extract at the container's root; and their count."""
    buffer = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for package in interp.packages:
            for source in sorted(package.rglob("*.py")):
                _cookie_copy(tar, source, source)
                count += 1
        stdlib = interp.stdlib
        # Every module of the stdlib directory (not the third-party ones below it).
        sources = [
            source
            for source in sorted(stdlib.rglob("*.py"))
            if not {"site-packages", "dist-packages"} & set(source.relative_to(stdlib).parts)
        ]
        assert {stdlib / name / "__init__.py" for name in STDLIB_PACKAGES} <= set(sources)
        for source in sources:
            _cookie_copy(tar, source, source)
            count += 1
        evil = EVIL.format(marker=MARKER, host_marker=str(host_marker / "escaped"))
        _add_file(tar, stdlib / "encodings" / f"{CODEC}.py", evil.encode())
        # A minimal /etc of the container's own.
        _add_file(tar, Path("/etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n")
        _add_file(tar, Path("/etc/group"), b"root:x:0:\ndisk:x:6:\n")
        if os.path.exists("/etc/ld.so.cache"):
            _add_file(tar, Path("/etc/ld.so.cache"), Path("/etc/ld.so.cache").read_bytes())
    return buffer.getvalue(), count


# Run inside the sandbox as its root: a root filesystem of its own on a tmpfs (mounted,
# in the sandbox's private mount namespace, on an empty directory of the test's), then
# pivot_root into it. $1: that directory; $2: a host directory of the test's to show
# at /hostdev; $3...: directories to plant in.
SETUP = r"""
set -eu
R=$1
hostdev=$2
shift 2
mount -t tmpfs -o mode=0755 hr-escape-root "$R"
cd "$R"
mkdir -p usr etc dev proc run old hostdev root tmp
chmod 1777 tmp
mount --rbind /usr usr
mount -o remount,bind,ro usr
mount --rbind /dev dev
mount --rbind /proc proc
mount --rbind "$hostdev" hostdev
TOPLEVEL
for planted in "$@"; do
  mkdir -p ".$planted"
  mount -t tmpfs -o mode=0755 hr-escape-plant ".$planted"
done
tar -x -f - -C "$R"
pivot_root . old
cd /
umount -l /old
rmdir /old
"""


def setup_script() -> str:
    """SETUP with the host's top-level /bin, /lib... as symlinks or read-only binds."""
    lines = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/", name)
        if host.is_symlink():
            lines.append(f"ln -s {shlex.quote(os.readlink(host))} {name}")
        elif host.is_dir():
            lines.append(f"mkdir {name} && mount --rbind /{name} {name}")
            lines.append(f"mount -o remount,bind,ro {name}")
    return SETUP.replace("TOPLEVEL", "\n".join(lines))


# -- the attack around one sandbox ---------------------------------------------------------


@dataclass
class Attack:
    """A sandbox with the attack planted, and a host directory of the test's."""

    box: Sandbox
    host: Path  # ours: markers/ (the planted module's host target) and nodes/ (probes)
    planted: int
    host_marker_preexisted: bool

    @property
    def markers(self) -> Path:
        return self.host / "markers"

    @property
    def nodes(self) -> Path:
        return self.host / "nodes"

    def escapes(self, daemon: RunningDaemon | None = None) -> list[str]:
        """Every marker the planted module left: in the container's root, in our host
        directory, (had it run in the host's mount namespace) at the host's root, and
        what it wrote on its stderr (a helper's is the daemon's log)."""
        found = []
        if daemon is not None:
            found += [line for line in daemon.log().splitlines() if "HOTRELAY-ESCAPE" in line]
        inside = Path(f"/proc/{self.box.pid}/root{MARKER}")
        with contextlib.suppress(FileNotFoundError):
            found.append(f"container {MARKER}: {inside.read_text().strip()!r}")
        for path in sorted(self.markers.iterdir()):
            found.append(f"host {path}: {path.read_text().strip()!r}")
        if not self.host_marker_preexisted and os.path.lexists(MARKER):
            found.append(f"host {MARKER}: {Path(MARKER).read_text().strip()!r}")
        return found

    def assert_no_escape(self, daemon: RunningDaemon | None, when: str) -> None:
        found = self.escapes(daemon)
        if found:
            pytest.fail(f"the planted module ran as host root ({when}):\n  " + "\n  ".join(found))

    def probe_open(self, zram: ZramDevice) -> str:
        """Open a node of zram's numbers from inside the container, as its root and in
        its cgroups: "ok", or what open() said. The node is made on the host, in a
        directory bound into the container (a user-namespaced /dev would refuse any
        node: SB_I_NODEV), so only the device cgroup decides."""
        node = self.nodes / "probe"
        with contextlib.suppress(FileNotFoundError):
            node.unlink()
        os.mknod(node, stat.S_IFBLK | 0o666, os.makedev(zram.major, zram.minor))
        node.chmod(0o666)
        try:
            result = self.box.run(
                ["dd", "if=/hostdev/probe", "of=/dev/null", "bs=4096", "count=1"], check=False
            )
        finally:
            node.unlink()
        if result.returncode == 0:
            return "ok"
        return result.stderr.decode(errors="replace").strip()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Closes every sandbox, device, daemon and directory a test made, newest first."""
    with ExitStack() as exits:
        yield exits


@pytest.fixture(params=[None, USERNS], ids=["privileged", "userns"])
def userns(request: pytest.FixtureRequest) -> IdMap | None:
    value: IdMap | None = request.param
    return value


@contextlib.contextmanager
def host_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hr-escape-"))
    try:
        path.chmod(0o755)
        (path / "markers").mkdir(mode=0o777)
        (path / "markers").chmod(0o777)
        (path / "nodes").mkdir(mode=0o755)
        (path / "root").mkdir(mode=0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def host_root_marker_removed(preexisted: bool) -> Iterator[None]:
    """Had the planted module run in the host's mount namespace, it wrote the host's
    /hotrelay-escaped: the test made that file, so the test removes it."""
    try:
        yield
    finally:
        if not preexisted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MARKER)


def planted_sandbox(stack: ExitStack, userns: IdMap | None, prefix: str) -> Attack:
    preexisted = os.path.lexists(MARKER)
    stack.enter_context(host_root_marker_removed(preexisted))
    host = stack.enter_context(host_dir())
    box = Sandbox.create(userns=userns, devices="default-deny", name_prefix=prefix)
    stack.callback(box.close)
    interp = daemon_interpreter()
    tarball, count = attack_tarball(interp, host / "markers")
    planted = [str(p) for p in (*interp.packages, interp.stdlib)]
    box.run(
        [
            "/bin/sh",
            "-c",
            setup_script(),
            "hr-escape-setup",
            str(host / "root"),
            str(host / "nodes"),
            *planted,
        ],
        input=tarball,
        timeout=60,
    )
    attack = Attack(box, host, count, preexisted)
    print(f"planted {count} cookie copies for {interp}")
    # The container sees the planted files at the host's paths, the host does not.
    effectors = sorted(Path(interp.packages[0], "effectors").rglob("*.py"))
    for path in [*effectors[:3], interp.stdlib / "socket.py"]:
        inside = box.run(["head", "-c", str(len(COOKIE)), str(path)]).stdout
        assert inside == COOKIE, (path, inside)
        assert not path.read_bytes().startswith(COOKIE), path
    evil = interp.stdlib / "encodings" / f"{CODEC}.py"
    assert box.run(["test", "-f", str(evil)], check=False).returncode == 0
    assert not evil.exists()
    assert not os.path.lexists(f"/proc/{box.pid}/root/old")
    assert attack.escapes() == []
    return attack


# -- the daemon's processes, from /proc ----------------------------------------------------


def parents() -> dict[int, int]:
    """pid -> ppid of every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        table[int(entry.name)] = int(text.rpartition(")")[2].split()[1])
    return table


def descendants(root: int) -> set[int]:
    """Every process below root: children, grandchildren, ..."""
    table = parents()
    below: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        below.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in below.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def signal_descendants(root: int, signum: int) -> set[int]:
    """Send signum to every descendant of root; the pids it reached. Each pid is pinned
    by a pidfd and checked to still be a descendant before the signal goes."""
    pidfds = {}
    try:
        for pid in descendants(root):
            with contextlib.suppress(ProcessLookupError):
                pidfds[pid] = os.pidfd_open(pid)
        still = descendants(root)
        reached = set()
        for pid, fd in pidfds.items():
            if pid in still:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signum)
                    reached.add(pid)
        return reached
    finally:
        for fd in pidfds.values():
            os.close(fd)


def daemon_pid(daemon: RunningDaemon) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def answers(daemon: RunningDaemon) -> bool:
    try:
        daemon.status()
    except (ControlError, OSError):
        return False
    return True


def daemon_alive(daemon: RunningDaemon) -> bool:
    return daemon.process is not None and daemon.process.poll() is None


class Subreaper:
    """This process as the reaper of orphans below it: the helpers of a daemon we
    SIGKILL are reparented here instead of to the VM's pid 1, which does not reap.
    Adopted orphans are children that were not ours before and are not one of the
    daemon processes we started (``daemons``)."""

    def __init__(self) -> None:
        self.daemons: set[int] = set()
        self.seen: set[int] = set()  # pids seen below a daemon
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._before = self._children()
        if self._libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    @staticmethod
    def _children() -> set[int]:
        return {pid for pid, ppid in parents().items() if ppid == os.getpid()}

    def adopted(self) -> set[int]:
        return self._children() - self._before - self.daemons

    def reap(self) -> None:
        """Reap the exited orphans seen below a daemon (never a subprocess of ours that
        another thread is about to wait for)."""
        for pid in self.adopted() & self.seen:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def close(self, grace: float = 5.0) -> None:
        """Every adopted orphan: reaped once it exits, SIGKILLed after grace."""
        try:
            deadline = time.monotonic() + grace
            while (orphans := self.adopted()) and time.monotonic() < deadline:
                for pid in orphans:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                time.sleep(0.02)
            for pid in self.adopted():
                with contextlib.suppress(ProcessLookupError):
                    fd = os.pidfd_open(pid)
                    try:
                        if parents().get(pid) == os.getpid():
                            signal.pidfd_send_signal(fd, signal.SIGKILL)
                    finally:
                        os.close(fd)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        finally:
            self._libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# -- small probes ----------------------------------------------------------------------------


def node_state(box: Sandbox, path: str) -> str:
    return inside_state(box, [path])[path]


def rule(
    name: str,
    target: str,
    kernel: str,
    path: str,
    symlinks: tuple[str, ...] = (),
    disksize: int | None = None,
) -> str:
    """Block devices named like kernel (and of that disksize: other test sessions on
    this host plug zram devices too, and take a name of ours once it is free)."""
    links = ", ".join(f'"{link}"' for link in symlinks)
    links_line = f"symlinks = [{links}]" if symlinks else ""
    size_line = f'attr.disksize = "{disksize}"' if disksize is not None else ""
    return f"""
[[rule]]
name = "{name}"
target = ["{target}"]
[rule.match]
subsystem = "block"
kernel = "{kernel}"
{size_line}
[rule.device]
path = "{path}"
mode = "0660"
group = 6
{links_line}
uevent = "both"
"""


# -- 1: SIGINT to everything the daemon spawned ----------------------------------------------


def test_sigint_to_the_daemons_processes_runs_nothing_planted(
    stack: ExitStack, userns: IdMap | None
) -> None:
    attack = planted_sandbox(stack, userns, "escape-int")
    box = attack.box
    first = stack.enter_context(ZramDevice())
    rules = {"10-escape.toml": rule("escape", f"pid:{box.pid}", "zram*", "/dev/hr/{kernel}")}
    daemon = stack.enter_context(RunningDaemon(rules, config=CONFIG))
    pid = daemon_pid(daemon)
    node = f"/dev/hr/{first.name}"
    eventually(lambda: node_state(box, node) == "ok", timeout=10)

    # Idle: every process the daemon spawned (its helpers, at any depth) gets SIGINT.
    reached = signal_descendants(pid, signal.SIGINT)
    print(f"SIGINT while idle reached {sorted(reached)}")
    with contextlib.suppress(TimeoutError):
        eventually(lambda: attack.escapes(daemon) or None, timeout=1.5, every=0.05)
    attack.assert_no_escape(daemon, f"after SIGINT to idle helpers {sorted(reached)}")
    assert daemon_alive(daemon)

    # Busy: SIGINT every descendant, over and over, while devices come and go (a
    # short-lived child doing one action gets it too).
    stop = threading.Event()
    hit: set[int] = set()

    def storm() -> None:
        while not stop.is_set():
            hit.update(signal_descendants(pid, signal.SIGINT))
            time.sleep(0.002)

    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    try:
        for _ in range(6):
            with ZramDevice():
                time.sleep(0.15)
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(10)
    time.sleep(0.5)
    print(f"SIGINT while busy reached {sorted(hit)}")
    assert reached | hit, "the daemon never had a process to signal"
    attack.assert_no_escape(daemon, f"after SIGINT to busy processes {sorted(hit)}")
    assert daemon_alive(daemon)

    # Recovery: the first device leaves the container, and the next one reaches it.
    first.remove()

    def first_gone() -> bool:
        if Path("/sys/block", first.name).exists():
            return True  # the name was taken again (maybe by another test session)
        return node_state(box, node) == "absent" and not grant_listed(box, first)

    eventually(first_gone, timeout=10)
    again = stack.enter_context(ZramDevice())
    eventually(lambda: node_state(box, f"/dev/hr/{again.name}") == "ok", timeout=10)
    assert grant_listed(box, again)
    attack.assert_no_escape(daemon, "at the end")
    assert daemon_alive(daemon)


# -- 2: SIGKILL of the daemon while its helpers work ----------------------------------------


class Churn:
    """Plugs and unplugs zram devices in a thread until stopped; keeps what it made."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.present: list[ZramDevice] = []
        self.gone: list[ZramDevice] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    if len(self.present) < 4 or self.rng.random() < 0.4:
                        self.present.append(ZramDevice().add())
                    else:
                        device = self.present.pop(self.rng.randrange(len(self.present)))
                        device.remove()
                        self.gone.append(device)
                time.sleep(self.rng.uniform(0.002, 0.02))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        with contextlib.suppress(BaseException):
            self.stop()
        # Only those still plugged: a gone one's index may have been reused since.
        for device in self.present:
            with contextlib.suppress(OSError):
                device.remove()


def test_daemon_killed_while_helpers_work_runs_nothing_planted(
    stack: ExitStack, userns: IdMap | None
) -> None:
    seed = int(os.environ.get("HOTRELAY_SEED", "0")) or time.time_ns() % 2**32
    print(f"HOTRELAY_SEED={seed}")
    rng = random.Random(seed)
    attack = planted_sandbox(stack, userns, "escape-kill")
    box = attack.box
    reaper = Subreaper()
    stack.callback(reaper.close)
    seen = reaper.seen
    churn = Churn(rng)
    stack.callback(churn.close)
    rules = {
        "10-escape.toml": rule(
            "escape", f"pid:{box.pid}", "zram*", "/dev/hr/{kernel}", ("hr-by-name/{kernel}",)
        )
    }
    daemon = RunningDaemon(rules, config=CONFIG)
    stack.callback(daemon.close)
    churn.start()
    kills = []
    try:
        for round_ in range(6):
            # Restarted on the same state: its reconciliation starts fresh helpers.
            daemon.start(wait=False)
            pid = daemon_pid(daemon)
            reaper.daemons.add(pid)
            start = time.monotonic()

            def spawned(pid: int = pid) -> set[int] | None:
                seen.update(found := descendants(pid))
                return found or None

            with contextlib.suppress(TimeoutError):
                eventually(spawned, timeout=10, every=0.001)
            if round_ % 2 == 0:
                # While a helper starts (the first process it spawned just appeared).
                delay = rng.uniform(0, 0.08)
            else:
                # Up and working through the burst of plugs and unplugs.
                eventually(partial(answers, daemon), timeout=20, every=0.02)
                delay = rng.uniform(0.05, 0.5)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                spawned()
                time.sleep(0.002)
            busy = sorted(descendants(pid))
            seen.update(busy)
            daemon.kill9()
            kills.append(
                f"round {round_}: SIGKILL {(time.monotonic() - start) * 1000:.0f} ms after "
                f"the start, {delay * 1000:.0f} ms after the first spawn; below it: {busy}"
            )
            reaper.reap()
            time.sleep(0.2)  # an orphaned helper's reply meets the closed socket
            reaper.reap()
            attack.assert_no_escape(daemon, "daemon SIGKILLed: " + "; ".join(kills))
        daemon.start()
        reaper.daemons.add(daemon_pid(daemon))
    finally:
        churn.stop()
    print("\n".join(kills))
    # Settle: the restarted daemon must end where the rules say.
    present = [d for d in churn.present if d.present]
    last: dict[str, str] = {}

    def expected() -> dict[str, str]:
        # A gone device's name may be taken again by a later device (ours or another
        # test session's, which the rule relays too): only a free name is judged.
        gone = [d for d in churn.gone if d.name not in {p.name for p in present}]
        gone = [d for d in gone if not Path("/sys/block", d.name).exists()]
        paths = {f"/dev/hr/{d.name}": "ok" for d in present}
        paths |= {f"/dev/hr/{d.name}": "absent" for d in gone}
        paths |= {f"/dev/hr-by-name/{d.name}": "symlink" for d in present}
        paths |= {f"/dev/hr-by-name/{d.name}": "absent" for d in gone}
        return paths

    def settled() -> bool:
        nonlocal last
        paths = expected()
        states = inside_state(box, paths)
        paths = {p: s for p, s in expected().items() if p in states}  # names freed since
        last = {p: s for p, s in states.items() if p in paths and s != paths[p]}
        return not last

    try:
        eventually(settled, timeout=15, every=0.2)
    except TimeoutError:
        pytest.fail(f"not as the rules say after the restarts: {last}")
    listed = devices_list(box)
    for device in present:
        assert grant_listed(box, device), (device, listed)
    for device in churn.gone:
        taken = Path("/sys/dev/block", f"{device.major}:{device.minor}").exists()
        assert taken or not grant_listed(box, device), (device, listed)
    seen.update(descendants(daemon_pid(daemon)))
    attack.assert_no_escape(daemon, f"daemon SIGKILLed {kills}")
    assert daemon_alive(daemon)


# -- 3: replies too big for the socket -------------------------------------------------------

# Directories the daemon makes (seven: rules may go 8 levels below /dev), every one
# of which a removal may quote.
DEEP = "/dev/hr/a/b/c/d/e/f/{kernel}"
DEEP_LINK = "hrl/a/b/c/d/e/f/{kernel}"
# 4095 bytes (PATH_MAX - 1), none valid UTF-8: the longest a quoted target can grow.
LONG_TARGET = os.fsdecode(b"\xff" * 4095)


def test_huge_symlink_targets_in_removal_replies_run_nothing_planted(
    stack: ExitStack, userns: IdMap | None
) -> None:
    attack = planted_sandbox(stack, userns, "escape-big")
    box = attack.box
    # Plugged before the daemon starts, so its coldplug reads the disksize.
    size = (1 << 20) + 4096 * random.randrange(1, 4096)
    zram = stack.enter_context(ZramDevice(disksize=str(size)))
    target = f"pid:{box.pid}"
    rules = {"10-escape.toml": rule("escape", target, "zram*", DEEP, (DEEP_LINK,), size)}
    daemon = stack.enter_context(RunningDaemon(rules, config=CONFIG))
    node = DEEP.format(kernel=zram.name)
    link = "/dev/" + DEEP_LINK.format(kernel=zram.name)
    relayed = {node: "ok", link: "symlink"}
    try:
        eventually(lambda: inside_state(box, relayed) == relayed, timeout=10)
    except TimeoutError:
        failing = daemon.status().get("failing")
        pytest.fail(f"not relayed: {inside_state(box, relayed)}; failing: {failing}")
    assert attack.probe_open(zram) == "ok"  # the probe itself works: the grant lets it open
    # Inside: our node and every directory the daemon made become symlinks with 4095-byte
    # targets, and plenty more such links sit where the daemon walks.
    replace = (
        'umount "$1" 2>/dev/null || true\n'
        "rm -rf /dev/hr /dev/hrl\n"
        # The outermost directories the daemon made: every walk of its paths meets them.
        'ln -s "$2" /dev/hr\n'
        'ln -s "$2" /dev/hrl\n'
        'for i in $(seq 1 64); do ln -s "$2" "/dev/hr-long-$i"; done\n'
    )
    box.run(["/bin/sh", "-c", replace, "replace", node, LONG_TARGET])
    assert node_state(box, "/dev/hr") == "symlink"
    assert os.readlink(f"/proc/{box.pid}/root/dev/hr") == LONG_TARGET
    time.sleep(1.5)  # the heal pass meets the symlinks too
    attack.assert_no_escape(daemon, "after the symlinks were planted")
    zram.remove()
    problems = []

    def revoked() -> bool:
        return not grant_listed(box, zram)

    try:
        eventually(revoked, timeout=10, every=0.1)
    except TimeoutError:
        problems.append(f"devices.list still grants {zram.name}: {devices_list(box)!r}")
    time.sleep(1)  # retries of the removal, if any
    escapes = attack.escapes(daemon)
    if escapes:
        problems.insert(0, "the planted module ran as host root:\n  " + "\n  ".join(escapes))
    if not daemon_alive(daemon):
        problems.append("the daemon died")
    opened = attack.probe_open(zram)
    if "Operation not permitted" not in opened:
        problems.append(f"a node of {zram.major}:{zram.minor} inside: {opened!r}, not EPERM")
    # What the container made stays as it made it.
    if os.readlink(f"/proc/{box.pid}/root/dev/hr") != LONG_TARGET:
        problems.append("the container's /dev/hr changed")
    assert not problems, "\n".join(problems)
