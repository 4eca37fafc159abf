"""Reading a container's account files has a deadline, and a stuck read holds one thread.

A regular file on a hung FUSE mount blocks read() in the kernel, unkillably; no open
flag prevents it. The read that would block is stood in for by one that waits on an
Event (no root needed): the caller gets an error naming the container at the deadline,
the thread is abandoned, no second read of that container starts while it is stuck,
other containers are served meanwhile, and once the stuck read ends all is as before.
"""

from __future__ import annotations

import threading

import pytest
import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.runtimes import names
from hotrelay.runtimes.names import AccountFileError, Owner, resolve_owner_async

STUCK = ContainerRef(runtime=Runtime.LXC, name="stuck", pid=4242)
FINE = ContainerRef(runtime=Runtime.LXC, name="fine", pid=4343)


async def test_a_stuck_read_times_out_and_holds_one_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    calls: list[str] = []

    def fake_resolve(container: ContainerRef, *, user: str | int, group: str | int) -> Owner:
        calls.append(container.name)
        if container is STUCK and group == "dialout":
            release.wait(30)
        return Owner(0, 20, 0, 20)

    monkeypatch.setattr(names, "resolve_owner", fake_resolve)
    start = trio.current_time()
    with pytest.raises(AccountFileError, match=r"lxc:stuck: reading .* took longer than 0.2 s"):
        await resolve_owner_async(STUCK, group="dialout", deadline=0.2)
    assert 0.2 <= trio.current_time() - start < 2
    # While it is stuck: refused at once, without another thread.
    with pytest.raises(AccountFileError, match=r"lxc:stuck: an earlier read .* still stuck"):
        await resolve_owner_async(STUCK, group="dialout", deadline=0.2)
    assert calls == ["stuck"]
    # Other containers are served meanwhile.
    assert await resolve_owner_async(FINE, group="dialout") == Owner(0, 20, 0, 20)
    # Numeric ids need no file at all, stuck or not.
    assert (await resolve_owner_async(STUCK, user=0, group=20)).gid == 20
    release.set()
    # The abandoned thread ends once the read returns; the container may be read again.
    deadline = trio.current_time() + 5
    while any("stuck" in key for key in names._reads_in_flight):
        assert trio.current_time() < deadline
        await trio.sleep(0.01)
    assert await resolve_owner_async(STUCK, group="dialout") == Owner(0, 20, 0, 20)
    assert calls == ["stuck", "fine", "stuck", "stuck"]


async def test_concurrent_reads_of_one_container_wait_for_each_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    active: list[int] = []
    most = 0

    def slow_resolve(container: ContainerRef, *, user: str | int, group: str | int) -> Owner:
        nonlocal most
        active.append(1)
        most = max(most, len(active))
        threading.Event().wait(0.05)
        active.pop()
        return Owner(0, 20, 0, 20)

    monkeypatch.setattr(names, "resolve_owner", slow_resolve)
    results: list[Owner] = []

    async def one() -> None:
        results.append(await resolve_owner_async(FINE, group="dialout", deadline=2))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert results == [Owner(0, 20, 0, 20)] * 3  # none refused as "stuck"
    assert most == 1  # one thread at a time for one container
