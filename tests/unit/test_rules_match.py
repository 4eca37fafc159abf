"""Matching: every key, globs, lists and negation, ancestors, remove from memory, the index.

Devices are in-memory ``RecordedDevice`` trees shaped like real sysfs (a CP2102 serial
adapter, a keyboard, a webcam, a GPU); test_rules_sysfs.py runs the same matching over
a fake sysfs tree on disk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotrelay.core.rules import (
    Attr,
    Attrs,
    Condition,
    DeviceView,
    Env,
    EventField,
    MatchContext,
    MatchMemory,
    Pattern,
    Pci,
    RecordedDevice,
    Rule,
    RuleSet,
    Usb,
)
from hotrelay.core.uevent import Uevent, Wire

PCI_USB = RecordedDevice(
    "/devices/pci0000:00/0000:00:14.0",
    "pci",
    None,
    "xhci_hcd",
    {"vendor": "0x8086", "device": "0xa36d"},
)
ROOT_HUB = RecordedDevice(
    "/devices/pci0000:00/0000:00:14.0/usb1",
    "usb",
    "usb_device",
    "usb",
    {"idVendor": "1d6b", "idProduct": "0002", "busnum": "1", "devpath": "0"},
    PCI_USB,
)


def usb_device(port: str, vendor: str, product: str, serial: str | None = None) -> RecordedDevice:
    attrs = {"idVendor": vendor, "idProduct": product, "busnum": "1", "devpath": port}
    if serial is not None:
        attrs["serial"] = serial
    return RecordedDevice(
        f"{ROOT_HUB.devpath}/1-{port}", "usb", "usb_device", "usb", attrs, ROOT_HUB
    )


def below(
    parent: RecordedDevice,
    name: str,
    subsystem: str | None,
    devtype: str | None = None,
    driver: str | None = None,
    attrs: Mapping[str, str] | None = None,
) -> RecordedDevice:
    return RecordedDevice(
        f"{parent.devpath}/{name}", subsystem, devtype, driver, attrs or {}, parent
    )


# A CP2102 USB-serial adapter on port 3: usb_device > interface > usb-serial port > tty.
CP2102 = usb_device("3", "10c4", "ea60", "0001")
CP2102_IF = below(CP2102, "1-3:1.0", "usb", "usb_interface", "cp210x", {"bInterfaceNumber": "00"})
CP2102_PORT = below(CP2102_IF, "ttyUSB0", "usb-serial", None, "cp210x", {"port_number": "0"})
TTY = below(CP2102_PORT, "tty/ttyUSB0", "tty", attrs={"dev": "188:0"})
# A keyboard on port 4: an input device with an event node, and a hidraw node.
KEYBOARD = usb_device("4", "046d", "c31c")
KBD_IF = below(KEYBOARD, "1-4:1.0", "usb", "usb_interface", "usbhid")
KBD_HID = below(KBD_IF, "0003:046D:C31C.0001", "hid", None, "hid-generic")
KBD_INPUT = below(KBD_HID, "input/input5", "input", attrs={"name": "Logitech USB Keyboard"})
KBD_EVENT = below(KBD_INPUT, "event3", "input")
KBD_HIDRAW = below(KBD_HID, "hidraw/hidraw0", "hidraw")
# A GPU's render node.
GPU = RecordedDevice(
    "/devices/pci0000:00/0000:00:02.0",
    "pci",
    None,
    "i915",
    {"vendor": "0x8086", "device": "0x46a6"},
)
RENDER = below(GPU, "drm/renderD128", "drm", "drm_minor")
ZRAM = RecordedDevice("/devices/virtual/block/zram1", "block", "disk", None, {"disksize": "0"})


def event(
    device: RecordedDevice,
    action: str = "add",
    wire: Wire = Wire.KERNEL,
    props: Mapping[str, str] | None = None,
    **more: str,
) -> Uevent:
    base = {"ACTION": action, "DEVPATH": device.devpath, "SUBSYSTEM": device.subsystem or "x"}
    if device.devtype:
        base["DEVTYPE"] = device.devtype
    return Uevent.from_properties({**base, **(props or {}), **more}, wire)


TTY_ADD = event(TTY, DEVNAME="ttyUSB0", MAJOR="188", MINOR="0")
TTY_UDEV = event(
    TTY,
    wire=Wire.UDEV,
    DEVNAME="/dev/ttyUSB0",
    MAJOR="188",
    MINOR="0",
    ID_SERIAL="Silicon_Labs_CP2102_0001",
    ID_VENDOR_ID="10c4",
    ID_MODEL_ID="ea60",
    ID_SERIAL_SHORT="0001",
    ID_PATH="pci-0000:00:14.0-usb-0:3:1.0",
    TAGS=":systemd:uaccess:",
    USEC_INITIALIZED="1",
)
EVENT_ADD = event(KBD_EVENT, DEVNAME="input/event3", MAJOR="13", MINOR="67")
HIDRAW_ADD = event(KBD_HIDRAW, DEVNAME="hidraw0", MAJOR="241", MINOR="0")
RENDER_ADD = event(RENDER, DEVNAME="dri/renderD128", MAJOR="226", MINOR="128")
ZRAM_ADD = event(ZRAM, DEVNAME="zram1", MAJOR="252", MINOR="1")


def ruleset(text: str) -> RuleSet:
    return RuleSet.from_texts([("t.toml", text)])


def one_rule(match: str) -> Rule:
    (rule,) = ruleset(f'[[rule]]\nname = "r"\ntarget = "lxc:c"\n[rule.match]\n{match}\n').rules
    return rule


def verdict(match: str, uevent: Uevent, device: DeviceView | None) -> str | None:
    """None if ``match`` holds for the event, else the explanation; checks test() agrees."""
    rule = one_rule(match)
    failure = rule.explain(MatchContext(uevent, device))
    assert rule.matches(MatchContext(uevent, device)) is (failure is None)
    return failure


@pytest.mark.parametrize(
    ("match", "failure"),
    [
        ('action = "add"', None),
        ('action = "remove"', 'action: "add" does not match "remove"'),
        ('action = ["add", "change"]', None),
        ('action = "!remove"', None),
        ('subsystem = "tty"', None),
        ('subsystem = "block"', 'subsystem: "tty" does not match "block"'),
        ('subsystem = ["block", "tty*"]', None),
        ('subsystem = "!tty"', 'subsystem: "tty" does not match "!tty"'),
        ('devtype = "disk"', 'devtype: absent does not match "disk"'),
        ('devtype = "!disk"', None),
        ('kernel = "ttyUSB[0-9]"', None),
        ('kernel = ["ttyUSB*", "!ttyUSB0"]',
         'kernel: "ttyUSB0" does not match ["ttyUSB*", "!ttyUSB0"]'),
        ('devname = "ttyUSB*"', None),
        ('devname = "/dev/ttyUSB0"', None),
        ('devname = "/dev/ttyS*"', 'devname: "/dev/ttyUSB0" does not match "/dev/ttyS*"'),
        ('driver = "cp210x"', 'driver: absent does not match "cp210x"'),
        ('env.MAJOR = "188"', None),
        ('env = { MAJOR = "188", MINOR = "1" }', 'env.MINOR: "0" does not match "1"'),
        ('env.ID_SERIAL = "*"', 'env.ID_SERIAL: absent does not match "*"'),
        ('env.ID_SERIAL = "!*"', None),
        ('attr.dev = "188:0"', None),
        ('attr.dev = "188:1"', 'attr.dev: "188:0" does not match "188:1"'),
        ('attr.idVendor = "10c4"', 'attr.idVendor: absent does not match "10c4"'),
        ('attrs.idVendor = "10c4"', None),
        ('attrs = { port_number = "0", idVendor = "10c4" }', (
            'attrs: no single device from /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/'
            'ttyUSB0/tty/ttyUSB0 up has port_number = "0", idVendor = "10c4"; closest is '
            '/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0 with '
            'port_number = "0", idVendor = absent'
        )),
        ('tag = "uaccess"',
         'tag: the event has no tags (kernel events carry none); wanted "uaccess"'),
        ('tag = "!uaccess"', None),
        ('usb = { vendor = "10c4", product = "ea60", serial = "0001" }', None),
        ('usb = { vendor = "0x10C4" }', None),
        ('usb = { vendor = "10c*", product = ["ea60", "ea70"] }', None),
        ('usb = { vendor = "1a86" }', (
            'usb.vendor: "10c4" does not match "1a86" '
            '(at /devices/pci0000:00/0000:00:14.0/usb1/1-3)'
        )),
        ('usb = { vendor = "10c4", serial = "!0001" }', (
            'usb.serial: "0001" does not match "!0001" '
            '(at /devices/pci0000:00/0000:00:14.0/usb1/1-3)'
        )),
        ('pci = { vendor = "8086", device = "a36d", slot = "0000:00:14.0" }', None),
        ('pci = { vendor = "10de" }', (
            'pci.vendor: "8086" does not match "10de" (at /devices/pci0000:00/0000:00:14.0)'
        )),
    ],
)  # fmt: skip
def test_each_key_on_a_usb_serial_tty(match: str, failure: str | None) -> None:
    assert verdict(match, TTY_ADD, TTY) == failure


@pytest.mark.parametrize(
    ("match", "failure"),
    [
        ('tag = "uaccess"', None),
        ('tag = ["seat", "uacc*"]', None),
        ('tag = "!systemd"', 'tag: tags "systemd", "uaccess" do not match "!systemd"'),
        ('env.ID_SERIAL = "Silicon_Labs_*"', None),
        ('env.ID_PATH = "pci-0000:00:14.0-usb-0:3:*"', None),
        ('devname = "ttyUSB0"', None),  # udev's DEVNAME is absolute, the rule's relative
    ],
)
def test_udev_keys(match: str, failure: str | None) -> None:
    assert verdict(match, TTY_UDEV, TTY) == failure


def test_driver_comes_from_the_property_or_sysfs() -> None:
    assert verdict('driver = "usbhid"', event(KBD_IF, DRIVER="usbhid"), None) is None
    assert verdict('driver = "usbhid"', event(KBD_IF), KBD_IF) is None
    assert verdict('driver = "hid-*"', event(KBD_HID), KBD_HID) is None


def test_devtype_and_pci_of_a_render_node() -> None:
    assert verdict('devtype = "drm_minor"', RENDER_ADD, RENDER) is None
    assert verdict('pci = { vendor = "8086", device = "46a6" }', RENDER_ADD, RENDER) is None
    assert verdict('pci = { slot = "0000:00:02.*" }', RENDER_ADD, RENDER) is None
    assert verdict('devname = "dri/renderD*"', RENDER_ADD, RENDER) is None
    assert verdict('usb = { vendor = "8086" }', RENDER_ADD, RENDER) == (
        "usb: not a USB device (no usb_device at or above /devices/pci0000:00/0000:00:02.0/drm/"
        "renderD128)"
    )


def test_a_parent_selecting_rule_covers_every_node_below() -> None:
    rule = one_rule('usb = { vendor = "046d", product = "c31c" }')
    for device, props in [
        (KBD_EVENT, {"DEVNAME": "input/event3"}),
        (KBD_HIDRAW, {"DEVNAME": "hidraw0"}),
        (KBD_INPUT, {}),
        (KBD_IF, {}),
        (KEYBOARD, {"DEVNAME": "bus/usb/001/004"}),
    ]:
        assert rule.matches(MatchContext(event(device, props=props), device)), device.devpath
    for device in (TTY, CP2102, ROOT_HUB, RENDER, ZRAM):
        assert not rule.matches(MatchContext(event(device), device)), device.devpath


def test_attrs_conditions_must_hold_on_one_and_the_same_device() -> None:
    # busnum = "2" is on the root hub, devpath = "3" on the adapter: no single device.
    hub = RecordedDevice(
        "/devices/usb2", "usb", "usb_device", None, {"busnum": "2", "devpath": "0"}
    )
    dev = RecordedDevice("/devices/usb2/2-3", "usb", "usb_device", None, {"devpath": "3"}, hub)
    tty = RecordedDevice("/devices/usb2/2-3/tty/ttyUSB1", "tty", None, None, {}, dev)
    assert verdict('attrs = { busnum = "2", devpath = "0" }', event(tty), tty) is None
    assert verdict('attrs = { devpath = "3" }', event(tty), tty) is None
    assert verdict('attrs = { busnum = "2", devpath = "3" }', event(tty), tty) == (
        'attrs: no single device from /devices/usb2/2-3/tty/ttyUSB1 up has busnum = "2", '
        'devpath = "3"; closest is /devices/usb2/2-3 with busnum = absent, devpath = "3"'
    )


def test_attrs_by_port_path() -> None:
    match = 'attrs = { busnum = "1", devpath = "3" }'
    assert verdict(match, TTY_ADD, TTY) is None
    assert verdict(match, EVENT_ADD, KBD_EVENT) is not None


def test_without_sysfs_usb_falls_back_to_udev_properties() -> None:
    assert (
        verdict('usb = { vendor = "10c4", product = "ea60", serial = "0001" }', TTY_UDEV, None)
        is None
    )
    assert verdict('usb = { vendor = "10c4" }', TTY_ADD, None) == (
        "usb: no sysfs view of /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/"
        "ttyUSB0 and no ID_VENDOR_ID/ID_MODEL_ID properties"
    )
    assert verdict('attr.dev = "188:0"', TTY_ADD, None) == (
        "attr.dev: no sysfs view of /devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/"
        "tty/ttyUSB0 (device not present)"
    )


def test_without_sysfs_pci_uses_the_pci_device_own_properties() -> None:
    pci_event = event(GPU, PCI_ID="8086:46A6", PCI_SLOT_NAME="0000:00:02.0")
    assert (
        verdict(
            'pci = { vendor = "8086", device = "46a6", slot = "0000:00:02.0" }', pci_event, None
        )
        is None
    )
    assert verdict('pci = { vendor = "8086" }', RENDER_ADD, None) == (
        "pci: no sysfs view of /devices/pci0000:00/0000:00:02.0/drm/renderD128 and no "
        "PCI_ID/PCI_SLOT_NAME properties"
    )


def test_explain_reports_the_first_failure_cheapest_first() -> None:
    rule = one_rule('usb.vendor = "1a86"\nsubsystem = "block"')
    assert rule.explain(MatchContext(TTY_ADD, TTY)) == 'subsystem: "tty" does not match "block"'


class CountingView:
    """Wraps a RecordedDevice chain and counts every read, to prove laziness and caching."""

    def __init__(self, device: RecordedDevice, reads: Counter[str]) -> None:
        self._device = device
        self.reads = reads

    @property
    def devpath(self) -> str:
        return self._device.devpath

    @property
    def sysname(self) -> str:
        return self._device.sysname

    @property
    def subsystem(self) -> str | None:
        self.reads[f"{self.devpath}:subsystem"] += 1
        return self._device.subsystem

    @property
    def devtype(self) -> str | None:
        self.reads[f"{self.devpath}:devtype"] += 1
        return self._device.devtype

    @property
    def driver(self) -> str | None:
        self.reads[f"{self.devpath}:driver"] += 1
        return self._device.driver

    def attribute(self, name: str) -> str | None:
        self.reads[f"{self.devpath}:{name}"] += 1
        return self._device.attribute(name)

    def parent(self) -> CountingView | None:
        self.reads[f"{self.devpath}:parent"] += 1
        up = self._device.parent()
        return None if up is None else CountingView(up, self.reads)


def test_each_attribute_is_read_at_most_once_per_event() -> None:
    text = "".join(
        f'[[rule]]\nname = "r{i}"\ntarget = "lxc:c"\n[rule.match]\n'
        f'usb = {{ vendor = "10c4", product = "{i:04x}" }}\nattrs.port_number = "!{i}"\n'
        for i in range(50)
    )
    rules = ruleset(
        text + '[[rule]]\nname = "hit"\ntarget = "lxc:c"\nmatch.attrs.idProduct = "ea60"\n'
    )
    reads: Counter[str] = Counter()
    assert [r.name for r in rules.match(TTY_ADD, CountingView(TTY, reads))] == ["hit"]
    assert reads, "the attrs rule must have read something"
    assert max(reads.values()) == 1, reads
    # And explain (which tries all 51 rules) reads nothing twice either.
    reads.clear()
    rules.explain(TTY_ADD, CountingView(TTY, reads))
    assert max(reads.values()) == 1, reads


def test_nothing_is_read_for_an_event_no_rule_can_match() -> None:
    rules = ruleset(
        '[[rule]]\nname = "r"\ntarget = "lxc:c"\n[rule.match]\nsubsystem = "tty"\n'
        'usb = { vendor = "10c4" }\n'
    )
    reads: Counter[str] = Counter()
    assert rules.match(ZRAM_ADD, CountingView(ZRAM, reads)) == []
    assert reads == Counter()


# Remove events: matching from what the add recorded.

REMOVE_RULES = """
[[rule]]
name = "cp2102"
target = "lxc:c"
[rule.match]
subsystem = "tty"
usb = { vendor = "10c4", serial = "0001" }
attrs.port_number = "0"

[[rule]]
name = "by-id"
target = "lxc:c"
[rule.match]
env.ID_SERIAL = "Silicon_Labs_*"

[[rule]]
name = "keyboard"
target = "lxc:c"
[rule.match]
usb.product = "c31c"
"""


def test_remove_matches_what_add_matched() -> None:
    rules = ruleset(REMOVE_RULES)
    memory = MatchMemory()
    assert [r.name for r in memory.match(rules, TTY_ADD, TTY)] == ["cp2102"]
    assert len(memory) == 1
    # The remove carries no sysfs: the recorded add answers usb and attrs.
    remove = TTY_ADD.replace(ACTION="remove")
    assert [r.name for r in memory.match(rules, remove, None)] == ["cp2102"]
    assert len(memory) == 0
    # Without memory the same remove matches nothing.
    assert rules.match(remove) == []


def test_remove_falls_back_to_the_add_properties() -> None:
    rules = ruleset(REMOVE_RULES)
    memory = MatchMemory()
    assert {r.name for r in memory.match(rules, TTY_UDEV, TTY)} == {"cp2102", "by-id"}
    # A kernel remove lacks udev's ID_SERIAL: the add's properties fill it in.
    assert {r.name for r in memory.match(rules, TTY_ADD.replace(ACTION="remove"), None)} == {
        "cp2102",
        "by-id",
    }


def test_remove_of_a_parent_forgets_its_children() -> None:
    rules = ruleset(REMOVE_RULES)
    memory = MatchMemory()
    for device in (KBD_EVENT, KBD_HIDRAW, KEYBOARD):
        assert memory.match(rules, event(device), device)
    assert len(memory) == 3
    # The children's removes were lost (overflow); the device's own remove clears all.
    assert [r.name for r in memory.match(rules, event(KEYBOARD, "remove"), None)] == ["keyboard"]
    assert memory.devpaths() == ()


def test_change_keeps_and_add_replaces_the_record() -> None:
    rules = ruleset(REMOVE_RULES)
    memory = MatchMemory()
    memory.match(rules, TTY_ADD, TTY)
    # A change that no longer matches (here: no sysfs view) keeps the add's record, so
    # the remove still undoes what the add did.
    assert memory.match(rules, TTY_ADD.replace(ACTION="change"), None) == []
    assert memory.recall(TTY.devpath) is not None
    other = RecordedDevice(TTY.devpath, "tty", None, None, {}, None)
    assert memory.match(rules, TTY_ADD, other) == []  # a new device reusing the devpath
    assert memory.recall(TTY.devpath) is None


def test_move_forgets_the_old_devpath() -> None:
    rules = ruleset(REMOVE_RULES)
    memory = MatchMemory()
    memory.match(rules, TTY_ADD, TTY)
    moved = TTY_ADD.replace(ACTION="move", DEVPATH=TTY.devpath + "x", DEVPATH_OLD=TTY.devpath)
    memory.match(rules, moved, None)
    assert memory.recall(TTY.devpath) is None


# The index answers exactly what a linear scan answers.

CATALOG: list[tuple[Uevent, RecordedDevice | None]] = [
    (TTY_ADD, TTY),
    (TTY_UDEV, TTY),
    (TTY_UDEV, None),
    (TTY_ADD.replace(ACTION="remove"), None),
    (event(CP2102_IF), CP2102_IF),
    (event(CP2102, DEVNAME="bus/usb/001/003", MAJOR="189", MINOR="2"), CP2102),
    (EVENT_ADD, KBD_EVENT),
    (HIDRAW_ADD, KBD_HIDRAW),
    (event(KBD_IF, DRIVER="usbhid"), KBD_IF),
    (RENDER_ADD, RENDER),
    (event(GPU, PCI_ID="8086:46A6", PCI_SLOT_NAME="0000:00:02.0"), None),
    (ZRAM_ADD, ZRAM),
    (ZRAM_ADD.replace(ACTION="change"), None),
]

_values = {
    "action": ["add", "remove", "change", "!add", "ch*"],
    "subsystem": ["tty", "block", "input", "hidraw", "usb", "drm", "pci", "t*", "!tty"],
    "devtype": ["disk", "usb_device", "drm_minor", "!disk"],
    "kernel": ["ttyUSB0", "ttyUSB*", "event3", "zram1", "!tty*", "1-3"],
    "devname": ["ttyUSB0", "/dev/hidraw0", "dri/*", "!*"],
}
_hex = ["10c4", "046d", "8086", "ea60", "c31c", "46a6", "a36d", "10c*", "!10c4"]


def _pattern(values: list[str]) -> st.SearchStrategy[Pattern]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=3).map(Pattern.parse)


def _optional(values: list[str]) -> st.SearchStrategy[Pattern | None]:
    return st.none() | _pattern(values)


@st.composite
def _rule(draw: st.DrawFn, number: int) -> Rule:
    conditions: list[Condition] = []
    for key, values in _values.items():
        if draw(st.booleans()):
            conditions.append(EventField(key, draw(_pattern(values))))
    if draw(st.booleans()):
        conditions.append(
            Usb(draw(_optional(_hex)), draw(_optional(_hex)), draw(_optional(["0001", "!0001"])))
        )
    if draw(st.integers(0, 3)) == 0:
        conditions.append(Pci(draw(_optional(_hex)), draw(_optional(_hex)), None))
    if draw(st.integers(0, 3)) == 0:
        conditions.append(Env("ID_SERIAL", draw(_pattern(["Silicon_Labs_CP2102_0001", "S*"]))))
    if draw(st.integers(0, 3)) == 0:
        conditions.append(Attr("disksize", draw(_pattern(["0", "4096", "4*", "!0"]))))
    if draw(st.integers(0, 3)) == 0:
        conditions.append(
            Attrs(
                (
                    ("busnum", draw(_pattern(["1", "2"]))),
                    ("devpath", draw(_pattern(["3", "4", "0"]))),
                )
            )
        )
    return Rule.build(f"r{number}", ["lxc:c"], conditions)


@st.composite
def _rules(draw: st.DrawFn) -> list[Rule]:
    count = draw(st.integers(0, 25))
    return [draw(_rule(i)) for i in range(count)]


@settings(max_examples=300, deadline=None)
@given(rules=_rules())
def test_index_agrees_with_a_linear_scan(rules: list[Rule]) -> None:
    ruleset_ = RuleSet(tuple(rules))
    for uevent, device in CATALOG:
        linear = [r.name for r in rules if r.matches(MatchContext(uevent, device))]
        indexed = [r.name for r in ruleset_.match(uevent, device)]
        assert indexed == linear, uevent.devpath
        explained = [v.rule.name for v in ruleset_.explain(uevent, device) if v.matched]
        assert explained == linear


def test_the_index_files_rules_under_their_most_selective_key() -> None:
    rules = ruleset(
        '[[rule]]\nname = "a"\ntarget = "lxc:c"\n[rule.match]\nsubsystem = "tty"\n'
        'usb = { vendor = "10c4", product = "ea60" }\nkernel = "ttyUSB0"\n'
        '[[rule]]\nname = "b"\ntarget = "lxc:c"\n[rule.match]\nkernel = "tty*"\n'
    )
    assert rules.index.stats() == {"rules": 2, "subsystems": 1, "scanned": 1}
    ctx = MatchContext(ZRAM_ADD, ZRAM)
    assert [r.name for r in rules.index.candidates(ctx)] == ["b"]
    ctx = MatchContext(TTY_ADD, TTY)
    assert [r.name for r in rules.index.candidates(ctx)] == ["a", "b"]


def test_exact_attributes_index_rules_that_have_nothing_cheaper() -> None:
    """Twenty zram disks told apart by size: filed under their size, so an event on a
    disk of another size tries none of them (they were scanned on every event)."""
    rules = ruleset(
        "".join(
            f'[[rule]]\nname = "z{i}"\ntarget = "lxc:c"\n[rule.match]\nsubsystem = "block"\n'
            f'kernel = "zram*"\nattr.disksize = "{i * 4096}"\n'
            for i in range(20)
        )
        + '[[rule]]\nname = "named"\ntarget = "lxc:c"\n[rule.match]\nkernel = "zram1"\n'
        'attr.disksize = "0"\n'
    )
    assert rules.index.stats() == {"rules": 21, "subsystems": 1, "scanned": 0}
    ctx = MatchContext(ZRAM_ADD, ZRAM)  # disksize "0"
    assert [r.name for r in rules.index.candidates(ctx)] == ["z0", "named"]
    assert [r.name for r in rules.match(ZRAM_ADD, ZRAM)] == ["z0", "named"]
    other = RecordedDevice("/devices/virtual/block/zram1", "block", "disk", None, {"disksize": "1"})
    # "named" is filed under its kernel name (no sysfs read to find it) and then
    # tried; none of the twenty is.
    assert [r.name for r in rules.index.candidates(MatchContext(ZRAM_ADD, other))] == ["named"]
    assert rules.match(ZRAM_ADD, other) == []
    # No sysfs (a removal): no value, so none of the twenty, as the condition says.
    assert [r.name for r in rules.index.candidates(MatchContext(ZRAM_ADD, None))] == ["named"]
