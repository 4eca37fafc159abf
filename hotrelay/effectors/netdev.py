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

Inside the container, root owns the namespace: it may delete, rename or hide (in a
nested netns) the interface we moved in, and create its own under the same name, or
even the same index and MAC. Moving such an interface to the host would hand the
container a foothold there (it keeps the peer of its veth). So the move in records
the interface's identity as the kernel states it (:class:`LinkIdentity`: its kind,
its permanent or MAC address, its parent device, and for a veth or macvlan the link
it hangs off in the host's netns), and the move out takes back only an interface at
the recorded index whose identity is exactly that; never one found by name. Anything
else is left where it is, with a warning that names the container and the difference.

pyroute2's IPRoute is synchronous (it runs its own asyncio loop), so each move runs
in one worker thread from start to end.
"""

from __future__ import annotations

import errno
import logging
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

__all__ = ["LinkIdentity", "MoveOut", "MovedNetdev", "NetdevMover"]

log = logging.getLogger("hotrelay.effectors.netdev")

# RTM_GETNSID's answer for a netns that has no id in the asking one.
NSID_NOT_ASSIGNED = (-1, 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class LinkIdentity:
    """What tells the interface we moved in from one the container made itself.

    ``kind`` is IFLA_INFO_KIND (None for a physical NIC); ``address`` the permanent
    address (IFLA_PERM_ADDRESS) where the kernel has one, else the MAC at the move
    (``permanent`` says which); ``parent`` the parent device as ``bus:name``
    (IFLA_PARENT_DEV_BUS_NAME, IFLA_PARENT_DEV_NAME), None for virtual interfaces;
    ``link`` is IFLA_LINK, the interface it hangs off (a veth's peer, a macvlan's
    lower device) when that is another one, and ``link_on_host`` whether that one is
    in the host's netns (IFLA_LINK_NETNSID is the host's id as seen from inside).

    A container can copy a name, an index, a kind and a MAC; it cannot make a
    parent device, nor a link whose other end is in the host's netns.
    """

    kind: str | None
    address: str | None
    permanent: bool
    parent: str | None
    link: int | None
    link_on_host: bool

    def differences(self, now: LinkIdentity) -> list[str]:
        """What differs in ``now`` from this recorded identity (empty: the same)."""
        found = []
        for name in ("kind", "address", "permanent", "parent", "link", "link_on_host"):
            was, is_ = getattr(self, name), getattr(now, name)
            if was != is_:
                found.append(f"{name} {is_!r} (recorded {was!r})")
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "address": self.address,
            "permanent": self.permanent,
            "parent": self.parent,
            "link": self.link,
            "link_on_host": self.link_on_host,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LinkIdentity:
        def text(key: str) -> str | None:
            value = data[key]
            return None if value is None else str(value)

        link = data["link"]
        return cls(
            kind=text("kind"),
            address=text("address"),
            permanent=bool(data["permanent"]),
            parent=text("parent"),
            link=None if link is None else int(link),
            link_on_host=bool(data["link_on_host"]),
        )


@dataclass(frozen=True, slots=True)
class MovedNetdev:
    """An interface we moved in: its host name to restore, where it is inside, and
    what it is (``identity`` None: a record from before identities were kept, which
    is never moved back)."""

    container: str
    host_name: str
    inside_name: str
    inside_index: int
    identity: LinkIdentity | None = None
    host_index: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "host_name": self.host_name,
            "inside_name": self.inside_name,
            "inside_index": self.inside_index,
            "identity": None if self.identity is None else self.identity.to_json(),
            "host_index": self.host_index,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MovedNetdev:
        identity = data.get("identity")
        host_index = data.get("host_index")
        return cls(
            container=str(data["container"]),
            host_name=str(data["host_name"]),
            inside_name=str(data["inside_name"]),
            inside_index=int(data["inside_index"]),
            identity=None if identity is None else LinkIdentity.from_json(identity),
            host_index=None if host_index is None else int(host_index),
        )


@dataclass(frozen=True, slots=True)
class MoveOut:
    """What a move out did: ``moved`` back to the host, or left alone and why
    (``refused``: something is at the recorded index or name, and it is not ours)."""

    moved: bool
    reason: str = ""
    refused: bool = False

    def __bool__(self) -> bool:
        return self.moved


# How long a moved interface may take to show under its new name in the container.
CONFIRM_WITHIN = 0.5


def _lookup(ipr: Any, ifname: str) -> int | None:
    indexes = ipr.link_lookup(ifname=ifname)
    return int(indexes[0]) if indexes else None


def _link(ipr: Any, index: int) -> Any | None:
    try:
        links = ipr.get_links(index)
    except NetlinkError:
        return None
    return links[0] if links else None


def _host_nsid(ipr: Any, host_ns: int) -> int | None:
    """The host netns's id in the netns of ``ipr`` (None: it has none there)."""
    answer = ipr.get_netnsid(fd=host_ns)
    nsid = None if answer is None else answer.get("nsid")
    return None if nsid is None or nsid in NSID_NOT_ASSIGNED else int(nsid)


def _identity(ipr: Any, link: Any, host_ns: int) -> LinkIdentity:
    """The identity of ``link`` (an RTM_NEWLINK answer from ``ipr``'s netns)."""
    perm = link.get("IFLA_PERM_ADDRESS")
    bus, parent = link.get("IFLA_PARENT_DEV_BUS_NAME"), link.get("IFLA_PARENT_DEV_NAME")
    iflink = link.get("IFLA_LINK")
    # IFLA_LINK is only sent when it names another interface; a link in the same
    # netns as the interface comes without IFLA_LINK_NETNSID.
    nsid = link.get("IFLA_LINK_NETNSID")
    on_host = nsid is not None and iflink is not None and nsid == _host_nsid(ipr, host_ns)
    return LinkIdentity(
        kind=link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
        address=str(perm) if perm else link.get("IFLA_ADDRESS"),
        permanent=bool(perm),
        parent=f"{bus or '?'}:{parent}" if parent else None,
        link=None if iflink is None else int(iflink),
        link_on_host=on_host,
    )


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


def _open_host_netns() -> int:
    return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _move_in(
    ifname: str, new_name: str, netns_fd: int, inside: socket.socket
) -> tuple[int, int, LinkIdentity]:
    """Move and rename; (index on the host before, index inside, identity inside)."""
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
                host_ns = _open_host_netns()
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
        # Recorded as it is inside, right after the move: the container has had no
        # say yet in what the kernel reports (its index, its peer's netns id there).
        link = _link(ipr, inside_index)
        if link is None:
            raise LookupError(f"{new_name!r} left the container right after the move")
        host_ns = _open_host_netns()
        try:
            identity = _identity(ipr, link, host_ns)
        finally:
            os.close(host_ns)
    return index, inside_index, identity


def _move_out(record: MovedNetdev, inside: socket.socket) -> MoveOut:
    host_ns = _open_host_netns()
    try:
        with IPRoute(groups=0, fileno=inside.detach()) as ipr:
            link = _link(ipr, record.inside_index)
            if link is None:
                named = _lookup(ipr, record.inside_name)
                if named is None:
                    return MoveOut(False, f"no interface has index {record.inside_index}")
                return MoveOut(
                    False,
                    f"no interface has index {record.inside_index}; the one named "
                    f"{record.inside_name!r} (index {named}) is not the one moved in",
                    refused=True,
                )
            if record.identity is None:
                return MoveOut(
                    False,
                    "recorded without its identity (an older hotrelay): never moved back "
                    "by index or name alone",
                    refused=True,
                )
            differences = record.identity.differences(_identity(ipr, link, host_ns))
            if differences:
                name = link.get("IFLA_IFNAME")
                return MoveOut(
                    False,
                    f"the interface at index {record.inside_index} ({name!r}) is not the "
                    f"one moved in: {', '.join(differences)}",
                    refused=True,
                )
            ipr.link("set", index=record.inside_index, net_ns_fd=host_ns, ifname=record.host_name)
            return MoveOut(True)
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
            host_index, index, identity = await trio.to_thread.run_sync(
                _move_in, ifname, target_name, netns_fd, inside
            )
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
        return MovedNetdev(name, ifname, target_name, index, identity, host_index)

    async def move_out(self, container: ContainerRef, record: MovedNetdev) -> MoveOut:
        """Bring the interface back to the host under its original name.

        Only the interface at the recorded index, and only if it is still exactly
        what was moved in (:class:`LinkIdentity`). Otherwise nothing is moved (false,
        with the reason): the interface left the container (unplugged), or the
        container hid it and put another one in its place. Either way nothing of
        ours is left to take back; a mismatch is logged as a warning.
        """
        helper = await self._helpers.get(container)
        inside = await helper.route_socket()
        try:
            result = await trio.to_thread.run_sync(_move_out, record, inside)
        except NetlinkError as exc:
            raise InjectionError(
                container.target,
                f"moving {record.inside_name} back to the host as {record.host_name}: "
                f"{exc.args[-1]}",
                errno=exc.code,
            ) from exc
        finally:
            inside.close()
        if result.refused:
            log.warning(
                "container %s: %s (moved in from the host as %s) not moved back: %s",
                container.target,
                record.inside_name,
                record.host_name,
                result.reason,
            )
        elif not result.moved:
            log.info(
                "container %s: %s already gone (%s)",
                container.target,
                record.inside_name,
                result.reason,
            )
        return result
