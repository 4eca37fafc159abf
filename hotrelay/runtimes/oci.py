"""runc and everything built on it (containerd, Docker, Podman): runc's state.json files.

runc keeps one directory per container under its root (``runc --root``): the default
``/run/runc``, Docker's ``/run/docker/runtime-runc/moby``, containerd's
``/run/containerd/runc/NAMESPACE``. Each holds ``state.json`` with the init pid, the
init's start time (``init_process_start``, the same clock ticks as /proc/PID/stat, so
a reused pid is caught), and the device rules runc applied: the runtime's own policy,
which the cgroup v2 effector must keep when it rebuilds a device program. A container
that was created but not started still has its ``exec.fifo``.

There are no events; the watcher polls a fingerprint of the state directories (names
and state.json mtimes), and the pidfd reports exits at once.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import Access, DeviceRule, DeviceType
from hotrelay.runtimes.base import Adapter, log
from hotrelay.runtimes.errors import ContainerGone, RuntimeUnavailable
from hotrelay.runtimes.procfs import snapshot

__all__ = [
    "DEFAULT_RUNC_ROOTS",
    "OciAdapter",
    "RuncState",
    "device_rule_from_libcontainer",
    "parse_state",
    "read_state_file",
]

DEFAULT_RUNC_ROOTS = (
    "/run/runc",
    "/run/docker/runtime-runc/moby",
    "/run/containerd/runc/*",
)
MAX_STATE_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RuncState:
    id: str
    pid: int
    start_time: int | None
    device_rules: tuple[DeviceRule, ...]
    created: bool  # created but not started (exec.fifo still there)


def device_rule_from_libcontainer(entry: Mapping[str, Any]) -> DeviceRule:
    """One rule of libcontainer's ``cgroups.devices``: type is a character code
    (97 'a', 98 'b', 99 'c'), -1 is a wildcard, ``permissions`` is the access."""
    kind = entry.get("type", ord("a"))
    if isinstance(kind, int) and not isinstance(kind, bool):
        kind = chr(kind)
    access = entry.get("permissions", entry.get("access", "rwm"))
    allow = entry.get("allow", True)
    if not isinstance(kind, str) or not isinstance(access, str) or not isinstance(allow, bool):
        raise ValueError(f"device rule {dict(entry)!r} has fields of the wrong type")
    major, minor = entry.get("major", -1), entry.get("minor", -1)
    for number in (major, minor):
        if not isinstance(number, int) or isinstance(number, bool) or number < -1:
            raise ValueError(f"device rule {dict(entry)!r}: bad device number {number!r}")
    return DeviceRule(
        DeviceType(kind),
        None if major == -1 else major,
        None if minor == -1 else minor,
        Access.parse(access),
        allow,
    )


def parse_state(data: Any, *, container_id: str) -> RuncState:
    """The parts of a runc state.json we need; ValueError if it is not one."""
    if not isinstance(data, dict):
        raise ValueError("state.json is not an object")
    pid = data.get("init_process_pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise ValueError("state.json has no init_process_pid")
    start = data.get("init_process_start")
    start_time = start if isinstance(start, int) and not isinstance(start, bool) else None
    if isinstance(start, str) and start.isdigit():
        start_time = int(start)
    cgroups = (data.get("config") or {}).get("cgroups") or {}
    # runc 1.1 flattens Resources into cgroups; older and newer ones nest it.
    entries = cgroups.get("devices")
    if entries is None:
        entries = (cgroups.get("resources") or cgroups.get("Resources") or {}).get("devices")
    rules = []
    for entry in entries or ():
        try:
            rules.append(device_rule_from_libcontainer(entry))
        except ValueError as exc:
            log.warning("runc %s: ignoring device rule: %s", container_id, exc)
    return RuncState(str(data.get("id", container_id)), pid, start_time, tuple(rules), False)


def read_state_file(path: Path) -> RuncState:
    """Read and parse one state.json (bounded size); OSError/ValueError on failure."""
    with open(path, "rb") as f:
        raw = f.read(MAX_STATE_SIZE + 1)
    if len(raw) > MAX_STATE_SIZE:
        raise ValueError(f"{path} is larger than {MAX_STATE_SIZE} bytes")
    state = parse_state(json.loads(raw), container_id=path.parent.name)
    created = (path.parent / "exec.fifo").exists()
    return RuncState(state.id, state.pid, state.start_time, state.device_rules, created)


class OciAdapter(Adapter):
    """runc containers found in the state directories of the given roots.

    A root may be a glob (``/run/containerd/runc/*`` covers every containerd
    namespace). The name of a container is its id.
    """

    runtime = Runtime.RUNC

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]] = DEFAULT_RUNC_ROOTS,
        *,
        poll_interval: float = 1.0,
        resync_interval: float = 30.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, resync_interval=resync_interval)
        self.roots = tuple(os.fspath(r) for r in roots)

    def describe(self) -> str:
        return "runc roots " + ", ".join(self.roots)

    def _root_dirs(self) -> list[Path]:
        found: list[Path] = []
        for root in self.roots:
            matches = glob.glob(root) if glob.has_magic(root) else [root]
            found += [Path(m) for m in sorted(matches) if os.path.isdir(m)]
        return found

    def _state_files(self) -> list[Path]:
        files = []
        for root in self._root_dirs():
            try:
                entries = sorted(os.scandir(root), key=lambda e: e.name)
            except OSError:
                continue
            files += [Path(e.path) / "state.json" for e in entries if e.is_dir()]
        return files

    def _read_running(self, path: Path) -> RuncState | None:
        try:
            state = read_state_file(path)
        except FileNotFoundError:
            return None  # deleted while we looked
        except (OSError, ValueError) as exc:
            log.warning("runc: cannot read %s: %s", path, exc)
            return None
        return None if state.created else state

    def _snapshot(self, state: RuncState) -> ContainerRef | None:
        try:
            return snapshot(
                self.runtime,
                state.id,
                state.pid,
                id=state.id,
                expected_start_time=state.start_time,
                base_device_rules=state.device_rules,
            )
        except ContainerGone:
            return None  # stopped: runc keeps state.json until `runc delete`

    def _require_roots(self) -> None:
        if not self._root_dirs():
            raise RuntimeUnavailable(f"no runc state directory ({', '.join(self.roots)})")

    def _list_sync(self) -> list[ContainerRef]:
        self._require_roots()
        refs = []
        seen = set()
        for path in self._state_files():
            state = self._read_running(path)
            if state is None or state.id in seen:
                continue
            ref = self._snapshot(state)
            if ref is not None:
                seen.add(state.id)
                refs.append(ref)
        return refs

    def _lookup_sync(self, name: str) -> ContainerRef | None:
        self._require_roots()
        for root in self._root_dirs():
            if "/" in name or name in (".", ".."):
                return None
            state = self._read_running(root / name / "state.json")
            if state is not None and (ref := self._snapshot(state)) is not None:
                return ref
        return None

    async def _list_running(self) -> list[ContainerRef]:
        return await trio.to_thread.run_sync(self._list_sync)

    async def _lookup(self, name: str) -> ContainerRef | None:
        return await trio.to_thread.run_sync(self._lookup_sync, name)

    def _fingerprint_sync(self) -> Hashable:
        items = []
        for path in self._state_files():
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                mtime = -1
            items.append((str(path), mtime, (path.parent / "exec.fifo").exists()))
        return tuple(items)

    async def poll_fingerprint(self) -> Hashable:
        return await trio.to_thread.run_sync(self._fingerprint_sync)
