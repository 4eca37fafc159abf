"""A throwaway "sandbox container" built from raw namespaces and cgroups.

A sandbox is a process that is pid 1 of its own pid namespace, with its own mount,
network, UTS and IPC namespaces (optionally all owned by a new user namespace, as in
an unprivileged container), a fresh tmpfs on /dev, a fresh /proc, and its own v1
devices cgroup and cgroup2 directory. That is the part of a container hotrelay
cares about, without a runtime, an image or a root filesystem.

The test process never forks (it may run trio or threads): it starts
``python -m hotrelay.testing.sandbox``, an intermediate process that unshares and
forks pid 1, and talks to it over two pipes:

    intermediate -> test   "userns"         unshared the user namespace, map me
    test -> intermediate   "mapped"         uid_map/gid_map written
    intermediate -> test   "ready <pid>"    pid 1 is set up; <pid> is its host pid
    intermediate -> test   "error <text>"   setup failed
    test -> intermediate   EOF              tear down: kill and reap pid 1, exit

The intermediate keeps pid 1 unreaped until the test side lets go, so the host pid
the test holds can never be recycled while the sandbox object exists; and if the
test process dies, the EOF still takes the sandbox down.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import itertools
import os
import re
import secrets
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, NoReturn

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.containers import IdMap as CoreIdMap
from hotrelay.core.device_access import DeviceRule
from hotrelay.kernel import libc

DeviceMode = Literal["allow-all", "default-deny"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEVICES_PARENT = CGROUP_ROOT / "devices" / "hotrelay-test"
UNIFIED_PARENT = CGROUP_ROOT / "unified" / "hotrelay-test"

# What runc writes for an OCI spec without device rules: mknod anything, use only
# the harmless character devices and ptys.
OCI_DEFAULT_ALLOW = (
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
)

# The same as a runtime's rule list, default-deny first: what runc turns into its v2
# device program, for tests and benchmarks that attach one of their own.
OCI_DEFAULT_RULES = (
    DeviceRule.parse("a", allow=False),
    *(DeviceRule.parse(line) for line in OCI_DEFAULT_ALLOW),
)

# (name, major, minor): all inside OCI_DEFAULT_ALLOW, so default-deny leaves them usable.
DEV_NODES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
DEV_SYMLINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)

# /dev is built on a tmpfs mounted here and then moved onto /dev: while it is being
# filled, the host's /dev must stay visible so its nodes can be bind-mounted in.
# The mount namespace is private by then, so the host's /tmp is never touched.
DEV_STAGING = "/tmp"

_counter = itertools.count()


class SandboxError(RuntimeError):
    """The sandbox could not be set up or torn down."""


class SandboxCommandError(subprocess.CalledProcessError):
    """A command run inside a sandbox failed; the message carries its stderr."""

    def __str__(self) -> str:
        stderr = self.stderr.decode(errors="replace").strip() if self.stderr else ""
        return f"{super().__str__()} stderr: {stderr!r}"


@dataclasses.dataclass(frozen=True)
class IdMap:
    """One uid_map/gid_map line: ids inside..inside+count map to outside..outside+count."""

    inside: int
    outside: int
    count: int

    def line(self) -> str:
        return f"{self.inside} {self.outside} {self.count}\n"

    def to_outside(self, inside_id: int) -> int:
        if not self.inside <= inside_id < self.inside + self.count:
            raise ValueError(f"id {inside_id} is not mapped by {self}")
        return self.outside + inside_id - self.inside


def helper_env() -> dict[str, str]:
    """Environment for our own ``python -m hotrelay...`` helper processes.

    Helpers run with cwd "/", so make the package importable even without an
    installed distribution.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = package_root if not existing else f"{package_root}:{existing}"
    return env


def helper_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Sandbox:
    """A running sandbox; build one with :meth:`create` or :func:`open_sandbox`."""

    def __init__(
        self,
        *,
        name: str,
        userns: IdMap | None,
        devices: DeviceMode,
    ) -> None:
        self.name = name
        self.userns = userns
        self.devices = devices
        self.devices_cgroup = DEVICES_PARENT / name
        self.unified_cgroup = UNIFIED_PARENT / name
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._helper: subprocess.Popen[bytes] | None = None
        self._control_fd: int | None = None
        self._adopted: list[subprocess.Popen[bytes]] = []

    @classmethod
    def create(
        cls,
        *,
        userns: IdMap | None = None,
        devices: DeviceMode = "default-deny",
        name_prefix: str = "sbx",
        timeout: float = 10.0,
    ) -> Sandbox:
        if devices not in ("allow-all", "default-deny"):
            raise ValueError(f"devices must be 'allow-all' or 'default-deny', not {devices!r}")
        sandbox = cls(name=_unique_name(name_prefix), userns=userns, devices=devices)
        try:
            _make_cgroup(sandbox.devices_cgroup)
            _make_cgroup(sandbox.unified_cgroup)
            if devices == "default-deny":
                _write(sandbox.devices_cgroup / "devices.deny", "a")
                for rule in OCI_DEFAULT_ALLOW:
                    _write(sandbox.devices_cgroup / "devices.allow", rule)
            sandbox._start(timeout)
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    # -- what the sandbox is ------------------------------------------------------

    @property
    def pid(self) -> int:
        """Host pid of the sandbox's pid 1."""
        if self._pid is None:
            raise SandboxError(f"sandbox {self.name} is not running")
        return self._pid

    @property
    def cgroups(self) -> tuple[Path, Path]:
        return (self.devices_cgroup, self.unified_cgroup)

    @property
    def root(self) -> Path:
        return Path(f"/proc/{self.pid}/root")

    def ns_path(self, kind: str) -> Path:
        return Path(f"/proc/{self.pid}/ns/{kind}")

    def ref(self) -> ContainerRef:
        """The sandbox as the relay sees a container: a ``pid:`` target.

        Read from /proc, the way a runtime adapter fills a ContainerRef, so effectors
        can be tested on a sandbox exactly as they run on a real container.
        """
        proc = Path(f"/proc/{self.pid}")
        namespaces = {
            kind: os.stat(proc / "ns" / kind).st_ino
            for kind in ("mnt", "net", "pid", "user", "uts", "ipc", "cgroup")
        }
        # Field 22 (starttime) follows the parenthesised comm, which may hold spaces.
        start_time = int((proc / "stat").read_text().rpartition(")")[2].split()[19])
        base = OCI_DEFAULT_RULES if self.devices == "default-deny" else ()
        return ContainerRef(
            runtime=Runtime.PID,
            name=str(self.pid),
            pid=self.pid,
            id=self.name,
            start_time=start_time,
            devices_cgroup="/" + str(self.devices_cgroup.relative_to(CGROUP_ROOT / "devices")),
            unified_cgroup="/" + str(self.unified_cgroup.relative_to(CGROUP_ROOT / "unified")),
            namespaces=namespaces,
            uid_map=CoreIdMap.parse((proc / "uid_map").read_text()),
            gid_map=CoreIdMap.parse((proc / "gid_map").read_text()),
            host_network=False,
            privileged=self.userns is None,
            base_device_rules=base,
        )

    def is_running(self) -> bool:
        if self._pidfd is None:
            return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return not readable

    # -- doing things inside ------------------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv wrapped so it runs in all the sandbox's namespaces and cgroups.

        The device cgroup check applies to the process calling open()/mknod(),
        so the command joins the sandbox cgroups first; nsenter -U then makes it
        uid/gid 0 of the user namespace.
        """
        join = " && ".join(
            f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))}" for cg in self.cgroups
        )
        flags = "-m -p -n -u -i" + (" -U" if self.userns is not None else "")
        script = f'{join} && exec nsenter -t {self.pid} {flags} -- "$@"'
        return ["/bin/sh", "-c", script, f"sandbox-{self.name}", *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            self.command(argv),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise SandboxCommandError(result.returncode, list(argv), result.stdout, result.stderr)
        return result

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """Start argv inside in the background; close() kills it if still running."""
        proc = subprocess.Popen(self.command(argv), stdin=stdin, stdout=stdout, stderr=stderr)
        self.adopt(proc)
        return proc

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """Make close() kill and reap proc, a helper acting inside this sandbox."""
        self._adopted.append(proc)

    # -- lifecycle ----------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        status_r, status_w = os.pipe()
        control_r, control_w = os.pipe()
        self._control_fd = control_w
        argv = helper_argv(
            "hotrelay.testing.sandbox",
            f"--status-fd={status_w}",
            f"--control-fd={control_r}",
            f"--hostname={self.name[:63]}",
            *(f"--cgroup={cg}" for cg in self.cgroups),
            *(["--userns"] if self.userns is not None else []),
        )
        try:
            self._helper = subprocess.Popen(
                argv,
                pass_fds=(status_w, control_r),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
                env=helper_env(),
                # A ^C aimed at pytest must not kill sandboxes before their teardown.
                start_new_session=True,
            )
        finally:
            os.close(status_w)
            os.close(control_r)
        deadline = time.monotonic() + timeout
        with open(status_r, "rb", buffering=0) as status:
            while True:
                line = _read_line(status, deadline, self._helper)
                kind, _, rest = line.partition(" ")
                if kind == "userns" and self.userns is not None:
                    # Only a process privileged over the parent namespace may map
                    # ids other than its own, so the test side writes the maps.
                    for map_file in ("uid_map", "gid_map"):
                        _write(Path(f"/proc/{self._helper.pid}/{map_file}"), self.userns.line())
                    os.write(control_w, b"mapped\n")
                elif kind == "ready":
                    self._pid = int(rest)
                    break
                else:
                    raise SandboxError(f"sandbox {self.name} setup failed: {line}")
        # pid 1 stays unreaped until we close the control pipe, so this pid is ours.
        self._pidfd = os.pidfd_open(self._pid)

    def close(self) -> None:
        """Tear everything down; safe to call more than once and after failures."""
        if self._pidfd is not None:
            # pid 1 of a pid namespace ignores SIGTERM; SIGKILL takes the whole namespace.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = None
        if self._control_fd is not None:
            os.close(self._control_fd)
            self._control_fd = None
        if self._helper is not None:
            _stop(self._helper, grace=10.0)
        for proc in self._adopted:
            _stop(proc, grace=0.0)
        self._adopted.clear()
        self._pid = None
        for cgroup in self.cgroups:
            _remove_cgroup_tree(cgroup)
        for parent in (DEVICES_PARENT, UNIFIED_PARENT):
            # Another sandbox (maybe in another process) may still be using it.
            with contextlib.suppress(OSError):
                parent.rmdir()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Sandbox {self.name} pid={self._pid} userns={self.userns} {self.devices}>"


@contextlib.contextmanager
def open_sandbox(
    *,
    userns: IdMap | None = None,
    devices: DeviceMode = "default-deny",
    name_prefix: str = "sbx",
) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(userns=userns, devices=devices, name_prefix=name_prefix)
    try:
        yield sandbox
    finally:
        sandbox.close()


def remove_cgroup_tree(path: Path, *, timeout: float = 5.0) -> None:
    """Remove a cgroup this harness created, with every cgroup below it."""
    _remove_cgroup_tree(path, timeout=timeout)


# -- test-side helpers --------------------------------------------------------------


def _unique_name(prefix: str) -> str:
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "-", prefix)[:40] or "sbx"
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(2)}"


def _write(path: Path, text: str) -> None:
    """One write(2) call: cgroup and procfs control files take one record per write."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _make_cgroup(path: Path) -> None:
    # A concurrent close() elsewhere may remove the shared parent between our two mkdirs.
    for _ in range(50):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileNotFoundError:
            continue
        return
    raise SandboxError(f"could not create cgroup {path}")


def _read_line(status: IO[bytes], deadline: float, helper: subprocess.Popen[bytes]) -> str:
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([status], [], [], remaining)[0]:
            raise SandboxError("sandbox setup timed out")
        chunk = status.read(1)
        if not chunk:
            raise SandboxError(f"sandbox helper exited with status {helper.wait()} during setup")
        line += chunk
    return line.decode().rstrip("\n")


def _stop(proc: subprocess.Popen[bytes], *, grace: float) -> None:
    """Reap proc (our own child), killing it if it outlives grace seconds."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _remove_cgroup_tree(path: Path, *, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            for dirpath, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(dirpath)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            if time.monotonic() > deadline:
                raise SandboxError(f"cgroup {path} still busy: {_cgroup_pids(path)}") from exc
            # Processes of ours are still exiting (or a helper outlived its sandbox):
            # everything in a cgroup we created was started by this harness.
            if time.monotonic() > deadline - timeout / 2:
                _kill_cgroup(path)
            time.sleep(0.01)


def _cgroup_pids(path: Path) -> list[int]:
    pids: list[int] = []
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(FileNotFoundError):
            pids.extend(int(pid) for pid in procs.read_text().split())
    return pids


def _cgroup_relpath(path: Path) -> str:
    """The path /proc/PID/cgroup shows for a cgroup directory, e.g. /hotrelay-test/x."""
    hierarchy = path.relative_to(CGROUP_ROOT).parts[0]
    return "/" + str(path.relative_to(CGROUP_ROOT / hierarchy))


def _kill_cgroup(path: Path) -> None:
    relpath = _cgroup_relpath(path)
    for pid in _cgroup_pids(path):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            # Re-check membership now that the pidfd pins the pid against recycling.
            membership = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            if any(line.split(":", 2)[2].startswith(relpath) for line in membership):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
        finally:
            os.close(pidfd)


# -- the intermediate process and pid 1 -------------------------------------------------


def _send(fd: int, line: str) -> None:
    os.write(fd, (line.replace("\n", " ") + "\n").encode())


def _read_control_line(fd: int) -> str:
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return line.decode().strip()


def _helper_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hotrelay.testing.sandbox")
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--cgroup", action="append", default=[])
    parser.add_argument("--userns", action="store_true")
    args = parser.parse_args(argv)
    status: int = args.status_fd
    control: int = args.control_fd
    try:
        for cgroup in args.cgroup:
            _write(Path(cgroup) / "cgroup.procs", str(os.getpid()))
        if args.userns:
            libc.unshare(libc.CLONE_NEWUSER)
            _send(status, "userns")
            if _read_control_line(control) != "mapped":
                return 1
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        # After the user namespace, so these are owned by it as in a real
        # unprivileged container (the tmpfs /dev gets SB_I_NODEV, the netns gets no
        # kernel uevents).
        libc.unshare(
            libc.CLONE_NEWNS
            | libc.CLONE_NEWPID
            | libc.CLONE_NEWNET
            | libc.CLONE_NEWUTS
            | libc.CLONE_NEWIPC
        )
        socket.sethostname(args.hostname)
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(ready_r)
            _pid1(ready_w, userns=args.userns)
        os.close(ready_w)
        with open(ready_r, "rb") as ready:
            # Empty means pid 1 reached exec: its end of the pipe was close-on-exec.
            failure = ready.read().decode().strip()
    except Exception as exc:  # report anything, the test side shows it
        _send(status, f"error {type(exc).__name__}: {exc}")
        return 1
    if not failure and os.waitpid(child, os.WNOHANG)[0] != 0:
        failure = "died before exec"
    if failure:
        _send(status, f"error pid 1: {failure}")
        with contextlib.suppress(ChildProcessError):
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        return 1
    _send(status, f"ready {child}")
    os.close(status)
    while os.read(control, 64):
        pass
    # Not reaped yet, so the pid still names our child.
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    return 0


def _pid1(ready_w: int, *, userns: bool) -> NoReturn:
    """Set up the sandbox's mounts, then exec an init; ready_w closes on exec (CLOEXEC)."""
    try:
        libc.set_parent_death_signal(signal.SIGKILL)
        os.chdir("/")
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE, None)
        _build_dev(userns=userns)
        libc.mount("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC, None)
        os.closerange(3, ready_w)
        os.closerange(ready_w + 1, 65536)
        # Exec rather than stay this Python: a process that changed uid without exec
        # is not dumpable and its mm belongs to the host user namespace, so the
        # sandbox's own root could not read /proc/1/* as in a real container.
        interpreter = os.path.realpath(sys.executable)
        with contextlib.suppress(OSError):
            os.execv(interpreter, [interpreter, "-I", "-S", "-c", INIT_SCRIPT, "hotrelay-init"])
        # The interpreter may be unreachable for a mapped root; an init that never
        # reaps is still an init.
        os.execv("/usr/bin/sleep", ["sleep", "infinity"])
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(ready_w, f"{type(exc).__name__}: {exc}\n".encode())
        os._exit(1)


# Stdlib only, run with -I -S: reap whatever gets reparented to pid 1. SIGINT goes
# back to the default, which pid 1 ignores, so like any container init only SIGKILL
# from outside stops it.
INIT_SCRIPT = """
import os, signal
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    signal.sigwait({signal.SIGCHLD})
"""


def _build_dev(*, userns: bool) -> None:
    libc.mount("tmpfs", DEV_STAGING, "tmpfs", libc.MS_NOSUID, "mode=0755,size=1m")
    for name, major, minor in DEV_NODES:
        node = f"{DEV_STAGING}/{name}"
        if userns:
            # mknod needs CAP_MKNOD in the initial user namespace, and nodes on this
            # tmpfs would not open anyway (SB_I_NODEV): bind the host's instead.
            os.close(os.open(node, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            libc.mount(f"/dev/{name}", node, None, libc.MS_BIND, None)
        else:
            os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(node, 0o666)
    for name, target in DEV_SYMLINKS:
        os.symlink(target, f"{DEV_STAGING}/{name}")
    libc.mount(DEV_STAGING, "/dev", None, libc.MS_MOVE, None)


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
