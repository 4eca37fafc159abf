"""``hotrelay explain`` against real devices: a hot-added zram disk and a veth pair.

The same SysfsDevice code the unit tests run over a fake tree reads the real /sys
here, and /dev/zramN is resolved through its real device number.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hotrelay.cli import main
from hotrelay.core.rules import MatchMemory
from hotrelay.rules_files import load_rules
from hotrelay.sysfs import SysfsDevice, resolve_device
from hotrelay.testing.hotplug import VethPair, ZramDevice

pytestmark = pytest.mark.privileged

RULES = """\
[[rule]]
name = "zram-disk"
target = ["lxc:test", "docker:db-*"]
[rule.match]
subsystem = "block"
kernel = "zram*"
devtype = "disk"
attr.disksize = "1048576"      # the 1M the fixture sets

[[rule]]
name = "big-zram"
target = "lxc:big"
[rule.match]
subsystem = "block"
kernel = "zram*"
attr.disksize = "1073741824"

[[rule]]
name = "test-veth"
target = "lxc:router"
[rule.match]
subsystem = "net"
kernel = "hrt*"
attr = { type = "1", mtu = "1500" }   # ARPHRD_ETHER
attrs.addr_len = "6"
[rule.netdev]
name = "wan0"
"""


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "rules.d"
    directory.mkdir()
    (directory / "10-test.toml").write_text(RULES)
    return directory


@pytest.fixture
def quiet(tmp_path: Path) -> list[str]:
    """No daemon to ask and no runtime enabled: every target says so."""
    config = tmp_path / "hotrelay.toml"
    config.write_text("[runtimes]\nenabled = []\n")
    return ["--config", str(config), "--socket", str(tmp_path / "no-daemon.sock")]


def explain(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["explain", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_explain_a_real_zram_node(
    zram: ZramDevice, rules_dir: Path, quiet: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    node = f"/dev/{zram.name}"
    assert stat.S_ISBLK(os.stat(node).st_mode)
    out = explain([node, "--rules", str(rules_dir), *quiet], capsys)
    assert out.splitlines() == [
        f"device /devices/virtual/block/{zram.name}",
        f"  subsystem block, devtype disk, kernel {zram.name}, node {node} "
        f"(b {zram.major}:{zram.minor}), driver -",
        f"rules {rules_dir}: 3 rules",
        f"  [match] zram-disk ({rules_dir}/10-test.toml:1) -> lxc:test, docker:db-*",
        f'  [no]    big-zram ({rules_dir}/10-test.toml:10): attr.disksize: "1048576" does not '
        'match "1073741824"',
        f'  [no]    test-veth ({rules_dir}/10-test.toml:18): subsystem: "block" does not match '
        '"net"',
        "would go to (asked the runtimes):",
        f"  lxc:test -> nothing: the lxc runtime is not enabled ([runtimes] in {quiet[1]})",
        f"  docker:db-* -> nothing: the docker runtime is not enabled ([runtimes] in {quiet[1]})",
    ]
    report = json.loads(explain([node, "--rules", str(rules_dir), "--json", *quiet], capsys))
    assert report["device"]["devpath"] == zram.devpath
    assert (report["device"]["major"], report["device"]["minor"]) == (zram.major, zram.minor)
    assert report["matched"] == ["zram-disk"]
    # The /sys path names the same device.
    assert explain([f"/sys/block/{zram.name}", "--rules", str(rules_dir), *quiet], capsys) == out


def test_explain_a_real_veth(
    veth: VethPair, rules_dir: Path, quiet: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    sys_path = f"/sys/class/net/{veth.name}"
    out = explain([sys_path, "--rules", str(rules_dir), *quiet], capsys)
    assert out.splitlines() == [
        f"device /devices/virtual/net/{veth.name}",
        f"  subsystem net, devtype -, kernel {veth.name}, driver -",
        f"rules {rules_dir}: 3 rules",
        f'  [no]    zram-disk ({rules_dir}/10-test.toml:1): subsystem: "net" does not match '
        '"block"',
        f'  [no]    big-zram ({rules_dir}/10-test.toml:10): subsystem: "net" does not match '
        '"block"',
        f"  [match] test-veth ({rules_dir}/10-test.toml:18) -> lxc:router",
        "would go to (asked the runtimes):",
        f"  lxc:router -> nothing: the lxc runtime is not enabled ([runtimes] in {quiet[1]})",
    ]
    report = json.loads(explain([sys_path, "--rules", str(rules_dir), "--json", *quiet], capsys))
    assert report["device"]["kernel"] == veth.name
    assert [r["matched"] for r in report["rules"]] == [False, False, True]


def test_remove_matches_after_the_real_device_is_gone(zram: ZramDevice, rules_dir: Path) -> None:
    rules = load_rules([rules_dir])
    device = resolve_device(f"/dev/{zram.name}")
    add = device.to_uevent()
    memory = MatchMemory()
    assert [r.name for r in memory.match(rules, add, device)] == ["zram-disk"]
    zram.remove()
    assert not zram.syspath.exists()
    gone = SysfsDevice(zram.syspath)
    remove = add.replace(ACTION="remove")
    assert rules.match(remove, gone) == []  # sysfs no longer knows the disksize
    assert [r.name for r in memory.match(rules, remove, gone)] == ["zram-disk"]
