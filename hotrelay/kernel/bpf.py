"""Thin, typed wrappers for the bpf(2) commands cgroup-device programs need.

Only what hotrelay uses: load a ``BPF_PROG_TYPE_CGROUP_DEVICE`` program (with the
verifier's log), attach/detach/replace it on a cgroup, list what is attached, and read
a program back. ``union bpf_attr`` layouts are from include/uapi/linux/bpf.h (x86_64);
each command gets a zeroed buffer a little larger than the fields we set, since the
kernel requires every byte it does not know about to be zero.

Every failure raises :class:`BpfError`, an OSError carrying the errno, the command
and, for a load, the verifier log.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import struct
from dataclasses import dataclass

__all__ = [
    "BPF_CGROUP_DEVICE",
    "BPF_F_ALLOW_MULTI",
    "BPF_F_ALLOW_OVERRIDE",
    "BPF_F_QUERY_EFFECTIVE",
    "BPF_F_REPLACE",
    "BPF_PROG_TYPE_CGROUP_DEVICE",
    "MAX_PROGS_PER_CGROUP",
    "BpfError",
    "ProgramInfo",
    "QueryResult",
    "VerifierError",
    "get_prog_fd_by_id",
    "open_cgroup",
    "prog_attach",
    "prog_detach",
    "prog_info",
    "prog_load",
    "prog_query",
    "prog_xlated",
]

SYS_bpf = 321  # x86_64

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6

BPF_F_ALLOW_OVERRIDE = 1
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4
BPF_F_QUERY_EFFECTIVE = 1

# The kernel's per-cgroup, per-attach-type limit (BPF_CGROUP_MAX_PROGS).
MAX_PROGS_PER_CGROUP = 64

_ATTR_SIZE = 128
_LOAD = struct.Struct("<IIQQIIQII16sII")
_ATTACH = struct.Struct("<IIIII")
_QUERY = struct.Struct("<IIIIQI")
_GET_FD_BY_ID = struct.Struct("<III")
_INFO_BY_FD = struct.Struct("<IIQ")
# struct bpf_prog_info up to attach_btf_id: 232 bytes on x86_64 (6.x kernels).
_PROG_INFO_SIZE = 232
_INFO_ID = 4
_INFO_TAG = 8
_INFO_XLATED_LEN = 20
_INFO_XLATED_INSNS = 32
_INFO_NR_MAP_IDS = 52
_INFO_NAME = 64

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_uint)
_syscall.restype = ctypes.c_long

_COMMANDS = {
    BPF_PROG_LOAD: "BPF_PROG_LOAD",
    BPF_PROG_ATTACH: "BPF_PROG_ATTACH",
    BPF_PROG_DETACH: "BPF_PROG_DETACH",
    BPF_PROG_GET_FD_BY_ID: "BPF_PROG_GET_FD_BY_ID",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
    BPF_PROG_QUERY: "BPF_PROG_QUERY",
}


class BpfError(OSError):
    """bpf(2) failed: ``errno``, the command, what it was about and any verifier log."""

    def __init__(self, err: int, command: str, subject: str = "", log: str = "") -> None:
        message = os.strerror(err) if err else "failed without setting errno"
        if err in errno.errorcode:
            message += f" [{errno.errorcode[err]}]"
        if err == 38:  # ENOSYS
            message += f" (kernel {platform.release()} lacks bpf())"
        detail = f"{command}{f' ({subject})' if subject else ''}: {message}"
        if log:
            detail += f"\nverifier log:\n{log.rstrip()}"
        super().__init__(err, detail)
        self.command = command
        self.subject = subject
        self.log = log

    def __str__(self) -> str:
        return str(self.strerror)


class VerifierError(BpfError):
    """PROG_LOAD refused the program; ``log`` says why."""


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], subject: str = "") -> int:
    result = int(_syscall(SYS_bpf, cmd, ctypes.addressof(attr), ctypes.sizeof(attr)))
    if result < 0:
        raise BpfError(ctypes.get_errno(), _COMMANDS.get(cmd, str(cmd)), subject)
    return result


def _attr(
    layout: struct.Struct, *values: object, size: int = _ATTR_SIZE
) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(size)
    layout.pack_into(attr, 0, *values)
    return attr


def prog_load(
    insns: bytes,
    *,
    name: str = "",
    log_size: int = 1 << 20,
    prog_type: int = BPF_PROG_TYPE_CGROUP_DEVICE,
    expected_attach_type: int = BPF_CGROUP_DEVICE,
) -> int:
    """Load a program; returns its fd (close-on-exec, as every bpf fd).

    The log is requested only on a retry after a failure, so the common path costs
    nothing: the kernel verifies a program fastest when it writes no log.
    """
    if not insns or len(insns) % 8:
        raise ValueError(f"program of {len(insns)} bytes is not whole instructions")
    code = ctypes.create_string_buffer(insns, len(insns))
    # license "" (not NULL: the kernel copies it with strncpy_from_user, NULL -> EFAULT).
    license_ = ctypes.create_string_buffer(b"", 1)
    # The kernel takes only [A-Za-z0-9_.] in names (EINVAL otherwise).
    encoded_name = re.sub(rb"[^A-Za-z0-9_.]", b"_", name.encode())[:15]

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = _attr(
            _LOAD,
            prog_type,
            len(insns) // 8,
            ctypes.addressof(code),
            ctypes.addressof(license_),
            1 if log is not None else 0,
            ctypes.sizeof(log) if log is not None else 0,
            ctypes.addressof(log) if log is not None else 0,
            0,
            0,
            encoded_name,
            0,
            expected_attach_type,
        )
        return _bpf(BPF_PROG_LOAD, attr, f"program {name!r}, {len(insns) // 8} instructions")

    try:
        return attempt(None)
    except BpfError as first:
        if first.errno not in (13, 22, 7):  # EACCES, EINVAL, E2BIG: the verifier said no
            raise
    log = ctypes.create_string_buffer(log_size)
    try:
        return attempt(log)
    except BpfError as exc:
        text = log.value.decode(errors="replace")
        if not text.strip():
            raise
        raise VerifierError(exc.errno or 0, exc.command, exc.subject, text) from None


def open_cgroup(path: str | os.PathLike[str]) -> int:
    """An O_RDONLY directory fd for a cgroup, the target of attach/detach/query."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def prog_attach(
    cgroup_fd: int,
    prog_fd: int,
    *,
    flags: int = BPF_F_ALLOW_MULTI,
    replace_fd: int | None = None,
    attach_type: int = BPF_CGROUP_DEVICE,
    subject: str = "",
) -> None:
    """Attach a program; with ``replace_fd`` swap it in atomically for that one.

    Replacing needs ALLOW_MULTI mode (BPF_F_REPLACE is refused otherwise); in the
    exclusive modes (flags 0 or ALLOW_OVERRIDE) attaching again replaces by itself.
    """
    if replace_fd is not None:
        flags |= BPF_F_REPLACE
    attr = _attr(
        _ATTACH,
        cgroup_fd,
        prog_fd,
        attach_type,
        flags,
        replace_fd if replace_fd is not None else 0,
    )
    _bpf(BPF_PROG_ATTACH, attr, subject)


def prog_detach(
    cgroup_fd: int,
    prog_fd: int | None,
    *,
    attach_type: int = BPF_CGROUP_DEVICE,
    subject: str = "",
) -> None:
    """Detach a program (ALLOW_MULTI mode needs its fd; exclusive modes take None)."""
    attr = _attr(_ATTACH, cgroup_fd, prog_fd if prog_fd is not None else 0, attach_type, 0, 0)
    _bpf(BPF_PROG_DETACH, attr, subject)


@dataclass(frozen=True, slots=True)
class QueryResult:
    """What PROG_QUERY says: the cgroup's attach mode and its program ids, in run order."""

    attach_flags: int
    prog_ids: tuple[int, ...]


def prog_query(
    cgroup_fd: int,
    *,
    effective: bool = False,
    attach_type: int = BPF_CGROUP_DEVICE,
    subject: str = "",
) -> QueryResult:
    """The programs attached to a cgroup (``effective``: those that run, ancestors' too)."""
    capacity = MAX_PROGS_PER_CGROUP
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        attr = _attr(
            _QUERY,
            cgroup_fd,
            attach_type,
            BPF_F_QUERY_EFFECTIVE if effective else 0,
            0,
            ctypes.addressof(ids),
            capacity,
        )
        try:
            _bpf(BPF_PROG_QUERY, attr, subject)
        except BpfError as exc:
            if exc.errno != 28:  # ENOSPC: more programs than room; prog_cnt says how many
                raise
            capacity = max(capacity * 2, struct.unpack_from("<I", attr, 24)[0])
            continue
        attach_flags, count = (
            struct.unpack_from("<I", attr, 12)[0],
            struct.unpack_from("<I", attr, 24)[0],
        )
        return QueryResult(attach_flags, tuple(ids[:count]))


def get_prog_fd_by_id(prog_id: int) -> int:
    """An fd for a loaded program by id (ENOENT once the program is gone)."""
    return _bpf(BPF_PROG_GET_FD_BY_ID, _attr(_GET_FD_BY_ID, prog_id, 0, 0), f"program id {prog_id}")


@dataclass(frozen=True, slots=True)
class ProgramInfo:
    """The parts of ``struct bpf_prog_info`` hotrelay reads."""

    id: int
    tag: bytes
    name: str
    xlated_len: int
    nr_map_ids: int


def _get_info(prog_fd: int, info: ctypes.Array[ctypes.c_char]) -> None:
    attr = _attr(_INFO_BY_FD, prog_fd, ctypes.sizeof(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"program fd {prog_fd}")


def prog_info(prog_fd: int) -> ProgramInfo:
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    _get_info(prog_fd, info)
    return ProgramInfo(
        id=struct.unpack_from("<I", info, _INFO_ID)[0],
        tag=info.raw[_INFO_TAG : _INFO_TAG + 8],
        name=info.raw[_INFO_NAME : _INFO_NAME + 16].split(b"\0", 1)[0].decode(errors="replace"),
        xlated_len=struct.unpack_from("<I", info, _INFO_XLATED_LEN)[0],
        nr_map_ids=struct.unpack_from("<I", info, _INFO_NR_MAP_IDS)[0],
    )


def prog_xlated(prog_fd: int) -> tuple[ProgramInfo, bytes]:
    """The program's info and its instructions as the kernel holds them after verification.

    The length may be zero when the caller may not see it (kernel.kptr_restrict /
    bpf_dump_raw_ok): then the program cannot be read back.
    """
    first = prog_info(prog_fd)
    if first.xlated_len == 0:
        return first, b""
    buffer = ctypes.create_string_buffer(first.xlated_len)
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    struct.pack_into("<I", info, _INFO_XLATED_LEN, first.xlated_len)
    struct.pack_into("<Q", info, _INFO_XLATED_INSNS, ctypes.addressof(buffer))
    _get_info(prog_fd, info)
    length = min(struct.unpack_from("<I", info, _INFO_XLATED_LEN)[0], first.xlated_len)
    return first, buffer.raw[:length]
