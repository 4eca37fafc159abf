"""Raw targets: ``pid:PID`` and ``cgroup:PATH``, for containers no runtime adapter knows.

``pid:PID`` is the container whose init is that process. Its start time is recorded
the first time the pid resolves, so a later process that reuses the number is never
taken for the container: once that process exits, the target stays gone.

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
import os
from collections.abc import Hashable, Iterable
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.runtimes.base import Adapter
from hotrelay.runtimes.errors import ContainerGone
from hotrelay.runtimes.procfs import ProcessInfo, read_process, snapshot

__all__ = ["CGROUP_ROOT", "CgroupAdapter", "PidAdapter", "cgroup_init"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


class PidAdapter(Adapter):
    """``pid:PID`` targets."""

    runtime = Runtime.PID

    def __init__(self, pids: Iterable[int | str] = (), *, resync_interval: float = 30.0) -> None:
        super().__init__(poll_interval=resync_interval, resync_interval=resync_interval)
        self._followed: dict[int, int | None] = {}
        for pid in pids:
            self.follow(pid)

    def describe(self) -> str:
        return f"{len(self._followed)} pid target(s)"

    def follow(self, pid: int | str) -> None:
        number = _pid(pid)
        self._followed.setdefault(number, None)

    def unfollow(self, pid: int | str) -> None:
        self._followed.pop(_pid(pid), None)

    def _snapshot(self, pid: int) -> ContainerRef | None:
        expected = self._followed.get(pid)
        try:
            ref = snapshot(self.runtime, str(pid), pid, expected_start_time=expected)
        except ContainerGone:
            return None
        if pid in self._followed and expected is None:
            self._followed[pid] = ref.start_time
        return ref

    async def _list_running(self) -> list[ContainerRef]:
        await trio.lowlevel.checkpoint()
        return [ref for pid in list(self._followed) if (ref := self._snapshot(pid)) is not None]

    async def _lookup(self, name: str) -> ContainerRef | None:
        await trio.lowlevel.checkpoint()
        if not name.isdigit() or int(name) <= 0:
            return None
        return self._snapshot(int(name))


def _pid(value: int | str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"pid {value!r} is not a positive number")
    return number


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
