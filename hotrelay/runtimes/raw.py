"""Raw targets: ``pid:PID`` and ``cgroup:PATH``, for containers no runtime adapter knows.

``pid:PID`` is the container whose init is that process. Its start time (field 22 of
/proc/PID/stat) is recorded the first time the pid resolves, the *pin*, so a later
process that reuses the number is never taken for the container: once that process
exits, the target stays gone. Pins are kept in a file of the state directory
(:meth:`PidAdapter.keep_pins`), so a restart of the daemon keeps them; they are
void after a reboot (the file carries the boot id). ``pid:PID@STARTTIME`` is pinned
from the start: it names only the process that started then.

``cgroup:PATH`` is the container living in that cgroup (a glob matches several): PATH
is relative to a hierarchy root, as /proc/PID/cgroup shows it (``/lxc.payload.c1``),
and is looked up in the cgroup2 hierarchy and in the v1 devices hierarchy. Its init is
the process of the cgroup that is pid 1 of its own pid namespace (the oldest such), or
else the oldest process. A cgroup is polled; a new init means a restart.

Neither runtime lists anything by itself: they report the targets they follow
(:meth:`follow`), which the daemon sets from its rules.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Hashable, Iterable
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.rules.model import TargetError, parse_pid_target
from hotrelay.runtimes.base import Adapter
from hotrelay.runtimes.errors import ContainerGone
from hotrelay.runtimes.procfs import ProcessInfo, parse_stat_start_time, read_process, snapshot

__all__ = ["CGROUP_ROOT", "CgroupAdapter", "PidAdapter", "cgroup_init"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

log = logging.getLogger("hotrelay.runtimes")


class PidAdapter(Adapter):
    """``pid:PID`` and ``pid:PID@STARTTIME`` targets."""

    runtime = Runtime.PID

    def __init__(self, pids: Iterable[int | str] = (), *, resync_interval: float = 30.0) -> None:
        super().__init__(poll_interval=resync_interval, resync_interval=resync_interval)
        # pid -> the start times rules name for it (empty: only unpinned targets).
        self._followed: dict[int, set[int]] = {}
        # pid -> start time seen first, for unpinned targets.
        self._pins: dict[int, int] = {}
        self._pins_path: Path | None = None
        self._refused: set[tuple[int, int]] = set()
        for pid in pids:
            self.follow(pid)

    def describe(self) -> str:
        return f"{len(self._followed)} pid target(s)"

    def keep_pins(self, path: Path) -> None:
        """Persist first-sight pins in ``path`` (and take those of this boot from it)."""
        self._pins_path = path
        try:
            data = json.loads(path.read_text())
            if data.get("boot_id") == _boot_id():
                stored = {int(k): int(v) for k, v in data.get("pins", {}).items()}
                self._pins = {**stored, **self._pins}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.error("pid: pins in %s unreadable, ignored: %s", path, exc)

    def pinned(self, pid: int) -> int | None:
        """The start time pid is pinned to at first sight, if it is."""
        return self._pins.get(pid)

    def follow(self, pid: int | str) -> None:
        number, start = _pid(pid)
        starts = self._followed.setdefault(number, set())
        if start is not None:
            starts.add(start)

    def unfollow(self, pid: int | str) -> None:
        self._followed.pop(_pid(pid)[0], None)

    def follow_only(self, pids: Iterable[int | str]) -> None:
        """Follow exactly these (a reload): a pid no rule names any more is dropped, so
        its container stops being reported (and leaves ``status``). Pins are kept."""
        self._followed = {}
        for pid in pids:
            self.follow(pid)

    def _snapshot(self, pid: int, start: int | None = None) -> ContainerRef | None:
        try:
            actual = parse_stat_start_time(Path(f"/proc/{pid}/stat").read_text())
        except (OSError, ValueError):
            return None
        accepted = set(self._followed.get(pid, ()))
        if start is not None:
            accepted.add(start)
        pin = self._pins.get(pid)
        if pin is not None:
            accepted.add(pin)
        if accepted and actual not in accepted:
            self._refuse(pid, actual, accepted)
            return None
        try:
            ref = snapshot(self.runtime, str(pid), pid, expected_start_time=actual)
        except ContainerGone:
            return None
        if pin is None and pid in self._followed and not self._followed[pid]:
            self._pin(pid, actual)
        return ref

    def _refuse(self, pid: int, actual: int, accepted: set[int]) -> None:
        if (pid, actual) in self._refused:
            return
        self._refused.add((pid, actual))
        wanted = ", ".join(f"pid:{pid}@{s}" for s in sorted(accepted))
        log.warning(
            "pid:%d: refusing process %d started at %d: the target is %s (the pid was "
            "reused by another process)",
            pid,
            pid,
            actual,
            wanted,
        )

    def _pin(self, pid: int, start: int) -> None:
        self._pins[pid] = start
        log.info("pid:%d: pinned to the process started at %d (pid:%d@%d)", pid, start, pid, start)
        if self._pins_path is None:
            return
        body = json.dumps(
            {"boot_id": _boot_id(), "pins": {str(k): v for k, v in self._pins.items()}}
        )
        tmp = self._pins_path.with_name(f".{self._pins_path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self._pins_path)
        except OSError as exc:
            log.error("pid:%d: cannot persist its pin in %s: %s", pid, self._pins_path, exc)

    async def _list_running(self) -> list[ContainerRef]:
        await trio.lowlevel.checkpoint()
        return [ref for pid in list(self._followed) if (ref := self._snapshot(pid)) is not None]

    async def _lookup(self, name: str) -> ContainerRef | None:
        await trio.lowlevel.checkpoint()
        try:
            pid, start = parse_pid_target(name)
        except TargetError:
            return None
        return self._snapshot(pid, start)


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _pid(value: int | str) -> tuple[int, int | None]:
    """(pid, start time) of ``PID`` or ``PID@STARTTIME``."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"pid {value!r} is not a positive number")
        return value, None
    try:
        return parse_pid_target(value)
    except TargetError as exc:
        raise ValueError(str(exc)) from None


def _read_procs(directory: Path) -> list[int]:
    try:
        text = (directory / "cgroup.procs").read_text()
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [int(line) for line in text.split() if line.isdigit()]


def cgroup_init(pids: Iterable[int]) -> ProcessInfo | None:
    """The container init among a cgroup's processes (see the module docstring)."""
    infos = []
    for pid in pids:
        try:
            infos.append(read_process(pid))
        except ContainerGone:
            continue
    if not infos:
        return None
    return min(infos, key=lambda info: (not info.is_namespace_init, info.start_time, info.pid))


class CgroupAdapter(Adapter):
    """``cgroup:PATH`` targets (PATH may be a glob)."""

    runtime = Runtime.CGROUP

    def __init__(
        self,
        paths: Iterable[str] = (),
        *,
        cgroup_root: str | os.PathLike[str] = CGROUP_ROOT,
        poll_interval: float = 1.0,
        resync_interval: float = 30.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, resync_interval=resync_interval)
        self.cgroup_root = Path(cgroup_root)
        self._followed: set[str] = set()
        for path in paths:
            self.follow(path)

    def describe(self) -> str:
        return f"{len(self._followed)} cgroup target(s) under {self.cgroup_root}"

    def follow(self, path: str) -> None:
        self._followed.add(_normalize(path))

    def unfollow(self, path: str) -> None:
        self._followed.discard(_normalize(path))

    def follow_only(self, paths: Iterable[str]) -> None:
        """Follow exactly these (a reload): see :meth:`PidAdapter.follow_only`."""
        self._followed = {_normalize(path) for path in paths}

    def _hierarchies(self) -> list[Path]:
        roots = [self.cgroup_root / "unified", self.cgroup_root / "devices"]
        if (self.cgroup_root / "cgroup.procs").exists():  # pure cgroup2 host
            roots.insert(0, self.cgroup_root)
        return [r for r in roots if r.is_dir()]

    def _matches(self, pattern: str) -> dict[str, list[Path]]:
        """Relative cgroup path -> its directories in each hierarchy."""
        found: dict[str, list[Path]] = {}
        for hierarchy in self._hierarchies():
            text = f"{hierarchy}{pattern}"
            matches = glob.glob(text) if glob.has_magic(pattern) else [text]
            for match in sorted(matches):
                if os.path.isdir(match):
                    relative = "/" + os.path.relpath(match, hierarchy).removeprefix(".")
                    found.setdefault(relative.replace("//", "/"), []).append(Path(match))
        return found

    def _ref(self, name: str, directories: list[Path]) -> ContainerRef | None:
        pids: list[int] = []
        for directory in directories:
            pids += [p for p in _read_procs(directory) if p not in pids]
        info = cgroup_init(pids)
        if info is None:
            return None
        try:
            return snapshot(self.runtime, name, info.pid, expected_start_time=info.start_time)
        except ContainerGone:
            return None

    def _list_sync(self) -> list[ContainerRef]:
        refs: dict[str, ContainerRef] = {}
        for pattern in sorted(self._followed):
            for name, directories in self._matches(pattern).items():
                if name not in refs and (ref := self._ref(name, directories)) is not None:
                    refs[name] = ref
        return list(refs.values())

    def _lookup_sync(self, name: str) -> ContainerRef | None:
        pattern = _normalize(name)
        directories = self._matches(pattern).get(pattern, [])
        return self._ref(pattern, directories) if directories else None

    async def _list_running(self) -> list[ContainerRef]:
        return await trio.to_thread.run_sync(self._list_sync)

    async def _lookup(self, name: str) -> ContainerRef | None:
        return await trio.to_thread.run_sync(self._lookup_sync, name)

    async def resolve(self, name_glob: str) -> list[ContainerRef]:
        """Like a one-off ``cgroup:name_glob`` target (need not be followed)."""
        pattern = _normalize(name_glob)

        def resolve_sync() -> list[ContainerRef]:
            return [
                ref
                for name, directories in self._matches(pattern).items()
                if (ref := self._ref(name, directories)) is not None
            ]

        return await trio.to_thread.run_sync(resolve_sync)

    def _fingerprint_sync(self) -> Hashable:
        items = []
        for pattern in sorted(self._followed):
            for name, directories in sorted(self._matches(pattern).items()):
                items.append((name, tuple(tuple(_read_procs(d)) for d in directories)))
        return tuple(items)

    async def poll_fingerprint(self) -> Hashable:
        return await trio.to_thread.run_sync(self._fingerprint_sync)


def _normalize(path: str) -> str:
    """``/a/b`` relative to a hierarchy root; absolute /sys/fs/cgroup/... paths accepted."""
    text = str(path)
    for prefix in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/devices", "/sys/fs/cgroup"):
        if text == prefix or text.startswith(prefix + "/"):
            text = text[len(prefix) :]
            break
    parts = [p for p in text.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"cgroup path {path!r} must not contain '.' or '..'")
    return "/" + "/".join(parts)
