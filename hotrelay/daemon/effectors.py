"""Adapters from the relay's actions to the effectors, in the executor's terms.

Each adapter implements the executor's ``Effector`` protocol for one action kind:
``prepare`` looks without touching and returns what a crash-safe undo needs, ``apply``
does the work and returns the effector's own record, ``undo`` reverses a record (also
one that only got as far as ``prepare``), ``notify`` runs a one-off action. Records
are JSON-ready dicts: they live in the ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import trio

from hotrelay.core.containers import ContainerRef, IdMap, IdRange, Runtime
from hotrelay.core.device_access import DeviceRule, DeviceType, parse_devices_list
from hotrelay.core.plan import (
    GrantDevice,
    InjectUevent,
    MakeNode,
    MakeSymlink,
    MoveNetdev,
    SkipSymlink,
)
from hotrelay.core.uevent import Uevent, Wire
from hotrelay.daemon.executor import EffectorError
from hotrelay.effectors.cgroup_v2 import V2Grant, render_rule
from hotrelay.effectors.cgroups import DeviceGrants, GrantRecord
from hotrelay.effectors.devnode import DeviceNodes, NodeRecord, SymlinkRecord
from hotrelay.effectors.netdev import MovedNetdev, NetdevMover
from hotrelay.effectors.nshelper import InjectionError, NamespaceHelpers, TargetExistsError
from hotrelay.effectors.uevent_inject import UeventInjector
from hotrelay.runtimes.names import resolve_owner_async

__all__ = [
    "CgroupEffector",
    "InjectEffector",
    "NetdevEffector",
    "NodeEffector",
    "NoteEffector",
    "SymlinkEffector",
    "container_from_json",
    "container_to_json",
]

log = logging.getLogger("hotrelay.effectors")

Record = dict[str, Any]
DEVICES_ROOT = Path("/sys/fs/cgroup/devices")


def _already_allowed(cgroup: str | None, rule: DeviceRule, root: Path) -> bool | None:
    """Whether v1 already allows ``rule`` in ``cgroup`` (None: no v1 layer there)."""
    if cgroup is None:
        return None
    try:
        listed = parse_devices_list((root / cgroup.lstrip("/") / "devices.list").read_text())
    except (OSError, ValueError):
        return None
    return any(entry.allow and entry.covers(rule) for entry in listed)


def _resolved(action: Any) -> ContainerRef:
    """The action's container; the relay only plans actions for resolved containers."""
    container = action.container
    if not isinstance(container, ContainerRef):
        raise EffectorError(f"{action.describe()}: {container} is not a running container")
    return container


class CgroupEffector:
    """GrantDevice: the device cgroup grant on every layer the container has."""

    def __init__(self, grants: DeviceGrants, *, devices_root: Path = DEVICES_ROOT) -> None:
        self._grants = grants
        self._devices_root = devices_root

    def prepare(self, action: GrantDevice) -> Record:
        container = _resolved(action)
        cgroup = container.devices_cgroup
        # Recorded before the grant: if we crash before the grant's own record reaches
        # the ledger, the undo must know whether the container had this access already.
        return {
            "pending": True,
            "rule": action.device.render(),
            "devices_cgroup": cgroup,
            "already_allowed": _already_allowed(cgroup, action.device, self._devices_root),
            "unified_cgroup": container.unified_cgroup,
            "base_rules": [render_rule(r) for r in container.base_device_rules],
        }

    async def apply(self, action: GrantDevice, record: Record) -> Record:
        await trio.lowlevel.checkpoint()
        return {"grant": self._grants.grant(_resolved(action), action.device).to_json()}

    async def undo(self, record: Record) -> None:
        await trio.lowlevel.checkpoint()
        if "grant" in record:
            self._grants.revoke(GrantRecord.from_json(record["grant"]))
            return
        # Only prepared: the grant may have half-happened. On v1 a deny of exactly
        # this rule takes back whatever we might have added; the kernel checks both
        # layers, so on hybrid hosts a v1 deny closes the device whatever v2 says.
        self._undo_pending_v1(record)
        # On v2 the grant may sit in our programs' prefix, and on a pure cgroup2 host
        # nothing else would ever take it out: revoke it wherever it is one of ours
        # (a program that does not hold it is left as it is).
        unified = record.get("unified_cgroup")
        v2 = self._grants.v2
        if unified is not None and v2 is not None:
            rules = tuple(str(r) for r in record.get("base_rules", ()))
            pending = V2Grant(str(unified), str(record["rule"]), v2.tree(str(unified)), rules)
            v2.revoke(pending)

    def _undo_pending_v1(self, record: Record) -> None:
        cgroup = record.get("devices_cgroup")
        if cgroup is None or record.get("already_allowed") is not False:
            return
        path = self._devices_root / str(cgroup).lstrip("/") / "devices.deny"
        try:
            path.write_text(str(record["rule"]))
        except FileNotFoundError:
            return  # the cgroup is gone, and the access with it
        log.warning("undid an unfinished grant of %s in %s", record["rule"], cgroup)

    async def notify(self, action: Any) -> None:
        raise EffectorError(f"{action.describe()}: not a one-off action")

    def reconcile(self, records: list[Record]) -> tuple[list[Record], int, tuple[str, ...]]:
        """Heal grants a runtime took away. Returns (updated records, heals, errors)."""
        grants = [GrantRecord.from_json(r["grant"]) for r in records if "grant" in r]
        result = self._grants.reconcile(grants)
        return [{"grant": g.to_json()} for g in result.records], result.heals, result.errors


# -- containers in records ------------------------------------------------------------


def container_to_json(container: ContainerRef) -> Record:
    """What an undo needs to find the container again (and to know it is the same one)."""
    return {
        "runtime": container.runtime.value,
        "name": container.name,
        "pid": container.pid,
        "id": container.id,
        "start_time": container.start_time,
        "devices_cgroup": container.devices_cgroup,
        "unified_cgroup": container.unified_cgroup,
        "namespaces": dict(container.namespaces),
        "uid_map": [[r.inside, r.outside, r.count] for r in container.uid_map.ranges],
        "gid_map": [[r.inside, r.outside, r.count] for r in container.gid_map.ranges],
        "host_network": container.host_network,
        "privileged": container.privileged,
    }


def container_from_json(data: Record) -> ContainerRef:
    return ContainerRef(
        runtime=Runtime(data["runtime"]),
        name=str(data["name"]),
        pid=int(data["pid"]),
        id=str(data.get("id", "")),
        start_time=data.get("start_time"),
        devices_cgroup=data.get("devices_cgroup"),
        unified_cgroup=data.get("unified_cgroup"),
        namespaces={str(k): int(v) for k, v in data.get("namespaces", {}).items()},
        uid_map=IdMap(tuple(IdRange(*r) for r in data.get("uid_map", []))),
        gid_map=IdMap(tuple(IdRange(*r) for r in data.get("gid_map", []))),
        host_network=bool(data.get("host_network", False)),
        privileged=bool(data.get("privileged", True)),
    )


def _with_dirs(node: NodeRecord, dirs: tuple[str, ...]) -> Record:
    data = node.to_json()
    data["created_dirs"] = list(dirs)
    return data


def _alive(container: ContainerRef) -> bool:
    """Is this the same process still (a reused pid has another start time)?"""
    try:
        stat = Path(f"/proc/{container.pid}/stat").read_text()
    except OSError:
        return False
    start = int(stat.rpartition(")")[2].split()[19])
    return container.start_time is None or start == container.start_time


class _InContainer:
    """Shared by the effectors that act inside a container's namespaces."""

    def _prepared(self, action: Any) -> Record:
        return {"pending": True, "container": container_to_json(_resolved(action))}

    async def _target(self, record: Record) -> ContainerRef | None:
        """The recorded container if it still runs; None means its namespaces died with it."""
        await trio.lowlevel.checkpoint()
        container = container_from_json(record["container"])
        return container if _alive(container) else None

    async def notify(self, action: Any) -> None:
        raise EffectorError(f"{action.describe()}: not a one-off action")

    async def _undo_inside(self, container: ContainerRef, undo: Awaitable[object]) -> None:
        """Run an undo inside the container; if the container stopped meanwhile, what we
        made there went with its namespaces, so the undo is done, not failed."""
        try:
            await undo
        except InjectionError:
            if _alive(container):
                raise
            log.debug("%s stopped during an undo: nothing left to undo there", container.target)


class NodeEffector(_InContainer):
    """MakeNode: the device node in the container's /dev, with its owner and mode."""

    def __init__(self, nodes: DeviceNodes, helpers: NamespaceHelpers) -> None:
        self._nodes = nodes
        self._helpers = helpers

    async def heal(self, record: Record) -> Record | None:
        """Make the node again if the container deleted it; the new record, or None.

        A path that exists is left alone, even if it is no longer our node: the
        container put something there, and we never overwrite what we did not make.
        """
        container = await self._target(record)
        if container is None or "node" not in record:
            return None
        node = NodeRecord.from_json(record["node"])
        if await self._helpers.node_exists(container, node.path):
            return None
        again = await self._nodes.make_node(
            container,
            node.path,
            type=node.type,
            major=node.major,
            minor=node.minor,
            mode=node.mode,
            uid=node.uid,
            gid=node.gid,
            method=node.method,
        )
        # Directories made the first time stay ours to remove, with any made now.
        dirs = tuple(dict.fromkeys((*node.created_dirs, *again.created_dirs)))
        log.warning("healed %s in %s: the container had deleted it", node.path, container.target)
        return {"container": record["container"], "node": _with_dirs(again, dirs)}

    def prepare(self, action: MakeNode) -> Record:
        # Which node apply may make: a crash (or a helper killed mid-request) between
        # making it and recording it leaves the step pending, and its undo must then
        # remove that node, or every later apply finds it in the way, forever.
        return {
            **self._prepared(action),
            "path": action.path,
            "type": action.type.value,
            "major": action.major,
            "minor": action.minor,
        }

    async def apply(self, action: MakeNode, record: Record) -> Record:
        container = _resolved(action)
        owner = await resolve_owner_async(
            container, user=action.owner, group=action.group, helpers=self._helpers
        )
        try:
            node = await self._nodes.make_node(
                container,
                action.path,
                type=action.type,
                major=action.major,
                minor=action.minor,
                mode=action.mode,
                uid=owner.uid,
                gid=owner.gid,
            )
        except TargetExistsError:
            record["existed"] = True  # not ours: the rollback leaves it alone
            raise
        return {"container": record["container"], "node": node.to_json()}

    async def undo(self, record: Record) -> None:
        container = await self._target(record)
        if container is None:
            return  # gone with the container's mount namespace
        if "node" in record:
            node = NodeRecord.from_json(record["node"])
            await self._undo_inside(container, self._nodes.remove_node(container, node))
        elif "path" in record and not record.get("existed"):
            # Pending: made or not, we cannot tell. Removed only if it is exactly this
            # device (remove_node leaves anything else alone); our directories stay.
            pending = NodeRecord(
                container=container.target,
                path=str(record["path"]),
                type=DeviceType(record["type"]),
                major=int(record["major"]),
                minor=int(record["minor"]),
                mode=0,
                uid=0,
                gid=0,
                method=self._nodes.method_for(container),
            )
            await self._undo_inside(container, self._nodes.remove_node(container, pending))


class SymlinkEffector(_InContainer):
    """MakeSymlink: a link such as /dev/serial/by-id/... to the node, in the container."""

    def __init__(self, nodes: DeviceNodes, helpers: NamespaceHelpers) -> None:
        self._nodes = nodes
        self._helpers = helpers

    async def heal(self, record: Record) -> Record | None:
        """Make the link again if it is gone; the new record, or None. Anything at its
        path (ours or the container's) is left alone, as for nodes."""
        container = await self._target(record)
        if container is None or "symlink" not in record:
            return None
        link = SymlinkRecord.from_json(record["symlink"])
        if await self._helpers.node_exists(container, link.path):
            return None
        again = await self._nodes.make_symlink(container, link.path, link.target)
        dirs = tuple(dict.fromkeys((*link.created_dirs, *again.created_dirs)))
        log.warning("healed %s in %s: it was gone", link.path, container.target)
        data = again.to_json()
        data["created_dirs"] = list(dirs)
        return {"container": record["container"], "symlink": data}

    def prepare(self, action: MakeSymlink) -> Record:
        # As for nodes: a pending link may exist; its undo removes it only if it still
        # points exactly where we would have pointed it.
        return {**self._prepared(action), "path": action.link, "target": action.target}

    async def apply(self, action: MakeSymlink, record: Record) -> Record:
        try:
            link = await self._nodes.make_symlink(_resolved(action), action.link, action.target)
        except TargetExistsError:
            record["existed"] = True
            raise
        return {"container": record["container"], "symlink": link.to_json()}

    async def undo(self, record: Record) -> None:
        container = await self._target(record)
        if container is None:
            return
        if "symlink" in record:
            link = SymlinkRecord.from_json(record["symlink"])
            await self._undo_inside(container, self._nodes.remove_symlink(container, link))
        elif "path" in record and not record.get("existed"):
            pending = SymlinkRecord(container.target, str(record["path"]), str(record["target"]))
            await self._undo_inside(container, self._nodes.remove_symlink(container, pending))


class InjectEffector(_InContainer):
    """InjectUevent: replay the event in the container's network namespace.

    Its undo is the matching ``remove`` (the device leaves the container), sent the
    same way, so listeners inside see the device go as they saw it come.
    """

    def __init__(self, injector: UeventInjector) -> None:
        self._injector = injector

    def prepare(self, action: InjectUevent) -> Record:
        return {
            **self._prepared(action),
            "uevent": dict(action.uevent.properties),
            "wire": None if action.wire is None else action.wire.value,
        }

    async def apply(self, action: InjectUevent, record: Record) -> Record:
        sent = await self._injector.inject(
            _resolved(action), action.uevent, wire=action.wire, devlinks=_devlinks(action.uevent)
        )
        return {**record, "pending": False, "sent": sent.to_json()}

    async def undo(self, record: Record) -> None:
        container = await self._target(record)
        if container is None or record.get("pending", True):
            return  # nobody inside heard the add (or nobody is left to hear the remove)
        uevent = Uevent.from_properties(record["uevent"]).replace(ACTION="remove", SEQNUM=None)
        wire = None if record.get("wire") is None else Wire(record["wire"])
        await self._undo_inside(
            container,
            self._injector.inject(container, uevent, wire=wire, devlinks=_devlinks(uevent)),
        )

    async def notify(self, action: InjectUevent) -> None:
        await self._injector.inject(
            _resolved(action), action.uevent, wire=action.wire, devlinks=_devlinks(action.uevent)
        )


def _devlinks(uevent: Uevent) -> tuple[str, ...]:
    """The container-side links the relay put in DEVLINKS (core.relay._inside_view); the
    injector writes DEVLINKS from what it is given, and would otherwise drop them.
    Space-separated as udev has them: template values never carry whitespace."""
    return tuple((uevent.get("DEVLINKS") or "").split())


class NetdevEffector(_InContainer):
    """MoveNetdev: the interface into the container's netns (renamed); undo brings it back."""

    def __init__(self, mover: NetdevMover) -> None:
        self._mover = mover

    def prepare(self, action: MoveNetdev) -> Record:
        return self._prepared(action)

    async def apply(self, action: MoveNetdev, record: Record) -> Record:
        moved = await self._mover.move_in(_resolved(action), action.ifname, action.new_name)
        return {"container": record["container"], "moved": moved.to_json()}

    async def undo(self, record: Record) -> None:
        container = await self._target(record)
        if container is None or "moved" not in record:
            return  # a netns that dies hands physical interfaces back to the host itself
        # Only the very interface moved in goes back (its identity is checked); one the
        # container put in its place is left there, logged, and the move counts as undone.
        await self._mover.move_out(container, MovedNetdev.from_json(record["moved"]))


class NoteEffector:
    """SkipSymlink: nothing to do; its step in the ledger says what was left out, and why."""

    def prepare(self, action: SkipSymlink) -> Record:
        return {"note": action.describe()}

    async def apply(self, action: SkipSymlink, record: Record) -> Record:
        await trio.lowlevel.checkpoint()
        return record

    async def undo(self, record: Record) -> None:
        await trio.lowlevel.checkpoint()

    async def notify(self, action: Any) -> None:
        raise EffectorError(f"{action.describe()}: not a one-off action")
