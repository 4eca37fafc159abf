"""Sysfs at the edge: ``SysfsDevice`` implements the core's ``DeviceView`` over a sysfs tree.

The tree's root is a parameter (default /sys), so tests build a fake tree in a temp
dir and exercise exactly this code. Reads are plain file reads and readlinks; the core
caches them per event, so each is done at most once per event.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

from hotrelay.core.uevent import Uevent, UeventParseError
from hotrelay.errors import HotrelayError

__all__ = ["SYSFS", "SysfsDevice", "SysfsError", "devnum_mismatch", "resolve_device"]

SYSFS = Path("/sys")
# sysfs attributes are at most a page; anything longer is a binary blob nobody matches.
_MAX_ATTRIBUTE = 4096


class SysfsError(HotrelayError):
    """A device that cannot be found or read in sysfs."""


def _link_name(path: str | os.PathLike[str]) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


class SysfsDevice:
    """One device directory under ``ROOT/devices``."""

    __slots__ = ("_dir", "_properties", "path", "root")

    def __init__(self, path: Path, root: Path = SYSFS) -> None:
        self.path = path
        self.root = root
        self._properties: dict[str, str] | None = None
        self._dir = os.fspath(path)  # attribute() joins strings: pathlib cost ~5 us a read

    @classmethod
    def from_syspath(cls, path: Path, root: Path = SYSFS) -> SysfsDevice:
        """A device from any path that leads to its directory (``/sys/class/net/eth0`` too)."""
        real_root = root.resolve()
        try:
            real = path.resolve(strict=True)
        except OSError as exc:
            raise SysfsError(f"{path}: {exc.strerror or exc}") from None
        devices = real_root / "devices"
        if real != devices and devices not in real.parents:
            raise SysfsError(f"{path}: not a device (outside {devices})")
        if not (real / "uevent").is_file():
            raise SysfsError(f"{path}: not a device (no uevent file)")
        return cls(real, real_root)

    @classmethod
    def from_devnum(cls, kind: str, major: int, minor: int, root: Path = SYSFS) -> SysfsDevice:
        """The device behind ``kind`` (``char`` or ``block``) ``major:minor``."""
        link = root / "dev" / kind / f"{major}:{minor}"
        if not link.exists():
            raise SysfsError(f"no {kind} device {major}:{minor} in {root / 'dev' / kind}")
        return cls.from_syspath(link, root)

    @property
    def devpath(self) -> str:
        return "/" + str(self.path.relative_to(self.root))

    @property
    def sysname(self) -> str:
        return self.path.name

    @property
    def subsystem(self) -> str | None:
        return _link_name(self.path / "subsystem")

    @property
    def driver(self) -> str | None:
        return _link_name(self.path / "driver")

    @property
    def devtype(self) -> str | None:
        return self.properties().get("DEVTYPE")

    def properties(self) -> dict[str, str]:
        """The ``uevent`` file's KEY=VALUE lines (MAJOR, MINOR, DEVNAME, DEVTYPE, ...)."""
        if self._properties is None:
            try:
                text = (self.path / "uevent").read_text(errors="replace")
            except OSError:
                text = ""
            props = {}
            for line in text.splitlines():
                key, sep, value = line.partition("=")
                if sep and key:
                    props[key] = value
            self._properties = props
        return self._properties

    def attribute(self, name: str) -> str | None:
        if not name or "/" in name or name in (".", ".."):
            return None
        path = f"{self._dir}/{name}"
        try:
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                # As udev: a link attribute (driver, subsystem, module) is its target's name.
                return _link_name(Path(path))
            if not stat.S_ISREG(info.st_mode):
                return None
            data = _read_at_most(path, _MAX_ATTRIBUTE + 1)
        except OSError:
            return None  # absent, write-only (remove, rescan) or gone mid-read
        if len(data) > _MAX_ATTRIBUTE:
            return None
        return data.decode("utf-8", "replace").rstrip()

    def parent(self) -> SysfsDevice | None:
        top = self.root / "devices"
        directory = self.path.parent
        while directory != top and top in directory.parents:
            if (directory / "uevent").is_file():
                return SysfsDevice(directory, self.root)
            directory = directory.parent
        return None

    def to_uevent(self, action: str = "add") -> Uevent:
        """The uevent the kernel would send for this device now (as ``udevadm trigger``)."""
        subsystem = self.subsystem
        if subsystem is None:
            raise SysfsError(f"{self.path}: has no subsystem")
        props = {"ACTION": action, "DEVPATH": self.devpath, "SUBSYSTEM": subsystem}
        for key, value in self.properties().items():
            props.setdefault(key, value)
        try:
            return Uevent.from_properties(props)
        except UeventParseError as exc:
            raise SysfsError(f"{self.path / 'uevent'}: {exc}") from None

    def __repr__(self) -> str:
        return f"SysfsDevice({str(self.path)!r})"


def devnum_mismatch(uevent: Uevent, root: str = "/sys") -> str | None:
    """Why the event's MAJOR:MINOR is not the device at its DEVPATH, or None if it is.

    Every device number the daemon grants comes from an event, and a sender that may
    speak on a trusted group (udevd, or host root handing the kernel a message with
    UEVENT_SEND) could name a harmless device's DEVPATH with the host's root disk's
    number. sysfs says what the number really is: ``/sys/dev/{block,char}/MAJ:MIN``
    links to the device's directory, so it must lead to DEVPATH, and ``block`` vs
    ``char`` (the only part of SUBSYSTEM a grant uses) is checked by which of the two
    holds the link, and SUBSYSTEM itself against the device's ``subsystem`` link.
    Two readlinks; events without a device number (and removes, whose device is
    gone) have nothing to check and cost nothing.
    """
    major = uevent.major
    minor = uevent.minor
    if major is None or minor is None or uevent.action == "remove":
        return None
    kind = "block" if uevent.subsystem == "block" else "char"
    directory = f"{root}/dev/{kind}"
    try:
        target = os.readlink(f"{directory}/{major}:{minor}")
    except FileNotFoundError:
        return f"{kind} device {major}:{minor} does not exist"
    except OSError as exc:
        return f"{kind} device {major}:{minor}: {exc.strerror or exc}"
    devpath = uevent.devpath
    if target != "../.." + devpath:  # how sysfs writes these links: the cheap common case
        actual = posixpath.normpath(posixpath.join(directory, target))
        if actual != root + devpath:
            return f"{kind} device {major}:{minor} is {actual.removeprefix(root)}, not {devpath}"
    subsystem = _link_name(root + devpath + "/subsystem")
    if subsystem != uevent.subsystem:
        return f"{devpath} is of subsystem {subsystem}, not {uevent.subsystem}"
    return None


def _read_at_most(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        size = 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def resolve_device(spec: str, root: Path = SYSFS) -> SysfsDevice:
    """``/dev/NODE`` (by its device number) or ``/sys/...`` to its device in ``root``."""
    if spec.startswith("/dev/"):
        try:
            info = os.stat(spec)
        except OSError as exc:
            raise SysfsError(f"{spec}: {exc.strerror or exc}") from None
        if stat.S_ISCHR(info.st_mode):
            kind = "char"
        elif stat.S_ISBLK(info.st_mode):
            kind = "block"
        else:
            raise SysfsError(f"{spec}: not a device node")
        return SysfsDevice.from_devnum(kind, os.major(info.st_rdev), os.minor(info.st_rdev), root)
    if spec == "/sys" or spec.startswith("/sys/"):
        return SysfsDevice.from_syspath(root / spec[len("/sys/") :], root)
    raise SysfsError(f"{spec}: expected a /dev/... node or a /sys/... device path")


class LazySysfsDevice:
    """A ``DeviceView`` of ``/sys`` + devpath that touches nothing until asked.

    The daemon hands one to matching for every uevent, and most events are decided by
    their own properties (subsystem, kernel name) without a sysfs read; building a
    ``SysfsDevice`` (a pathlib path) per event cost a third of the daemon's time in a
    storm. ``devpath`` and ``sysname`` come from the event itself.
    """

    __slots__ = ("_device", "devpath")

    def __init__(self, devpath: str) -> None:
        self.devpath = devpath
        self._device: SysfsDevice | None = None

    def _real(self) -> SysfsDevice:
        if self._device is None:
            self._device = SysfsDevice(SYSFS / self.devpath.lstrip("/"))
        return self._device

    @property
    def sysname(self) -> str:
        return self.devpath.rsplit("/", 1)[-1]

    @property
    def subsystem(self) -> str | None:
        return self._real().subsystem

    @property
    def devtype(self) -> str | None:
        return self._real().devtype

    @property
    def driver(self) -> str | None:
        return self._real().driver

    def attribute(self, name: str) -> str | None:
        return self._real().attribute(name)

    def parent(self) -> SysfsDevice | None:
        return self._real().parent()
