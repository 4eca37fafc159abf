"""How matching sees sysfs: an abstract device view, a per-event cache, a recording.

The core never touches sysfs. The edge (``hotrelay.sysfs.SysfsDevice``) implements
``DeviceView`` over a real or fake sysfs tree; tests and benchmarks implement it in
memory with ``RecordedDevice``. Matching wraps the view in a ``CachedDevice`` for the
duration of one event, so each attribute of each device in the chain is read at most
once however many rules ask, and nothing is read that no candidate rule needs.

After an ``add``, the cache *is* a record of everything matching looked at; frozen
into a ``RecordedDevice`` it answers the same questions at ``remove``, when the
device is already gone from sysfs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

__all__ = ["CachedDevice", "DeviceView", "RecordedDevice"]


class DeviceView(Protocol):
    """One device in sysfs and the way to its parent. Implementations may do I/O."""

    @property
    def devpath(self) -> str:
        """The path below /sys, starting with /devices/."""
        ...

    @property
    def sysname(self) -> str: ...

    @property
    def subsystem(self) -> str | None: ...

    @property
    def devtype(self) -> str | None: ...

    @property
    def driver(self) -> str | None: ...

    def attribute(self, name: str) -> str | None:
        """The attribute's value without its trailing whitespace; None if it has none."""
        ...

    def parent(self) -> DeviceView | None:
        """The closest ancestor that is a device; None at the top."""
        ...


@dataclass(frozen=True, slots=True)
class RecordedDevice:
    """A device as it was seen: a pure, in-memory ``DeviceView``.

    ``attributes`` holds what was read (None for "read, absent"); an attribute never
    read answers None. ``parent`` is None both at the top and where the walk stopped.
    """

    devpath: str
    subsystem: str | None = None
    devtype: str | None = None
    driver: str | None = None
    attributes: Mapping[str, str | None] = field(default_factory=dict, hash=False)
    up: RecordedDevice | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.attributes, MappingProxyType):
            object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    @property
    def sysname(self) -> str:
        return self.devpath.rsplit("/", 1)[-1]

    def attribute(self, name: str) -> str | None:
        return self.attributes.get(name)

    def parent(self) -> RecordedDevice | None:
        return self.up

    def chain(self) -> tuple[RecordedDevice, ...]:
        """This device and its recorded ancestors, nearest first."""
        out: list[RecordedDevice] = []
        device: RecordedDevice | None = self
        while device is not None:
            out.append(device)
            device = device.up
        return tuple(out)


class CachedDevice:
    """A ``DeviceView`` that reads each fact of the wrapped view at most once."""

    __slots__ = ("_attributes", "_facts", "_parent", "_parent_read", "_source")

    def __init__(self, source: DeviceView) -> None:
        self._source = source
        self._attributes: dict[str, str | None] = {}
        self._facts: dict[str, str | None] = {}  # subsystem, devtype, driver
        self._parent: CachedDevice | None = None
        self._parent_read = False

    @property
    def devpath(self) -> str:
        return self._source.devpath

    @property
    def sysname(self) -> str:
        return self._source.sysname

    @property
    def subsystem(self) -> str | None:
        facts = self._facts
        if "subsystem" not in facts:
            facts["subsystem"] = self._source.subsystem
        return facts["subsystem"]

    @property
    def devtype(self) -> str | None:
        facts = self._facts
        if "devtype" not in facts:
            facts["devtype"] = self._source.devtype
        return facts["devtype"]

    @property
    def driver(self) -> str | None:
        facts = self._facts
        if "driver" not in facts:
            facts["driver"] = self._source.driver
        return facts["driver"]

    def attribute(self, name: str) -> str | None:
        attributes = self._attributes
        if name not in attributes:
            attributes[name] = self._source.attribute(name)
        return attributes[name]

    def parent(self) -> CachedDevice | None:
        if not self._parent_read:
            source = self._source.parent()
            self._parent = None if source is None else CachedDevice(source)
            self._parent_read = True
        return self._parent

    def record(self) -> RecordedDevice:
        """Freeze what was read so far, up the chain as far as it was walked."""
        facts = self._facts
        return RecordedDevice(
            devpath=self.devpath,
            subsystem=facts.get("subsystem"),
            devtype=facts.get("devtype"),
            driver=facts.get("driver"),
            attributes=self._attributes,
            up=None if self._parent is None else self._parent.record(),
        )
