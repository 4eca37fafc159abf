"""``hotrelay check``, ``explain`` and ``simulate``: exit codes, output, parsable --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hotrelay.cli import main
from hotrelay.core.uevent import Uevent, Wire, serialize

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "uevents"
ROOT = Path(__file__).resolve().parents[2]

RULES = """\
[[rule]]
name = "zram"
target = ["lxc:test", "docker:db-*"]
[rule.match]
subsystem = "block"
kernel = "zram*"
[rule.device]
mode = "0600"
symlinks = ["disk/by-hr/{kernel}"]

[[rule]]
name = "big-zram"
target = "lxc:big"
match.subsystem = "block"
match.attr.disksize = "1073741824"

[[rule]]
name = "nic"
target = "lxc:router"
match = { subsystem = "net", kernel = "hr*" }
netdev.name = "wan0"
"""


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "rules.d"
    directory.mkdir()
    (directory / "10-test.toml").write_text(RULES)
    return directory


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """A zram disk and a net interface, laid out as in /sys."""
    root = tmp_path / "sys"
    zram = root / "devices/virtual/block/zram1"
    zram.mkdir(parents=True)
    (zram / "uevent").write_text("MAJOR=252\nMINOR=1\nDEVNAME=zram1\nDEVTYPE=disk\n")
    (zram / "subsystem").symlink_to("../../../../class/block")
    (zram / "disksize").write_text("0\n")
    nic = root / "devices/virtual/net/hrt0a"
    nic.mkdir(parents=True)
    (nic / "uevent").write_text("INTERFACE=hrt0a\nIFINDEX=12\n")
    (nic / "subsystem").symlink_to("../../../../class/net")
    (root / "class/net").mkdir(parents=True)
    (root / "class/net/hrt0a").symlink_to("../../devices/virtual/net/hrt0a")
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# check


def test_check_ok(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["check", str(rules_dir)], capsys)
    assert (code, err) == (0, "")
    assert out == f"{rules_dir}: 3 rules in 1 file, ok (1 indexed, 2 scanned)\n"


def test_check_prints_path_line_messages_and_exits_1(
    rules_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (rules_dir / "20-bad.toml").write_text(
        '[[rule]]\nname = "zram"\ntarget = "lxc:x"\nmatch.kernel = "a["\n'
    )
    (rules_dir / "30-bad.toml").write_text('[[rule]]\nname = "y"\ntarget = "lxd:y"\nmatch.x = 1\n')
    code, out, err = run(["check", str(rules_dir)], capsys)
    assert code == 1
    assert out.splitlines() == [
        f'{rules_dir}/20-bad.toml:2: rule "zram": duplicate name; first defined at '
        f"{rules_dir}/10-test.toml:1",
        f'{rules_dir}/20-bad.toml:4: rule "zram": match.kernel: glob "a[": unterminated \'[\' '
        "at position 2",
        f'{rules_dir}/30-bad.toml:4: rule "y": match: unknown key "x"; expected one of action, '
        "attr, attrs, devname, devtype, driver, env, kernel, pci, subsystem, tag, usb",
    ]
    assert err == "hotrelay: 3 errors\n"


def test_check_json_ok_and_errors(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", "--json", str(rules_dir)], capsys)
    report = json.loads(out)
    assert code == 0
    assert (report["ok"], report["rules"], report["errors"]) == (True, 3, [])
    (rules_dir / "20-bad.toml").write_text('[[rule]]\nname = "y"\ntarget = "lxd:y"\nmatch.x = 1\n')
    code, out, err = run(["check", "--json", str(rules_dir)], capsys)
    report = json.loads(out)
    assert (code, err, report["ok"]) == (1, "", False)
    (error,) = report["errors"]
    assert error["path"] == f"{rules_dir}/20-bad.toml"
    assert error["line"] == 4
    assert error["message"].startswith('rule "y": match: unknown key "x"')


def test_check_files_and_directories_together(
    rules_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = tmp_path / "extra.toml"
    extra.write_text('[[rule]]\nname = "zram"\ntarget = "lxc:x"\nmatch.kernel = "x"\n')
    code, out, _ = run(["check", str(rules_dir), str(extra)], capsys)
    assert code == 1
    assert out == (
        f'{extra}:2: rule "zram": duplicate name; first defined at {rules_dir}/10-test.toml:1\n'
    )


def test_check_a_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", str(tmp_path / "nope")], capsys)
    assert (code, out) == (1, f"{tmp_path}/nope: no such file or directory\n")


# explain


def no_runtimes(tmp_path: Path) -> list[str]:
    """explain's options for a config with no runtime enabled and no daemon to ask."""
    config = tmp_path / "hotrelay.toml"
    config.write_text("[runtimes]\nenabled = []\n")
    return ["--config", str(config), "--socket", str(tmp_path / "no-daemon.sock")]


def test_explain_a_sys_path(
    rules_dir: Path, sysfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "explain",
        "/sys/devices/virtual/block/zram1",
        "--rules",
        str(rules_dir),
        "--sysfs",
        str(sysfs),
        *no_runtimes(tmp_path),
    ]
    code, out, err = run(argv, capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "device /devices/virtual/block/zram1",
        "  subsystem block, devtype disk, kernel zram1, node /dev/zram1 (b 252:1), driver -",
        f"rules {rules_dir}: 3 rules",
        f"  [match] zram ({rules_dir}/10-test.toml:1) -> lxc:test, docker:db-*",
        f'  [no]    big-zram ({rules_dir}/10-test.toml:11): attr.disksize: "0" does not match '
        '"1073741824"',
        f'  [no]    nic ({rules_dir}/10-test.toml:17): subsystem: "block" does not match "net"',
        "would go to (asked the runtimes):",
        f"  lxc:test -> nothing: the lxc runtime is not enabled ([runtimes] in {tmp_path}/"
        "hotrelay.toml)",
        f"  docker:db-* -> nothing: the docker runtime is not enabled ([runtimes] in {tmp_path}/"
        "hotrelay.toml)",
    ]


def test_explain_json(
    rules_dir: Path, sysfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "explain",
        "/sys/class/net/hrt0a",
        "--rules",
        str(rules_dir),
        "--sysfs",
        str(sysfs),
        "--json",
        *no_runtimes(tmp_path),
    ]
    code, out, _ = run(argv, capsys)
    assert code == 0
    report = json.loads(out)
    assert report["device"] == {
        "syspath": str((sysfs / "devices/virtual/net/hrt0a").resolve()),
        "devpath": "/devices/virtual/net/hrt0a",
        "subsystem": "net",
        "devtype": None,
        "kernel": "hrt0a",
        "devname": None,
        "major": None,
        "minor": None,
        "driver": None,
    }
    assert [(r["name"], r["matched"], r["failure"]) for r in report["rules"]] == [
        ("zram", False, 'subsystem: "net" does not match "block"'),
        ("big-zram", False, 'subsystem: "net" does not match "block"'),
        ("nic", True, None),
    ]
    assert report["matched"] == ["nic"]
    assert report["targets"] == ["lxc:router"]
    assert report["containers_resolved"] == "runtimes"
    (receivers,) = report["receivers"]
    assert receivers["target"] == "lxc:router"
    assert receivers["containers"] == []
    assert "the lxc runtime is not enabled" in receivers["why_none"]


def test_explain_errors(rules_dir: Path, sysfs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["explain", "/sys/class/net/nope", "--sysfs", str(sysfs)], capsys)
    assert (code, out) == (1, "")
    assert err == f"hotrelay: {sysfs.resolve()}/class/net/nope: No such file or directory\n"
    code, _, err = run(["explain", "zram1", "--sysfs", str(sysfs)], capsys)
    assert (code, err) == (
        1,
        "hotrelay: zram1: expected a /dev/... node or a /sys/... device path\n",
    )
    (rules_dir / "20-bad.toml").write_text("[[rule]]\nname = 1\n")
    argv = ["explain", "/sys/class/net/hrt0a", "--rules", str(rules_dir), "--sysfs", str(sysfs)]
    code, out, err = run(argv, capsys)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{rules_dir}/20-bad.toml:1: rule #1: missing target: give target = "
        '["RUNTIME:NAME", ...] such as "lxc:homeassistant"',
        f"{rules_dir}/20-bad.toml:1: rule #1: missing [rule.match]: a rule needs at least one "
        "condition",
        f'{rules_dir}/20-bad.toml:2: rule #1: name: expected a string such as "zigbee-dongle", '
        "got integer 1",
        "hotrelay: 3 error(s) in the rules; nothing was loaded",
    ]


# simulate


def test_simulate_a_kernel_capture(
    rules_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "simulate",
        "--rules",
        str(rules_dir),
        "--sysfs",
        str(tmp_path),
        str(GOLDEN / "kernel-zram-add.bin"),
        *no_runtimes(tmp_path),
    ]
    code, out, err = run(argv, capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "event add /devices/virtual/block/zram1 (block, kernel wire, seqnum 820), not present "
        "here: matching on its properties only",
        f"matched zram ({rules_dir}/10-test.toml:1)",
        "plan (8 actions, nothing was changed; target patterns: no running container resolved):",
        "  1. grant b 253:1 rwm to lxc:test  [rule zram]",
        "  2. create /dev/zram1 (b 253:1, mode 0600, owner 0, group 0) in lxc:test  [rule zram]",
        "  3. symlink /dev/disk/by-hr/zram1 -> ../../zram1 in lxc:test  [rule zram]",
        "  4. inject add uevent for /devices/virtual/block/zram1 (auto wire) into lxc:test  "
        "[rule zram]",
        "  5. grant b 253:1 rwm to docker:db-*  [rule zram]",
        "  6. create /dev/zram1 (b 253:1, mode 0600, owner 0, group 0) in docker:db-*  [rule zram]",
        "  7. symlink /dev/disk/by-hr/zram1 -> ../../zram1 in docker:db-*  [rule zram]",
        "  8. inject add uevent for /devices/virtual/block/zram1 (auto wire) into docker:db-*  "
        "[rule zram]",
    ]


def test_simulate_reads_attributes_from_sysfs_when_present(
    rules_dir: Path, sysfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (sysfs / "devices/virtual/block/zram1/disksize").write_text("1073741824\n")
    event = tmp_path / "zram.txt"
    event.write_text(
        "# udevadm info /dev/zram1\nP: /devices/virtual/block/zram1\nN: zram1\n"
        "E: ACTION=add\nE: DEVPATH=/devices/virtual/block/zram1\nE: SUBSYSTEM=block\n"
        "E: DEVNAME=/dev/zram1\nE: MAJOR=252\nE: MINOR=1\nE: USEC_INITIALIZED=5\n"
    )
    argv = ["simulate", "--rules", str(rules_dir), "--sysfs", str(sysfs), "--json", str(event)]
    argv += no_runtimes(tmp_path)
    code, out, _ = run(argv, capsys)
    assert code == 0
    report = json.loads(out)
    assert report["sysfs"] is True
    assert report["event"]["wire"] == "udev"
    assert [m["name"] for m in report["matched"]] == ["zram", "big-zram"]
    assert [a["action"] for a in report["actions"]] == [
        *["GrantDevice", "MakeNode", "MakeSymlink", "InjectUevent"] * 2,  # zram, two targets
        *["GrantDevice", "MakeNode", "InjectUevent"],  # big-zram, now that disksize matches
    ]
    assert report["actions"][-1] == {
        "action": "InjectUevent",
        "describe": "inject add uevent for /devices/virtual/block/zram1 (auto wire) into lxc:big",
        "container": "lxc:big",
        "uevent": {"action": "add", "devpath": "/devices/virtual/block/zram1", "seqnum": None},
        "wire": None,
        "origin": "big-zram",
    }


def test_simulate_a_remove_and_a_net_event(
    rules_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nic = Uevent.from_properties(
        {
            "ACTION": "add",
            "DEVPATH": "/devices/virtual/net/hrt1",
            "SUBSYSTEM": "net",
            "INTERFACE": "hrt1",
        },
        Wire.UDEV,
    )
    capture = tmp_path / "nic.bin"
    capture.write_bytes(serialize(nic))
    argv = ["simulate", "--rules", str(rules_dir), "--sysfs", str(tmp_path), str(capture)]
    argv[1:1] = no_runtimes(tmp_path)
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert out.splitlines()[-1] == "  1. move interface hrt1 into lxc:router as wan0  [rule nic]"
    capture.write_bytes(serialize(nic.replace(ACTION="remove")))
    code, out, _ = run(argv, capsys)
    assert out.splitlines()[-1] == "no actions for this event"
    argv[-1] = str(GOLDEN / "kernel-bdi-add.bin")
    code, out, _ = run(argv, capsys)
    assert out.splitlines()[-1] == "no rule matches: nothing to do"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"ACTION=add\nnot a property\n", "{path}:2: expected KEY=VALUE, got 'not a property'"),
        (b"ACTION=add\nDEVPATH=/x\n", "{path}: missing SUBSYSTEM"),
        (b"add@/x\0ACTION=add\0", "{path}: missing DEVPATH"),
        (b"\xff\xfe", "{path}: not a uevent (neither wire format nor UTF-8 text)"),
    ],
)
def test_simulate_bad_captures(
    rules_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    message: str,
) -> None:
    capture = tmp_path / "bad"
    capture.write_bytes(content)
    code, out, err = run(["simulate", "--rules", str(rules_dir), str(capture)], capsys)
    assert (code, out) == (1, "")
    assert err == f"hotrelay: {message.format(path=capture)}\n"


def test_simulate_a_missing_file(rules_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["simulate", "--rules", str(rules_dir), "/nonexistent.bin"], capsys)
    assert (code, err) == (1, "hotrelay: /nonexistent.bin: No such file or directory\n")


def test_through_a_real_process(rules_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hotrelay", "simulate", "--json", "--rules", str(rules_dir),
         "--sysfs", str(tmp_path), str(GOLDEN / "udev-zram-remove.bin")],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    report = json.loads(result.stdout)
    assert [a["action"] for a in report["actions"]] == [
        "InjectUevent", "RemoveSymlink", "RemoveNode", "RevokeDevice",
        "InjectUevent", "RemoveSymlink", "RemoveNode", "RevokeDevice",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "hotrelay", "check", str(ROOT / "rules"), str(tmp_path / "nope")],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == f"{tmp_path}/nope: no such file or directory\n"
    assert result.stderr == "hotrelay: 1 error\n"
