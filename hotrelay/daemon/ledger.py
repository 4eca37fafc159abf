"""The ledger: what hotrelay has applied, written durably before it counts as done.

After a crash or restart the daemon reconciles the kernel against this record: a grant
whose device or container is gone is revoked, one that is missing is applied again.
So every entry must be on disk before the relay reports its action done, and an entry
must never be half-written. Each entry is one small JSON file, written to a temporary
name, fsync'd, renamed over the final name, and the directory fsync'd: a crash at any
point leaves either the old entry or the new one, never a torn one.

One file per entry keeps every update O(1) however many grants exist, and lets a
corrupt file (a disk error, a hand edit) cost only that entry, which is reported.

The files are read once, when the ledger opens; from then on reads come from a copy in
memory that every write updates after the file is durable (the bytes are kept, and
parsed afresh on each read, so a caller's changes never reach the copy unwritten).
The heal pass reads every entry every few seconds: from memory, not from thousands of
files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Ledger", "LedgerEntry", "LedgerError"]

log = logging.getLogger(__name__)

_SUFFIX = ".json"
_TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


class LedgerError(OSError):
    """The ledger directory cannot be used (not a private root-owned directory, ...)."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One applied thing: ``key`` names it uniquely, ``record`` says how to undo it."""

    key: str
    kind: str
    record: Mapping[str, Any]


def _filename(key: str) -> str:
    # Keys contain '/', ':' and glob characters; a digest is a safe, fixed-size name.
    return hashlib.sha256(key.encode()).hexdigest()[:32] + _SUFFIX


class Ledger:
    """Durable key -> record store in ``directory`` (created 0700, root-only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise LedgerError(
                f"ledger directory {directory} must be owned by uid {os.geteuid()} "
                f"with mode 0700 (it is uid {info.st_uid}, mode {info.st_mode & 0o777:o})"
            )
        self._dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._remove_stale_temporaries()
        # file name -> the bytes on disk, for every readable entry (see the docstring).
        self._mirror: dict[str, bytes] = {}
        for name in sorted(os.listdir(self._dirfd)):
            if name.endswith(_SUFFIX) and not name.startswith(_TMP_PREFIX):
                body = self._read_file(name)
                if body is not None and self._parse(name, body) is not None:
                    self._mirror[name] = body

    def close(self) -> None:
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _remove_stale_temporaries(self) -> None:
        # A temporary left behind is a write that crashed before its rename: the
        # previous version of that entry (if any) is still the truth.
        for name in os.listdir(self._dirfd):
            if name.startswith(_TMP_PREFIX):
                os.unlink(name, dir_fd=self._dirfd)

    def put(self, entry: LedgerEntry) -> None:
        """Write ``entry`` durably; when this returns, it survives a crash."""
        body = json.dumps(
            {
                "version": FORMAT_VERSION,
                "key": entry.key,
                "kind": entry.kind,
                "record": entry.record,
            },
            sort_keys=True,
        ).encode()
        final = _filename(entry.key)
        tmp = f"{_TMP_PREFIX}{final}.{os.getpid()}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=self._dirfd
        )
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
        os.fsync(self._dirfd)
        self._mirror[final] = body

    def delete(self, key: str) -> None:
        """Forget ``key`` durably; deleting an absent key is not an error."""
        name = _filename(key)
        try:
            os.unlink(name, dir_fd=self._dirfd)
        except FileNotFoundError:
            self._mirror.pop(name, None)
            return
        os.fsync(self._dirfd)
        self._mirror.pop(name, None)

    def get(self, key: str) -> LedgerEntry | None:
        name = _filename(key)
        body = self._mirror.get(name)
        return None if body is None else self._parse(name, body)

    def entries(self) -> Iterator[LedgerEntry]:
        """Every readable entry (an unreadable file was reported when the ledger opened)."""
        for name in sorted(self._mirror):
            entry = self._parse(name, self._mirror[name])
            if entry is not None:
                yield entry

    def _read_file(self, name: str) -> bytes | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self._dirfd)
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                return f.read(1 << 20)
        except OSError as exc:
            log.error("ledger %s/%s unreadable, ignored: %s", self.directory, name, exc)
            return None

    def _parse(self, name: str, body: bytes) -> LedgerEntry | None:
        try:
            data = json.loads(body)
            entry = LedgerEntry(key=data["key"], kind=data["kind"], record=data["record"])
            if not isinstance(entry.key, str) or not isinstance(entry.kind, str):
                raise TypeError("key and kind must be strings")
            if not isinstance(entry.record, dict) or _filename(entry.key) != name:
                raise TypeError("record must be an object stored under its key's name")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ledger %s/%s unreadable, ignored: %s", self.directory, name, exc)
            return None
        return entry
