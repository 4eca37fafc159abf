"""The real daemon, end to end: real hotplug, real containers, checked from inside them."""

from __future__ import annotations

import contextlib
import errno
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from hotrelay.control.client import ControlClient, ControlError
from hotrelay.core.uevent import parse
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import UeventListener, UeventMessage, open_inside, stat_inside
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

RULE = """
[[rule]]
name = "zram"
target = [{targets}]
[rule.match]
subsystem = "block"
kernel = "{kernel}"
[rule.device]
path = "/dev/disks/{{kernel}}"
mode = "0640"
group = 6
"""


def rules(*targets: str, kernel: str = "zram*") -> dict[str, str]:
    quoted = ", ".join(f'"{t}"' for t in targets)
    return {"10-zram.toml": RULE.format(targets=quoted, kernel=kernel)}


@pytest.fixture
def sandboxes() -> Iterator[list[Sandbox]]:
    made: list[Sandbox] = []
    yield made
    for sandbox in made:
        sandbox.close()


def node(zram: ZramDevice) -> str:
    return f"/dev/disks/{zram.name}"


def usable(sandbox: Sandbox, path: str) -> bool:
    return open_inside(sandbox, path, read=4096) == 0


def gone(sandbox: Sandbox, path: str) -> bool:
    return open_inside(sandbox, path) == errno.ENOENT


def about(zram: ZramDevice, action: str) -> Callable[[UeventMessage], bool]:
    def heard(message: UeventMessage) -> bool:
        return message.env.get("DEVPATH") == zram.devpath and message.env.get("ACTION") == action

    return heard


def injected(zram: ZramDevice, action: str) -> Callable[[UeventMessage], bool]:
    """Our injected event: it names the node where the container has it. (A privileged
    container's netns belongs to the host's user namespace, so the kernel also sends it
    the host's own event, with the host's DEVNAME.)"""

    def heard(message: UeventMessage) -> bool:
        env = message.env
        return (
            env.get("DEVPATH") == zram.devpath
            and env.get("ACTION") == action
            and env.get("DEVNAME") == f"disks/{zram.name}"
        )

    return heard


def recorded(daemon: RunningDaemon, zram: ZramDevice) -> list[dict[str, Any]]:
    """The daemon's ledger entries for this device (the host may have other zram devices)."""
    return [e for e in daemon.ledger() if f"{zram.devpath} " in e["key"]]


def devices_list(sandbox: Sandbox) -> str:
    return (sandbox.devices_cgroup / "devices.list").read_text()


def test_hotplug_reaches_privileged_and_userns_containers(sandboxes: list[Sandbox]) -> None:
    privileged = Sandbox.create(devices="default-deny")
    sandboxes.append(privileged)
    userns = Sandbox.create(userns=IdMap(0, 100000, 65536), devices="default-deny")
    sandboxes.append(userns)
    with RunningDaemon(rules(f"pid:{privileged.pid}", f"pid:{userns.pid}")) as daemon:
        listeners = [UeventListener.start(s, group=1) for s in (privileged, userns)]
        try:
            with ZramDevice() as zram:
                for sandbox in (privileged, userns):
                    eventually(partial(usable, sandbox, node(zram)), timeout=1.0)
                    st = stat_inside(sandbox, node(zram))
                    assert st.st_mode & 0o7777 == 0o640
                    assert (st.st_uid, st.st_gid) == (0, 6)  # as the container sees them
                    assert st.st_rdev == zram.devnum
                for listener in listeners:
                    heard = listener.wait_for(injected(zram, "add"), timeout=5)
                    event = parse(heard.raw)
                    assert event.devname == f"disks/{zram.name}"  # the container's path
                    assert heard.port == 0  # rebroadcast by the kernel: udevd would trust it
                grants = daemon.grants()
                # pid: targets are listed with their start time: the one process they name.
                assert {g["container"] for g in grants if g["device"] == str(zram.devnode)} == {
                    f"pid:{privileged.pid}@{privileged.ref().start_time}",
                    f"pid:{userns.pid}@{userns.ref().start_time}",
                }
            for sandbox in (privileged, userns):
                eventually(partial(gone, sandbox, node(zram)), timeout=1.0)
            # The cgroup grant went with it: a node made by hand no longer opens.
            assert f"b {zram.major}:{zram.minor} rwm" not in devices_list(privileged)
            privileged.run(["mknod", "/dev/again", "b", str(zram.major), str(zram.minor)])
            assert open_inside(privileged, "/dev/again") == errno.EPERM
            for listener in listeners:
                listener.wait_for(injected(zram, "remove"), timeout=5)
        finally:
            for listener in listeners:
                listener.close()
        assert recorded(daemon, zram) == []  # nothing of our device is left applied


def test_a_container_started_later_gets_the_device(sandboxes: list[Sandbox]) -> None:
    with ZramDevice() as zram, RunningDaemon(rules("cgroup:/hotrelay-test/late-*")):
        late = Sandbox.create(devices="default-deny", name_prefix="late")
        sandboxes.append(late)
        eventually(lambda: usable(late, node(zram)), timeout=5.0)


def test_a_restarted_container_gets_the_device_again(sandboxes: list[Sandbox]) -> None:
    with ZramDevice() as zram, RunningDaemon(rules("cgroup:/hotrelay-test/again-*")) as daemon:
        first = Sandbox.create(devices="default-deny", name_prefix="again")
        sandboxes.append(first)
        eventually(lambda: usable(first, node(zram)), timeout=5.0)
        first.close()
        second = Sandbox.create(devices="default-deny", name_prefix="again")
        sandboxes.append(second)
        eventually(lambda: usable(second, node(zram)), timeout=5.0)
        # The first incarnation's binding is undone; only the second one's is recorded.
        eventually(lambda: len(recorded(daemon, zram)) == 1, timeout=5.0)


def test_restart_after_kill_9_reconciles_with_what_changed_meanwhile(
    sandboxes: list[Sandbox],
) -> None:
    sandbox = Sandbox.create(devices="default-deny")
    sandboxes.append(sandbox)
    daemon = RunningDaemon(rules(f"pid:{sandbox.pid}")).start()
    removed_while_down = ZramDevice().add()
    try:
        eventually(lambda: usable(sandbox, node(removed_while_down)), timeout=1.0)
        daemon.kill9()
        # Plugged before the other leaves, so the kernel cannot hand it the same number.
        with ZramDevice() as added_while_down:
            removed_while_down.remove()
            daemon.start()
            # The grant of the device that left is revoked, its node removed; the one
            # that came is relayed.
            eventually(lambda: gone(sandbox, node(removed_while_down)), timeout=5.0)
            eventually(lambda: usable(sandbox, node(added_while_down)), timeout=5.0)
            stale = f"b {removed_while_down.major}:{removed_while_down.minor} rwm"
            assert stale not in devices_list(sandbox)
            # A clean restart: `list` still says since when each grant is held.
            daemon.stop()
            daemon.start()
            rows = [r for r in daemon.grants() if r["device"].endswith(added_while_down.name)]
            assert rows, daemon.grants()
            assert all(isinstance(r["since"], float) for r in rows), rows
    finally:
        removed_while_down.remove()
        daemon.close()


@pytest.mark.parametrize("point", ["applied:GrantDevice", "recorded:GrantDevice"])
def test_kill_9_in_the_middle_of_a_grant_ends_as_the_rules_say(
    sandboxes: list[Sandbox], point: str
) -> None:
    """SIGKILL between the grant and its ledger record, or between that record and the
    node: after a restart the device is relayed, and after unplug nothing stays."""
    sandbox = Sandbox.create(devices="default-deny")
    sandboxes.append(sandbox)
    with ZramDevice() as zram:
        # Only this device, so the crash comes from relaying it (as coldplug, at start).
        daemon = RunningDaemon(rules(f"pid:{sandbox.pid}", kernel=zram.name))
        try:
            daemon.start(env={"HOTRELAY_TEST_CRASH_AT": point}, wait=False)
            assert daemon.wait_exit() == -9
            (entry,) = recorded(daemon, zram)
            assert entry["record"]["complete"] is False
            daemon.start()
            eventually(lambda: usable(sandbox, node(zram)), timeout=5.0)
            zram.remove()
            eventually(lambda: gone(sandbox, node(zram)), timeout=5.0)
            assert f"b {zram.major}:{zram.minor} rwm" not in devices_list(sandbox)
            eventually(lambda: recorded(daemon, zram) == [], timeout=5)
        finally:
            daemon.close()


def test_sighup_keeps_old_rules_on_error_and_applies_a_valid_change(
    sandboxes: list[Sandbox],
) -> None:
    a = Sandbox.create(devices="default-deny")
    b = Sandbox.create(devices="default-deny")
    sandboxes += [a, b]
    with ZramDevice() as zram, RunningDaemon(rules(f"pid:{a.pid}")) as daemon:
        eventually(lambda: usable(a, node(zram)), timeout=1.0)
        daemon.write_rules({"10-zram.toml": RULE.format(targets='"pid:oops"', kernel="zram*")})
        daemon.reload_signal()
        error = eventually(lambda: daemon.status()["last_reload_error"], timeout=3.0)
        assert '10-zram.toml:4: rule "zram": target' in error
        assert usable(a, node(zram))  # the old rules still hold
        daemon.write_rules(rules(f"pid:{b.pid}"))
        daemon.reload_signal()
        eventually(lambda: usable(b, node(zram)), timeout=5.0)
        eventually(lambda: gone(a, node(zram)), timeout=5.0)


def test_attach_and_detach_through_the_control_socket(sandboxes: list[Sandbox]) -> None:
    sandbox = Sandbox.create(devices="default-deny")
    sandboxes.append(sandbox)
    with ZramDevice() as zram, RunningDaemon({}) as daemon:
        assert open_inside(sandbox, "/dev/zigbee") == errno.ENOENT
        daemon.request(
            "attach", target=f"pid:{sandbox.pid}", device=str(zram.devnode), path="/dev/zigbee"
        )
        eventually(lambda: usable(sandbox, "/dev/zigbee"), timeout=5.0)
        assert [g["path"] for g in daemon.grants()] == ["/dev/zigbee"]
        daemon.request("detach", target=f"pid:{sandbox.pid}", device=str(zram.devnode))
        eventually(lambda: gone(sandbox, "/dev/zigbee"), timeout=5.0)


def test_overflow_is_detected_and_the_resync_catches_up(sandboxes: list[Sandbox]) -> None:
    sandbox = Sandbox.create(devices="default-deny")
    sandboxes.append(sandbox)
    config = 'rcvbuf = "64K"\n'  # the smallest the config allows
    with ZramDevice() as noisy, RunningDaemon(rules(f"pid:{sandbox.pid}"), config=config) as daemon:
        eventually(lambda: usable(sandbox, node(noisy)), timeout=5.0)
        # 200k events from another process, far beyond the buffer, and a real hotplug
        # and unplug in the middle of it: their own uevents are likely lost.
        burst = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hotrelay.testing.hotplug",
                "burst",
                str(noisy.syspath),
                "200000",
            ]
        )
        try:
            with ZramDevice() as during:
                eventually(lambda: daemon.status()["counters"]["overflows"] >= 1, timeout=30.0)
                eventually(lambda: usable(sandbox, node(during)), timeout=30.0)
            assert burst.wait(60) == 0
        finally:
            burst.kill()
            burst.wait()
        eventually(lambda: gone(sandbox, node(during)), timeout=30.0)
        assert usable(sandbox, node(noisy))
        assert recorded(daemon, during) == []


def test_daemon_refuses_to_start_on_bad_rules(tmp_path: Path) -> None:
    daemon = RunningDaemon({"10-bad.toml": "[[rule]]\nname = 3\n"}, workdir=tmp_path)
    with pytest.raises(RuntimeError, match=r"10-bad.toml:2: "):
        daemon.start(timeout=10)
    daemon.close()


def test_self_healing_restores_a_deleted_node_and_a_dropped_grant(
    sandboxes: list[Sandbox],
) -> None:
    sandbox = Sandbox.create(devices="default-deny")
    sandboxes.append(sandbox)
    config = "heal_interval = 0.2\n"
    with ZramDevice() as zram, RunningDaemon(rules(f"pid:{sandbox.pid}"), config=config) as daemon:
        eventually(lambda: usable(sandbox, node(zram)), timeout=1.0)

        def heals() -> int:
            return int(daemon.status()["counters"]["heals"])

        # The container deletes our node ... (the heal may be quicker than any check
        # of ours that it is gone, so the heal count says it happened)
        before = heals()
        sandbox.run(["rm", node(zram)])
        eventually(lambda: heals() > before, timeout=3.0)
        eventually(lambda: usable(sandbox, node(zram)), timeout=3.0)
        # ... and something (runc update, a daemon-reload) takes the grant away.
        before = heals()
        (sandbox.devices_cgroup / "devices.deny").write_text(f"b {zram.major}:{zram.minor} rwm")
        eventually(lambda: heals() > before, timeout=3.0)
        eventually(lambda: usable(sandbox, node(zram)), timeout=3.0)
        assert f"b {zram.major}:{zram.minor} rwm" in devices_list(sandbox)


def test_metrics_report_what_the_daemon_did(sandboxes: list[Sandbox]) -> None:
    sandbox = Sandbox.create(devices="default-deny")
    sandboxes.append(sandbox)
    with socket.socket() as probe:  # a free loopback port for the exporter
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = f'metrics = "127.0.0.1:{port}"\n'
    with RunningDaemon(rules(f"pid:{sandbox.pid}"), config=config), ZramDevice() as zram:
        eventually(lambda: usable(sandbox, node(zram)), timeout=5.0)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())

        def scraped_after_a_grant() -> str | None:
            text = scrape()
            return text if 'kind="apply",outcome="ok"' in text else None

        text = eventually(scraped_after_a_grant)
        assert 'hotrelay_actions_total{kind="apply",outcome="ok"}' in text
        assert 'hotrelay_events_total{source="kernel",verdict="matched"}' in text
        assert 'hotrelay_containers{runtime="pid"} 1' in text
        grants = next(line for line in text.splitlines() if line.startswith("hotrelay_grants "))
        assert float(grants.split()[1]) >= 1
        assert "hotrelay_job_duration_seconds_count" in text


DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_monitor_fields() -> dict[str, set[str]]:
    """The monitor table of docs/operations.md: type -> its fields."""
    fields: dict[str, set[str]] = {}
    for line in DOCS.read_text().splitlines():
        found = re.match(r"\| `(uevent|container|action)` \| (.*) \|$", line)
        if found:
            # A field is a backticked word followed by a space, a comma or the end;
            # backticked words in parentheses are its values.
            words = re.sub(r"\([^)]*\)", "", found[2])
            fields[found[1]] = set(re.findall(r"`([a-z_]+)`", words))
    return fields


def documented_label_values(metric: str) -> dict[str, set[str]]:
    """label -> documented values, from the metrics table of docs/operations.md."""
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith(f"| `{metric}`"))
    return {
        label: {v.strip() for v in values.split(":")[0].split(",")}
        for label, values in re.findall(r"`([a-z]+)` \(([^)]*)\)", row)
    }


def test_monitor_events_and_metric_labels_are_what_the_docs_say(
    sandboxes: list[Sandbox],
) -> None:
    sandbox = Sandbox.create(devices="default-deny")
    sandboxes.append(sandbox)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = f'metrics = "127.0.0.1:{port}"\n'
    with RunningDaemon(rules(f"pid:{sandbox.pid}"), config=config) as daemon:
        events: list[dict[str, Any]] = []
        client = ControlClient(daemon.socket, timeout=20)

        def listen() -> None:
            with contextlib.suppress(ControlError, OSError):
                for event in client.stream("monitor"):
                    events.append(event)
                    if {e["type"] for e in events} >= {"uevent", "action"}:
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        eventually(lambda: daemon.status()["counters"] is not None)
        time.sleep(0.3)  # subscribed
        with ZramDevice() as zram:
            eventually(lambda: usable(sandbox, node(zram)), timeout=5.0)
            listener.join(10)
        client.close()
        documented = documented_monitor_fields()
        assert set(documented) == {"uevent", "container", "action"}
        seen_types = {e["type"] for e in events}
        assert {"uevent", "action"} <= seen_types, events
        for event in events:
            assert set(event) - {"type"} == documented[event["type"]], event

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for metric in ("hotrelay_actions_total", "hotrelay_events_total"):
            allowed = documented_label_values(metric)
            assert allowed, metric
            for labels in re.findall(rf"^{metric}{{([^}}]*)}}", text, re.MULTILINE):
                for label, value in re.findall(r'(\w+)="([^"]*)"', labels):
                    assert value in allowed[label], (metric, label, value, allowed)


def test_reload_refuses_a_bad_config_and_keeps_relaying(sandboxes: list[Sandbox]) -> None:
    sandbox = Sandbox.create(devices="default-deny")
    sandboxes.append(sandbox)
    with ZramDevice() as zram, RunningDaemon(rules(f"pid:{sandbox.pid}")) as daemon:
        eventually(lambda: usable(sandbox, node(zram)), timeout=1.0)
        daemon.config_path.write_text('log_level = "chatty"\n')
        with pytest.raises(ControlError, match=r"hotrelay.toml:1: log_level"):
            daemon.request("reload")
        # Through the CLI with --json, as a script would: JSON on failure too, status 1.
        cli = subprocess.run(
            [sys.executable, "-m", "hotrelay", "reload", "--json", "--socket", str(daemon.socket)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert cli.returncode == 1, cli.stderr
        answer = json.loads(cli.stdout)
        assert answer["ok"] is False
        assert "hotrelay.toml:1: log_level" in answer["error"]
        assert usable(sandbox, node(zram))
        daemon.config_path.write_text('log_level = "info"\nheal_interval = 1\n')
        daemon.request("reload")
        assert "heal_interval changed; takes effect after a restart" in daemon.log()
