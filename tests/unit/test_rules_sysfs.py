"""The edge: SysfsDevice over a fake sysfs tree, and rule files with their permission checks.

The fake tree is laid out like the real one (devices/, class/ and dev/ links, subsystem
and driver links, uevent files), so the same code reads /sys in the privileged tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from hotrelay.core.rules import MatchMemory, RuleSet, RuleSetError
from hotrelay.core.uevent import Uevent
from hotrelay.rules_files import load_rules, rule_files
from hotrelay.sysfs import SysfsDevice, SysfsError, resolve_device

USB = "devices/pci0000:00/0000:00:14.0/usb1/1-3"
TTY = f"{USB}/1-3:1.0/ttyUSB0/tty/ttyUSB0"


def make_device(
    root: Path,
    devpath: str,
    subsystem: str | None,
    *,
    uevent: Mapping[str, str] | None = None,
    attrs: Mapping[str, str] | None = None,
    driver: str | None = None,
) -> Path:
    path = root / devpath
    path.mkdir(parents=True, exist_ok=True)
    (path / "uevent").write_text("".join(f"{k}={v}\n" for k, v in (uevent or {}).items()))
    if subsystem is not None:
        # Only the link's name matters; real links point into /sys/bus or /sys/class.
        (path / "subsystem").symlink_to(f"../../../bus/{subsystem}")
    if driver is not None:
        (path / "driver").symlink_to(f"../../../bus/usb/drivers/{driver}")
    for name, value in (attrs or {}).items():
        (path / name).write_text(value + "\n")
    return path


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """A CP2102 USB-serial adapter on port 3 of bus 1, and a zram disk."""
    root = tmp_path / "sys"
    make_device(root, "devices/pci0000:00/0000:00:14.0", "pci", attrs={"vendor": "0x8086"})
    make_device(
        root,
        "devices/pci0000:00/0000:00:14.0/usb1",
        "usb",
        uevent={"DEVTYPE": "usb_device"},
        attrs={"busnum": "1", "devpath": "0"},
    )
    make_device(
        root,
        USB,
        "usb",
        uevent={
            "DEVTYPE": "usb_device",
            "DEVNAME": "bus/usb/001/003",
            "MAJOR": "189",
            "MINOR": "2",
        },
        attrs={
            "idVendor": "10c4",
            "idProduct": "ea60",
            "serial": "0001",
            "busnum": "1",
            "devpath": "3",
            "product": "CP2102 USB to UART Bridge Controller",
        },
        driver="usb",
    )
    make_device(
        root,
        f"{USB}/1-3:1.0",
        "usb",
        uevent={"DEVTYPE": "usb_interface"},
        driver="cp210x",
        attrs={"bInterfaceNumber": "00"},
    )
    make_device(
        root, f"{USB}/1-3:1.0/ttyUSB0", "usb-serial", driver="cp210x", attrs={"port_number": "0"}
    )
    # Not a device (no uevent file): matching must skip over it to reach the parent.
    (root / f"{USB}/1-3:1.0/ttyUSB0/tty").mkdir()
    make_device(
        root,
        TTY,
        "tty",
        uevent={"MAJOR": "188", "MINOR": "0", "DEVNAME": "ttyUSB0"},
        attrs={"dev": "188:0"},
    )
    (root / f"{USB}/1-3:1.0/power").mkdir()
    make_device(
        root,
        "devices/virtual/block/zram1",
        "block",
        uevent={"MAJOR": "252", "MINOR": "1", "DEVNAME": "zram1", "DEVTYPE": "disk"},
        attrs={"disksize": "0", "big": "x" * 5000},
    )
    for kind, devnum, target in [
        ("char", "188:0", TTY),
        ("block", "252:1", "devices/virtual/block/zram1"),
    ]:
        (root / "dev" / kind).mkdir(parents=True, exist_ok=True)
        (root / "dev" / kind / devnum).symlink_to(f"../../{target}")
    (root / "class/tty").mkdir(parents=True)
    (root / "class/tty/ttyUSB0").symlink_to(f"../../{TTY}")
    return root


def test_a_device_and_its_facts(sysfs: Path) -> None:
    tty = SysfsDevice.from_syspath(sysfs / "class/tty/ttyUSB0", sysfs)
    assert tty.devpath == "/" + TTY
    assert (tty.sysname, tty.subsystem, tty.devtype, tty.driver) == ("ttyUSB0", "tty", None, None)
    assert tty.attribute("dev") == "188:0"  # the trailing newline is stripped
    assert tty.attribute("nope") is None
    assert tty.attribute("../dev") is None
    assert tty.attribute("subsystem") == "tty"  # a link attribute is its target's name
    port = tty.parent()
    assert port is not None
    assert port.devpath == f"/{USB}/1-3:1.0/ttyUSB0"  # skipped the tty/ class directory
    assert port.driver == "cp210x"
    interface = port.parent()
    assert interface is not None
    assert interface.devtype == "usb_interface"
    assert interface.attribute("power") is None  # a directory, not an attribute
    chain = []
    device: SysfsDevice | None = tty
    while device is not None:
        chain.append(device.sysname)
        device = device.parent()
    assert chain == ["ttyUSB0", "ttyUSB0", "1-3:1.0", "1-3", "usb1", "0000:00:14.0"]


def test_oversized_attributes_are_not_read(sysfs: Path) -> None:
    zram = SysfsDevice.from_syspath(sysfs / "devices/virtual/block/zram1", sysfs)
    assert zram.attribute("disksize") == "0"
    assert zram.attribute("big") is None


def test_to_uevent(sysfs: Path) -> None:
    tty = SysfsDevice.from_syspath(sysfs / TTY, sysfs)
    assert tty.to_uevent() == Uevent.from_properties(
        {"ACTION": "add", "DEVPATH": "/" + TTY, "SUBSYSTEM": "tty", "MAJOR": "188",
         "MINOR": "0", "DEVNAME": "ttyUSB0"}
    )  # fmt: skip
    assert tty.to_uevent("change").action == "change"


def test_resolve_sys_paths_into_the_root(sysfs: Path) -> None:
    assert resolve_device("/sys/class/tty/ttyUSB0", sysfs).devpath == "/" + TTY
    assert resolve_device(f"/sys/{USB}", sysfs).sysname == "1-3"
    assert SysfsDevice.from_devnum("block", 252, 1, sysfs).sysname == "zram1"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/sys/class/tty/ttyS9", "{root}/class/tty/ttyS9: No such file or directory"),
        ("/sys/class", "{root}/class: not a device (outside {root}/devices)"),
        ("/sys/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty",
         "{root}/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty: not a device "
         "(no uevent file)"),
        ("ttyUSB0", "ttyUSB0: expected a /dev/... node or a /sys/... device path"),
        ("/dev/hotrelay-no-such-node", "/dev/hotrelay-no-such-node: No such file or directory"),
        ("/dev/", "/dev/: not a device node"),
    ],
)  # fmt: skip
def test_resolve_errors(sysfs: Path, spec: str, message: str) -> None:
    with pytest.raises(SysfsError) as info:
        resolve_device(spec, sysfs)
    assert str(info.value) == message.format(root=sysfs.resolve())


def test_resolve_a_dev_node_by_its_number(sysfs: Path) -> None:
    # /dev/null is c 1:3 on every Linux host; the fake tree has no such device.
    with pytest.raises(SysfsError) as info:
        resolve_device("/dev/null", sysfs)
    assert str(info.value) == f"no char device 1:3 in {sysfs}/dev/char"
    (sysfs / "dev/char/1:3").symlink_to(f"../../{TTY}")
    assert resolve_device("/dev/null", sysfs).sysname == "ttyUSB0"


RULES = """
[[rule]]
name = "by-serial"
target = "lxc:ha"
[rule.match]
subsystem = "tty"
usb = { vendor = "10c4", product = "ea60", serial = "0001" }

[[rule]]
name = "by-port"
target = "lxc:lab"
[rule.match]
attrs = { busnum = "1", devpath = "3" }
"""


def test_matching_reads_ancestors_through_sysfs(sysfs: Path) -> None:
    rules = RuleSet.from_texts([("t.toml", RULES + 'kernel = "ttyUSB*"\n')])
    tty = SysfsDevice.from_syspath(sysfs / TTY, sysfs)
    assert [r.name for r in rules.match(tty.to_uevent(), tty)] == ["by-serial", "by-port"]
    zram = SysfsDevice.from_syspath(sysfs / "devices/virtual/block/zram1", sysfs)
    assert rules.match(zram.to_uevent(), zram) == []


def test_attrs_driver_matches_an_ancestors_driver_link(sysfs: Path) -> None:
    # Like udev's DRIVERS: the driver link reads as an attribute, on any ancestor.
    rules = RuleSet.from_texts(
        [("t.toml", '[[rule]]\nname = "d"\ntarget = "lxc:c"\nmatch.attrs.driver = "cp210x"\n')]
    )
    tty = SysfsDevice.from_syspath(sysfs / TTY, sysfs)
    assert [r.name for r in rules.match(tty.to_uevent(), tty)] == ["d"]


def test_remove_matches_after_the_device_left_sysfs(sysfs: Path) -> None:
    rules = RuleSet.from_texts(
        [("t.toml", RULES.replace("attrs_driver_is_separate = false\n", ""))]
    )
    memory = MatchMemory()
    tty = SysfsDevice.from_syspath(sysfs / TTY, sysfs)
    add = tty.to_uevent()
    assert [r.name for r in memory.match(rules, add, tty)] == ["by-serial", "by-port"]
    shutil.rmtree(sysfs / USB)  # unplugged
    remove = add.replace(ACTION="remove")
    gone = SysfsDevice(sysfs / TTY, sysfs)
    assert rules.match(remove, gone) == []  # sysfs alone no longer knows
    assert [r.name for r in memory.match(rules, remove, gone)] == ["by-serial", "by-port"]


# Rule files on disk.

GOOD = '[[rule]]\nname = "{name}"\ntarget = "lxc:c"\nmatch.subsystem = "tty"\n'


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "rules.d"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    return directory


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_files_load_in_name_order(rules_dir: Path) -> None:
    write(rules_dir / "20-b.toml", GOOD.format(name="b"))
    write(rules_dir / "10-a.toml", GOOD.format(name="a"))
    write(rules_dir / "README", "not rules")
    write(rules_dir / ".10-a.toml.swp.toml", "junk")
    assert [p.name for p in rule_files(rules_dir)] == ["10-a.toml", "20-b.toml"]
    rules = load_rules([rules_dir])
    assert [r.name for r in rules] == ["a", "b"]
    assert rules.files == (str(rules_dir / "10-a.toml"), str(rules_dir / "20-b.toml"))
    assert len(load_rules([rules_dir / "20-b.toml"])) == 1


def test_an_empty_directory_is_an_empty_rule_set(rules_dir: Path) -> None:
    assert len(load_rules([rules_dir])) == 0


def load_errors(*paths: Path) -> list[str]:
    with pytest.raises(RuleSetError) as info:
        load_rules(paths)
    return [str(e) for e in info.value.errors]


def test_loading_is_all_or_nothing_with_every_error(rules_dir: Path) -> None:
    write(rules_dir / "10-a.toml", GOOD.format(name="a"))
    write(rules_dir / "20-b.toml", GOOD.format(name="a"))
    write(rules_dir / "30-c.toml", "x =")
    assert load_errors(rules_dir) == [
        f'{rules_dir}/20-b.toml:2: rule "a": duplicate name; first defined at '
        f"{rules_dir}/10-a.toml:1",
        f"{rules_dir}/30-c.toml:1: invalid TOML: Invalid value (at end of file)",
    ]


def test_a_file_writable_by_others_is_refused(rules_dir: Path) -> None:
    write(rules_dir / "10-a.toml", GOOD.format(name="a"), 0o666)
    write(rules_dir / "20-b.toml", GOOD.format(name="b"), 0o664)
    assert load_errors(rules_dir) == [
        f"{rules_dir}/10-a.toml: refusing a file writable by group and others (mode 0666): a "
        "daemon running as root must not load policy anyone else can write (chmod go-w)",
        f"{rules_dir}/20-b.toml: refusing a file writable by group (mode 0664): a daemon "
        "running as root must not load policy anyone else can write (chmod go-w)",
    ]


def test_a_directory_writable_by_others_is_refused(rules_dir: Path) -> None:
    write(rules_dir / "10-a.toml", GOOD.format(name="a"))
    rules_dir.chmod(0o777)
    expected = [
        f"{rules_dir}: refusing a directory writable by group and others (mode 0777): a daemon "
        "running as root must not load policy anyone else can write (chmod go-w)"
    ]
    assert load_errors(rules_dir) == expected
    # A file named directly is refused when its directory is unsafe, too.
    assert load_errors(rules_dir / "10-a.toml") == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_file_owned_by_another_user_is_refused(rules_dir: Path) -> None:
    path = write(rules_dir / "10-a.toml", GOOD.format(name="a"))
    os.chown(path, 1234, 0)
    assert load_errors(rules_dir) == [
        f"{path}: refusing a file owned by uid 1234: only root may own hotrelay policy (chown root)"
    ]


def test_unreadable_and_odd_files(rules_dir: Path) -> None:
    write(rules_dir / "10-latin1.toml", "# caf\xe9\n")
    (rules_dir / "10-latin1.toml").write_bytes(b"\n# caf\xe9\n")
    os.mkfifo(rules_dir / "20-fifo.toml", 0o644)
    (rules_dir / "30-dangling.toml").symlink_to(rules_dir / "nowhere")
    assert load_errors(rules_dir, rules_dir / "missing.toml") == [
        f"{rules_dir}/10-latin1.toml:2: not UTF-8 text (byte 0xe9)",
        f"{rules_dir}/20-fifo.toml: not a regular file",
        f"{rules_dir}/30-dangling.toml: cannot read: No such file or directory",
        f"{rules_dir}/missing.toml: no such file or directory",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files anyway")
def test_a_file_without_read_permission(rules_dir: Path) -> None:
    path = write(rules_dir / "10-a.toml", GOOD.format(name="a"), 0o000)
    assert load_errors(rules_dir) == [f"{path}: cannot read: Permission denied"]
