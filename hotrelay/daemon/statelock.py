"""One daemon per state directory.

Two daemons on one state directory would each take the other's ledger entries for
leftovers and undo them. So the daemon takes an exclusive lock on ``STATE_DIR/lock``
before it reads or writes anything there, holds it for its whole life (the kernel
releases it when the process dies, however it dies), and a second daemon is refused
at once, naming the first one's pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from hotrelay.errors import HotrelayError

__all__ = ["StateDirectoryBusy", "lock_state_directory"]

LOCK_NAME = "lock"


class StateDirectoryBusy(HotrelayError):
    """Another hotrelay daemon holds the state directory."""


def lock_state_directory(state_dir: Path) -> int:
    """Lock ``state_dir`` for this process; the descriptor must stay open."""
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StateDirectoryBusy(
                f"{state_dir}: another hotrelay daemon (pid {holder}) is using this state "
                "directory; stop it first, or give this one its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd
