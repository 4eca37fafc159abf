"""An operator's first day: the surprises a new user met, each through the front door.

- A symlink template naming a property the event lacks (the README's own
  ``serial/by-id/{ID_SERIAL}`` on a host without udevd) dropped the whole rule without
  a word; now only that link is left out, said once, and shown in status and list.
- Two daemons on one state directory undid each other's grants; the second is now
  refused at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest
from adversarial_support import grant_listed, inside_state, ours, zram_rules

from hotrelay.testing.containers import LxcHost, SessionDirs
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.sandbox import Sandbox

pytestmark = pytest.mark.privileged


def ok_inside(box: Sandbox, node: str) -> bool:
    return inside_state(box, [node])[node] == "ok"


LINK_RULE = """
[[rule]]
name = "serial"
target = ["{target}"]
[rule.match]
subsystem = "block"
kernel = "{kernel}"
[rule.device]
path = "/dev/disks/{{kernel}}"
symlinks = ["serial/by-id/{{ID_SERIAL}}", "by-name/{{kernel}}"]
"""


def test_a_link_without_a_value_is_left_out_the_device_goes_in_and_everyone_is_told() -> None:
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        box = Sandbox.create(devices="default-deny", name_prefix="link")
        stack.callback(box.close)
        # pid: rather than cgroup: so that the sandbox's set-up processes, which pass
        # through its cgroup first, are no incarnations of their own (each would be
        # told about once, rightly).
        daemon = stack.enter_context(
            RunningDaemon(
                {"10-serial.toml": LINK_RULE.format(target=f"pid:{box.pid}", kernel=zram.name)}
            )
        )
        node = f"/dev/disks/{zram.name}"
        eventually(partial(ok_inside, box, node), timeout=5)
        # The device is in, the link with a value too; the one without is not.
        state = inside_state(box, [f"/dev/by-name/{zram.name}", "/dev/serial"])
        assert state == {f"/dev/by-name/{zram.name}": "symlink", "/dev/serial": "absent"}
        assert grant_listed(box, zram)
        # Said once, counted, and shown in status and list.
        warnings = [
            line
            for line in daemon.log().splitlines()
            if " WARNING " in line and "skip symlink" in line
        ]
        assert len(warnings) == 1, warnings
        assert "has no property ID_SERIAL" in warnings[0]
        status = daemon.status()
        assert status["counters"]["links_left_out"] == 1
        (left,) = status["left_out"]
        assert left["link"] == "serial/by-id/{ID_SERIAL}"
        assert "ID_SERIAL" in left["reason"]
        (row,) = [g for g in daemon.grants() if g["device"].endswith(zram.name)]
        assert row["left_out"]
        assert "ID_SERIAL" in row["left_out"][0]
        # A change event replans the same binding: not said again.
        (zram.syspath / "uevent").write_text("change")
        time.sleep(0.5)
        told = [line for line in daemon.log().splitlines() if "WARNING" in line]
        assert sum("skip symlink" in line for line in told) == 1


def test_a_second_daemon_on_the_same_state_directory_is_refused_at_once() -> None:
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        first = stack.enter_context(RunningDaemon(zram_rules(ours("lock"), kernel=zram.name)))
        box = Sandbox.create(devices="default-deny", name_prefix="lock")
        stack.callback(box.close)
        node = f"/dev/disks/{zram.name}"
        eventually(partial(ok_inside, box, node), timeout=5)
        assert first.process is not None

        start = time.monotonic()
        second = subprocess.run(
            [
                sys.executable, "-m", "hotrelay", "run",
                "--config", str(first.config_path),
                "--rules", str(first.rules_dir),
                "--state-dir", str(first.state_dir),
                "--socket", str(first.workdir / "second.sock"),
            ],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        took = time.monotonic() - start

        assert second.returncode == 1, second.stderr
        assert str(first.state_dir) in second.stderr
        assert f"pid {first.process.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert took < 10  # refused before any start-up work, not after it
        assert not (first.workdir / "second.sock").exists()
        # The first daemon and its grant are as they were.
        assert first.process.poll() is None
        assert grant_listed(box, zram)
        assert ok_inside(box, node)


def hotrelay_cli(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotrelay", *args, "--socket", str(daemon.socket)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def test_attach_says_no_for_what_does_not_exist_and_shows_what_it_holds() -> None:
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        box = Sandbox.create(devices="default-deny", name_prefix="attach")
        stack.callback(box.close)
        daemon = stack.enter_context(RunningDaemon({}))
        target = f"pid:{box.pid}"
        attached = daemon.state_dir / "attached.toml"
        refusals = {
            "no such container": (["attach", "pid:999999999", str(zram.devnode)], "no running"),
            "no such device": (["attach", target, "/dev/hotrelay-no-such-node"], "No such file"),
            "not a node": (["attach", target, "/dev/null/x"], "attach:"),
            "unknown group": (
                ["attach", target, str(zram.devnode), "--group", "no-such-group-x"],
                "no-such-group-x",
            ),
            "bad mode": (["attach", target, str(zram.devnode), "--mode", "999"], "--mode '999'"),
            "bad path": (["attach", target, str(zram.devnode), "--path", "/etc/x"], "--path"),
        }
        for what, (argv, reason) in refusals.items():
            result = hotrelay_cli(daemon, *argv)
            assert result.returncode == 1, (what, result.stdout, result.stderr)
            assert reason in result.stderr, (what, result.stderr)
            assert "attached" not in result.stdout, what
            assert not attached.exists() or "[[rule]]" not in attached.read_text(), what
        assert daemon.status()["attached"] == []

        # A /sys/... device path works too, and what was attached is shown.
        sys_path = f"/sys/block/{zram.name}"
        done = hotrelay_cli(daemon, "attach", target, sys_path, "--path", "/dev/zigbee")
        assert done.returncode == 0, done.stderr
        eventually(partial(ok_inside, box, "/dev/zigbee"), timeout=5)
        (shown,) = daemon.status()["attached"]
        assert target in shown
        assert str(zram.devnode) in shown
        (row,) = daemon.grants()
        assert row["attached"] is True
        assert row["path"] == "/dev/zigbee"
        undone = hotrelay_cli(daemon, "detach", target, sys_path)
        assert undone.returncode == 0, undone.stderr
        eventually(lambda: inside_state(box, ["/dev/zigbee"])["/dev/zigbee"] == "absent")
        assert daemon.status()["attached"] == []
        # No rule names that pid any more: status stops listing it as a container.
        eventually(
            lambda: all(c["pid"] != box.pid for c in daemon.status()["containers"]), timeout=5
        )


def test_a_target_that_names_no_running_container_is_said_in_status_and_explain() -> None:
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        box = Sandbox.create(devices="default-deny", name_prefix="typo")
        stack.callback(box.close)
        rule = zram_rules(f"pid:{box.pid}", "lxc:no-such-container-typo", kernel=zram.name)
        daemon = stack.enter_context(RunningDaemon(rule))
        eventually(partial(ok_inside, box, f"/dev/disks/{zram.name}"), timeout=5)
        targets = {t["target"]: t for t in daemon.status()["targets"]}
        assert targets["lxc:no-such-container-typo"]["running"] == []
        assert targets[f"pid:{box.pid}"]["running"] == [f"pid:{box.pid}@{box.ref().start_time}"]
        explained = subprocess.run(
            [sys.executable, "-m", "hotrelay", "explain", str(zram.devnode),
             "--rules", str(daemon.rules_dir), "--socket", str(daemon.socket)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert explained.returncode == 0, explained.stderr
        lines = explained.stdout.splitlines()
        assert "would go to (asked the running daemon):" in lines
        assert f"  pid:{box.pid} -> pid:{box.pid} (pid {box.pid})" in lines
        assert any(
            line.startswith("  lxc:no-such-container-typo -> nothing: no running container")
            for line in lines
        ), lines


def test_a_fast_lxc_restart_gets_its_device_back_within_a_second(
    lxc_host: LxcHost, runtime_dirs: SessionDirs
) -> None:
    """`lxc-stop -k; lxc-start` between two polls of the LXC adapter, without the LXC
    hook: the command socket's name is the same, the socket is new. Before, the start
    was noticed only by the next full listing (up to 30 s) in 2 of 5 tries."""
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        container = lxc_host.create(runtime_dirs.name("fr"))
        stack.callback(container.destroy)
        container.start()
        config = f'[runtimes]\nenabled = ["lxc"]\n[runtimes.lxc]\npaths = ["{lxc_host.lxcpath}"]\n'
        rule = zram_rules(f"lxc:{container.name}", kernel=zram.name)
        daemon = stack.enter_context(RunningDaemon(rule, config=config))
        node = Path(f"/dev/disks/{zram.name}")

        def node_in(pid: int | None) -> bool:
            return pid is not None and (Path(f"/proc/{pid}/root") / node.relative_to("/")).exists()

        eventually(lambda: node_in(container.pid()), timeout=10)
        for attempt in range(5):
            before = container.pid()
            container.restart()  # lxc-stop -k, then lxc-start at once
            after = container.pid()
            assert after != before
            start = time.monotonic()
            eventually(lambda: node_in(container.pid()), timeout=10, every=0.02)
            took = time.monotonic() - start
            assert took < 3, f"attempt {attempt}: {took:.2f} s"
        errors = [line for line in daemon.log().splitlines() if " ERROR " in line]
        assert errors == [], errors


def test_revoke_on_exit_revokes_everything_and_exits_0() -> None:
    """`hotrelay run --revoke-on-exit` used to revoke nothing (the executor was already
    cancelled: "Nursery is closed to new arrivals", or "not revoked in time")."""
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        boxes = [Sandbox.create(devices="default-deny", name_prefix="roe") for _ in range(2)]
        for box in boxes:
            stack.callback(box.close)
        rule = zram_rules(*(f"pid:{box.pid}" for box in boxes), kernel=zram.name)
        daemon = RunningDaemon(rule, extra_args=("--revoke-on-exit",))
        stack.callback(daemon.close)
        daemon.start()
        node = f"/dev/disks/{zram.name}"
        for box in boxes:
            eventually(partial(ok_inside, box, node), timeout=5)
        assert daemon.stop() == 0
        for box in boxes:
            assert not grant_listed(box, zram)
            assert inside_state(box, [node])[node] == "absent"
        assert daemon.ledger() == []
        assert "revoke-on-exit: every binding undone" in daemon.log()
        assert "Traceback" not in daemon.log()


def test_refresh_of_a_runtime_this_daemon_does_not_run_is_refused() -> None:
    with RunningDaemon({}, config="[runtimes]\nenabled = []\n") as daemon:
        result = hotrelay_cli(daemon, "refresh", "lxc", "anything")
        assert result.returncode == 1
        assert "the lxc runtime is not enabled" in result.stderr
        scheduled = hotrelay_cli(daemon, "refresh", "pid", "1")  # pid: is always followed
        assert scheduled.returncode == 0, scheduled.stderr


def test_simulate_plans_exactly_what_the_daemon_did() -> None:
    """The dry run is the run: `simulate` on the event the daemon relayed lists the very
    steps the daemon recorded in its ledger, in order (grant sharing and container-side
    paths included)."""
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        box = Sandbox.create(devices="default-deny", name_prefix="sim")
        stack.callback(box.close)
        rules = {
            **zram_rules(f"pid:{box.pid}", kernel=zram.name),
            # A second rule for the same device: the daemon grants once (shared).
            **zram_rules(f"pid:{box.pid}", kernel=zram.name, path="/dev/again/{kernel}", name="b"),
        }
        daemon = stack.enter_context(RunningDaemon(rules))
        eventually(partial(ok_inside, box, f"/dev/disks/{zram.name}"), timeout=5)
        eventually(
            lambda: len([e for e in daemon.ledger() if e["record"]["complete"]]) == 2, timeout=5
        )
        recorded = [
            step["describe"]
            for entry in sorted(daemon.ledger(), key=lambda e: e["key"])
            for step in entry["record"]["steps"]
        ]
        capture = daemon.workdir / "event.txt"
        capture.write_text(
            f"ACTION=add\nDEVPATH={zram.devpath}\nSUBSYSTEM=block\nDEVTYPE=disk\n"
            f"DEVNAME={zram.name}\nMAJOR={zram.major}\nMINOR={zram.minor}\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "hotrelay", "simulate", "--json", "--rules",
             str(daemon.rules_dir), "--socket", str(daemon.socket), str(capture)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["containers_resolved"] == "daemon"
        planned = [action["describe"] for action in report["actions"]]
        assert planned == recorded, (planned, recorded)
        assert len(planned) >= 5
        assert sum(p.startswith("grant ") for p in planned) == 1  # shared, as the daemon did


def test_a_link_that_is_gone_is_made_again_like_a_node() -> None:
    """The heal pass used to remake nodes only: a symlink deleted inside (or lost in a
    crash between undo and apply) stayed gone while `list` said applied."""
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        box = Sandbox.create(devices="default-deny", name_prefix="relink")
        stack.callback(box.close)
        rules = {"10-serial.toml": LINK_RULE.format(target=f"pid:{box.pid}", kernel=zram.name)}
        daemon = stack.enter_context(
            RunningDaemon(rules, config="heal_interval = 0.3\n[runtimes]\nenabled = []\n")
        )
        link = f"/dev/by-name/{zram.name}"
        eventually(lambda: inside_state(box, [link])[link] == "symlink", timeout=5)
        box.run(["rm", link])
        eventually(lambda: inside_state(box, [link])[link] == "symlink", timeout=5)
        assert f"healed {link}" in daemon.log()
