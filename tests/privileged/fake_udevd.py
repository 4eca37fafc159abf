"""A stand-in for systemd-udevd, as far as hotrelay can tell udevd from anyone else.

It listens on a control socket (a SEQPACKET unix socket, like /run/udev/control, but
at a path of the test's own: the daemon is pointed at it with ``udev_control``, so no
/run/udev/control is ever made on the host), and multicasts libudev messages to the
udev group from its main process (udevd's manager) or from its one forked child
(a udevd worker: real workers broadcast the events they processed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["FakeUdevd"]

PYTHON = os.path.realpath(getattr(sys, "_base_executable", sys.executable))

SCRIPT = r"""
import os, socket, sys, threading

path = sys.argv[1]
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 15)
nl.bind((0, 0))
to_worker_r, to_worker_w = os.pipe()
from_worker_r, from_worker_w = os.pipe()
worker = os.fork()
if worker == 0:  # the worker: one level below the manager, like udevd's
    os.close(to_worker_w); os.close(from_worker_r)
    commands = os.fdopen(to_worker_r)
    for line in commands:
        nl.sendto(bytes.fromhex(line.strip()), (0, 2))
        os.write(from_worker_w, b"x")
    os._exit(0)
os.close(to_worker_r); os.close(from_worker_w)
ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
ctl.bind(path)
ctl.listen(64)

def serve():
    while True:
        conn, _ = ctl.accept()
        conn.close()

threading.Thread(target=serve, daemon=True).start()
print("ready", os.getpid(), worker, flush=True)
for line in sys.stdin:
    who, data = line.split()
    if who == "manager":
        nl.sendto(bytes.fromhex(data), (0, 2))
        print("sent", os.getpid(), flush=True)
    else:
        os.write(to_worker_w, (data + "\n").encode())
        os.read(from_worker_r, 1)
        print("sent", worker, flush=True)
os.close(to_worker_w)
os.waitpid(worker, 0)
"""


class FakeUdevd:
    """``with FakeUdevd() as udevd``: ``udevd.control`` is its control socket's path."""

    def __init__(self, control: Path | None = None) -> None:
        self._tmp = None if control is not None else tempfile.mkdtemp(prefix="fake-udevd-")
        self.control = control or Path(self._tmp or "") / "control"
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._proc = subprocess.Popen(
            [PYTHON, "-I", "-c", SCRIPT, os.fspath(self.control)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        assert self._proc.stdout is not None
        ready = self._proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            self._stderr.seek(0)
            why = self._stderr.read().decode()
            self.close()
            raise RuntimeError(f"fake udevd did not start: {why}")
        self.pid = int(ready[1])
        self.worker_pid = int(ready[2])

    def send(self, data: bytes, *, worker: bool = False) -> int:
        """Multicast ``data`` to the udev group; the pid it was sent from."""
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._proc.stdin.write(f"{'worker' if worker else 'manager'} {data.hex()}\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().split()
        assert answer[:1] == ["sent"], answer
        return int(answer[1])

    def close(self) -> None:
        """Stop it (and its worker), reap both, remove the control socket."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.close()  # the manager closes the worker's pipe and reaps it
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self._stderr.close()
        self.control.unlink(missing_ok=True)
        if self._tmp is not None and os.path.isdir(self._tmp):
            os.rmdir(self._tmp)

    def __enter__(self) -> FakeUdevd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
