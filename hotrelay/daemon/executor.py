"""The executor: runs the relay's jobs through the effectors, with a write-ahead ledger.

For an ApplyJob, each action of the binding goes through its effector in three steps:
``prepare`` (read-only: look at the kernel and decide, e.g. "this device was already
allowed"), a ledger write that records the step as *pending* with that record, then
``apply``, and a ledger write that marks it *done*. A crash anywhere therefore leaves a
ledger entry that says exactly what may have been done, and every ``undo`` is written
to be safe on a step that was only pending (undoing a grant that never happened denies
what was denied anyway; removing a node that was never made finds nothing).

An UndoJob undoes the recorded steps, the device-cgroup grant first and then the rest
newest first, rewriting the ledger after each, and deletes the entry at the end. A
failed apply rolls back what it did; whatever cannot be rolled back stays in the
ledger and is reported as leftover, for the relay to undo.

Jobs for one container run one at a time, in order (so a device's add and remove, and
the steps within each, keep their order); different containers proceed in parallel,
and one container's failing or slow job never holds up another's.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from hotrelay.core.containers import Runtime
from hotrelay.core.relay import ApplyJob, BindingKey, Job, NotifyJob, UndoJob
from hotrelay.daemon.ledger import Ledger, LedgerEntry
from hotrelay.errors import HotrelayError

__all__ = [
    "Effector",
    "EffectorError",
    "Executor",
    "JobResult",
    "applied_since",
    "key_from_record",
    "key_record",
    "restore_applied",
]

log = logging.getLogger("hotrelay.executor")

Record = dict[str, Any]
# Crash tests name a point here (e.g. "applied:GrantDevice") and the daemon SIGKILLs
# itself there, exactly as a crash would stop it. Unset in production: no effect.
CRASH_AT_ENV = "HOTRELAY_TEST_CRASH_AT"

# What an effector raises when an action fails (as opposed to a bug in hotrelay).
_FAILURES = (HotrelayError, OSError, ValueError)


class EffectorError(HotrelayError):
    """An action failed; the message names the container, device and reason."""


class Effector(Protocol):
    """Does one kind of action. Records are JSON-ready dicts kept in the ledger."""

    def prepare(self, action: Any) -> Record:
        """Look, don't touch: what applying ``action`` needs to remember for its undo."""
        ...

    async def apply(self, action: Any, record: Record) -> Record:
        """Do it; return the record (updated with what was actually done)."""
        ...

    async def undo(self, record: Record) -> None:
        """Undo it, also when ``apply`` never ran or ran halfway; idempotent."""
        ...

    async def notify(self, action: Any) -> None:
        """A one-off action with nothing to undo (a change uevent)."""
        ...


@dataclass(frozen=True, slots=True)
class JobResult:
    job: Job
    error: str | None = None
    leftover: bool = False
    seconds: float = 0.0


def key_record(key: BindingKey) -> Record:
    return {
        "runtime": key.runtime.value,
        "container": key.container,
        "devpath": key.devpath,
        "rule": key.rule,
    }


def key_from_record(record: Mapping[str, Any]) -> BindingKey:
    return BindingKey(
        Runtime(record["runtime"]), record["container"], record["devpath"], record["rule"]
    )


# Work that must not overlap a container's jobs but reports nothing to the relay (the
# heal pass's node checks): run in the container's queue, in order with its jobs.
Task = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class _Worker:
    send: trio.MemorySendChannel[Job | Task]
    pending: int = 0
    tasks: int = 0  # of pending, how many are tasks


@dataclass(slots=True)
class ExecutorStats:
    jobs: int = 0
    failed: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class Executor:
    """Runs jobs; reports each result through ``report`` (in the relay's task)."""

    def __init__(
        self,
        ledger: Ledger,
        effectors: Mapping[str, Effector],
        report: Callable[[JobResult], Awaitable[None]],
    ) -> None:
        self._ledger = ledger
        self._effectors = effectors
        self._report = report
        self._workers: dict[tuple[Runtime, str], _Worker] = {}
        self._nursery: trio.Nursery | None = None
        self.stats = ExecutorStats()
        self._crash_at = os.environ.get(CRASH_AT_ENV)

    def _crash_point(self, point: str) -> None:
        if self._crash_at == point:
            log.warning("crash test: SIGKILL at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def submit(self, job: Job) -> None:
        """Queue ``job`` behind the other jobs of its container."""
        key = job.binding.key if isinstance(job, ApplyJob) else job.key
        worker = self._worker((key.runtime, key.container))
        worker.pending += 1
        worker.send.send_nowait(job)

    def submit_task(self, container: tuple[Runtime, str], task: Task) -> bool:
        """Queue ``task`` behind the container's jobs, unless one is queued already
        (a slow container then gets one at a time, however often they are offered)."""
        worker = self._worker(container)
        if worker.tasks:
            return False
        worker.pending += 1
        worker.tasks += 1
        worker.send.send_nowait(task)
        return True

    def _worker(self, container: tuple[Runtime, str]) -> _Worker:
        assert self._nursery is not None, "Executor.run is not running"
        worker = self._workers.get(container)
        if worker is None:
            send, receive = trio.open_memory_channel[Job | Task](float("inf"))
            worker = self._workers[container] = _Worker(send)
            self._nursery.start_soon(self._work, container, receive)
        return worker

    async def _work(
        self, container: tuple[Runtime, str], receive: trio.MemoryReceiveChannel[Job | Task]
    ) -> None:
        worker = self._workers[container]
        while True:
            job = await receive.receive()
            if not isinstance(job, ApplyJob | UndoJob | NotifyJob):
                try:
                    await job()
                except trio.Cancelled:
                    raise
                except Exception:  # the daemon must outlive a failing task
                    log.exception("%s %s: background task failed", container[0].value, container[1])
                worker.pending -= 1
                worker.tasks -= 1
                if self._idle(container, worker, receive):
                    return
                continue
            started = time.perf_counter()
            result = await self._run(job)
            result = JobResult(job, result.error, result.leftover, time.perf_counter() - started)
            self.stats.jobs += 1
            self.stats.failed += result.error is not None
            worker.pending -= 1
            await self._report(result)
            if self._idle(container, worker, receive):
                return

    def _idle(
        self,
        container: tuple[Runtime, str],
        worker: _Worker,
        receive: trio.MemoryReceiveChannel[Job | Task],
    ) -> bool:
        if worker.pending or receive.statistics().current_buffer_used:
            return False
        # Idle: let the task go; a later job for this container starts a new one.
        del self._workers[container]
        worker.send.close()
        return True

    async def _run(self, job: Job) -> JobResult:
        try:
            if isinstance(job, ApplyJob):
                return await self._apply(job)
            if isinstance(job, UndoJob):
                return await self._undo(job)
            return await self._notify(job)
        except trio.Cancelled:
            raise
        except Exception as exc:  # one failing job must never stop the daemon
            log.exception("%s: unexpected error", job.describe())
            return JobResult(job, error=f"{type(exc).__name__}: {exc}", leftover=True)

    def _effector(self, kind: str) -> Effector:
        try:
            return self._effectors[kind]
        except KeyError:
            raise EffectorError(f"no effector for {kind} actions") from None

    def _write(self, key: BindingKey, entry: Record) -> None:
        self._ledger.put(LedgerEntry(str(key), "binding", entry))

    def record_heals(self, heals: Sequence[tuple[str, int, str, Record]]) -> int:
        """Keep the new records of steps the heal pass re-did: (ledger key, step index,
        step kind, record). The executor is the ledger's only writer; a step that is no
        longer there as it was (a job changed the entry meanwhile) is skipped. Each
        entry is written once; how many steps were kept."""
        by_key: dict[str, list[tuple[int, str, Record]]] = {}
        for key, index, kind, record in heals:
            by_key.setdefault(key, []).append((index, kind, record))
        kept = 0
        for key, changes in by_key.items():
            current = self._ledger.get(key)
            if current is None:
                continue
            entry = dict(current.record)
            steps = entry.get("steps", [])
            for index, kind, record in changes:
                if index < len(steps) and steps[index].get("kind") == kind:
                    steps[index]["record"] = record
                    kept += 1
            self._ledger.put(LedgerEntry(key, current.kind, entry))
        return kept

    async def _apply(self, job: ApplyJob) -> JobResult:
        binding = job.binding
        key = binding.key
        container = binding.container
        entry: Record = {
            "key": key_record(key),
            "fingerprint": binding.fingerprint,
            "container": {"pid": container.pid, "start_time": container.start_time},
            # True only once every step is done: a rollback or undo that stopped halfway
            # leaves "done" steps that are not the whole binding.
            "complete": False,
            "steps": [],
        }
        steps: list[Record] = entry["steps"]
        for action in binding.actions:
            kind = type(action).__name__
            step: Record = {"kind": kind, "describe": action.describe(), "state": "pending"}
            try:
                effector = self._effector(kind)
                step["record"] = effector.prepare(action)
                steps.append(step)
                # One write: the previous step done, this one pending.
                self._write(key, entry)
                if len(steps) > 1:
                    self._crash_point(f"recorded:{steps[-2]['kind']}")
                step["record"] = await effector.apply(action, step["record"])
                self._crash_point(f"applied:{kind}")  # done in the kernel, not in the ledger
                step["state"] = "done"
            except _FAILURES as exc:
                log.warning("%s: %s failed: %s", key, action.describe(), exc)
                leftover = await self._rollback(key, entry)
                return JobResult(job, error=f"{action.describe()}: {exc}", leftover=leftover)
            log.info("%s: %s", key, action.describe())
        entry["complete"] = True
        entry["since"] = time.time()  # shown by `list`, also after a restart
        self._write(key, entry)
        return JobResult(job)

    async def _rollback(self, key: BindingKey, entry: Record) -> bool:
        """Undo a failed apply's steps; True if some could not be undone (kept in ledger)."""
        try:
            await self._undo_steps(key, entry)
        except _FAILURES:
            return True
        return False

    async def _undo_steps(self, key: BindingKey, entry: Record) -> None:
        steps: list[Record] = entry["steps"]
        while steps:
            index = _next_undo(steps)
            step = steps[index]
            try:
                await self._effector(step["kind"]).undo(step.get("record", {}))
            except _FAILURES as exc:
                log.warning("%s: undo of %s failed: %s", key, step["describe"], exc)
                self._write(key, entry)
                raise
            del steps[index]
            log.info("%s: undid %s", key, step["describe"])
        self._ledger.delete(str(key))

    async def _undo(self, job: UndoJob) -> JobResult:
        stored = self._ledger.get(str(job.key))
        if stored is None:
            return JobResult(job)  # nothing recorded: nothing was done
        entry = dict(stored.record)
        entry["steps"] = list(entry.get("steps", []))
        entry["complete"] = False
        try:
            await self._undo_steps(job.key, entry)
        except _FAILURES as exc:
            return JobResult(job, error=str(exc), leftover=True)
        return JobResult(job)

    async def _notify(self, job: NotifyJob) -> JobResult:
        errors = []
        for action in job.actions:
            try:
                await self._effector(type(action).__name__).notify(action)
            except _FAILURES as exc:
                errors.append(f"{action.describe()}: {exc}")
        return JobResult(job, error="; ".join(errors) or None)


def _next_undo(steps: list[Record]) -> int:
    """Which recorded step to undo next: the newest grant, else the newest step.

    Grants go first. The kernel checks device access at open(), so taking a grant
    back needs nothing from the container, while removing a node or a link does: a
    container that keeps us from removing them (or a helper that cannot reach it)
    must never keep the device usable.
    """
    for index in range(len(steps) - 1, -1, -1):
        if steps[index].get("kind") == "GrantDevice":
            return index
    return len(steps) - 1


def applied_since(ledger: Ledger) -> dict[BindingKey, float]:
    """When each complete binding in the ledger was applied (for ``list``)."""
    since: dict[BindingKey, float] = {}
    for entry in ledger.entries():
        record = entry.record
        if entry.kind != "binding" or record.get("complete") is not True:
            continue
        when = record.get("since")
        try:
            key = key_from_record(record["key"])
        except (KeyError, ValueError, TypeError):
            continue
        if isinstance(when, int | float) and not isinstance(when, bool):
            since[key] = float(when)
    return since


def restore_applied(ledger: Ledger) -> dict[BindingKey, str]:
    """What the ledger says is applied: key -> fingerprint ("partial" if unfinished)."""
    applied: dict[BindingKey, str] = {}
    for entry in ledger.entries():
        if entry.kind != "binding":
            continue
        try:
            key = key_from_record(entry.record["key"])
        except (KeyError, ValueError, TypeError):
            log.error("ledger entry %s has no usable key; ignored", entry.key)
            continue
        finished = entry.record.get("complete") is True
        applied[key] = entry.record.get("fingerprint", "partial") if finished else "partial"
    return applied
