"""A container that tries to get its own interface moved into the host, against the real daemon.

A rule moves a host veth end (no addresses) into a sandbox as ``wan0``. Root inside
the sandbox then hides the real one (in a nested netns it makes) or the test unplugs
it on the host, and the container creates its own veth pair with both ends inside:
``wan0`` (same name, same index, same MAC as the one moved in) and ``wan0p``. Then
something makes the daemon undo the move: a rule change, or a restart followed by
one. If the daemon moved that ``wan0`` to the host, the container would hold the
peer of an interface in the host's netns. It must never get there; the real NIC,
when it is still in the container, comes back to the host as it was.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import VethPair
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

INSIDE = "wan0"
FAKE_PEER = "wan0p"

RULE = """
[[rule]]
name = "nic"
target = ["pid:{pid}"]
[rule.match]
subsystem = "net"
kernel = "{kernel}"
[rule.netdev]
name = "{inside}"
"""


def nic_rules(pid: int, kernel: str) -> dict[str, str]:
    return {"10-nic.toml": RULE.format(pid=pid, kernel=kernel, inside=INSIDE)}


# The rule change that revokes the move: the rule names no container any more.
NO_NIC = {
    "10-nic.toml": RULE.replace('"pid:{pid}"', '"cgroup:/hotrelay-test/no-such-container"').format(
        kernel="hrt-none", inside=INSIDE
    )
}


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def links(sandbox: Sandbox | None = None) -> dict[str, Any]:
    """iproute2's view, by name: the host's, or the sandbox root's."""
    argv = ["ip", "-json", "-details", "link", "show"]
    if sandbox is not None:
        out = sandbox.run(argv).stdout
    else:
        out = subprocess.run(argv, check=True, capture_output=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def inside(sandbox: Sandbox) -> dict[str, Any]:
    return links(sandbox=sandbox)


def host() -> dict[str, Any]:
    return links()


def nic_ledger(daemon: RunningDaemon) -> list[dict[str, Any]]:
    return [e for e in daemon.ledger() if " nic" in e["key"]]


def moved_record(daemon: RunningDaemon) -> dict[str, Any]:
    (entry,) = nic_ledger(daemon)
    (step,) = [s for s in entry["record"]["steps"] if s["kind"] == "MoveNetdev"]
    moved: dict[str, Any] = step["record"]["moved"]
    return moved


def start(stack: ExitStack, *, userns: IdMap | None) -> tuple[Sandbox, VethPair, RunningDaemon]:
    box = Sandbox.create(userns=userns, devices="default-deny", name_prefix="nicattack")
    stack.callback(box.close)
    veth = VethPair()
    stack.callback(veth.delete)
    veth.add()
    # Only this test's pair (other sessions may plug veths named hrt*), found at start.
    daemon = RunningDaemon(nic_rules(box.pid, veth.peer_name))
    stack.callback(daemon.close)
    daemon.start()
    eventually(lambda: INSIDE in inside(box), timeout=10)
    eventually(lambda: [e for e in nic_ledger(daemon) if e["record"]["complete"]] or None)
    return box, veth, daemon


def hide_and_impersonate(box: Sandbox, veth: VethPair, how: str, moved: dict[str, Any]) -> None:
    """Root inside takes the real wan0 out of the way and makes its own in its place."""
    real = inside(box)[INSIDE]
    if how == "nested-netns":
        # A process in a netns of its own, holding the real NIC there.
        box.run(
            [
                "sh",
                "-c",
                "unshare -n sleep 600 </dev/null >/dev/null 2>&1 & pid=$!; "
                'while [ "$(readlink /proc/$pid/ns/net)" = "$(readlink /proc/self/ns/net)" ]; '
                "do sleep 0.01; done; "
                f"ip link set dev {INSIDE} netns $pid",
            ]
        )
    else:
        veth.delete()  # unplugged on the host: the pair is gone, both ends
        eventually(lambda: INSIDE not in inside(box), timeout=5)
    assert INSIDE not in inside(box)
    box.run(
        [
            "ip", "link", "add", INSIDE, "index", str(moved["inside_index"]),
            "address", real["address"], "type", "veth", "peer", "name", FAKE_PEER,
        ]
    )  # fmt: skip
    fake = inside(box)
    assert fake[INSIDE]["ifindex"] == moved["inside_index"]
    assert fake[INSIDE]["address"] == real["address"]


def assert_fake_stayed_inside(box: Sandbox, veth: VethPair, fake: dict[str, Any]) -> None:
    on_host = host()
    for name in (INSIDE, FAKE_PEER, veth.peer_name):
        assert name not in on_host, f"{name} arrived in the host netns: {on_host.get(name)}"
    addresses = {link.get("address") for link in on_host.values()}
    assert fake[INSIDE]["address"] not in addresses
    assert fake[FAKE_PEER]["address"] not in addresses
    now = inside(box)
    assert now[INSIDE]["ifindex"] == fake[INSIDE]["ifindex"]
    assert now[FAKE_PEER]["ifindex"] == fake[FAKE_PEER]["ifindex"]


@pytest.mark.parametrize("trigger", ["reload", "restart"])
@pytest.mark.parametrize("how", ["nested-netns", "unplugged"])
def test_a_container_made_interface_is_never_moved_to_the_host(
    stack: ExitStack, how: str, trigger: str
) -> None:
    box, veth, daemon = start(stack, userns=None)
    moved = moved_record(daemon)
    hide_and_impersonate(box, veth, how, moved)
    fake = inside(box)

    if trigger == "restart":
        daemon.stop()
        daemon.start()
        eventually(lambda: daemon.status()["failing"] == {}, timeout=5)
        # The host cannot see the moved NIC after a restart: that alone undoes nothing.
        assert len(nic_ledger(daemon)) == 1
        assert_fake_stayed_inside(box, veth, fake)
    daemon.write_rules(NO_NIC)
    daemon.request("reload")

    eventually(lambda: nic_ledger(daemon) == [], timeout=10)
    assert_fake_stayed_inside(box, veth, fake)
    log = daemon.log()
    warning = f"container pid:{box.pid}: {INSIDE} (moved in from the host as {veth.peer_name})"
    assert f"{warning} not moved back: " in log
    assert "is not the one moved in: " in log


@pytest.mark.parametrize("userns", [None, IdMap(0, 100000, 65536)], ids=["privileged", "userns"])
def test_the_real_nic_comes_back_and_survives_a_restart(
    stack: ExitStack, userns: IdMap | None
) -> None:
    box, veth, daemon = start(stack, userns=userns)
    moved = moved_record(daemon)
    assert moved["identity"]["kind"] == "veth"
    assert moved["identity"]["link"] == veth.index  # its peer, in the host's netns
    assert moved["identity"]["link_on_host"] is True
    before = inside(box)[INSIDE]
    daemon.stop()
    daemon.start()
    eventually(lambda: daemon.status()["failing"] == {}, timeout=5)
    counters = daemon.status()["counters"]
    # Not bounced through the host and back: nothing undone, nothing applied again.
    assert (counters["undone"], counters["applied"]) == (0, 0)
    assert moved_record(daemon) == moved
    assert inside(box)[INSIDE]["ifindex"] == before["ifindex"]
    assert veth.peer_name not in host()
    assert [g["state"] for g in daemon.grants() if g["rule"] == "nic"] == ["applied"]

    daemon.write_rules(NO_NIC)
    daemon.request("reload")
    eventually(lambda: veth.peer_name in host(), timeout=10)
    eventually(lambda: nic_ledger(daemon) == [], timeout=5)
    assert INSIDE not in inside(box)
    back = host()[veth.peer_name]
    assert back["address"] == before["address"]
    assert back.get("linkinfo", {}).get("info_kind") == "veth"
    assert back.get("link") == veth.name  # its peer, in the same (host) netns again
    assert back.get("addr_info", []) == []
