"""The only code that ever runs in a container's mount namespace.

A process that has joined a container's mount namespace resolves every path it
opens there. CPython opens paths on its own (a traceback re-reads source files and
honours their coding cookie, a codec lookup imports ``encodings.<name>``), so an
interpreter that joins a container's mount namespace and then meets any error runs
whatever the container planted at those paths, as host root.

So nothing joins a container's mount namespace except a child forked for exactly
one mount operation (attaching a detached node, or detaching it again), which:

1. blocks every signal, so no Python signal handler can run in it;
2. empties the import machinery (``sys.meta_path``, ``sys.path_hooks``,
   ``sys.path``) and unregisters the codec search function, so no import and no codec
   lookup can reach any file;
3. replaces the exception, unraisable and warning hooks and ``linecache`` with ones
   that read nothing;
4. joins the mount namespace and at once makes its root and working directory an
   empty, read-only tmpfs that no path leads to (created detached, before the
   join): from then on an absolute path, whoever opens it, finds nothing;
5. makes one or two syscalls on descriptors it already holds, and ends with
   ``os._exit`` (its status is the errno), whatever happens: no interpreter
   shutdown, no ``atexit``, no traceback.

Step 4 is what makes the rule hold by construction: even a code path nobody thought
of that opens a file by its absolute path resolves in an empty directory. The other
steps keep such code paths from starting at all.
"""

from __future__ import annotations

import codecs
import encodings
import errno as errnos
import gc
import linecache
import os
import select
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from hotrelay.kernel import mount, ns
from hotrelay.kernel.libc import MNT_DETACH, umount2

__all__ = ["attach_node", "detach_node", "empty_root"]

# Exit statuses of the child that are not an errno.
_STATUS_INTERNAL = 254
_STATUS_NO_ERRNO = 253


def empty_root() -> int:
    """A descriptor of an empty, read-only tmpfs that is mounted nowhere."""
    return mount.empty_detached_tmpfs()


def _read_nothing(*args: Any, **kwargs: Any) -> list[str]:
    return []


def _do_nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _write_fixed_line(*args: object) -> None:
    # The only output allowed: a fixed line to stderr, by descriptor.
    try:
        os.write(2, b"hotrelay: mount-namespace child failed\n")
    finally:
        os._exit(_STATUS_INTERNAL)


def _seal_interpreter() -> None:
    """Make this (forked, single-threaded) interpreter unable to reach any file."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    gc.disable()
    sys.meta_path.clear()
    sys.path_hooks.clear()
    sys.path_importer_cache.clear()
    sys.path.clear()
    codecs.unregister(encodings.search_function)
    sys.excepthook = _write_fixed_line
    sys.unraisablehook = _write_fixed_line
    warnings.simplefilter("ignore")
    warnings.showwarning = _do_nothing
    linecache.getlines = _read_nothing
    linecache.updatecache = _read_nothing
    linecache.checkcache = _do_nothing


def _child(mnt_fd: int, root_fd: int, operation: Callable[[], object]) -> NoReturn:
    status = _STATUS_INTERNAL
    try:
        _seal_interpreter()
        ns.join(mnt_fd, "mnt")
        os.fchdir(root_fd)
        os.chroot(".")
        try:
            operation()
        finally:
            os.fchdir(root_fd)
        status = 0
    except OSError as exc:
        status = exc.errno if exc.errno and 0 < exc.errno < _STATUS_NO_ERRNO else _STATUS_NO_ERRNO
    except BaseException:
        status = _STATUS_INTERNAL
    finally:
        os._exit(status)


def _run(mnt_fd: int, root_fd: int, operation: Callable[[], object], timeout: float) -> None:
    """Fork, run ``operation`` in the mount namespace, and raise its errno as OSError."""
    pid = os.fork()
    if pid == 0:
        _child(mnt_fd, root_fd, operation)
    # The child cannot exit before we hold its pidfd in a way that matters: we are its
    # parent, so its pid stays ours (a zombie at worst) until we wait for it.
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(errnos.ETIMEDOUT, f"mount operation did not finish in {timeout} s")
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return
    if code < 0:
        raise OSError(errnos.EINTR, f"mount-namespace child killed by signal {-code}")
    if code in (_STATUS_INTERNAL, _STATUS_NO_ERRNO):
        raise OSError(errnos.EIO, "mount-namespace child failed")
    raise OSError(code, os.strerror(code))


def attach_node(mnt_fd: int, root_fd: int, tree: int, placeholder: int, timeout: float) -> None:
    """Mount the detached ``tree`` onto ``placeholder`` (both descriptors we hold).

    move_mount() attaches only into the caller's own mount namespace, hence the child.
    """

    def operation() -> None:
        mount.move_mount(
            tree, "", placeholder, "", mount.MOVE_MOUNT_F_EMPTY_PATH | mount.MOVE_MOUNT_T_EMPTY_PATH
        )

    _run(mnt_fd, root_fd, operation, timeout)


def detach_node(mnt_fd: int, root_fd: int, parent: int, name: str, timeout: float) -> None:
    """Detach the mount at ``name`` in the directory ``parent`` (a descriptor we hold).

    umount2() takes a path only: the child stands in ``parent`` and names the leaf
    alone (one component, checked by the caller), with UMOUNT_NOFOLLOW so that a
    symlink swapped in cannot redirect it. EINVAL (not a mount point) is success.
    """

    def operation() -> None:
        os.fchdir(parent)
        try:
            umount2(name, MNT_DETACH | mount.UMOUNT_NOFOLLOW)
        except OSError as exc:
            if exc.errno != errnos.EINVAL:
                raise

    _run(mnt_fd, root_fd, operation, timeout)
