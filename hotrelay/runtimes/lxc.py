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
running containers changed.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from pathlib import Path

import trio

from hotrelay.core.containers import ContainerRef, IdMap, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.runtimes.base import Adapter, log
from hotrelay.runtimes.errors import ContainerGone, RuntimeApiError
from hotrelay.runtimes.procfs import snapshot
from hotrelay.runtimes.tools import find_tool, run_tool

__all__ = ["DEFAULT_LXCPATH", "LxcAdapter", "parse_config_items", "parse_idmap_items"]

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
        config = await self._config(path, name)
        ref = snapshot(Runtime.LXC, name, pid, base_device_rules=_device_rules(config))
        uid_map, _ = parse_idmap_items(config["lxc.idmap"])
        if uid_map.ranges and not ref.user_namespaced:
            # The configured idmap is not what this pid runs with: the container is
            # restarting or the pid is not its init any more.
            raise ContainerGone(f"lxc:{name}: pid {pid} is not in the container's user namespace")
        return ref

    async def poll_fingerprint(self) -> Hashable:
        """The LXC command sockets that exist now (see the module docstring)."""
        text = await trio.to_thread.run_sync(PROC_NET_UNIX.read_text, "utf-8", "surrogateescape")
        prefixes = (*(f"@{path}/" for path in self.lxcpaths), "@lxc/")
        sockets = set()
        for line in text.splitlines()[1:]:
            fields = line.split()
            name = fields[-1] if len(fields) >= 8 else ""
            if name.endswith("/command") and name.startswith(prefixes):
                sockets.add(name)
        return frozenset(sockets)
