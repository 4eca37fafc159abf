"""Real containers for tests: LXC, Docker, LXD, runc and Podman, each on private state.

Every engine here runs on directories and sockets of its own (a temp lxcpath, a
``dockerd`` with its own data root, exec root and socket, an ``lxd`` with its own
``LXD_DIR``, a private runc root, Podman with its own ``--root``/``--runroot``), so
tests never touch the host's containers and several test sessions can run at once.
Test containers get no network at all: ``lxc.net.0.type = empty``, ``--network none``,
an LXD preseed without networks, ``dockerd --bridge=none``. Nothing here creates a
bridge or an interface with an address.

The VM's pid 1 does not reap orphans, and every runtime here daemonizes (lxc-start's
monitor, runc's container init, conmon, containerd shims). So each command that leaves
processes behind runs under a *reaper*: ``python -m hotrelay.testing.containers reap --
ARGV`` makes itself a child subreaper (PR_SET_CHILD_SUBREAPER), starts ARGV, reports
its pid, reaps whatever gets reparented to it, and exits once nothing is left. When
the test side closes the reaper's stdin (teardown, or the test process died), the
reaper SIGKILLs its remaining children, reaps them and exits. Daemons are stopped by
the pid this harness started, never by name.

Root filesystems are a static busybox (Debian's busybox-static) with applet symlinks,
``sbin/init -> ../bin/busybox``, an inittab that keeps a ``sleep`` running, and an
/etc/passwd and /etc/group with ``root``, ``dialout`` (gid 20) and ``hrgroup`` (1000).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import trio

from hotrelay.core.containers import ContainerEvent
from hotrelay.kernel import libc
from hotrelay.testing.sandbox import helper_argv, helper_env

__all__ = [
    "DIALOUT_GID",
    "BusyboxRootfs",
    "DockerEngine",
    "EngineError",
    "LxcContainer",
    "LxcHost",
    "LxdEngine",
    "PodmanEngine",
    "Reaped",
    "RuncRoot",
    "SessionDirs",
    "SubidEntries",
    "build_busybox_rootfs",
    "next_event_for",
    "unmount_under",
    "wait_for",
]

DIALOUT_GID = 20
HRGROUP_GID = 1000
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "hruser:x:1000:1000:hotrelay test user:/home/hruser:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\ndialout:x:20:hruser\nhrgroup:x:1000:\nnogroup:x:65534:\n"
INITTAB = "::sysinit:/bin/true\n::respawn:/bin/sleep 1000000\n"
SLEEP_FOREVER = ("sleep", "1000000")
PR_SET_CHILD_SUBREAPER = 36
EVENT_WAIT = 30.0


class EngineError(RuntimeError):
    """A test engine or container could not be set up or torn down."""


def wait_for(
    what: str, predicate: object, *, timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Poll ``predicate()`` until true; EngineError naming ``what`` after ``timeout``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise EngineError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command that leaves no process behind; EngineError with its stderr."""
    raw = subprocess.run(
        list(argv),
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        env=None if env is None else {**os.environ, **env},
        timeout=timeout,
        check=False,
    )
    result = subprocess.CompletedProcess(
        raw.args,
        raw.returncode,
        raw.stdout.decode(errors="replace"),
        raw.stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise EngineError(
            f"{' '.join(argv)} exited with {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return result


# -- the reaper ---------------------------------------------------------------------------


class Reaped:
    """ARGV running under a reaper process (see the module docstring).

    ``pid`` is ARGV's own pid (a daemon's pid, to signal it); :meth:`wait_main` waits
    for ARGV itself to exit; :meth:`close` makes the reaper kill whatever is left and
    waits for it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] = "/",
        timeout: float = 30.0,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.returncode: int | None = None
        self._pidfd: int | None = None
        full_env = helper_env()
        if env:
            full_env.update(env)
        with open(log_path, "ab") as log:
            self._reaper = subprocess.Popen(
                helper_argv("hotrelay.testing.containers", "reap", "--", *self.argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=full_env,
                cwd=cwd,
                # A ^C aimed at pytest must not kill engines before their teardown.
                start_new_session=True,
            )
        self._buffer = b""
        try:
            kind, value = self._read_message(timeout)
            if kind != "pid":
                raise EngineError(f"reaper for {self.argv[0]} said {kind} {value}")
            self.pid = value
            with contextlib.suppress(ProcessLookupError):
                self._pidfd = os.pidfd_open(self.pid)
        except BaseException:
            self.close()
            raise

    def _read_message(self, timeout: float) -> tuple[str, int]:
        assert self._reaper.stdout is not None
        fd = self._reaper.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise EngineError(f"{self.argv[0]}: no word from its reaper in {timeout} s")
            chunk = os.read(fd, 256)
            if not chunk:
                raise EngineError(f"{self.argv[0]}: reaper exited early; see {self.log_path}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        kind, _, value = line.decode().partition(" ")
        return kind, int(value)

    def wait_main(self, timeout: float = 60.0) -> int:
        """ARGV's exit status (as a shell shows it: 128+N for signal N)."""
        if self.returncode is None:
            kind, value = self._read_message(timeout)
            if kind != "exit":
                raise EngineError(f"reaper for {self.argv[0]} said {kind} {value}")
            self.returncode = value
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        return self.returncode

    def check(self, timeout: float = 60.0) -> None:
        """ARGV must exit 0 (a command that daemonizes, like ``lxc-start -d``)."""
        status = self.wait_main(timeout)
        if status != 0:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise EngineError(f"{' '.join(self.argv)} exited with {status}: {tail}")

    def alive(self) -> bool:
        if self._pidfd is None:
            return False
        return not select.select([self._pidfd], [], [], 0)[0]

    def send_signal(self, signum: int) -> None:
        """Signal ARGV through its pidfd, so a recycled pid is never hit."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def stop(self, *, signum: int = signal.SIGTERM, grace: float = 30.0) -> None:
        """Signal ARGV and wait for it; SIGKILL after ``grace`` seconds."""
        if self.returncode is not None:
            return
        self.send_signal(signum)
        try:
            self.wait_main(grace)
        except EngineError:
            self.send_signal(signal.SIGKILL)
            self.wait_main(10.0)

    def close(self, timeout: float = 30.0) -> None:
        """Let the reaper kill and reap what is left, then reap the reaper."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._reaper.stdin is not None and not self._reaper.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self._reaper.stdin.close()
        try:
            self._reaper.wait(timeout)
        except subprocess.TimeoutExpired:
            self._reaper.kill()
            self._reaper.wait()
        if self._reaper.stdout is not None:
            self._reaper.stdout.close()

    def __enter__(self) -> Reaped:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found += [int(p) for p in text.split()]
    return found


def _exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _reaper_main(argv: Sequence[str]) -> int:
    """The reaper process (see the module docstring). Messages go to stdout."""
    libc_handle = ctypes.CDLL(None, use_errno=True)
    if libc_handle.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper: PR_SET_CHILD_SUBREAPER: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    # SIGCHLD wakes the select() below through this pipe.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    report = os.dup(1)
    os.set_inheritable(report, False)
    # The command's output goes to our stderr (the log), never into the message pipe.
    os.dup2(2, 1)
    main = os.fork()
    if main == 0:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.execvp(argv[0], list(argv))
        except OSError as exc:
            print(f"reaper: cannot run {argv[0]}: {exc}", file=sys.stderr)
        os._exit(127)
    os.write(report, f"pid {main}\n".encode())
    control_open = True
    main_done = False
    while True:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                if main_done:
                    return 0  # nothing left to reap
                pid = 0
            if pid == 0:
                break
            if pid == main and not main_done:
                main_done = True
                with contextlib.suppress(OSError):
                    os.write(report, f"exit {_exit_status(status)}\n".encode())
        if not control_open:
            # Teardown (or the test process is gone): kill what is left.
            for child in _children(os.getpid()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        watched = [wake_r, 0] if control_open else [wake_r]
        readable, _, _ = select.select(watched, [], [], 1.0)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        if 0 in readable and not os.read(0, 4096):
            control_open = False


# -- files and mounts -------------------------------------------------------------------


def unmount_under(*roots: Path) -> list[str]:
    """Lazily unmount every mount at or below ``roots`` (deepest first); returns them."""
    prefixes = [str(r.resolve()).rstrip("/") for r in roots]
    targets = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if any(mount_point == p or mount_point.startswith(p + "/") for p in prefixes):
                targets.append(mount_point)
    for target in sorted(set(targets), key=lambda t: -t.count("/")):
        with contextlib.suppress(OSError):
            libc.umount2(target, libc.MNT_DETACH)
    return targets


def remove_tree(path: Path) -> None:
    """rm -rf after unmounting whatever is mounted below."""
    if not path.exists():
        return
    unmount_under(path)
    for _ in range(3):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            unmount_under(path)
            time.sleep(0.2)
    shutil.rmtree(path, ignore_errors=True)


class SessionDirs:
    """A private directory tree for one test session: ``base`` under /tmp (0755, so
    unprivileged containers can traverse it) and ``run`` under /run with short paths
    for sockets (a unix socket path must fit in 108 bytes)."""

    def __init__(self) -> None:
        self.token = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.base = Path(tempfile.mkdtemp(prefix=f"hotrelay-rt-{self.token}-", dir="/tmp"))
        self.base.chmod(0o755)
        self.run = Path(tempfile.mkdtemp(prefix=f"hr{self.token}", dir="/run"))
        self.run.chmod(0o755)

    def name(self, prefix: str) -> str:
        """A container name unique to this session (and short: LXC limits paths)."""
        return f"{prefix}{self.token}{secrets.token_hex(2)}"

    def close(self) -> None:
        remove_tree(self.base)
        remove_tree(self.run)


# -- root filesystems ---------------------------------------------------------------------


def find_busybox() -> Path:
    """The static busybox (busybox-static); the dynamic one would need a libc inside."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and b"ld-linux" not in path.read_bytes()[:4096]:
            return path
    raise EngineError("no static busybox: install busybox-static")


def build_busybox_rootfs(dest: Path, *, shift: int = 0) -> Path:
    """A bootable busybox tree at ``dest``; ``shift`` chowns it for a user namespace."""
    busybox = find_busybox()
    for directory in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var"):
        (dest / directory).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    applets = run([str(busybox), "--list"]).stdout.split()
    for applet in applets:
        link = dest / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (dest / "sbin" / "init").symlink_to("../bin/busybox")
    (dest / "etc" / "passwd").write_text(PASSWD)
    (dest / "etc" / "group").write_text(GROUP)
    (dest / "etc" / "inittab").write_text(INITTAB)
    (dest / "etc" / "hostname").write_text("busybox\n")
    if shift:
        shift_ownership(dest, shift)
    return dest


def shift_ownership(root: Path, shift: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            os.chown(path, st.st_uid + shift, st.st_gid + shift, follow_symlinks=False)
    st = os.lstat(root)
    os.chown(root, st.st_uid + shift, st.st_gid + shift)


class BusyboxRootfs:
    """One pristine busybox tree per session, copied for each container."""

    def __init__(self, base: Path) -> None:
        self.path = build_busybox_rootfs(base / "busybox-rootfs")

    def copy_to(self, dest: Path, *, shift: int = 0) -> Path:
        shutil.copytree(self.path, dest, symlinks=True)
        if shift:
            shift_ownership(dest, shift)
        return dest

    def tar_bytes(self, *, prefix: str = ".") -> bytes:
        """The tree as an uncompressed tar, entries under ``prefix``."""
        path = self.path.parent / f"busybox-{prefix.strip('./') or 'root'}.tar"
        with tarfile.open(path, "w") as tar:
            tar.add(self.path, arcname=prefix)
        return path.read_bytes()


# -- LXC ----------------------------------------------------------------------------------

SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


class SubidEntries:
    """``root:START:COUNT`` in /etc/subuid and /etc/subgid for the session, removed after.

    Only lines this object added are removed, so entries the host (or a concurrent
    session) had are left alone.
    """

    def __init__(self, start: int = 100000, count: int = 65536) -> None:
        self.line = f"root:{start}:{count}"
        self._added: list[Path] = []
        for path in SUBID_FILES:
            lines = path.read_text().splitlines() if path.exists() else []
            if self.line not in lines:
                with open(path, "a") as f:
                    prefix = "" if not lines or path.read_text().endswith("\n") else "\n"
                    f.write(f"{prefix}{self.line}\n")
                self._added.append(path)

    def close(self) -> None:
        for path in self._added:
            lines = path.read_text().splitlines(keepends=True)
            with contextlib.suppress(ValueError):
                lines.remove(f"{self.line}\n")
            path.write_text("".join(lines))
        self._added.clear()


LXC_CONFIG = """\
lxc.uts.name = {name}
lxc.rootfs.path = dir:{rootfs}
lxc.net.0.type = empty
lxc.apparmor.profile = unconfined
lxc.init.cmd = /sbin/init
lxc.mount.auto = proc:mixed sys:ro cgroup:mixed
lxc.autodev = 1
lxc.tty.max = 0
lxc.pty.max = 4
"""


class LxcContainer:
    def __init__(self, host: LxcHost, name: str, *, unprivileged: bool) -> None:
        self.host = host
        self.name = name
        self.unprivileged = unprivileged
        self.path = host.lxcpath / name
        self._starts: list[Reaped] = []

    def _tool(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([tool, "-P", str(self.host.lxcpath), "-n", self.name, *args], check=check)

    def start(self) -> None:
        reaped = Reaped(
            ["lxc-start", "-P", str(self.host.lxcpath), "-n", self.name, "-d",
             "-o", str(self.path / "lxc.log"), "-l", "INFO"],
            log_path=self.host.log_path,
        )  # fmt: skip
        self._starts.append(reaped)
        reaped.check()
        self._tool("lxc-wait", "-s", "RUNNING", "-t", "30")
        wait_for(f"lxc {self.name} init pid", lambda: self.pid() is not None, timeout=10)

    def info(self) -> dict[str, str]:
        result = self._tool("lxc-info", "-s", "-p", "-H", check=False)
        return {
            key.strip(): value.strip()
            for key, _, value in (line.partition(":") for line in result.stdout.splitlines())
        }

    def state(self) -> str:
        return self.info().get("State", "")

    def pid(self) -> int | None:
        """The init pid lxc-info reports (None when stopped)."""
        pid = self.info().get("PID", "")
        return int(pid) if pid.isdigit() else None

    def stop(self) -> None:
        self._tool("lxc-stop", "-k")
        self._tool("lxc-wait", "-s", "STOPPED", "-t", "30")
        self._reap_starts()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _reap_starts(self) -> None:
        for reaped in self._starts:
            reaped.close()
        self._starts.clear()

    def destroy(self) -> None:
        with contextlib.suppress(EngineError):
            if self.state() not in ("STOPPED", ""):
                self.stop()
        self._reap_starts()
        remove_tree(self.path)


class LxcHost:
    """A private lxcpath with busybox containers, privileged or not (idmap 0 100000 65536)."""

    ID_SHIFT = 100000
    ID_COUNT = 65536

    def __init__(self, dirs: SessionDirs, rootfs: BusyboxRootfs) -> None:
        for tool in ("lxc-start", "lxc-info", "lxc-ls", "lxc-stop", "lxc-wait"):
            if shutil.which(tool) is None:
                raise EngineError(f"{tool} is not installed (apt install lxc)")
        self.dirs = dirs
        self.rootfs = rootfs
        self.lxcpath = dirs.base / "lxc"
        self.lxcpath.mkdir()
        self.lxcpath.chmod(0o755)
        self.log_path = dirs.base / "lxc-reaper.log"
        self.containers: list[LxcContainer] = []
        self._subids: SubidEntries | None = None

    def create(self, name: str, *, unprivileged: bool = False) -> LxcContainer:
        container = LxcContainer(self, name, unprivileged=unprivileged)
        self.containers.append(container)
        container.path.mkdir()
        container.path.chmod(0o755)
        rootfs = container.path / "rootfs"
        config = LXC_CONFIG.format(name=name, rootfs=rootfs)
        if unprivileged:
            if self._subids is None:
                self._subids = SubidEntries(self.ID_SHIFT, self.ID_COUNT)
            config += (
                f"lxc.idmap = u 0 {self.ID_SHIFT} {self.ID_COUNT}\n"
                f"lxc.idmap = g 0 {self.ID_SHIFT} {self.ID_COUNT}\n"
            )
        self.rootfs.copy_to(rootfs, shift=self.ID_SHIFT if unprivileged else 0)
        (container.path / "config").write_text(config)
        return container

    def close(self) -> None:
        errors = []
        for container in reversed(self.containers):
            try:
                container.destroy()
            except Exception as exc:
                errors.append(exc)
        self.containers.clear()
        if self._subids is not None:
            self._subids.close()
            self._subids = None
        remove_tree(self.lxcpath)
        if errors:
            raise ExceptionGroup("LXC teardown failed", errors)


# -- Docker -------------------------------------------------------------------------------


class DockerEngine:
    """A private ``dockerd``: own socket, data root, exec root and pidfile; no bridge."""

    IMAGE = "hotrelay-busybox:local"

    def __init__(self, dirs: SessionDirs, rootfs: BusyboxRootfs) -> None:
        if shutil.which("dockerd") is None or shutil.which("docker") is None:
            raise EngineError("dockerd/docker are not installed (apt install docker.io)")
        self.data_root = dirs.base / "docker"
        self.exec_root = dirs.run / "d"
        self.socket = dirs.run / "docker.sock"
        self.pidfile = dirs.run / "docker.pid"
        self.log_path = dirs.base / "dockerd.log"
        self.daemon: Reaped | None = None
        self.daemon = Reaped(
            ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--storage-driver=overlay2", "--data-root", str(self.data_root),
             "--exec-root", str(self.exec_root), "-H", f"unix://{self.socket}",
             "--pidfile", str(self.pidfile)],
            log_path=self.log_path,
        )  # fmt: skip
        try:
            wait_for("dockerd to answer", lambda: self.cli("version", check=False).returncode == 0)
            self.cli("import", "-", self.IMAGE, input=rootfs.tar_bytes())
        except BaseException:
            self.close()
            raise

    def cli(
        self, *args: str, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(["docker", "-H", f"unix://{self.socket}", *args], check=check, input=input)

    def run_container(self, name: str, *command: str) -> str:
        """``docker run -d --network none``; returns the container id."""
        argv = command or SLEEP_FOREVER
        return self.cli(
            "run", "-d", "--network", "none", "--name", name, self.IMAGE, *argv
        ).stdout.strip()

    def inspect(self, name: str) -> dict[str, object]:
        data = json.loads(self.cli("inspect", "--type", "container", name).stdout)
        assert isinstance(data, list)
        return dict(data[0])

    def pid(self, name: str) -> int:
        return int(self.cli("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())

    def close(self) -> None:
        errors: list[Exception] = []
        if self.daemon is not None:
            try:
                if self.daemon.alive():
                    ids = self.cli("ps", "-aq", check=False).stdout.split()
                    if ids:
                        self.cli("rm", "-f", *ids, check=False)
            except Exception as exc:
                errors.append(exc)
            self.daemon.stop(grace=30)
            self.daemon.close()
            self.daemon = None
        # dockerd leaves the default netns bind mount under its exec root.
        remove_tree(self.exec_root)
        remove_tree(self.data_root)
        if errors:
            raise ExceptionGroup("Docker teardown failed", errors)


# -- LXD ----------------------------------------------------------------------------------

LXD_PRESEED = """\
config: {}
networks: []
storage_pools:
- name: default
  driver: dir
  config: {}
profiles:
- name: default
  devices:
    root:
      path: /
      pool: default
      type: disk
"""


class LxdEngine:
    """A private ``lxd`` (its own LXD_DIR), a dir pool, NO network, a local busybox image."""

    IMAGE = "hotrelay-busybox"

    def __init__(self, dirs: SessionDirs, rootfs: BusyboxRootfs) -> None:
        if shutil.which("lxd") is None or shutil.which("lxc") is None:
            raise EngineError("lxd is not installed (apt install lxd)")
        self.lxd_dir = dirs.base / "lxd"
        self.lxd_dir.mkdir()
        self.lxd_dir.chmod(0o755)
        self.socket = self.lxd_dir / "unix.socket"
        self.log_path = dirs.base / "lxd.log"
        self.env = {"LXD_DIR": str(self.lxd_dir)}
        self.instances: list[str] = []
        self.daemon: Reaped | None = Reaped(
            ["/bin/sh", "-c",
             # Raising the hard limit needs CAP_SYS_RESOURCE, which root lacks here.
             "ulimit -n 65536 2>/dev/null || ulimit -n $(ulimit -Hn); "
             f"exec lxd --group lxd --logfile={self.log_path}"],
            log_path=dirs.base / "lxd-reaper.log",
            env=self.env,
        )  # fmt: skip
        try:
            self.cli_lxd("waitready", "--timeout", "60")
            run(["lxd", "init", "--preseed"], env=self.env, input=LXD_PRESEED.encode())
            self.cli(
                "image",
                "import",
                str(self._image_tarball(dirs.base, rootfs)),
                "--alias",
                self.IMAGE,
            )
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _image_tarball(base: Path, rootfs: BusyboxRootfs) -> Path:
        metadata = (
            "architecture: x86_64\n"
            f"creation_date: {int(time.time())}\n"
            "properties:\n  description: hotrelay busybox\n  os: busybox\n  release: local\n"
        )
        tarball = base / "lxd-image.tar.gz"
        staging = base / "lxd-image"
        staging.mkdir()
        (staging / "metadata.yaml").write_text(metadata)
        with tarfile.open(tarball, "w:gz", compresslevel=1) as tar:
            tar.add(staging / "metadata.yaml", arcname="metadata.yaml")
            tar.add(rootfs.path, arcname="rootfs")
        shutil.rmtree(staging)
        return tarball

    def cli_lxd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["lxd", *args], env=self.env, check=check)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["lxc", *args], env=self.env, check=check)

    def launch(self, name: str, *, privileged: bool = False) -> None:
        self.instances.append(name)
        args = ["launch", self.IMAGE, name]
        if privileged:
            args += ["-c", "security.privileged=true"]
        self.cli(*args)

    def state(self, name: str) -> dict[str, object]:
        data = json.loads(self.cli("query", f"/1.0/instances/{name}/state").stdout)
        assert isinstance(data, dict)
        return data

    def pid(self, name: str) -> int:
        pid = self.state(name)["pid"]
        assert isinstance(pid, int)
        return pid

    def close(self) -> None:
        errors: list[Exception] = []
        if self.daemon is not None:
            if self.daemon.alive():
                for name in self.instances:
                    with contextlib.suppress(EngineError):
                        self.cli("delete", "--force", name)
                with contextlib.suppress(EngineError):
                    self.cli("image", "delete", self.IMAGE)
                try:
                    self.cli_lxd("shutdown", "--timeout", "30")
                except Exception as exc:
                    errors.append(exc)
            self.daemon.stop(grace=30)
            self.daemon.close()
            self.daemon = None
        remove_tree(self.lxd_dir)
        if errors:
            raise ExceptionGroup("LXD teardown failed", errors)


# -- runc ---------------------------------------------------------------------------------


class RuncRoot:
    """runc containers from busybox OCI bundles (``runc spec``), under a private root."""

    def __init__(self, dirs: SessionDirs, rootfs: BusyboxRootfs) -> None:
        if shutil.which("runc") is None:
            raise EngineError("runc is not installed (apt install runc)")
        self.root = dirs.run / "runc"
        self.bundles = dirs.base / "runc-bundles"
        self.bundles.mkdir()
        self.rootfs = rootfs
        self.log_path = dirs.base / "runc.log"
        self._runs: dict[str, Reaped] = {}

    def runc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["runc", "--root", str(self.root), *args], check=check)

    def run_container(self, container_id: str, *command: str) -> None:
        bundle = self.bundles / container_id
        bundle.mkdir()
        self.rootfs.copy_to(bundle / "rootfs")
        run(["runc", "spec", "--bundle", str(bundle)])
        config_path = bundle / "config.json"
        config = json.loads(config_path.read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = list(command or SLEEP_FOREVER)
        config["hostname"] = container_id[:63]
        config_path.write_text(json.dumps(config, indent=1))
        reaped = Reaped(
            ["runc", "--root", str(self.root), "run", "-d", "--bundle", str(bundle), container_id],
            log_path=self.log_path,
        )
        self._runs[container_id] = reaped
        reaped.check()

    def state(self, container_id: str) -> dict[str, object]:
        data = json.loads(self.runc("state", container_id).stdout)
        assert isinstance(data, dict)
        return data

    def delete(self, container_id: str) -> None:
        self.runc("delete", "--force", container_id, check=False)
        reaped = self._runs.pop(container_id, None)
        if reaped is not None:
            reaped.close()
        remove_tree(self.bundles / container_id)

    def close(self) -> None:
        for container_id in list(self._runs):
            self.delete(container_id)
        remove_tree(self.root)
        remove_tree(self.bundles)


# -- Podman -------------------------------------------------------------------------------


class PodmanEngine:
    """Podman on private storage (``--root``/``--runroot``/``--tmpdir``), runc, cgroupfs,
    the file events backend, ``--network none`` and rlimits root can actually set here."""

    def __init__(self, dirs: SessionDirs, rootfs: BusyboxRootfs) -> None:
        if shutil.which("podman") is None:
            raise EngineError("podman is not installed (apt install podman)")
        self.dirs = dirs
        self.rootfs = rootfs
        self.storage = dirs.base / "podman"
        self.run_root = dirs.run / "pm"
        self.tmp_dir = dirs.run / "pmtmp"
        self.rootfs_dir = dirs.base / "podman-rootfs"
        self.rootfs_dir.mkdir()
        self.socket = dirs.run / "podman.sock"
        self.log_path = dirs.base / "podman.log"
        self.global_args = (
            "--root", str(self.storage), "--runroot", str(self.run_root),
            "--tmpdir", str(self.tmp_dir), "--runtime", "runc",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file",
        )  # fmt: skip
        self._reaped: list[Reaped] = []
        self.service: Reaped | None = None

    @property
    def argv(self) -> tuple[str, ...]:
        return ("podman", *self.global_args)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*self.argv, *args], check=check)

    def _reaped_cli(self, *args: str) -> None:
        """A podman command that starts containers: conmon daemonizes under a reaper."""
        reaped = Reaped([*self.argv, *args], log_path=self.log_path)
        self._reaped.append(reaped)
        reaped.check()

    def run_container(self, name: str, *command: str) -> str:
        rootfs = self.rootfs.copy_to(self.rootfs_dir / name)
        self._reaped_cli(
            "run", "-d", "--name", name, "--network", "none",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
            "--rootfs", str(rootfs), *(command or SLEEP_FOREVER),
        )  # fmt: skip
        return self.cli("inspect", "--format", "{{.Id}}", name).stdout.strip()

    def start(self, name: str) -> None:
        self._reaped_cli("start", name)

    def restart(self, name: str) -> None:
        self._reaped_cli("restart", "-t", "0", name)

    def stop(self, name: str) -> None:
        self.cli("stop", "-t", "0", name)

    def pid(self, name: str) -> int:
        return int(self.cli("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())

    def start_service(self) -> Path:
        """``podman system service`` on a private socket (the API mode of the adapter)."""
        if self.service is None:
            self.service = Reaped(
                [*self.argv, "system", "service", "--time=0", f"unix://{self.socket}"],
                log_path=self.log_path,
            )
            wait_for("the podman API socket", self.socket.exists, timeout=30)
        return self.socket

    def close(self) -> None:
        self.cli("rm", "--all", "--force", "--time", "0", check=False)
        if self.service is not None:
            self.service.stop(grace=10)
            self.service.close()
            self.service = None
        for reaped in self._reaped:
            reaped.close()
        self._reaped.clear()
        for path in (self.storage, self.run_root, self.tmp_dir, self.rootfs_dir):
            remove_tree(path)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hotrelay.testing.containers")
    sub = parser.add_subparsers(dest="verb", required=True)
    reap = sub.add_parser("reap", help="run ARGV as a child subreaper")
    reap.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        parser.error("reap needs a command")
    return _reaper_main(command)


@contextlib.contextmanager
def session_dirs() -> Iterator[SessionDirs]:
    dirs = SessionDirs()
    try:
        yield dirs
    finally:
        dirs.close()


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


async def next_event_for(
    receive: trio.MemoryReceiveChannel[ContainerEvent],
    name: str,
) -> ContainerEvent:
    """The next watcher event about container ``name`` (others are skipped).

    Waits up to EVENT_WAIT seconds (then trio.TooSlowError): real runtimes on a busy
    2-CPU machine can take a while.
    """
    with trio.fail_after(EVENT_WAIT):
        while True:
            event = await receive.receive()
            if event.container.name == name:
                return event
