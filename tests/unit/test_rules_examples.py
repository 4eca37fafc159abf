"""The example rules in rules/ are valid and do what their comments say."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotrelay.cli import main
from hotrelay.core.plan import plan_for
from hotrelay.core.rules import RecordedDevice, RuleSet, RuleSetError
from hotrelay.core.uevent import Uevent
from hotrelay.rules_files import load_rules

EXAMPLES = Path(__file__).resolve().parents[2] / "rules"


@pytest.fixture(scope="module")
def examples() -> RuleSet:
    return load_rules([EXAMPLES])


def test_hotrelay_check_rules_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert out == f"{EXAMPLES}: 6 rules in 5 files, ok (4 indexed, 2 scanned)\n"


def test_every_example_file_has_comments_and_rules(examples: RuleSet) -> None:
    files = sorted(EXAMPLES.glob("*.toml"))
    assert len(files) == 5
    for path in files:
        assert path.read_text().startswith("#"), f"{path.name} should open with a comment"
    assert len(examples) == 6


PCI = RecordedDevice("/devices/pci0000:00/0000:00:14.0", "pci", None, "xhci_hcd", {})
HUB = RecordedDevice(
    f"{PCI.devpath}/usb1", "usb", "usb_device", "usb", {"busnum": "1", "devpath": "0"}, PCI
)


def usb(port: str, vendor: str, product: str, serial: str = "") -> RecordedDevice:
    attrs = {
        "idVendor": vendor,
        "idProduct": product,
        "serial": serial,
        "busnum": "1",
        "devpath": port,
    }
    return RecordedDevice(f"{HUB.devpath}/1-{port}", "usb", "usb_device", "usb", attrs, HUB)


def node(
    parent: RecordedDevice, path: str, subsystem: str, devtype: str | None = None
) -> RecordedDevice:
    interface = RecordedDevice(
        f"{parent.devpath}/{parent.sysname}:1.0", "usb", "usb_interface", None, {}, parent
    )
    return RecordedDevice(f"{interface.devpath}/{path}", subsystem, devtype, None, {}, interface)


def add(device: RecordedDevice, devname: str | None = None, **props: str) -> Uevent:
    base = {"ACTION": "add", "DEVPATH": device.devpath, "SUBSYSTEM": device.subsystem or ""}
    if devname:
        base |= {"DEVNAME": devname, "MAJOR": "1", "MINOR": "2"}
    return Uevent.from_properties(base | props)


def matched(rules: RuleSet, event: Uevent, device: RecordedDevice | None) -> list[str]:
    return [rule.name for rule in rules.match(event, device)]


DONGLE = usb("2", "10c4", "ea60", "a4c1383d0b8bed11a0c1f8e2d0d3c06e")
OTHER_CP210X = usb("5", "10c4", "ea60", "0001")
WEBCAM = usb("6", "046d", "082d")
NIC = usb("7", "0bda", "8153")
ON_PORT_3 = usb("3", "1a86", "7523")


def test_zigbee_dongle_by_serial(examples: RuleSet) -> None:
    tty = node(DONGLE, "ttyUSB0/tty/ttyUSB0", "tty")
    event = add(tty, "ttyUSB0", ID_SERIAL="ITead_Sonoff_Zigbee_3.0_USB_Dongle_Plus")
    assert matched(examples, event, tty) == ["zigbee-dongle"]
    plan = [a.describe() for a in plan_for(event, examples.match(event, tty))]
    assert plan[:3] == [
        "grant c 1:2 rw to lxc:homeassistant",
        "create /dev/zigbee (c 1:2, mode 0660, owner root, group dialout) in lxc:homeassistant",
        "symlink /dev/serial/by-id/usb-ITead_Sonoff_Zigbee_3.0_USB_Dongle_Plus -> ../../zigbee "
        "in lxc:homeassistant",
    ]
    other = node(OTHER_CP210X, "ttyUSB1/tty/ttyUSB1", "tty")
    assert matched(examples, add(other, "ttyUSB1"), other) == []


def test_webcam_video_and_media_nodes(examples: RuleSet) -> None:
    for path, subsystem, devname in [
        ("video4linux/video0", "video4linux", "video0"),
        ("video4linux/video1", "video4linux", "video1"),
        ("media0", "media", "media0"),
    ]:
        device = node(WEBCAM, path, subsystem)
        assert matched(examples, add(device, devname), device) == ["webcam-frigate"]
    sound = node(WEBCAM, "sound/card1/controlC1", "sound")
    assert matched(examples, add(sound, "snd/controlC1"), sound) == []


def test_everything_on_one_port(examples: RuleSet) -> None:
    tty = node(ON_PORT_3, "ttyUSB2/tty/ttyUSB2", "tty")
    hidraw = node(ON_PORT_3, "hidraw/hidraw3", "hidraw")
    for device, devname in [(tty, "ttyUSB2"), (hidraw, "hidraw3"), (ON_PORT_3, "bus/usb/001/009")]:
        assert matched(examples, add(device, devname), device) == ["port-1-3-to-lab"]
    kiosk = add(hidraw, "hidraw3", ID_PATH="pci-0000:00:14.0-usb-0:4:1.0")
    assert matched(examples, kiosk, None) == ["port-2-4-to-kiosk"]
    event_node = add(hidraw, "input/event9", ID_PATH="pci-0000:00:14.0-usb-0:4:1.0")
    assert matched(examples, event_node.replace(DEVPATH=hidraw.devpath + "/event9"), None) == []


def test_gpu_render_node_only(examples: RuleSet) -> None:
    gpu = RecordedDevice(
        "/devices/pci0000:00/0000:00:02.0", "pci", None, "i915", {"vendor": "0x8086"}
    )
    render = RecordedDevice(f"{gpu.devpath}/drm/renderD128", "drm", "drm_minor", None, {}, gpu)
    card = RecordedDevice(f"{gpu.devpath}/drm/card0", "drm", "drm_minor", None, {}, gpu)
    assert matched(examples, add(render, "dri/renderD128"), render) == ["igpu-render-jellyfin"]
    assert matched(examples, add(card, "dri/card0"), card) == []


def test_usb_nic_is_moved_and_renamed(examples: RuleSet) -> None:
    netdev = node(NIC, "net/enx00e04c680001", "net")
    event = add(netdev, INTERFACE="enx00e04c680001", IFINDEX="9")
    assert matched(examples, event, netdev) == ["usb-nic-wan"]
    assert [a.describe() for a in plan_for(event, examples.match(event, netdev))] == [
        "move interface enx00e04c680001 into lxc:router as wan0"
    ]


DOCS = [EXAMPLES.parent / "README.md", *sorted((EXAMPLES.parent / "docs").glob("*.md"))]


def toml_blocks(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every ```toml block in a Markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if line.strip() == "```toml":
            start = number
        elif line.strip() == "```" and start is not None:
            blocks.append((start, "\n".join(lines[start : number - 1]) + "\n"))
            start = None
    return blocks


def test_every_rule_example_in_the_readme_and_docs_loads() -> None:
    """The rules users copy from the README and docs/ are valid as printed."""
    checked = 0
    for path in DOCS:
        for line, text in toml_blocks(path):
            if "[[rule]]" not in text:
                continue
            try:
                RuleSet.from_texts([(f"{path.name}:{line}", text)])
            except RuleSetError as exc:
                raise AssertionError(f"{path.name}, block at line {line}: {exc}") from None
            checked += 1
    assert checked >= 3
