"""Network interfaces moved into a container's netns and back, seen from both sides.

A veth pair stands in for a NIC (the kernel has no dummy driver here); one end is
moved. Nothing gets an address: the tests check that too.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest
import trio

from hotrelay.effectors import netdev
from hotrelay.effectors.netdev import LinkIdentity, MovedNetdev, NetdevMover
from hotrelay.effectors.nshelper import InjectionError, NamespaceHelpers
from hotrelay.testing.fixtures import SandboxFactory
from hotrelay.testing.hotplug import VethPair
from hotrelay.testing.inside import UeventListener
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = pytest.mark.privileged

P = ParamSpec("P")
R = TypeVar("R")

SANDBOXES: dict[str, IdMap | None] = {
    "privileged": None,
    "userns-0-100000": IdMap(0, 100000, 65536),
}


async def blocking(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


@pytest.fixture(params=list(SANDBOXES))
def box(request: pytest.FixtureRequest, make_sandbox: SandboxFactory) -> Sandbox:
    return make_sandbox(userns=SANDBOXES[request.param])


@pytest.fixture
async def helpers() -> AsyncIterator[NamespaceHelpers]:
    async with NamespaceHelpers() as pool:
        yield pool


def links_inside(sandbox: Sandbox) -> dict[str, dict[str, object]]:
    """Interfaces as the sandbox's root sees them (iproute2's JSON), by name."""
    out = sandbox.run(["ip", "-json", "address", "show"]).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def on_host(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


async def test_veth_end_moves_in_renamed_and_comes_back(
    box: Sandbox, veth: VethPair, helpers: NamespaceHelpers
) -> None:
    mover = NetdevMover(helpers)
    ref = box.ref()
    with UeventListener.start(box, group=1) as inside_events:
        record = await mover.move_in(ref, veth.peer_name, "wan0")

        assert record == MovedNetdev(
            ref.target,
            veth.peer_name,
            "wan0",
            record.inside_index,
            LinkIdentity(
                "veth",
                record.identity.address if record.identity else None,
                permanent=False,
                parent=None,
                link=veth.index,
                link_on_host=True,
            ),
            veth.peer_index,
        )
        inside = await blocking(links_inside, box)
        assert set(inside) == {"lo", "wan0"}
        assert inside["wan0"]["ifindex"] == record.inside_index
        assert inside["wan0"].get("addr_info", []) == []  # no address, ever
        assert not on_host(veth.peer_name)
        assert on_host(veth.name)
        # The kernel announces it inside itself, from port 0 (nothing to inject):
        # add under the name it had while moving, then move to its new name.
        renamed = await blocking(
            inside_events.wait_for, lambda m: m.header == "move@/devices/virtual/net/wan0"
        )
        headers = [(m.header, m.port) for m in inside_events.messages(timeout=0)]
        assert headers.index((f"add@/devices/virtual/net/{veth.peer_name}", 0)) < headers.index(
            (renamed.header, 0)
        )

    assert MovedNetdev.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert (await mover.move_out(ref, record)).moved

    assert on_host(veth.peer_name)
    assert set(await blocking(links_inside, box)) == {"lo"}
    gone = await mover.move_out(ref, record)  # nothing left to undo
    assert not gone.moved
    assert not gone.refused


async def test_name_taken_inside_fails_and_leaves_it_on_the_host(
    sandbox: Sandbox, veth: VethPair, helpers: NamespaceHelpers
) -> None:
    mover = NetdevMover(helpers)
    with pytest.raises(
        InjectionError, match=rf"container pid:\d+: moving {veth.peer_name} in as lo"
    ) as caught:
        await mover.move_in(sandbox.ref(), veth.peer_name, "lo")
    assert caught.value.errno == errno.EEXIST
    assert on_host(veth.peer_name)
    assert set(await blocking(links_inside, sandbox)) == {"lo"}


async def test_refusals_name_the_problem(
    sandbox: Sandbox, veth: VethPair, helpers: NamespaceHelpers
) -> None:
    mover = NetdevMover(helpers)
    ref = sandbox.ref()
    with pytest.raises(InjectionError, match="no interface 'hrt-missing0' on the host"):
        await mover.move_in(ref, "hrt-missing0")
    with pytest.raises(InjectionError, match="interface name 'a/b'"):
        await mover.move_in(ref, veth.peer_name, "a/b")
    with pytest.raises(InjectionError, match="host's network namespace"):
        await mover.move_in(dataclasses.replace(ref, host_network=True), veth.peer_name)
    assert on_host(veth.peer_name)
    assert on_host(veth.name)


async def test_name_clash_found_only_by_the_kernel_does_not_strand_the_interface(
    sandbox: Sandbox, veth: VethPair, helpers: NamespaceHelpers, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel moves first and renames after, so a clash it finds (here: a name
    # the container took between our check and the move, simulated by hiding it
    # from the check) fails the request with the interface already inside.
    await blocking(sandbox.run, ["ip", "link", "property", "add", "dev", "lo", "altname", "wan9"])
    real_lookup = netdev._lookup
    hidden: list[str] = []

    def lookup_missing_the_race(ipr: Any, ifname: str) -> int | None:
        if ifname == "wan9" and not hidden:
            hidden.append(ifname)
            return None
        return real_lookup(ipr, ifname)

    monkeypatch.setattr(netdev, "_lookup", lookup_missing_the_race)
    mover = NetdevMover(helpers)
    with pytest.raises(InjectionError, match="in as wan9: File exists") as caught:
        await mover.move_in(sandbox.ref(), veth.peer_name, "wan9")
    assert hidden == ["wan9"]
    assert caught.value.errno == errno.EEXIST
    assert on_host(veth.peer_name)
    assert set(await blocking(links_inside, sandbox)) == {"lo"}
