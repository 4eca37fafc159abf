"""The pump's heal ticker under a heal pass slower than its interval (no root needed).

The heal pass runs inside the pump, and the pump takes everything already queued
before it plans the next jobs. Before the fix the ticker queued a tick every interval
whatever the pump was doing, so a heal pass longer than the interval (400 bindings
with ``heal_interval = 0.1`` on the CI machine) always found another tick queued: the
pump never planned again and a device plugged then was never relayed. Now a tick is
sent only once the previous one has been handled.
"""

from __future__ import annotations

import trio

from hotrelay.core.rules import RuleSet
from hotrelay.daemon.pump import Daemon, DaemonOptions, _Tick


async def test_ticks_never_pile_up_behind_a_slow_heal_pass() -> None:
    daemon = Daemon(
        DaemonOptions(heal_interval=0.01), effectors={}, runtimes=[], load_rules=RuleSet
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon._ticker)
        for _ in range(5):
            tick = await daemon._receive.receive()
            assert isinstance(tick, _Tick)
            await trio.sleep(0.1)  # a heal pass ten times longer than the interval
            assert daemon._receive.statistics().current_buffer_used == 0
            assert tick.done is not None
            tick.done.set()
        nursery.cancel_scope.cancel()
