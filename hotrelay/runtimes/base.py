"""What every runtime adapter offers, and the watcher they share.

An adapter knows how to ask one runtime which containers run (``list_running``), how
to look one up by name (``lookup``), and optionally how to hear about changes early
(``hints``: an event stream, or a cheap ``poll_fingerprint``). The :class:`Watcher`
turns that into ContainerStarted / ContainerStopped events:

- it subscribes to the runtime's events *before* listing, so nothing that happens
  between the listing and the subscription is lost;
- it holds a pidfd on every running container's init and reports a stop the moment
  the init exits, whatever the runtime says or how slowly it says it;
- a change hint re-checks one name (or everything); a restart under the same name
  is a stop followed by a start with the new pid;
- a periodic full resync catches anything a lost event would hide.

A runtime that is not there (no socket, no tool) is skipped with one log line and
checked again quietly; a container that vanishes mid-lookup is simply not running.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

import trio

from hotrelay.core.containers import (
    ContainerEvent,
    ContainerRef,
    ContainerStarted,
    ContainerStopped,
    Runtime,
)
from hotrelay.core.rules.glob import GlobError, Pattern
from hotrelay.runtimes.errors import ContainerGone, RuntimeApiError, RuntimeUnavailable
from hotrelay.runtimes.procfs import PidHandle

__all__ = ["Adapter", "Hint", "Watcher", "log"]

log = logging.getLogger("hotrelay.runtimes")

# A name to re-check, or None for "list everything again".
Hint = str | None
EventSend = trio.MemorySendChannel[ContainerEvent]
HintSend = trio.MemorySendChannel[Hint]

# Transient failures of a runtime that answers: logged, state kept, retried later.
TRANSIENT_ERRORS = (RuntimeApiError, OSError, trio.TooSlowError)
# What ends an event stream until it reconnects.
STREAM_ERRORS = (RuntimeUnavailable, RuntimeApiError, OSError, trio.TooSlowError)

# poll_fingerprint() returns this when the adapter has no cheap change detector.
NO_FINGERPRINT = object()
# Polls that list everything again after a fingerprint change.
SETTLE_POLLS = 5


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


class Adapter(abc.ABC):
    """One runtime's containers. Subclasses implement ``_list_running`` and ``available``.

    ``poll_interval`` is how often the watcher checks ``poll_fingerprint`` (when the
    adapter has one); ``resync_interval`` how often it lists everything regardless.
    """

    runtime: ClassVar[Runtime]

    def __init__(self, *, poll_interval: float = 1.0, resync_interval: float = 30.0) -> None:
        self.poll_interval = poll_interval
        self.resync_interval = resync_interval
        self._watcher: Watcher | None = None
        self._unavailable: str | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # -- what subclasses provide ----------------------------------------------------

    @abc.abstractmethod
    def describe(self) -> str:
        """Where this adapter looks (socket, paths), for log lines."""

    @abc.abstractmethod
    async def _list_running(self) -> list[ContainerRef]:
        """Every running container; raises RuntimeUnavailable if the runtime is absent."""

    async def _lookup(self, name: str) -> ContainerRef | None:
        """One container by exact name; None if it does not run. Override when cheaper."""
        for ref in await self._list_running():
            if ref.name == name:
                return ref
        return None

    async def hints(self, send: HintSend, *, task_status: trio.TaskStatus[None]) -> None:
        """Feed change hints (names, None for everything) from the runtime's events.

        Must call ``task_status.started()`` once subscribed (or once it knows the
        runtime is absent), then run until cancelled. The default has no events.
        """
        task_status.started()
        await trio.sleep_forever()

    async def poll_fingerprint(self) -> Hashable:
        """A cheap value that changes when containers start or stop (NO_FINGERPRINT: none)."""
        await trio.lowlevel.checkpoint()
        return NO_FINGERPRINT

    # -- the public API -------------------------------------------------------------

    async def list_running(self) -> list[ContainerRef]:
        """Every running container of this runtime; [] (logged once) if it is absent."""
        try:
            refs = await self._list_running()
        except RuntimeUnavailable as exc:
            self.note_unavailable(exc)
            return []
        self.note_available()
        return refs

    async def lookup(self, name: str) -> ContainerRef | None:
        """The running container called exactly ``name``, or None."""
        try:
            ref = await self._lookup(name)
        except RuntimeUnavailable as exc:
            self.note_unavailable(exc)
            return None
        except ContainerGone:
            return None
        self.note_available()
        return ref

    async def resolve(self, name_glob: str) -> list[ContainerRef]:
        """The running containers whose name matches ``name_glob`` (a name or a glob)."""
        if not _is_glob(name_glob):
            ref = await self.lookup(name_glob)
            return [] if ref is None else [ref]
        try:
            pattern = Pattern.parse(name_glob)
        except GlobError as exc:
            raise ValueError(f"{self.runtime.value}:{name_glob}: {exc}") from None
        return [ref for ref in await self.list_running() if pattern.matches(ref.name)]

    async def watch(
        self,
        send_channel: EventSend,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Emit ContainerStarted/ContainerStopped into ``send_channel`` until cancelled.

        ``started()`` comes after the containers already running were reported.
        """
        if self._watcher is not None:
            raise RuntimeError(f"{self!r} is already being watched")
        watcher = Watcher(self, send_channel)
        self._watcher = watcher
        try:
            await watcher.run(task_status)
        finally:
            self._watcher = None

    async def resync(self) -> list[ContainerRef]:
        """List everything now running; a running watcher reports what changed.

        With a watcher running, its events are sent before this returns: call it from
        a task other than the one draining the watcher's channel (or give the channel
        room), or the two wait for each other.
        """
        if self._watcher is not None:
            return await self._watcher.resync()
        return await self.list_running()

    @property
    def watcher(self) -> Watcher | None:
        """The running watcher (for its pidfd handles), if ``watch`` is running."""
        return self._watcher

    # -- one log line per outage ----------------------------------------------------

    def note_unavailable(self, exc: Exception) -> None:
        reason = str(exc)
        if self._unavailable is None:
            log.info("%s: runtime not available, skipped: %s", self.runtime.value, reason)
        self._unavailable = reason

    def note_available(self) -> None:
        if self._unavailable is not None:
            log.info("%s: runtime available again (%s)", self.runtime.value, self.describe())
            self._unavailable = None

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable


@dataclass(eq=False)
class _Tracked:
    ref: ContainerRef
    handle: PidHandle


class Watcher:
    """Follows one adapter's containers; see the module docstring."""

    def __init__(self, adapter: Adapter, send: EventSend) -> None:
        self.adapter = adapter
        self._send = send
        self._known: dict[str, _Tracked] = {}
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._hint_send: HintSend | None = None

    @property
    def running(self) -> dict[str, ContainerRef]:
        return {name: tracked.ref for name, tracked in self._known.items()}

    def handle(self, name: str) -> PidHandle | None:
        """The pidfd handle on a running container's init (owned by the watcher)."""
        tracked = self._known.get(name)
        return None if tracked is None else tracked.handle

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        hint_send, hint_receive = trio.open_memory_channel[Hint](math.inf)
        self._hint_send = hint_send
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._run_hints, hint_send)
                await self.resync()
                task_status.started()
                nursery.start_soon(self._poll_loop)
                await self._serve_hints(hint_receive)
        finally:
            self._nursery = None
            for tracked in self._known.values():
                tracked.handle.close()
            self._known.clear()

    async def _run_hints(self, send: HintSend, *, task_status: trio.TaskStatus[None]) -> None:
        await self.adapter.hints(send, task_status=task_status)

    async def _serve_hints(self, receive: trio.MemoryReceiveChannel[Hint]) -> None:
        async for first in receive:
            names = {first}
            while True:
                try:
                    names.add(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            if None in names:
                await self.resync()
                continue
            for name in sorted(n for n in names if n is not None):
                await self.recheck(name)

    async def _poll_loop(self) -> None:
        adapter = self.adapter
        last: Hashable = NO_FINGERPRINT
        last_full = trio.current_time()
        settling = 0
        while True:
            await trio.sleep(adapter.poll_interval)
            try:
                fingerprint = await adapter.poll_fingerprint()
            except RuntimeUnavailable:
                fingerprint = "unavailable"
            except TRANSIENT_ERRORS as exc:
                log.debug("%s: fingerprint failed: %s", adapter.runtime.value, exc)
                fingerprint = NO_FINGERPRINT
            now = trio.current_time()
            if fingerprint is not NO_FINGERPRINT and fingerprint != last:
                # A change is often seen half-way (a socket exists before the runtime
                # reports the container running): keep listing for a few polls.
                settling = SETTLE_POLLS
            if settling > 0 or now - last_full >= adapter.resync_interval:
                settling = max(0, settling - 1)
                last_full = now
                self.hint(None)
            last = fingerprint

    def hint(self, name: Hint) -> None:
        """Ask for a re-check of ``name`` (None: everything), from any task."""
        if self._hint_send is not None:
            self._hint_send.send_nowait(name)

    async def resync(self) -> list[ContainerRef]:
        async with self._lock:
            try:
                refs = await self.adapter._list_running()
            except RuntimeUnavailable as exc:
                self.adapter.note_unavailable(exc)
                # pidfds still report exits; nothing else is known.
                return [t.ref for t in self._known.values()]
            except TRANSIENT_ERRORS as exc:
                log.warning("%s: listing containers failed: %s", self.adapter.runtime.value, exc)
                return [t.ref for t in self._known.values()]
            self.adapter.note_available()
            by_name = {ref.name: ref for ref in refs}
            for name in [n for n in self._known if n not in by_name]:
                await self._apply(name, None, "vanished")
            for name, ref in by_name.items():
                await self._apply(name, ref, "runtime")
            return [t.ref for t in self._known.values()]

    async def recheck(self, name: str) -> None:
        async with self._lock:
            try:
                ref = await self.adapter._lookup(name)
            except ContainerGone:
                ref = None
            except RuntimeUnavailable as exc:
                self.adapter.note_unavailable(exc)
                return
            except TRANSIENT_ERRORS as exc:
                log.warning("%s: looking up %s failed: %s", self.adapter.runtime.value, name, exc)
                return
            self.adapter.note_available()
            await self._apply(name, ref, "runtime")

    async def _apply(self, name: str, ref: ContainerRef | None, reason: str) -> None:
        """Make our state say ``ref`` (None: not running) and report the difference.

        Called with the lock held, so events leave in the order the state changed.
        """
        old = self._known.get(name)
        same_process = (
            old is not None
            and ref is not None
            and old.ref.pid == ref.pid
            and old.ref.start_time == ref.start_time
        )
        if old is not None and same_process and ref is not None:
            if ref != old.ref:
                old.ref = ref
                await self._send.send(ContainerStarted(ref))
            return
        if old is not None:
            del self._known[name]
            old.handle.close()
            await self._send.send(ContainerStopped(old.ref, reason))
        if ref is None:
            return
        try:
            handle = PidHandle.open(ref.pid, expected_start_time=ref.start_time)
        except ContainerGone:
            return  # exited between the lookup and now: as if never seen
        tracked = _Tracked(ref, handle)
        self._known[name] = tracked
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_exit, name, tracked)
        await self._send.send(ContainerStarted(ref))

    async def _watch_exit(self, name: str, tracked: _Tracked) -> None:
        try:
            await tracked.handle.wait_exit()
        except (trio.ClosedResourceError, ValueError):
            return  # replaced or stopped through another path, which reported it
        async with self._lock:
            if self._known.get(name) is not tracked:
                return
            del self._known[name]
            tracked.handle.close()
            await self._send.send(ContainerStopped(tracked.ref, "exited"))
        # It may already be back under a new pid (a restart).
        self.hint(name)
