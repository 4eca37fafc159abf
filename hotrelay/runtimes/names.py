"""User and group names resolved the way the container sees them.

A rule says ``owner = "root"`` and ``group = "dialout"``: those names mean what the
container's own /etc/passwd and /etc/group say, and the ids are then mapped to host ids
through the container's user namespace. The files are read through the container's
root (/proc/PID/root) with every path component resolved *inside* that root, as the
container itself would: ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``, or on
kernels before 5.6 a component-by-component walk with O_NOFOLLOW that re-roots
absolute symlinks and clamps ``..`` at the root. A symlink such as ``/etc/group ->
/host/etc/group`` therefore names the container's ``/host/etc/group``, never the
host's; a magic link (``/proc/self/root/...``) is refused. The file must be a regular
file of bounded size, opened with O_NONBLOCK so a FIFO cannot stall the daemon.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from hotrelay.core.accounts import Accounts, IdKind, to_host_id
from hotrelay.core.containers import ContainerRef
from hotrelay.effectors.nshelper.errors import (
    AccountReadError,
    HelperError,
    HelperTimeoutError,
)
from hotrelay.effectors.nshelper.rootfiles import (
    ACCOUNT_FILES,
    MAX_ACCOUNT_FILE,
    AccountFileError,
    open_in_root,
    read_account_file,
    read_file_in_root,
)
from hotrelay.runtimes.procfs import PidHandle

if TYPE_CHECKING:
    from hotrelay.effectors.nshelper.pool import NamespaceHelpers

__all__ = [
    "MAX_ACCOUNT_FILE",
    "AccountFileError",
    "Owner",
    "open_in_root",
    "read_accounts",
    "read_file_in_root",
    "resolve_owner",
    "resolve_owner_async",
]

# Kept under its old name for the tests that call it.
_read_account_file = read_account_file


def read_accounts(
    pid: int, *, expected_start_time: int | None = None, walk: bool = False
) -> Accounts:
    """The users and groups of the container whose init is ``pid``.

    A missing file means no names (numeric ids still work); anything unsafe (symlink
    escaping the root through a magic link, FIFO, huge file) raises AccountFileError.
    """
    with PidHandle.open(pid, expected_start_time=expected_start_time) as handle:
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Still alive after the open: the root is that process's root.
            handle.check_alive()
            texts = [read_account_file(root_fd, path, walk) for path in ACCOUNT_FILES]
        finally:
            os.close(root_fd)
    return Accounts.parse(texts[0], texts[1], where=f"the container of pid {pid}")


@dataclass(frozen=True, slots=True)
class Owner:
    """An owner and group, as the container names them and as host ids."""

    uid: int
    gid: int
    host_uid: int
    host_gid: int


def resolve_owner(
    container: ContainerRef,
    *,
    user: str | int = 0,
    group: str | int = 0,
    walk: bool = False,
) -> Owner:
    """Turn ``user``/``group`` (names or numbers) into the container's and the host's ids.

    Names are looked up in the container (blocking file reads: from async code use
    :func:`resolve_owner_async`). Raises UnknownAccountError for a name the container
    does not have, UnmappedIdError for an id its user namespace does not map.
    """
    accounts = (
        read_accounts(container.pid, expected_start_time=container.start_time, walk=walk)
        if _names_in(user, group)
        else Accounts()
    )
    return _owner(container, accounts, user, group)


def _owner(container: ContainerRef, accounts: Accounts, user: str | int, group: str | int) -> Owner:
    """Names (or numbers) to the container's ids, and those to the host's."""
    uid = accounts.uid(user)
    gid = accounts.gid(group)
    return Owner(
        uid=uid,
        gid=gid,
        host_uid=to_host_id(container.uid_map, uid, IdKind.USER),
        host_gid=to_host_id(container.gid_map, gid, IdKind.GROUP),
    )


def _names_in(user: str | int, group: str | int) -> bool:
    """Whether resolving needs the container's account files (a name, not a number)."""
    return any(isinstance(v, str) and not v.isdigit() for v in (user, group))


# Reading a container's account files may block in ways no flag prevents: a regular
# file on a FUSE mount whose server never answers parks the reader in the kernel,
# unkillably. The daemon therefore has the container's namespace helper read them:
# a read that misses the helper's deadline costs that helper (killed; a stuck one
# blocks further reads for that container only), never a thread of the daemon.
# Without helpers (tests, tools), the read runs in a worker thread with a deadline.
ACCOUNT_READ_DEADLINE = 5.0
# container -> trio time its thread read started (entries leave when the thread ends)
_reads_in_flight: dict[tuple[object, ...], float] = {}


async def resolve_owner_async(
    container: ContainerRef,
    *,
    user: str | int = 0,
    group: str | int = 0,
    deadline: float = ACCOUNT_READ_DEADLINE,
    helpers: NamespaceHelpers | None = None,
) -> Owner:
    if not _names_in(user, group):
        # Numbers only (the default): no file to read, so no thread hop, which would
        # cost a good part of a millisecond on the hotplug path.
        await trio.lowlevel.checkpoint()
        return resolve_owner(container, user=user, group=group)
    if helpers is not None:
        return await _resolve_through_helper(container, user, group, helpers)
    return await _resolve_in_thread(container, user, group, deadline)


async def _resolve_through_helper(
    container: ContainerRef, user: str | int, group: str | int, helpers: NamespaceHelpers
) -> Owner:
    try:
        helper = await helpers.get(container)
        passwd, groups = await helper.read_accounts()
    except AccountReadError as exc:
        raise AccountFileError(str(exc)) from None
    except HelperTimeoutError:
        raise AccountFileError(
            f"{container.target}: reading its /etc/passwd and /etc/group took longer "
            f"than {helpers.request_timeout:g} s (a file that never answers, such as one "
            "on a hung FUSE mount); its helper was killed"
        ) from None
    except HelperError as exc:
        raise AccountFileError(str(exc)) from None
    return _owner(container, Accounts.parse(passwd, groups, where=container.target), user, group)


async def _resolve_in_thread(
    container: ContainerRef, user: str | int, group: str | int, deadline: float
) -> Owner:
    key = (container.runtime, container.name, container.id)
    # Another binding of the same container is reading: wait while that read is within
    # its deadline; past it, the read is stuck, and no second thread joins it. (Polled:
    # an abandoned worker thread has no way to wake us.)
    while (began := _reads_in_flight.get(key)) is not None:
        if trio.current_time() > began + deadline:
            raise AccountFileError(
                f"{container.target}: an earlier read of its /etc/passwd or /etc/group is "
                "still stuck (a file that never answers, such as one on a hung FUSE mount); "
                "not starting another"
            )
        await trio.sleep(0.005)
    _reads_in_flight[key] = trio.current_time()
    started = False

    def read() -> Owner:
        nonlocal started
        started = True
        try:
            return resolve_owner(container, user=user, group=group)
        finally:
            _reads_in_flight.pop(key, None)

    try:
        with trio.move_on_after(deadline):
            return await trio.to_thread.run_sync(read, abandon_on_cancel=True)
    finally:
        if not started:
            _reads_in_flight.pop(key, None)  # cancelled before a worker thread took it
    raise AccountFileError(
        f"{container.target}: reading its /etc/passwd and /etc/group took longer than "
        f"{deadline:g} s (a file that never answers, such as one on a hung FUSE mount); "
        "gave up"
    )
