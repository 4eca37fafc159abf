"""Network interfaces moved into a container's network namespace, and back.

One RTM_NEWLINK carrying IFLA_NET_NS_FD and IFLA_IFNAME moves and renames an
interface atomically: it never exists under the new name on the host nor under the
old one inside, and a name already taken inside fails the whole move (EEXIST) with
the interface still on the host. The kernel then announces it in the container's
netns itself (add@ from port 0), so no uevent needs injecting.

Going back needs a rtnetlink socket in the container's netns: the container's
namespace helper creates one and hands it over (SCM_RIGHTS). The daemon never joins
another network namespace and never uses pyroute2's process-wide netns switching.
No interface is given an address here, ever.

pyroute2's IPRoute is synchronous (it runs its own asyncio loop), so each move runs
in one worker thread from start to end.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hotrelay.core.containers import ContainerRef
from hotrelay.core.rules.template import check_ifname
from hotrelay.effectors.nshelper import InjectionError, NamespaceHelpers, shares_host_network
from hotrelay.kernel import ns

__all__ = ["MovedNetdev", "NetdevMover"]


@dataclass(frozen=True, slots=True)
class MovedNetdev:
    """An interface we moved in: its host name to restore, and where it is inside."""

    container: str
    host_name: str
    inside_name: str
    inside_index: int

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "host_name": self.host_name,
            "inside_name": self.inside_name,
            "inside_index": self.inside_index,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MovedNetdev:
        return cls(
            container=str(data["container"]),
            host_name=str(data["host_name"]),
            inside_name=str(data["inside_name"]),
            inside_index=int(data["inside_index"]),
        )


# How long a moved interface may take to show under its new name in the container.
CONFIRM_WITHIN = 0.5


def _lookup(ipr: Any, ifname: str) -> int | None:
    indexes = ipr.link_lookup(ifname=ifname)
    return int(indexes[0]) if indexes else None


def _name_of(ipr: Any, index: int) -> str | None:
    try:
        links = ipr.get_links(index)
    except NetlinkError:
        return None
    return str(links[0].get("ifname")) if links else None


def _open_netns(container: ContainerRef) -> int:
    """The container's netns fd, verified against its ContainerRef while pinned."""
    pidfd = ns.open_pidfd(container.pid)
    try:
        fd = ns.open_namespace(container.pid, "net", container.namespaces.get("net"))
        if not ns.is_alive(pidfd):
            os.close(fd)
            raise ProcessLookupError(f"pid {container.pid} exited")
        return fd
    finally:
        os.close(pidfd)


def _move_in(ifname: str, new_name: str, netns_fd: int, inside: socket.socket) -> int:
    with IPRoute(groups=0) as host, IPRoute(groups=0, fileno=inside.detach()) as ipr:
        index = _lookup(host, ifname)
        if index is None:
            raise LookupError(f"no interface {ifname!r} on the host")
        # The kernel moves an interface under its current name and renames it only
        # afterwards (IFLA_IFNAME is merely the fallback for a clash during the move),
        # so a failed rename strands it inside under its old name: check the name
        # first, and bring a stranded interface back if the container raced us.
        if new_name != ifname and _lookup(ipr, new_name) is not None:
            raise FileExistsError(
                errno.EEXIST, f"an interface named {new_name!r} already exists in the container"
            )
        request: dict[str, Any] = {"index": index, "net_ns_fd": netns_fd}
        if new_name != ifname:
            request["ifname"] = new_name
        try:
            host.link("set", **request)
        except NetlinkError:
            stranded = _lookup(ipr, ifname)
            if stranded is not None:
                host_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    ipr.link("set", index=stranded, net_ns_fd=host_ns)
                finally:
                    os.close(host_ns)
            raise
        inside_index = _lookup(ipr, new_name)
        # The move is acked, yet a lookup in the container's netns right after it can
        # miss the new name (about one demo run in ten): look again, briefly, before
        # calling the move failed.
        deadline = time.monotonic() + CONFIRM_WITHIN
        while inside_index is None and time.monotonic() < deadline:
            time.sleep(0.01)
            inside_index = _lookup(ipr, new_name)
    if inside_index is None:
        raise LookupError(f"{new_name!r} did not appear in the container after the move")
    return inside_index


def _move_out(record: MovedNetdev, inside: socket.socket) -> bool:
    host_ns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with IPRoute(groups=0, fileno=inside.detach()) as ipr:
            index: int | None = record.inside_index
            if index is None or _name_of(ipr, index) is None:
                index = _lookup(ipr, record.inside_name)
            if index is None:
                return False
            ipr.link("set", index=index, net_ns_fd=host_ns, ifname=record.host_name)
            return True
    finally:
        os.close(host_ns)


class NetdevMover:
    """Move interfaces into containers and back, through their namespace helpers."""

    def __init__(self, helpers: NamespaceHelpers) -> None:
        self._helpers = helpers

    async def move_in(
        self, container: ContainerRef, ifname: str, new_name: str | None = None
    ) -> MovedNetdev:
        """Move host interface ``ifname`` into the container, named ``new_name``."""
        name = container.target
        target_name = new_name or ifname
        for each in (ifname, target_name):
            problem = check_ifname(each)
            if problem is not None:
                raise InjectionError(name, f"interface name {each!r} {problem}")
        if shares_host_network(container):
            raise InjectionError(
                name, f"cannot move {ifname}: the container uses the host's network namespace"
            )
        helper = await self._helpers.get(container)
        inside = await helper.route_socket()
        try:
            netns_fd = _open_netns(container)
        except BaseException:
            inside.close()
            raise
        try:
            index = await trio.to_thread.run_sync(_move_in, ifname, target_name, netns_fd, inside)
        except NetlinkError as exc:
            raise InjectionError(
                name, f"moving {ifname} in as {target_name}: {exc.args[-1]}", errno=exc.code
            ) from exc
        except OSError as exc:
            raise InjectionError(
                name, f"moving {ifname} in as {target_name}: {exc.strerror}", errno=exc.errno
            ) from exc
        except LookupError as exc:
            raise InjectionError(name, str(exc)) from exc
        finally:
            os.close(netns_fd)
            inside.close()
        return MovedNetdev(name, ifname, target_name, index)

    async def move_out(self, container: ContainerRef, record: MovedNetdev) -> bool:
        """Bring the interface back to the host under its original name.

        False if it is no longer in the container (gone with it, or moved away):
        there is nothing to undo.
        """
        helper = await self._helpers.get(container)
        inside = await helper.route_socket()
        try:
            return await trio.to_thread.run_sync(_move_out, record, inside)
        except NetlinkError as exc:
            raise InjectionError(
                container.target,
                f"moving {record.inside_name} back to the host as {record.host_name}: "
                f"{exc.args[-1]}",
                errno=exc.code,
            ) from exc
        finally:
            inside.close()
