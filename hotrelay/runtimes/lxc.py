"""LXC: containers under one or more lxcpaths, through LXC's own tools.

LXC has no daemon and no socket API; its command-line tools are the API. ``lxc-ls
--running -f -F NAME,STATE,PID`` lists the running containers of one lxcpath with
their init pids, ``lxc-info -s -p`` looks one up, and ``lxc-info -c KEY`` reads the
running container's configuration (its ``lxc.idmap`` and its own device rules, which
are the base rules the cgroup effectors preserve).

LXC emits no events we can subscribe to without starting its ``lxc-monitord``. Exits
come from the pidfd; starts are noticed by a cheap fingerprint: every running LXC
container's monitor listens on the abstract unix socket ``@LXCPATH/NAME/command``,
which the host's /proc/net/unix lists, so reading that one file tells when the set of
running containers changed; with each socket's inode, it also tells a container
stopped and started again within one poll (same name, new socket).

What those tools say is not taken on trust. They ask the container's monitor over that
abstract socket, and any host user can bind the name of a stopped container's socket,
answer RUNNING with a pid of its own choosing and so be handed the container's
devices. A claimed init is believed only when state that only root (or the lxcpath's
owner, for a user's own containers) can write agrees with it; see
:func:`verify_claimed_init`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import struct
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerRef, IdMap, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.base import Adapter, log
from hotrelay.runtimes.errors import ContainerGone, RuntimeApiError
from hotrelay.runtimes.procfs import PidHandle, snapshot
from hotrelay.runtimes.tools import find_tool, run_tool

__all__ = [
    "DEFAULT_LXCPATH",
    "ClaimRefused",
    "LxcAdapter",
    "command_socket_name",
    "command_sockets",
    "parse_config_items",
    "parse_idmap_items",
    "read_config_idmap",
    "verify_claimed_init",
]

DEFAULT_LXCPATH = "/var/lib/lxc"
RUNNING_STATES = frozenset({"RUNNING", "FROZEN", "FREEZING", "THAWED"})
CONFIG_KEYS = (
    "lxc.idmap",
    "lxc.cgroup.devices.deny",
    "lxc.cgroup.devices.allow",
    "lxc.cgroup2.devices.deny",
    "lxc.cgroup2.devices.allow",
)
PROC_NET_UNIX = Path("/proc/net/unix")


def command_sockets(
    proc_net_unix: str, lxcpaths: Iterable[str | Path]
) -> frozenset[tuple[str, str]]:
    """(name, inode) of each LXC command socket in /proc/net/unix's text.

    The inode, not only the name: a container stopped and started again within one
    poll (``lxc-stop -k; lxc-start``) has a socket of the same name, but a new one.
    """
    prefixes = (*(f"@{path}/" for path in lxcpaths), "@lxc/")
    sockets = set()
    for line in proc_net_unix.splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path
        if len(fields) < 8:
            continue
        name = fields[-1]
        if name.endswith("/command") and name.startswith(prefixes):
            sockets.add((name, fields[6]))
    return frozenset(sockets)


CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
DEVICES_ROOT = Path("/sys/fs/cgroup/devices")
# LXC's sockaddr_un.sun_path less the leading NUL and the NUL LXC writes after the name.
_SOCKET_NAME_ROOM = 106
_MAX_INCLUDE_DEPTH = 8
_UCRED = struct.Struct("=iII")


def parse_config_items(text: str, keys: Sequence[str]) -> dict[str, list[str]]:
    """Parse ``lxc-info -c K1 -c K2`` output: ``K = first value`` then one line per
    further value of a multi-valued key; an unset key prints ``K =``."""
    values: dict[str, list[str]] = {key: [] for key in keys}
    current: str | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(" =")
        if sep and key in values:
            current = key
            value = value.strip()
            if value:
                values[key].append(value)
        elif current is not None and line.strip():
            values[current].append(line.strip())
    return values


def parse_idmap_items(items: Sequence[str]) -> tuple[IdMap, IdMap]:
    """``u 0 100000 65536`` / ``g ...`` / ``b ...`` lines -> (uid map, gid map)."""
    uid_lines: list[str] = []
    gid_lines: list[str] = []
    for item in items:
        fields = item.split()
        if len(fields) != 4 or fields[0] not in ("u", "g", "b"):
            raise RuntimeApiError(f"lxc.idmap value {item!r} is not 'u|g|b INSIDE OUTSIDE COUNT'")
        line = " ".join(fields[1:])
        if fields[0] in ("u", "b"):
            uid_lines.append(line)
        if fields[0] in ("g", "b"):
            gid_lines.append(line)
    return IdMap.parse("\n".join(uid_lines)), IdMap.parse("\n".join(gid_lines))


def _device_rules(config: dict[str, list[str]]) -> tuple[DeviceRule, ...]:
    rules: list[DeviceRule] = []
    for version in ("cgroup", "cgroup2"):
        for verb, allow in (("deny", False), ("allow", True)):
            for value in config.get(f"lxc.{version}.devices.{verb}", []):
                try:
                    rules.append(DeviceRule.parse(value, allow=allow))
                except ValueError as exc:
                    log.warning("lxc: ignoring device rule %r: %s", value, exc)
    return tuple(rules)


class ClaimRefused(ContainerGone):
    """LXC's tools named an init that state only root can write does not confirm."""


def command_socket_name(lxcpath: str, name: str) -> str:
    """The abstract socket LXC's monitor listens on (``lxc_make_abstract_socket_name``):
    ``LXCPATH/NAME/command``, or ``lxc/HASH/command`` (FNV-1a 64 of ``LXCPATH/NAME``)
    when that does not fit in a socket address."""
    plain = f"{lxcpath}/{name}/command"
    if len(plain.encode()) < _SOCKET_NAME_ROOM:
        return plain
    digest = 0xCBF29CE484222325
    for byte in f"{lxcpath}/{name}".encode():
        digest = ((digest ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"lxc/{digest:016x}/command"


def _monitor_socket_uid(lxcpath: str, name: str) -> int:
    """The uid of whoever listens on the container's command socket (SO_PEERCRED)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(2.0)
        try:
            sock.connect("\0" + command_socket_name(lxcpath, name))
        except OSError as exc:
            raise ClaimRefused(f"its command socket does not answer ({exc.strerror})") from None
        _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return int(uid)
    finally:
        sock.close()


def _trusted_file(path: Path, owners: frozenset[int]) -> os.stat_result:
    try:
        info = path.stat()
    except OSError as exc:
        raise ClaimRefused(f"{path}: {exc.strerror}") from None
    if info.st_uid not in owners or info.st_mode & 0o022:
        raise ClaimRefused(
            f"{path} is owned by uid {info.st_uid} with mode {info.st_mode & 0o777:o}: "
            "not a file only root or the lxcpath owner can write"
        )
    return info


def read_config_idmap(config: Path, owners: frozenset[int]) -> list[str]:
    """The ``lxc.idmap`` values of a container's config file and what it includes,
    read from disk (never from the monitor): files only ``owners`` can write."""
    items: list[str] = []

    def read(path: Path, depth: int) -> None:
        if depth > _MAX_INCLUDE_DEPTH:
            raise ClaimRefused(f"{config}: lxc.include nested too deeply")
        info = _trusted_file(path, owners)
        if stat.S_ISDIR(info.st_mode):
            for entry in sorted(path.glob("*.conf")):
                read(entry, depth + 1)
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if not sep:
                continue
            key, value = key.strip(), value.strip()
            if key == "lxc.idmap":
                if value:
                    items.append(value)
                else:
                    items.clear()  # "lxc.idmap =" clears what came before
            elif key == "lxc.include" and value:
                read(Path(value), depth + 1)

    read(config, 0)
    return items


def _status_uids(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            real, effective = line.split()[1:3]
            return int(real), int(effective)
    raise ClaimRefused(f"process {pid} shows no Uid line")


def _parent_pid(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rpartition(")")[2].split()[1])


def _cgroup_parent_owner(cgroup: str, name: str) -> int:
    """The owner of the directory that holds the init's ``lxc.payload.NAME`` cgroup."""
    parts = [p for p in cgroup.split("/") if p]
    component = f"lxc.payload.{name}"
    if component not in parts:
        raise ClaimRefused(f"its cgroup {cgroup} is not the container's ({component})")
    parent = "/".join(parts[: parts.index(component)])
    for root in (*CGROUP_ROOTS, DEVICES_ROOT):
        if (root / "cgroup.procs").exists():
            try:
                return (root / parent).stat().st_uid
            except FileNotFoundError:
                continue
    raise ClaimRefused(f"its cgroup {cgroup} is not in this host's cgroup hierarchies")


def verify_claimed_init(lxcpath: str, name: str, ref: ContainerRef) -> None:
    """Check that ``ref.pid`` is really the init LXC started for ``lxcpath/name``.

    Believed only when all of this, written by root (or by the lxcpath's owner, whose
    containers these are) and by no one else, agrees: whoever listens on the command
    socket (SO_PEERCRED) is root or the lxcpath owner; the init's parent (LXC's
    monitor) runs as one of them; the init is in the container's own
    ``lxc.payload.NAME`` cgroup, in a directory only they can make cgroups in; and the
    init runs as the host id the config file's ``lxc.idmap`` gives the container's
    root (0 without one). Raises ClaimRefused naming the check that failed.
    """
    try:
        owners = frozenset({0, os.stat(lxcpath).st_uid})
        if (uid := _monitor_socket_uid(lxcpath, name)) not in owners:
            raise ClaimRefused(
                f"its command socket is held by uid {uid}, not root or the lxcpath owner"
            )
        monitor = _parent_pid(ref.pid)
        uids = _status_uids(monitor)
        if not set(uids) <= owners:
            raise ClaimRefused(
                f"the init's parent (pid {monitor}, its monitor) runs as uid {uids[1]}, "
                "not root or the lxcpath owner"
            )
        cgroup = ref.unified_cgroup if ref.devices_cgroup is None else ref.devices_cgroup
        if cgroup is None:
            raise ClaimRefused("the init has no cgroup to check")
        if (owner := _cgroup_parent_owner(cgroup, name)) not in owners:
            raise ClaimRefused(
                f"its cgroup {cgroup} sits in a directory owned by uid {owner}, "
                "not root or the lxcpath owner"
            )
        uid_map, _ = parse_idmap_items(read_config_idmap(Path(lxcpath, name, "config"), owners))
        expected = uid_map.to_host(0) if uid_map.ranges else 0
        actual = os.stat(f"/proc/{ref.pid}").st_uid
        if actual != expected:
            raise ClaimRefused(
                f"the init runs as host uid {actual}, but the config's lxc.idmap maps the "
                f"container's root to {expected}"
            )
    except ClaimRefused:
        raise
    except (OSError, ValueError, RuntimeApiError) as exc:
        raise ClaimRefused(f"cannot check it: {exc}") from None


class LxcAdapter(Adapter):
    """LXC containers of the given lxcpaths (``lxc-start -P PATH``)."""

    runtime = Runtime.LXC

    def __init__(
        self,
        lxcpaths: Sequence[str | os.PathLike[str]] = (DEFAULT_LXCPATH,),
        *,
        poll_interval: float = 1.0,
        resync_interval: float = 30.0,
    ) -> None:
        super().__init__(poll_interval=poll_interval, resync_interval=resync_interval)
        self.lxcpaths = tuple(os.fspath(p).rstrip("/") or "/" for p in lxcpaths)
        self._refused: set[tuple[str, int, str]] = set()  # warned about once each

    def describe(self) -> str:
        return "lxcpath " + ", ".join(self.lxcpaths)

    def _existing_paths(self) -> list[str]:
        return [path for path in self.lxcpaths if os.path.isdir(path)]

    async def _list_running(self) -> list[ContainerRef]:
        lxc_ls = find_tool("lxc-ls")
        refs: list[ContainerRef] = []
        seen: set[str] = set()
        for path in self._existing_paths():
            result = await run_tool([lxc_ls, "-P", path, "--running", "-f", "-F", "NAME,STATE,PID"])
            for name, state, pid in self._parse_ls(result.check().stdout):
                if state not in RUNNING_STATES or not pid.isdigit():
                    continue
                if name in seen:
                    log.warning("lxc: %s exists in more than one lxcpath; using the first", name)
                    continue
                try:
                    refs.append(await self._snapshot(path, name, int(pid)))
                except ContainerGone:
                    continue
                seen.add(name)
        return refs

    @staticmethod
    def _parse_ls(text: str) -> list[tuple[str, str, str]]:
        rows = []
        lines = text.splitlines()
        for line in lines[1:]:  # the first line is the header
            fields = line.split()
            if len(fields) == 3:
                rows.append((fields[0], fields[1], fields[2]))
        return rows

    async def _lookup(self, name: str) -> ContainerRef | None:
        lxc_info = find_tool("lxc-info")
        for path in self._existing_paths():
            result = await run_tool([lxc_info, "-P", path, "-n", name, "-s", "-p", "-H"])
            if result.returncode != 0:
                continue  # "NAME doesn't exist" in this lxcpath
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (line.partition(":") for line in result.stdout.splitlines())
            )
            state, pid = fields.get("State", ""), fields.get("PID", "")
            if state not in RUNNING_STATES or not pid.isdigit():
                return None
            return await self._snapshot(path, name, int(pid))
        return None

    async def _config(self, path: str, name: str) -> dict[str, list[str]]:
        argv = [find_tool("lxc-info"), "-P", path, "-n", name]
        for key in CONFIG_KEYS:
            argv += ["-c", key]
        result = await run_tool(argv)
        if result.returncode != 0:
            raise ContainerGone(f"lxc:{name}: {result.stderr.strip()}")
        return parse_config_items(result.stdout, CONFIG_KEYS)

    async def _snapshot(self, path: str, name: str, pid: int) -> ContainerRef:
        ref = snapshot(Runtime.LXC, name, pid)
        await trio.to_thread.run_sync(self._verify, path, name, ref)
        # The monitor is LXC's own: what it says of the running config can be used.
        config = await self._config(path, name)
        ref = dataclasses.replace(ref, base_device_rules=_device_rules(config))
        uid_map, _ = parse_idmap_items(config["lxc.idmap"])
        if uid_map.ranges and not ref.user_namespaced:
            # The configured idmap is not what this pid runs with: the container is
            # restarting or the pid is not its init any more.
            raise ContainerGone(f"lxc:{name}: pid {pid} is not in the container's user namespace")
        return ref

    def _verify(self, path: str, name: str, ref: ContainerRef) -> None:
        """verify_claimed_init on that very process (a pidfd pins it meanwhile)."""
        with PidHandle.open(ref.pid, expected_start_time=ref.start_time) as handle:
            try:
                verify_claimed_init(path, name, ref)
                handle.check_alive()
            except ClaimRefused as exc:
                if not handle.alive():
                    raise ContainerGone(f"lxc:{name}: pid {ref.pid} exited") from None
                key = (name, ref.pid, str(exc))
                if key not in self._refused:
                    if len(self._refused) > 1000:
                        self._refused.clear()
                    self._refused.add(key)
                    log.warning(
                        "lxc:%s: not believing that pid %d is its init (LXC's tools say so, "
                        "but %s); treated as not running",
                        name,
                        ref.pid,
                        exc,
                    )
                raise ClaimRefused(f"lxc:{name}: pid {ref.pid} refused: {exc}") from None

    async def poll_fingerprint(self) -> Hashable:
        """The LXC command sockets that exist now (see the module docstring)."""
        text = await trio.to_thread.run_sync(PROC_NET_UNIX.read_text, "utf-8", "surrogateescape")
        return command_sockets(text, self.lxcpaths)
