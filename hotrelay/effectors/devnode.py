"""Device nodes and symlinks inside a container's mount namespace.

Two ways to put a node into a container, picked by whether it has a user namespace:

- ``mknod``: privileged containers (no user namespace). The helper mknods the node at
  the target path in the container's /dev, with the requested mode, and chowns it.
- ``bind``: user-namespaced containers. Their /dev is a tmpfs mounted inside the user
  namespace, which the kernel marks SB_I_NODEV: a node made there will not open
  (EACCES), and host root cannot even create one as an unmapped id (EOVERFLOW). So the
  node is made on the host, in a private root-only directory under the state dir,
  owned by the host ids the container's owner maps to, cloned as a detached mount
  (open_tree(OPEN_TREE_CLONE), with nodev cleared: /run is often mounted nodev), and
  the helper mounts that onto an empty file it creates at the target as the
  container's root. The host file is unlinked as soon as the mount exists: the mount
  keeps the inode alive, and nothing stays behind in the state dir.

Ids in requests are the container's own numbers (names are resolved elsewhere);
they are mapped to host ids through the container's id maps. Every path is confined
to the container's /dev and walked without following symlinks (see nshelper).

Records (frozen, JSON-ready) say exactly what was created, including the parent
directories we made, so that removal, also after a daemon restart, undoes only that.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotrelay.core.containers import ContainerRef
from hotrelay.core.device_access import DeviceType
from hotrelay.effectors.nshelper import (
    InjectionError,
    NamespaceHelpers,
    Removed,
    UnsafePathError,
    split_dev_path,
)
from hotrelay.kernel import mount

__all__ = [
    "DEFAULT_NODES_DIR",
    "DeviceNodes",
    "NodeMethod",
    "NodeRecord",
    "Removal",
    "SymlinkRecord",
    "purge_host_nodes",
]

DEFAULT_NODES_DIR = Path("/run/hotrelay/nodes")
# When neither the request nor the host says: what devtmpfs itself uses.
FALLBACK_MODE = 0o600


class NodeMethod(enum.Enum):
    MKNOD = "mknod"
    BIND = "bind"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node we created: enough to remove exactly it, also after a restart.

    ``uid``/``gid`` are the container's ids; ``created_dirs`` are the parent
    directories we made for it, outermost first.
    """

    container: str
    path: str
    type: DeviceType
    major: int
    minor: int
    mode: int
    uid: int
    gid: int
    method: NodeMethod
    created_dirs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "path": self.path,
            "type": self.type.value,
            "major": self.major,
            "minor": self.minor,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "method": self.method.value,
            "created_dirs": list(self.created_dirs),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeRecord:
        return cls(
            container=str(data["container"]),
            path=str(data["path"]),
            type=DeviceType(data["type"]),
            major=int(data["major"]),
            minor=int(data["minor"]),
            mode=int(data["mode"]),
            uid=int(data["uid"]),
            gid=int(data["gid"]),
            method=NodeMethod(data["method"]),
            created_dirs=tuple(str(d) for d in data.get("created_dirs", ())),
        )


@dataclass(frozen=True, slots=True)
class SymlinkRecord:
    """A symlink we created (``target`` as written into the link)."""

    container: str
    path: str
    target: str
    created_dirs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "path": self.path,
            "target": self.target,
            "created_dirs": list(self.created_dirs),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SymlinkRecord:
        return cls(
            container=str(data["container"]),
            path=str(data["path"]),
            target=str(data["target"]),
            created_dirs=tuple(str(d) for d in data.get("created_dirs", ())),
        )


@dataclass(frozen=True, slots=True)
class Removal:
    """What removing a record did. ``left`` holds (path, why) for what was not ours
    any more (replaced by the container) or not empty; both are left alone."""

    container: str
    removed: tuple[str, ...] = ()
    left: tuple[tuple[str, str], ...] = ()

    @property
    def clean(self) -> bool:
        return not self.left

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "removed": list(self.removed),
            "left": [list(item) for item in self.left],
        }


def _host_id(container: ContainerRef, inside: int, *, group: bool) -> int:
    id_map = container.gid_map if group else container.uid_map
    host = id_map.to_host(inside)
    if host is None:
        kind = "gid" if group else "uid"
        raise InjectionError(
            container.target, f"{kind} {inside} is not mapped in its user namespace"
        )
    return host


def _check_path(container: ContainerRef, path: str) -> None:
    try:
        split_dev_path(path)
    except ValueError as exc:
        raise UnsafePathError(container.target, str(exc), path=path) from None


def _default_mode(kind: DeviceType, major: int, minor: int, host_node: str | None) -> int:
    """The host node's permission bits, if it is this device; else devtmpfs's default."""
    candidates = [host_node] if host_node else []
    candidates.append(f"/dev/{'block' if kind is DeviceType.BLOCK else 'char'}/{major}:{minor}")
    for candidate in candidates:
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        is_kind = stat.S_ISBLK(st.st_mode) if kind is DeviceType.BLOCK else stat.S_ISCHR(st.st_mode)
        if is_kind and st.st_rdev == os.makedev(major, minor):
            return stat.S_IMODE(st.st_mode)
    return FALLBACK_MODE


def _open_private_dir(path: Path) -> int:
    """Open (creating) a root-only directory; refuse one that anybody else controls."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by us")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def purge_host_nodes(nodes_dir: Path | str = DEFAULT_NODES_DIR) -> list[str]:
    """Remove host nodes a crash left between mknod and unlink; returns their names.

    Every entry is transient (unlinked as soon as it is mounted), so at daemon start
    anything in there is a leftover.
    """
    path = Path(nodes_dir)
    if not path.is_dir():
        return []
    removed = []
    for entry in sorted(os.listdir(path)):
        os.unlink(path / entry)
        removed.append(entry)
    return removed


class DeviceNodes:
    """Create and remove device nodes and symlinks in containers, via their helpers."""

    def __init__(
        self, helpers: NamespaceHelpers, *, nodes_dir: Path | str = DEFAULT_NODES_DIR
    ) -> None:
        self._helpers = helpers
        self.nodes_dir = Path(nodes_dir)

    @staticmethod
    def method_for(container: ContainerRef) -> NodeMethod:
        return NodeMethod.BIND if container.user_namespaced else NodeMethod.MKNOD

    async def make_node(
        self,
        container: ContainerRef,
        path: str,
        *,
        type: DeviceType,
        major: int,
        minor: int,
        mode: int | None = None,
        uid: int = 0,
        gid: int = 0,
        host_node: str | None = None,
        method: NodeMethod | None = None,
    ) -> NodeRecord:
        """Create the device node at ``path`` (below /dev) in the container.

        ``uid``/``gid`` are the container's ids (default: its root); ``mode`` None
        copies the host node's (``host_node``, or /dev/{block,char}/MAJ:MIN).
        Raises TargetExistsError if anything is already at path (left alone),
        UnsafePathError if the way there holds a symlink, InjectionError otherwise.
        """
        if type not in (DeviceType.BLOCK, DeviceType.CHAR):
            raise ValueError(f"a device node is block or char, not {type}")
        _check_path(container, path)
        if mode is None:
            mode = _default_mode(type, major, minor, host_node)
        method = method or self.method_for(container)
        host_uid = _host_id(container, uid, group=False)
        host_gid = _host_id(container, gid, group=True)
        # Directories, placeholders and symlinks are created as the container's root.
        dir_uid = _host_id(container, 0, group=False)
        dir_gid = _host_id(container, 0, group=True)
        helper = await self._helpers.get(container)
        if method is NodeMethod.MKNOD:
            created = await helper.make_node(
                path,
                kind=type.value,
                major=major,
                minor=minor,
                mode=mode,
                uid=host_uid,
                gid=host_gid,
                dir_uid=dir_uid,
                dir_gid=dir_gid,
            )
        else:
            nodes_fd = _open_private_dir(self.nodes_dir)
            try:
                name, tree = self._prepare_host_node(
                    nodes_fd, container, type, major, minor, mode, host_uid, host_gid
                )
                try:
                    created = await helper.bind_node(
                        path,
                        tree,
                        kind=type.value,
                        major=major,
                        minor=minor,
                        dir_uid=dir_uid,
                        dir_gid=dir_gid,
                    )
                finally:
                    os.close(tree)
                    # The mount (if any) holds the inode now; the name is not needed.
                    os.unlink(name, dir_fd=nodes_fd)
            finally:
                os.close(nodes_fd)
        return NodeRecord(
            container=container.target,
            path=path,
            type=type,
            major=major,
            minor=minor,
            mode=mode,
            uid=uid,
            gid=gid,
            method=method,
            created_dirs=created.dirs,
        )

    @staticmethod
    def _prepare_host_node(
        nodes_fd: int,
        container: ContainerRef,
        kind: DeviceType,
        major: int,
        minor: int,
        mode: int,
        host_uid: int,
        host_gid: int,
    ) -> tuple[str, int]:
        """mknod in the private dir, own and chmod it, and clone it as a detached mount.

        Plain syscalls on a local directory: they do not block, so no thread hop.
        """
        stem = "".join(c if c.isalnum() else "-" for c in container.target)[:64]
        name = f"{stem}-{major}-{minor}-{secrets.token_hex(6)}"
        fmt = stat.S_IFBLK if kind is DeviceType.BLOCK else stat.S_IFCHR
        os.mknod(name, fmt | 0o600, os.makedev(major, minor), dir_fd=nodes_fd)
        try:
            # chown before chmod: chown clears set-id bits.
            os.chown(name, host_uid, host_gid, dir_fd=nodes_fd, follow_symlinks=False)
            os.chmod(name, mode & 0o7777, dir_fd=nodes_fd)
            tree = mount.open_tree(
                nodes_fd,
                name,
                mount.OPEN_TREE_CLONE | mount.OPEN_TREE_CLOEXEC | mount.AT_SYMLINK_NOFOLLOW,
            )
            try:
                # The clone inherits the state dir's mount flags; /run is usually nodev,
                # which would make the node unusable. Nothing here needs suid or exec.
                mount.mount_setattr(
                    tree,
                    "",
                    mount.AT_EMPTY_PATH,
                    attr_clr=mount.MOUNT_ATTR_NODEV,
                    attr_set=mount.MOUNT_ATTR_NOSUID | mount.MOUNT_ATTR_NOEXEC,
                )
            except BaseException:
                os.close(tree)
                raise
        except BaseException:
            os.unlink(name, dir_fd=nodes_fd)
            raise
        return name, tree

    async def remove_node(self, container: ContainerRef, record: NodeRecord) -> Removal:
        """Unmount/unlink the node if it is still ours, then the directories we made.

        Idempotent: what is already gone is fine; what the container replaced is
        left alone and listed in ``left``.
        """
        helper = await self._helpers.get(container)
        removed = await helper.remove_node(
            record.path,
            kind=record.type.value,
            major=record.major,
            minor=record.minor,
            method=record.method.value,
            dirs=record.created_dirs,
        )
        return _removal(container, removed)

    async def make_symlink(self, container: ContainerRef, path: str, target: str) -> SymlinkRecord:
        """Create symlink ``path`` -> ``target`` (written as given, never followed)."""
        _check_path(container, path)
        if not target or "\0" in target:
            raise InjectionError(container.target, f"invalid symlink target {target!r}", path=path)
        helper = await self._helpers.get(container)
        created = await helper.make_symlink(
            path,
            target,
            dir_uid=_host_id(container, 0, group=False),
            dir_gid=_host_id(container, 0, group=True),
        )
        return SymlinkRecord(container.target, path, target, created.dirs)

    async def remove_symlink(self, container: ContainerRef, record: SymlinkRecord) -> Removal:
        """Remove the symlink if it still points at our target; then our directories."""
        helper = await self._helpers.get(container)
        removed = await helper.remove_symlink(record.path, record.target, dirs=record.created_dirs)
        return _removal(container, removed)


def _removal(container: ContainerRef, removed: Removed) -> Removal:
    left = removed.left
    if removed.more_left:
        left = (*left, ("...", f"{removed.more_left} more paths left alone"))
    return Removal(container.target, removed.removed, left)
