"""systemd-nspawn (and any container registered with systemd-machined).

machined keeps one file per registered machine in ``/run/systemd/machines/NAME``,
``KEY=VALUE`` lines it writes itself (``NAME``, ``SCOPE``, ``ROOT``, ``LEADER``,
``CLASS``...; values are C-escaped), next to ``unit:SCOPE`` symlinks. ``LEADER`` is the
container's init pid on the host; ``CLASS=container`` tells a container from a VM.
machined writes the file with a temporary name and renames it into place, so a reader
never sees half a file. No D-Bus needed: the files are the state machined restores
itself from. Starts are noticed by polling the directory (names and mtimes).

Only machined (root) may say which process is a machine's leader: a file is believed
only if it is a regular root-owned file that no one else can write, in a root-owned
directory no one else can write. Anything else (a file another user planted or can
edit, a directory anyone can write into) is ignored with a warning, since whoever can
name a LEADER would otherwise be handed the devices of the machine it names.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Hashable, Mapping
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.runtimes.base import Adapter, log
from hotrelay.runtimes.errors import ContainerGone, RuntimeUnavailable
from hotrelay.runtimes.procfs import snapshot

__all__ = ["DEFAULT_MACHINES_DIR", "NspawnAdapter", "parse_machine_file"]

DEFAULT_MACHINES_DIR = "/run/systemd/machines"
MAX_MACHINE_FILE = 64 * 1024


def parse_machine_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (comments skipped, C escapes undone) -> a dict."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = _c_unescape(value) if "\\" in value else value
    return values


_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}


def _c_unescape(text: str) -> str:
    """Undo systemd's cescape(): \\n, \\xNN, \\NNN (octal), \\\\, quotes."""
    raw = text.encode()
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte != 0x5C or i + 1 >= len(raw):
            out.append(byte)
            i += 1
            continue
        code = chr(raw[i + 1])
        if code in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[code])
            i += 2
        elif code == "x" and _is_digits(raw[i + 2 : i + 4], 16):
            out.append(int(raw[i + 2 : i + 4], 16))
            i += 4
        elif _is_digits(raw[i + 1 : i + 4], 8):
            out.append(int(raw[i + 1 : i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i + 1])
            i += 2
    return out.decode("utf-8", errors="replace")


def _is_digits(chunk: bytes, base: int) -> bool:
    digits = "0123456789abcdefABCDEF"[: 10 if base == 16 else base] + (
        "abcdefABCDEF" if base == 16 else ""
    )
    return len(chunk) == (2 if base == 16 else 3) and all(chr(b) in digits for b in chunk)


class NspawnAdapter(Adapter):
    """Containers registered with systemd-machined (``machinectl list``)."""

    runtime = Runtime.NSPAWN

    def __init__(
        self,
        machines_dir: str | os.PathLike[str] = DEFAULT_MACHINES_DIR,
        *,
        poll_interval: float = 1.0,
        resync_interval: float = 30.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, resync_interval=resync_interval)
        self.machines_dir = Path(machines_dir)
        self._distrusted: set[tuple[str, str]] = set()  # warned about once each

    def describe(self) -> str:
        return f"machines in {self.machines_dir}"

    def _machine_files(self) -> list[Path]:
        try:
            entries = sorted(os.scandir(self.machines_dir), key=lambda e: e.name)
            info = os.stat(self.machines_dir)
        except FileNotFoundError:
            raise RuntimeUnavailable(f"{self.machines_dir} does not exist (no machined)") from None
        if info.st_uid != 0 or info.st_mode & 0o022:
            self._distrust(
                self.machines_dir,
                f"owned by uid {info.st_uid} with mode {info.st_mode & 0o777:o}: others "
                "could register machines there",
            )
            return []
        return [
            Path(e.path)
            for e in entries
            if not e.name.startswith((".", "unit:")) and e.is_file(follow_symlinks=False)
        ]

    def _distrust(self, path: Path, why: str) -> None:
        key = (str(path), why)
        if key not in self._distrusted:
            if len(self._distrusted) > 1000:
                self._distrusted.clear()
            self._distrusted.add(key)
            log.warning("nspawn: %s is not machined's (%s); ignored", path, why)

    def _read_machine(self, path: Path) -> Mapping[str, str] | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None  # a symlink (machined's are unit:* ones): not a machine
            raise
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None
            if info.st_uid != 0 or info.st_mode & 0o022:
                self._distrust(
                    path,
                    f"owned by uid {info.st_uid} with mode {info.st_mode & 0o777:o}; only "
                    "a root-owned file no one else can write names a machine",
                )
                return None
            raw = f.read(MAX_MACHINE_FILE + 1)
        if len(raw) > MAX_MACHINE_FILE:
            log.warning("nspawn: %s is too large, ignored", path)
            return None
        return parse_machine_file(raw.decode("utf-8", errors="replace"))

    def _ref(self, path: Path) -> ContainerRef | None:
        machine = self._read_machine(path)
        if machine is None or machine.get("CLASS", "container") != "container":
            return None
        leader = machine.get("LEADER", "")
        if not leader.isdigit():
            return None
        name = machine.get("NAME") or path.name
        try:
            return snapshot(self.runtime, name, int(leader), id=machine.get("ID", ""))
        except ContainerGone:
            return None

    def _list_sync(self) -> list[ContainerRef]:
        return [ref for path in self._machine_files() if (ref := self._ref(path)) is not None]

    def _lookup_sync(self, name: str) -> ContainerRef | None:
        if "/" in name or name.startswith((".", "unit:")):
            return None
        self._machine_files()  # RuntimeUnavailable without machined
        return self._ref(self.machines_dir / name)

    async def _list_running(self) -> list[ContainerRef]:
        return await trio.to_thread.run_sync(self._list_sync)

    async def _lookup(self, name: str) -> ContainerRef | None:
        return await trio.to_thread.run_sync(self._lookup_sync, name)

    def _fingerprint_sync(self) -> Hashable:
        items = []
        for path in self._machine_files():
            try:
                items.append((path.name, path.stat().st_mtime_ns))
            except FileNotFoundError:
                continue
        return tuple(items)

    async def poll_fingerprint(self) -> Hashable:
        return await trio.to_thread.run_sync(self._fingerprint_sync)
