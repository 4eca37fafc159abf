"""The daemon's pump: inputs into the relay, jobs out to the executor.

One task owns the Relay. Everything else -- the event source, the runtime watchers,
the executor's results, the heal ticker, signals and the control socket -- talks to it
through one channel of inputs, so the relay needs no locks and sees inputs in order.

Start-up order is what makes coldplug race-free: subscribe to uevents first, read the
ledger, list the running containers, note the kernel's uevent sequence number, then
enumerate devices. An event already reflected in the enumeration (sequence number at or
below the one noted) is dropped as a duplicate; one after it is applied on top. The
same resync runs after an overflow and after a rules reload.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from hotrelay.control.server import Broadcaster
from hotrelay.core.containers import (
    ContainerEvent,
    ContainerRef,
    ContainerStarted,
    ContainerStopped,
    Runtime,
)
from hotrelay.core.relay import ApplyJob, BindingKey, Job, Relay, UndoJob
from hotrelay.core.rules import DeviceView, RuleSet, Target
from hotrelay.core.uevent import Uevent, Wire
from hotrelay.daemon.coldplug import enumerate_devices
from hotrelay.daemon.executor import (
    Effector,
    Executor,
    JobResult,
    applied_since,
    key_from_record,
    restore_applied,
)
from hotrelay.daemon.ledger import Ledger
from hotrelay.daemon.metrics import DaemonMetrics
from hotrelay.daemon.sdnotify import Notifier
from hotrelay.daemon.source import UDEV_CONTROL, EventSource, Overflow, SourceItem, SourceKind
from hotrelay.errors import HotrelayError
from hotrelay.kernel import libc
from hotrelay.runtimes import Adapter, PidAdapter
from hotrelay.sysfs import LazySysfsDevice, devnum_mismatch

__all__ = ["Daemon", "DaemonOptions", "moved_netdevs"]

log = logging.getLogger("hotrelay")

# Inputs waiting for the pump (event batches of up to source.MAX_BATCH, job results,
# container changes). Small on purpose: in a storm the backlog belongs in the netlink
# socket's buffer (``rcvbuf``, kernel memory, and ENOBUFS then resync when it is full),
# not in Python objects; a deep queue here once held two million parsed uevents and
# left the daemon's RSS three times its idle size after a soak.
INPUT_BUFFER = 4
# After this many events (or a resync: overflow, reload), once the queue is empty, the C heap's
# free pages go back to the kernel: uevents and their dicts are mostly too big for
# CPython's small-object allocator, and a storm otherwise leaves glibc's heap at its
# high-water mark for good.
TRIM_AFTER_EVENTS = 100_000

# The self-healing pass (daemon/main.py): given the ledger, which bindings are settled,
# the executor (to queue work behind a container's jobs) and a counter for heals those
# tasks do later; returns the heals it did itself.
HealPass = Callable[
    [Ledger, Callable[[BindingKey], bool], Executor, Callable[[int], None]], Awaitable[int]
]

# Distinct (device, number, reason) mismatches logged; further ones are only counted.
MISMATCH_LOG_LIMIT = 1000

# In the state dir: the start times of pid: targets pinned at first sight.
PID_PINS_FILE = "pid-pins.json"

SYSFS = Path("/sys")
UEVENT_SEQNUM = SYSFS / "kernel" / "uevent_seqnum"


def moved_netdevs(ledger: Ledger) -> dict[BindingKey, tuple[int, int | None]]:
    """Complete bindings of the ledger that moved an interface into a container, with
    that container's (pid, start time): the relay keeps them over a restart although
    the host's enumeration cannot see the interface (it is in the container)."""
    found: dict[BindingKey, tuple[int, int | None]] = {}
    for entry in ledger.entries():
        record = entry.record
        if entry.kind != "binding" or record.get("complete") is not True:
            continue
        steps = record.get("steps", [])
        if not any(s.get("kind") == "MoveNetdev" and s.get("state") == "done" for s in steps):
            continue
        try:
            key = key_from_record(record["key"])
            container = record["container"]
            start = container.get("start_time")
            found[key] = (int(container["pid"]), None if start is None else int(start))
        except (KeyError, ValueError, TypeError, AttributeError):
            continue  # restore_applied reports an unusable entry
    return found


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    rules_dir: Path = Path("/etc/hotrelay/rules.d")
    state_dir: Path = Path("/run/hotrelay")
    source: SourceKind = SourceKind.AUTO
    rcvbuf: int = 64 * 1024 * 1024
    heal_interval: float = 5.0
    revoke_on_exit: bool = False
    exit_timeout: float = 10.0
    # udevd's control socket: whoever listens there is udevd (source.py, udevd.py).
    udev_control: Path = UDEV_CONTROL


@dataclass(frozen=True, slots=True)
class _Tick:
    now: float
    done: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class _Reload:
    reason: str
    done: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class _Resync:
    reason: str


@dataclass(frozen=True, slots=True)
class _RevokeAll:
    """Stopping with revoke_on_exit: from now on no container is ours."""

    done: trio.Event


_Input = Sequence[SourceItem] | ContainerEvent | JobResult | _Tick | _Reload | _Resync | _RevokeAll


@dataclass(slots=True)
class DaemonStats:
    started: float = field(default_factory=time.time)
    duplicates: int = 0
    reloads: int = 0
    reload_errors: int = 0
    last_reload_error: str | None = None
    overflows: int = 0
    heals: int = 0
    # Events whose MAJOR:MINOR is not the device at their DEVPATH (sysfs.devnum_mismatch).
    dropped_mismatch: int = 0
    last_mismatch: str | None = None
    # Symlinks left out of a binding (a template with no value): logged once each.
    links_left_out: int = 0


class Daemon:
    """The relay daemon. ``await nursery.start(daemon.run)`` returns once coldplug is done."""

    def __init__(
        self,
        options: DaemonOptions,
        *,
        effectors: Mapping[str, Effector],
        runtimes: Sequence[Adapter],
        load_rules: Callable[[], RuleSet],
        reload_rules: Callable[[], RuleSet] | None = None,
        heal: HealPass | None = None,
        metrics: DaemonMetrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.options = options
        self.stats = DaemonStats()
        self._effectors = effectors
        self._runtimes = runtimes
        self._load_rules = load_rules
        # A reload may re-read more than the rules (the daemon's config too).
        self._reload_rules = reload_rules or load_rules
        self._heal_pass = heal
        self.feed = Broadcaster()
        self.metrics = metrics or DaemonMetrics()
        self._notifier = notifier
        self._synced: dict[str, int] = {}
        self.applied_since: dict[BindingKey, float] = {}
        self._send, self._receive = trio.open_memory_channel[_Input](INPUT_BUFFER)
        self._seqnum_floor = 0
        self._untrimmed = 0  # events since the last malloc_trim
        self._mismatch_logged: set[tuple[str, tuple[int, int] | None, str]] = set()
        self.relay = Relay()
        self.source: EventSource | None = None
        self.ledger: Ledger | None = None
        self.executor: Executor | None = None
        self._settled = trio.Event()
        self._revoking = False

    # -- life cycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        options = self.options
        rules = await trio.to_thread.run_sync(self._load_rules)
        with (
            EventSource(
                options.source, rcvbuf=options.rcvbuf, udev_control=options.udev_control
            ) as source,
            Ledger(options.state_dir / "ledger") as ledger,
        ):
            self.source, self.ledger = source, ledger
            self.relay = Relay(rules)
            self.relay.restore(restore_applied(ledger), moved_netdevs=moved_netdevs(ledger))
            self.applied_since.update(applied_since(ledger))
            for adapter in self._runtimes:
                if isinstance(adapter, PidAdapter):
                    # pid: targets pinned at first sight stay pinned across restarts.
                    adapter.keep_pins(options.state_dir / PID_PINS_FILE)
            executor = self.executor = Executor(ledger, self._effectors, self._send.send)
            async with trio.open_nursery() as nursery:
                await nursery.start(executor.run)
                # No buffer of its own: a storm's backlog waits in the socket's buffer.
                source_send, source_receive = trio.open_memory_channel[Sequence[SourceItem]](0)
                await nursery.start(source.run, source_send)
                nursery.start_soon(self._forward, source_receive)
                # Unbounded: a watcher reports every running container before it says
                # it started, and nothing reads these until they are all reported.
                changes_send, changes_receive = trio.open_memory_channel[ContainerEvent](math.inf)
                self._follow_targets(rules)
                for runtime in self._runtimes:
                    await nursery.start(runtime.watch, changes_send.clone())
                await self._coldplug(changes_receive)
                nursery.start_soon(self._forward, changes_receive)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._ticker)
                log.info(
                    "hotrelay: %d rules, %d containers, %d devices relayed, source %s",
                    len(rules),
                    len(self.relay.containers),
                    len(self.relay.desired),
                    source.kind.value,
                )
                task_status.started(self)
                try:
                    await self._pump()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._shutdown()
                    nursery.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        if self.options.revoke_on_exit and self.relay.applied:
            # stop() did not run (or ran out of time): the executor is gone by now.
            log.error(
                "revoke-on-exit: %d bindings not revoked; they are in the ledger, and the "
                "next start undoes what the rules no longer want",
                len(self.relay.applied),
            )

    async def stop(self) -> bool:
        """Before the daemon is cancelled: with revoke_on_exit, undo every binding while
        the pump and the executor still run. True if all were undone in time."""
        if not self.options.revoke_on_exit:
            return True
        done = trio.Event()
        await self._send.send(_RevokeAll(done))
        await done.wait()
        with trio.move_on_after(self.options.exit_timeout):
            await self.wait_settled()
            log.info("revoke-on-exit: every binding undone")
            return True
        return False

    async def _forward(self, receive: trio.MemoryReceiveChannel[_Input]) -> None:
        async for item in receive:
            await self._send.send(item)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                await self._send.send(_Reload("SIGHUP"))

    async def _ticker(self) -> None:
        interval = self.options.heal_interval
        if not math.isfinite(interval) or interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            done = trio.Event()
            await self._send.send(_Tick(trio.current_time(), done))
            # One tick at a time. The pump takes everything queued before it plans: a
            # heal pass longer than the interval (thousands of bindings) would otherwise
            # always find the next tick queued, and the pump would never plan again.
            await done.wait()

    # -- requests from outside -------------------------------------------------------

    async def reload(self, reason: str = "request") -> None:
        done = trio.Event()
        await self._send.send(_Reload(reason, done))
        await done.wait()

    async def wait_settled(self) -> None:
        """Until nothing is in flight and every desired binding is applied (tests, CLI)."""
        while not self.relay.is_settled():
            self._settled = trio.Event()
            await self._settled.wait()

    # -- the pump ----------------------------------------------------------------------

    async def _pump(self) -> None:
        relay = self.relay
        # What coldplug and the ledger left to do is planned before any new input.
        self._dispatch(relay.next_jobs())
        while True:
            item = await self._receive.receive()
            await self._handle(item)
            # Take everything already queued before planning: a burst plans once.
            while True:
                try:
                    item = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                await self._handle(item)
            self._dispatch(relay.next_jobs())
            self._sync_metrics()
            if relay.is_settled():
                self._settled.set()
            if self._untrimmed >= TRIM_AFTER_EVENTS:
                self._untrimmed = 0
                libc.malloc_trim()

    async def _handle(self, item: _Input) -> None:
        relay = self.relay
        if isinstance(item, JobResult):
            self._log_result(item)
            relay.job_done(item.job, error=item.error, leftover=item.leftover)
            key = item.job.key
            if item.error is None and isinstance(item.job, ApplyJob):
                self.applied_since[key] = time.time()
            elif key not in relay.applied:
                self.applied_since.pop(key, None)
        elif isinstance(item, ContainerStarted | ContainerStopped):
            self._container_event(item)
        elif isinstance(item, _Tick):
            relay.tick(item.now)
            try:
                if self._heal_pass is not None and self.ledger is not None:
                    assert self.executor is not None
                    self.stats.heals += await self._heal_pass(
                        self.ledger, self._settled_binding, self.executor, self._count_heals
                    )
            finally:
                if item.done is not None:
                    item.done.set()
        elif isinstance(item, _Reload):
            await self._reload(item)
        elif isinstance(item, _Resync):
            await self._resync_devices(item.reason)
        elif isinstance(item, _RevokeAll):
            self._revoking = True
            relay.resync_containers([])  # nothing is desired without containers
            item.done.set()
        else:
            await self._events(item)

    async def _events(self, batch: Sequence[SourceItem]) -> None:
        self._untrimmed += len(batch)
        floor = self._seqnum_floor
        for item in batch:
            if isinstance(item, Overflow):
                self.stats.overflows += 1
                log.warning("uevent overflow: the kernel dropped events; resynchronising")
                await self._resync_devices("overflow")
                floor = self._seqnum_floor
                continue
            if item.seqnum is not None and item.seqnum <= floor:
                self.stats.duplicates += 1  # already part of the last enumeration
                continue
            if item.devnum is not None and item.action != "remove":
                # Before anything can be granted: the number must be the device's.
                problem = devnum_mismatch(item)
                if problem is not None:
                    self._mismatch(item, problem)
                    continue
            self.relay.device_event(item, _view(item))
            if self.feed.subscribers:
                self.feed.publish(
                    {"type": "uevent", "action": item.action, "devpath": item.devpath,
                     "subsystem": item.subsystem, "seqnum": item.seqnum}
                )  # fmt: skip

    async def _reload(self, request: _Reload) -> None:
        self.stats.reloads += 1
        if self._notifier is not None:
            self._notifier.reloading(f"reloading ({request.reason})")
        try:
            rules = await trio.to_thread.run_sync(self._reload_rules)
        except HotrelayError as exc:
            self.stats.reload_errors += 1
            self.stats.last_reload_error = str(exc)
            self.metrics.reloads.inc(outcome="failed")
            log.error("reload (%s) refused, keeping the current rules:\n%s", request.reason, exc)
        else:
            log.info("reload (%s): %d rules", request.reason, len(rules))
            for adapter in self._follow_targets(rules):
                await adapter.resync()  # its watcher reports newly named containers
            self.relay.replace_rules(rules)
            self.relay.retry_everything()
            await self._resync_devices("reload")
            self.metrics.reloads.inc(outcome="ok")
        if self._notifier is not None:
            self._notifier.ready(f"relaying with {len(self.relay.rules)} rules")
        if request.done is not None:
            request.done.set()

    def _mismatch(self, uevent: Uevent, problem: str) -> None:
        """An event whose device number is not its device's: dropped, counted, logged
        once per device and reason (a sender repeating it cannot flood the log)."""
        stats = self.stats
        stats.dropped_mismatch += 1
        device = f"{uevent.subsystem} {uevent.major}:{uevent.minor}"
        reason = f"{uevent.action} {uevent.devpath} ({device}): {problem}"
        stats.last_mismatch = reason
        key = (uevent.devpath, uevent.devnum, problem)
        if key in self._mismatch_logged:
            return
        if len(self._mismatch_logged) < MISMATCH_LOG_LIMIT:
            self._mismatch_logged.add(key)
            log.warning("dropped a uevent whose device number is not its device's: %s", reason)

    def _count_heals(self, heals: int) -> None:
        """Heals done later by the tasks a heal pass queued."""
        self.stats.heals += heals

    def _settled_binding(self, key: BindingKey) -> bool:
        """Applied as desired and nothing in flight: safe for the heal pass to touch."""
        relay = self.relay
        want = relay.desired.get(key)
        return (
            want is not None
            and key not in relay.inflight
            and relay.applied.get(key) == want.fingerprint
        )

    # -- coldplug ----------------------------------------------------------------------

    async def _coldplug(self, changes: trio.MemoryReceiveChannel[ContainerEvent]) -> None:
        """Containers first (what the watchers reported), then every present device."""
        while True:
            try:
                self._container_event(changes.receive_nowait())
            except trio.WouldBlock:
                break
        await self._resync_devices("start")

    def _follow_targets(self, rules: RuleSet) -> list[Adapter]:
        """pid: and cgroup: targets are watched because a rule names them, and only while
        one does (a detached ``pid:`` attach is no container of ours any more); the
        adapters that follow targets are returned (after a reload they list again)."""
        following = []
        for adapter in self._runtimes:
            follow_only = getattr(adapter, "follow_only", None)
            if follow_only is None:
                continue
            following.append(adapter)
            follow_only(
                target.pattern
                for rule in rules
                for target in rule.targets
                if target.runtime is adapter.runtime
            )
        return following

    async def running_containers(self, target: Target) -> list[ContainerRef]:
        """The running containers ``target`` names now, asked of its runtime's adapter.

        HotrelayError if no adapter of that runtime is enabled here.
        """
        for adapter in self._runtimes:
            if adapter.runtime is target.runtime:
                refs = await adapter.resolve(target.pattern)
                return [ref for ref in refs if target.selects(ref)]
        raise HotrelayError(
            f"{target}: the {target.runtime.value} runtime is not enabled in this daemon "
            "(see [runtimes] in the config)"
        )

    def runtime_enabled(self, runtime: Runtime) -> bool:
        return any(adapter.runtime is runtime for adapter in self._runtimes)

    async def refresh_container(self, runtime: Runtime, name: str) -> None:
        """Someone (the LXC hook) says a container changed: list that runtime again."""
        for adapter in self._runtimes:
            if adapter.runtime is runtime:
                # A running watcher reports what changed through its own channel.
                await adapter.resync()

    def _container_event(self, event: ContainerEvent) -> None:
        ref = event.container
        if self._revoking:
            return  # stopping with revoke_on_exit: no container is ours any more
        if isinstance(event, ContainerStarted):
            log.info("container %s started (pid %d)", ref.target, ref.pid)
            self.relay.container_started(ref)
        else:
            log.info("container %s stopped (%s)", ref.target, event.reason)
            current = self.relay.containers.get(ref.key)
            if current is not None and current.pid == ref.pid:
                self.relay.container_stopped(ref.runtime, ref.name)
        self.feed.publish(
            {"type": "container", "container": ref.target, "pid": ref.pid,
             "state": "started" if isinstance(event, ContainerStarted) else "stopped"}
        )  # fmt: skip

    async def _resync_devices(self, reason: str) -> None:
        wire = (
            Wire.UDEV
            if self.source is not None and self.source.kind is SourceKind.UDEV
            else Wire.KERNEL
        )
        floor, devices, mismatched = await trio.to_thread.run_sync(_snapshot, wire)
        for uevent, problem in mismatched:
            self._mismatch(uevent, problem)
        self._seqnum_floor = max(self._seqnum_floor, floor)
        self.relay.resync_devices(devices)
        log.info("resync (%s): %d devices present", reason, len(devices))
        self._untrimmed = TRIM_AFTER_EVENTS  # a whole enumeration's garbage: trim once idle

    # -- results -----------------------------------------------------------------------

    def _dispatch(self, jobs: Iterable[Job]) -> None:
        assert self.executor is not None
        for job in jobs:
            self.executor.submit(job)
        for binding in self.relay.take_skipped():
            for skip in binding.skipped:
                log.warning("%s: %s", binding.key, skip.describe())
            for left in binding.left_out:
                self.stats.links_left_out += 1
                log.warning(
                    "%s: %s (the device goes in all the same)", binding.key, left.describe()
                )

    def _sync_metrics(self) -> None:
        """Bring the exported counters up to the relay's and the source's own."""
        metrics = self.metrics
        source = self.source
        kind = source.kind.value if source is not None else "none"
        now = {
            "matched": self.relay.stats.matched_events,
            "unmatched": self.relay.stats.events - self.relay.stats.matched_events,
            "untrusted": source.stats.dropped_untrusted if source is not None else 0,
            "malformed": (
                source.stats.dropped_malformed + source.stats.dropped_truncated
                if source is not None
                else 0
            ),
            "overflows": self.stats.overflows,
            "heals": self.stats.heals,
            "mismatch": self.stats.dropped_mismatch,
        }
        for name, value in now.items():
            delta = value - self._synced.get(name, 0)
            if delta <= 0:
                continue
            self._synced[name] = value
            if name == "overflows":
                metrics.overflows.inc(delta)
            elif name == "heals":
                metrics.heals.inc(delta)
            else:
                metrics.events.inc(delta, source=kind, verdict=name)
        metrics.grants.set(len(self.relay.applied))
        by_runtime: dict[str, int] = {}
        for runtime, _name in self.relay.containers:
            by_runtime[runtime.value] = by_runtime.get(runtime.value, 0) + 1
        for runtime in Runtime:
            metrics.containers.set(by_runtime.get(runtime.value, 0), runtime=runtime.value)

    def _log_result(self, result: JobResult) -> None:
        job = result.job
        ms = result.seconds * 1000
        kind = {ApplyJob: "apply", UndoJob: "undo"}.get(type(job), "notify")
        self.metrics.actions.inc(kind=kind, outcome="ok" if result.error is None else "failed")
        self.metrics.latency.observe(result.seconds)
        self.feed.publish(
            {"type": "action", "job": job.describe(), "outcome": "ok" if result.error is None
             else "failed", "error": result.error, "ms": round(ms, 3)}
        )  # fmt: skip
        if result.error is None:
            if isinstance(job, ApplyJob | UndoJob):
                log.info("%s: ok (%.1f ms)", job.describe(), ms)
        else:
            leftover = " (partly applied; will undo)" if result.leftover else ""
            log.error("%s: failed%s: %s", job.describe(), leftover, result.error)


def _view(uevent: Uevent) -> DeviceView | None:
    if uevent.action == "remove":
        return None  # gone from sysfs; matching uses what was recorded at add
    return LazySysfsDevice(uevent.devpath)


def _snapshot(
    wire: Wire,
) -> tuple[int, list[tuple[Uevent, DeviceView | None]], list[tuple[Uevent, str]]]:
    """(kernel uevent seqnum before the walk, every device now present, and the
    devices left out because their number is not theirs in sysfs)."""
    floor = int(UEVENT_SEQNUM.read_text())
    devices: list[tuple[Uevent, DeviceView | None]] = []
    mismatched: list[tuple[Uevent, str]] = []
    for uevent in enumerate_devices(wire=wire):
        # The walk reads sysfs itself, but with udevd running the properties come
        # through its database too: the number is checked like a live event's.
        problem = devnum_mismatch(uevent)
        if problem is None:
            devices.append((uevent, _view(uevent)))
        elif os.path.isdir(f"/sys{uevent.devpath}"):  # else it just went away mid-walk
            mismatched.append((uevent, problem))
    return floor, devices, mismatched
