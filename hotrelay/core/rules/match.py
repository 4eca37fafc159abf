"""Match conditions and the per-event context they read.

Every condition is a frozen value with ``test(ctx)`` (the fast path), ``explain(ctx)``
(None when it holds, else what failed and the value actually seen) and ``index_keys``
(exact values the rule index may file the rule under). Conditions on the event itself
(action, subsystem, kernel, ...) read only the uevent; ``driver``, ``attr``, ``attrs``,
``usb`` and ``pci`` read sysfs through the context's cached ``DeviceView``.

``usb`` and ``pci`` walk up from the event's device to the ``usb_device`` / PCI device
above it, and ``attrs`` accepts any device of the chain, so a rule selecting a parent
covers every device node below it: a USB serial adapter's tty, a webcam's video and
media nodes, a GPU's card and render nodes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from hotrelay.core.rules.device import CachedDevice, DeviceView, RecordedDevice
from hotrelay.core.rules.glob import Pattern
from hotrelay.core.uevent import Uevent

__all__ = [
    "Attr",
    "Attrs",
    "Condition",
    "Driver",
    "Env",
    "EventField",
    "MatchContext",
    "Pci",
    "Tag",
    "Usb",
    "normalize_hex",
]

# udev properties that carry the usb_device's ids when there is no sysfs to walk
# (simulating a capture from another host): set by udev's usb_id builtin.
_USB_FALLBACK = {
    "idVendor": "ID_VENDOR_ID",
    "idProduct": "ID_MODEL_ID",
    "serial": "ID_SERIAL_SHORT",
}


def normalize_hex(value: str) -> str:
    """Ids compare as lowercase hex without ``0x`` (sysfs: ``0x10de`` for PCI, ``10c4`` for USB)."""
    value = value.lower()
    return value[2:] if value.startswith("0x") else value


def _show(value: str | None) -> str:
    return "absent" if value is None else json.dumps(value, ensure_ascii=False)


def _mismatch(key: str, actual: str | None, pattern: Pattern, where: str = "") -> str:
    at = f" (at {where})" if where else ""
    return f"{key}: {_show(actual)} does not match {pattern}{at}"


class MatchContext:
    """What matching knows about one event: the uevent, its cached sysfs view, derived facts.

    ``recorded_properties`` are the properties seen at ``add``, consulted for a
    ``remove`` whose own properties lack a key (kernel remove events carry fewer).
    """

    __slots__ = (
        "_device",
        "_features",
        "_looked_up",
        "_pci",
        "_recorded",
        "_usb",
        "event",
        "properties",
    )

    def __init__(
        self,
        event: Uevent,
        device: DeviceView | None = None,
        recorded_properties: Mapping[str, str] | None = None,
    ) -> None:
        self.event = event
        self.properties = event.properties
        self._recorded = recorded_properties
        if device is not None and not isinstance(device, CachedDevice):
            device = CachedDevice(device)
        self._device: CachedDevice | None = device
        self._features: dict[str, str | None] = {}
        self._usb: CachedDevice | None = None
        self._pci: CachedDevice | None = None
        self._looked_up: set[str] = set()  # "usb", "pci": ancestors already searched

    @property
    def device(self) -> CachedDevice | None:
        return self._device

    def prop(self, key: str) -> str | None:
        value = self.properties.get(key)
        if value is None and self._recorded is not None:
            value = self._recorded.get(key)
        return value

    @property
    def node(self) -> str | None:
        node = self.event.node
        if node is None and self._recorded is not None:
            devname = self._recorded.get("DEVNAME")
            if devname:
                node = devname if devname.startswith("/") else "/dev/" + devname
        return node

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(t for t in (self.prop("TAGS") or "").split(":") if t)

    @property
    def driver(self) -> str | None:
        driver = self.prop("DRIVER")
        if driver is None and self._device is not None:
            driver = self._device.driver
        return driver

    def attribute(self, name: str) -> str | None:
        return None if self._device is None else self._device.attribute(name)

    def chain(self) -> Iterator[CachedDevice]:
        """The event's device, then each ancestor (read lazily, once per event)."""
        device = self._device
        while device is not None:
            yield device
            device = device.parent()

    def usb_device(self) -> CachedDevice | None:
        if "usb" not in self._looked_up:
            self._looked_up.add("usb")
            self._usb = next(
                (d for d in self.chain() if d.subsystem == "usb" and d.devtype == "usb_device"),
                None,
            )
        return self._usb

    def pci_device(self) -> CachedDevice | None:
        if "pci" not in self._looked_up:
            self._looked_up.add("pci")
            self._pci = next((d for d in self.chain() if d.subsystem == "pci"), None)
        return self._pci

    def usb_attribute(self, name: str) -> str | None:
        """An attribute of the usb_device above the event's device, hex ids normalized."""
        if self._device is None:
            value = self.prop(_USB_FALLBACK[name])
        else:
            usb = self.usb_device()
            value = None if usb is None else usb.attribute(name)
        return value if value is None or name == "serial" else normalize_hex(value)

    def pci_value(self, name: str) -> str | None:
        """``vendor``, ``device`` (normalized hex) or ``slot`` of the PCI device above."""
        if self._device is None:
            # Without sysfs only a PCI device's own event says who it is.
            pci_id = self.prop("PCI_ID")
            if name == "slot":
                return self.prop("PCI_SLOT_NAME")
            if pci_id is None or ":" not in pci_id:
                return None
            vendor, device = pci_id.split(":", 1)
            return normalize_hex(vendor if name == "vendor" else device)
        pci = self.pci_device()
        if pci is None:
            return None
        if name == "slot":
            return pci.sysname
        value = pci.attribute(name)
        return None if value is None else normalize_hex(value)

    def feature(self, name: str) -> str | None:
        """An index feature's value for this event, computed once (see ``FEATURES``)."""
        features = self._features
        if name not in features:
            features[name] = _feature_value(self, name)
        return features[name]

    def record(self) -> RecordedDevice | None:
        return None if self._device is None else self._device.record()


def _usb_id(ctx: MatchContext) -> str | None:
    vendor, product = ctx.usb_attribute("idVendor"), ctx.usb_attribute("idProduct")
    return None if vendor is None or product is None else f"{vendor}:{product}"


def _pci_id(ctx: MatchContext) -> str | None:
    vendor, device = ctx.pci_value("vendor"), ctx.pci_value("device")
    return None if vendor is None or device is None else f"{vendor}:{device}"


# Index features, most selective first: the index files each rule under the first
# feature it has exact values for. Each is computed exactly as the condition that
# offers it reads its value, so an index lookup can never disagree with a test.
FEATURES: Mapping[str, Callable[[MatchContext], str | None]] = {
    "usb.id": _usb_id,
    "usb.serial": lambda ctx: ctx.usb_attribute("serial"),
    "pci.id": _pci_id,
    "pci.slot": lambda ctx: ctx.pci_value("slot"),
    "usb.vendor": lambda ctx: ctx.usb_attribute("idVendor"),
    "usb.product": lambda ctx: ctx.usb_attribute("idProduct"),
    "pci.vendor": lambda ctx: ctx.pci_value("vendor"),
    "pci.device": lambda ctx: ctx.pci_value("device"),
    "kernel": lambda ctx: ctx.event.sysname,
    "devname": lambda ctx: ctx.node,
    "driver": lambda ctx: ctx.driver,
    "devtype": lambda ctx: ctx.event.devtype,
    "action": lambda ctx: ctx.event.action,
}
# "env:KEY" features (any property) rank after the node name, before the driver;
# "attr:NAME" (a sysfs attribute of the device) last, as the only one that reads sysfs
# for the device itself: a rule is filed under it only when it has nothing cheaper.
_RANKED = [*FEATURES]
_RANKED.insert(_RANKED.index("driver"), "env")
_RANKED.append("attr")
FEATURE_PRIORITY = {name: rank for rank, name in enumerate(_RANKED)}


def _feature_value(ctx: MatchContext, name: str) -> str | None:
    if name.startswith("env:"):
        return ctx.prop(name[4:])
    if name.startswith("attr:"):
        return ctx.attribute(name[5:])
    return FEATURES[name](ctx)


def feature_rank(name: str) -> int:
    kind, colon, _ = name.partition(":")
    return FEATURE_PRIORITY[kind if colon else name]


IndexKeys = tuple[tuple[str, frozenset[str]], ...]


class Condition(Protocol):
    """One match condition. ``order`` sorts a rule's conditions: cheap ones first."""

    @property
    def key(self) -> str: ...

    @property
    def order(self) -> int: ...

    def test(self, ctx: MatchContext) -> bool: ...

    def explain(self, ctx: MatchContext) -> str | None: ...

    def index_keys(self) -> IndexKeys: ...


def _action(ctx: MatchContext) -> str | None:
    return ctx.event.action


def _subsystem(ctx: MatchContext) -> str | None:
    return ctx.event.subsystem


def _devtype(ctx: MatchContext) -> str | None:
    return ctx.event.devtype


def _kernel(ctx: MatchContext) -> str | None:
    return ctx.event.sysname


def _devname(ctx: MatchContext) -> str | None:
    return ctx.node


_EVENT_FIELDS: Mapping[str, Callable[[MatchContext], str | None]] = {
    "action": _action,
    "subsystem": _subsystem,
    "devtype": _devtype,
    "kernel": _kernel,
    "devname": _devname,
}


@dataclass(frozen=True, slots=True)
class EventField:
    """``action``, ``subsystem``, ``devtype``, ``kernel`` (sysname) or ``devname`` (/dev path)."""

    key: str
    pattern: Pattern

    def __post_init__(self) -> None:
        if self.key not in _EVENT_FIELDS:
            raise ValueError(f"not an event field: {self.key!r}")

    @property
    def order(self) -> int:
        return 0

    def value(self, ctx: MatchContext) -> str | None:
        return _EVENT_FIELDS[self.key](ctx)

    def test(self, ctx: MatchContext) -> bool:
        return self.pattern.matches(_EVENT_FIELDS[self.key](ctx))

    def explain(self, ctx: MatchContext) -> str | None:
        actual = self.value(ctx)
        return None if self.pattern.matches(actual) else _mismatch(self.key, actual, self.pattern)

    def index_keys(self) -> IndexKeys:
        exact = self.pattern.indexable
        if exact is None or self.key == "subsystem":  # subsystem is the index's first level
            return ()
        return ((self.key, exact),)


@dataclass(frozen=True, slots=True)
class Env:
    """``env.KEY``: a uevent or udev property."""

    name: str
    pattern: Pattern

    @property
    def key(self) -> str:
        return f"env.{self.name}"

    @property
    def order(self) -> int:
        return 1

    def test(self, ctx: MatchContext) -> bool:
        return self.pattern.matches(ctx.prop(self.name))

    def explain(self, ctx: MatchContext) -> str | None:
        actual = ctx.prop(self.name)
        return None if self.pattern.matches(actual) else _mismatch(self.key, actual, self.pattern)

    def index_keys(self) -> IndexKeys:
        exact = self.pattern.indexable
        return () if exact is None else ((f"env:{self.name}", exact),)


@dataclass(frozen=True, slots=True)
class Tag:
    """``tag``: some udev tag matches (and, for ``!glob``, none matches the negation)."""

    pattern: Pattern

    @property
    def key(self) -> str:
        return "tag"

    @property
    def order(self) -> int:
        return 1

    def test(self, ctx: MatchContext) -> bool:
        return self.pattern.matches_any(ctx.tags)

    def explain(self, ctx: MatchContext) -> str | None:
        tags = ctx.tags
        if self.pattern.matches_any(tags):
            return None
        if not tags:
            return f"tag: the event has no tags (kernel events carry none); wanted {self.pattern}"
        shown = ", ".join(_show(t) for t in sorted(tags))
        return f"tag: tags {shown} do not match {self.pattern}"

    def index_keys(self) -> IndexKeys:
        return ()


@dataclass(frozen=True, slots=True)
class Driver:
    """``driver``: the DRIVER property, else the device's bound driver in sysfs."""

    pattern: Pattern

    @property
    def key(self) -> str:
        return "driver"

    @property
    def order(self) -> int:
        return 2

    def test(self, ctx: MatchContext) -> bool:
        return self.pattern.matches(ctx.driver)

    def explain(self, ctx: MatchContext) -> str | None:
        actual = ctx.driver
        return None if self.pattern.matches(actual) else _mismatch("driver", actual, self.pattern)

    def index_keys(self) -> IndexKeys:
        exact = self.pattern.indexable
        return () if exact is None else (("driver", exact),)


@dataclass(frozen=True, slots=True)
class Attr:
    """``attr.NAME``: a sysfs attribute of the event's device itself."""

    name: str
    pattern: Pattern

    @property
    def key(self) -> str:
        return f"attr.{self.name}"

    @property
    def order(self) -> int:
        return 3

    def test(self, ctx: MatchContext) -> bool:
        return self.pattern.matches(ctx.attribute(self.name))

    def explain(self, ctx: MatchContext) -> str | None:
        actual = ctx.attribute(self.name)
        if self.pattern.matches(actual):
            return None  # also with no sysfs view: a negation holds for a missing value
        if ctx.device is None:
            return f"{self.key}: no sysfs view of {ctx.event.devpath} (device not present)"
        return _mismatch(self.key, actual, self.pattern)

    def index_keys(self) -> IndexKeys:
        exact = self.pattern.indexable
        return () if exact is None else ((f"attr:{self.name}", exact),)


def _id_conditions_explain(
    key: str,
    found: CachedDevice | None,
    no_device: str,
    checks: tuple[tuple[str, Pattern | None, Callable[[], str | None]], ...],
) -> str | None:
    for name, pattern, read in checks:
        if pattern is None:
            continue
        actual = read()
        if not pattern.matches(actual):
            if found is None and actual is None:
                return f"{key}: {no_device}"
            return _mismatch(f"{key}.{name}", actual, pattern, found.devpath if found else "")
    return None


@dataclass(frozen=True, slots=True)
class Usb:
    """``usb = {vendor, product, serial}``: the usb_device above the event's device."""

    vendor: Pattern | None = None
    product: Pattern | None = None
    serial: Pattern | None = None

    @property
    def key(self) -> str:
        return "usb"

    @property
    def order(self) -> int:
        return 4

    def test(self, ctx: MatchContext) -> bool:
        return (
            (self.vendor is None or self.vendor.matches(ctx.usb_attribute("idVendor")))
            and (self.product is None or self.product.matches(ctx.usb_attribute("idProduct")))
            and (self.serial is None or self.serial.matches(ctx.usb_attribute("serial")))
        )

    def explain(self, ctx: MatchContext) -> str | None:
        found = ctx.usb_device() if ctx.device is not None else None
        below = ctx.event.devpath
        return _id_conditions_explain(
            "usb",
            found,
            f"not a USB device (no usb_device at or above {below})"
            if ctx.device is not None
            else f"no sysfs view of {below} and no ID_VENDOR_ID/ID_MODEL_ID properties",
            (
                ("vendor", self.vendor, lambda: ctx.usb_attribute("idVendor")),
                ("product", self.product, lambda: ctx.usb_attribute("idProduct")),
                ("serial", self.serial, lambda: ctx.usb_attribute("serial")),
            ),
        )

    def index_keys(self) -> IndexKeys:
        keys: list[tuple[str, frozenset[str]]] = []
        vendor = self.vendor.indexable if self.vendor else None
        product = self.product.indexable if self.product else None
        serial = self.serial.indexable if self.serial else None
        # Cartesian pairs stay small for hand-written lists; beyond that, index less.
        if vendor and product and len(vendor) * len(product) <= 64:
            keys.append(("usb.id", frozenset(f"{v}:{p}" for v in vendor for p in product)))
        if serial:
            keys.append(("usb.serial", serial))
        if vendor:
            keys.append(("usb.vendor", vendor))
        if product:
            keys.append(("usb.product", product))
        return tuple(keys)


@dataclass(frozen=True, slots=True)
class Pci:
    """``pci = {vendor, device, slot}``: the PCI device above the event's device."""

    vendor: Pattern | None = None
    device: Pattern | None = None
    slot: Pattern | None = None

    @property
    def key(self) -> str:
        return "pci"

    @property
    def order(self) -> int:
        return 4

    def test(self, ctx: MatchContext) -> bool:
        return (
            (self.vendor is None or self.vendor.matches(ctx.pci_value("vendor")))
            and (self.device is None or self.device.matches(ctx.pci_value("device")))
            and (self.slot is None or self.slot.matches(ctx.pci_value("slot")))
        )

    def explain(self, ctx: MatchContext) -> str | None:
        found = ctx.pci_device() if ctx.device is not None else None
        below = ctx.event.devpath
        return _id_conditions_explain(
            "pci",
            found,
            f"not a PCI device (no PCI device at or above {below})"
            if ctx.device is not None
            else f"no sysfs view of {below} and no PCI_ID/PCI_SLOT_NAME properties",
            (
                ("vendor", self.vendor, lambda: ctx.pci_value("vendor")),
                ("device", self.device, lambda: ctx.pci_value("device")),
                ("slot", self.slot, lambda: ctx.pci_value("slot")),
            ),
        )

    def index_keys(self) -> IndexKeys:
        keys: list[tuple[str, frozenset[str]]] = []
        vendor = self.vendor.indexable if self.vendor else None
        device = self.device.indexable if self.device else None
        slot = self.slot.indexable if self.slot else None
        if vendor and device and len(vendor) * len(device) <= 64:
            keys.append(("pci.id", frozenset(f"{v}:{d}" for v in vendor for d in device)))
        if slot:
            keys.append(("pci.slot", slot))
        if vendor:
            keys.append(("pci.vendor", vendor))
        if device:
            keys.append(("pci.device", device))
        return tuple(keys)


@dataclass(frozen=True, slots=True)
class Attrs:
    """``attrs.NAME``: the device or one ancestor; one and the same device must satisfy all."""

    checks: tuple[tuple[str, Pattern], ...]

    @property
    def key(self) -> str:
        return "attrs"

    @property
    def order(self) -> int:
        return 5

    def test(self, ctx: MatchContext) -> bool:
        checks = self.checks
        return any(
            all(pattern.matches(device.attribute(name)) for name, pattern in checks)
            for device in ctx.chain()
        )

    def explain(self, ctx: MatchContext) -> str | None:
        if self.test(ctx):
            return None
        wanted = ", ".join(f"{name} = {pattern}" for name, pattern in self.checks)
        if ctx.device is None:
            return f"attrs: no sysfs view of {ctx.event.devpath}; wanted {wanted}"
        # Show the device that came closest, with what it actually has: that is
        # usually the one the operator meant, with one value wrong.
        best: tuple[int, CachedDevice] | None = None
        for device in ctx.chain():
            score = sum(p.matches(device.attribute(n)) for n, p in self.checks)
            if best is None or score > best[0]:
                best = (score, device)
        assert best is not None
        seen = ", ".join(f"{n} = {_show(best[1].attribute(n))}" for n, _ in self.checks)
        return (
            f"attrs: no single device from {ctx.event.devpath} up has {wanted}; "
            f"closest is {best[1].devpath} with {seen}"
        )

    def index_keys(self) -> IndexKeys:
        return ()
