"""The relay: a sans-IO state machine from devices, rules and containers to jobs.

Everything the daemon learns goes in as a method call (a device event, a container
that started or stopped, new rules, a finished job); what should happen comes out of
:meth:`Relay.next_jobs`. The relay never touches the kernel.

It works as a reconciler, not an event router. From what it knows it derives the
*desired* bindings: one per (container, device, rule) where a present device matches a
rule whose target names a running container. It remembers which bindings are
*applied*. ``next_jobs`` emits the difference: apply what is desired and not applied,
undo what is applied and no longer desired. Every situation reduces to that one diff:
hotplug and unplug, a container starting later (coldplug) or restarting (new pid, so a
different binding), a rule reload, an overflow resync, and a restart of the daemon
itself (the ledger says what is applied; the enumeration says what is desired). An add
quickly followed by a remove ends removed whatever the timing: a binding has at most
one job in flight, and when it finishes the diff is taken again.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.core.plan import (
    Action,
    GrantDevice,
    InjectUevent,
    MakeNode,
    MakeSymlink,
    SkipRule,
    SkipSymlink,
    plan_for,
)
from hotrelay.core.rules import DeviceView, MatchMemory, Rule, RuleSet
from hotrelay.core.uevent import Uevent, Wire

__all__ = [
    "ApplyJob",
    "Binding",
    "BindingKey",
    "Job",
    "NotifyJob",
    "Relay",
    "RelayStats",
    "UndoJob",
]

_K = TypeVar("_K")

# Retry a failed job after this long, doubling up to the cap (seconds).
RETRY_FIRST = 1.0
RETRY_MAX = 60.0


@dataclass(frozen=True, slots=True)
class BindingKey:
    """Names one binding; stable across restarts, so it keys the ledger."""

    runtime: Runtime
    container: str
    devpath: str
    rule: str

    def __str__(self) -> str:
        return f"{self.runtime.value}:{self.container} {self.devpath} {self.rule}"


@dataclass(frozen=True, slots=True)
class Binding:
    """One device relayed into one container by one rule: the actions that do it."""

    key: BindingKey
    container: ContainerRef
    uevent: Uevent
    rule: str
    actions: tuple[Action, ...]
    fingerprint: str = field(compare=False)

    @classmethod
    def build(cls, container: ContainerRef, uevent: Uevent, rule: Rule) -> Binding:
        add = uevent if uevent.action == "add" else uevent.replace(ACTION="add")
        # Plan through one target only: several of the rule's targets may name the
        # same container, and it must get the device once.
        chosen = next(t for t in rule.targets if t.selects(container))
        planned = plan_for(add, [rule], resolve=lambda t: [container] if t is chosen else [])
        return cls.from_actions(container, add, rule.name, tuple(_as_seen_inside(planned)))

    @classmethod
    def from_actions(
        cls, container: ContainerRef, uevent: Uevent, rule: str, actions: tuple[Action, ...]
    ) -> Binding:
        # What makes two bindings "the same": the container incarnation (a restart is
        # a new pid), the device and everything the actions would do.
        identity = "\n".join(
            [
                f"{container.pid} {container.start_time}",
                f"{uevent.devpath} {uevent.devnum}",
                *(a.describe() for a in actions),
            ]
        )
        return cls(
            key=BindingKey(container.runtime, container.name, uevent.devpath, rule),
            container=container,
            uevent=uevent,
            rule=rule,
            actions=actions,
            fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:24],
        )

    def with_grant(self, grant: DeviceRule | None) -> Binding:
        """The same binding with its device-cgroup grant replaced (None: left out)."""
        actions: list[Action] = []
        for action in self.actions:
            if not isinstance(action, GrantDevice):
                actions.append(action)
            elif grant is not None:
                actions.append(dataclasses.replace(action, device=grant))
        if tuple(actions) == self.actions:
            return self
        return Binding.from_actions(self.container, self.uevent, self.rule, tuple(actions))

    @property
    def skipped(self) -> tuple[SkipRule, ...]:
        """Why this binding cannot be applied (a template with no value, ...), if so."""
        return tuple(a for a in self.actions if isinstance(a, SkipRule))

    @property
    def left_out(self) -> tuple[SkipSymlink, ...]:
        """Symlinks this binding leaves out (it applies all the same), and why."""
        return tuple(a for a in self.actions if isinstance(a, SkipSymlink))


@dataclass(frozen=True, slots=True)
class ApplyJob:
    binding: Binding

    @property
    def key(self) -> BindingKey:
        return self.binding.key

    def describe(self) -> str:
        return f"apply {self.key}"


@dataclass(frozen=True, slots=True)
class UndoJob:
    """Undo an applied binding; the executor knows how from what it recorded."""

    key: BindingKey

    def describe(self) -> str:
        return f"undo {self.key}"


@dataclass(frozen=True, slots=True)
class NotifyJob:
    """Tell a container about a change to a device it already has (uevent only)."""

    key: BindingKey
    actions: tuple[InjectUevent, ...]

    def describe(self) -> str:
        return f"notify {self.key}"


Job = ApplyJob | UndoJob | NotifyJob


class _Failure(enum.Enum):
    APPLY = "apply"
    UNDO = "undo"


@dataclass(slots=True)
class _Retry:
    kind: _Failure
    attempts: int
    due: float
    error: str


@dataclass(slots=True)
class RelayStats:
    events: int = 0
    matched_events: int = 0
    applied: int = 0
    undone: int = 0
    failures: int = 0
    resyncs: int = 0


@dataclass(frozen=True, slots=True)
class _Device:
    uevent: Uevent
    rules: tuple[Rule, ...]


class Relay:
    """The relay's whole state. Not thread-safe; one trio task drives it."""

    def __init__(self, rules: RuleSet | None = None) -> None:
        self.rules = rules if rules is not None else RuleSet()
        self.stats = RelayStats()
        self._memory = MatchMemory()
        self._devices: dict[str, _Device] = {}
        self._containers: dict[tuple[Runtime, str], ContainerRef] = {}
        self._desired: dict[BindingKey, Binding] = {}
        # Indexes over _desired, so one event costs O(its own bindings), not O(all).
        self._by_devpath: dict[str, set[BindingKey]] = {}
        self._by_container: dict[tuple[Runtime, str], set[BindingKey]] = {}
        self._applied: dict[BindingKey, str] = {}  # key -> fingerprint
        # Interfaces the ledger says we moved into a container, by key -> (pid, start
        # time) of that container: the host no longer sees them, so no enumeration
        # after a restart can say they are still wanted. They are kept while that very
        # container runs and a rule of that name still targets it.
        self._held: dict[BindingKey, tuple[int, int | None]] = {}
        self._inflight: dict[BindingKey, Job] = {}
        self._retry: dict[BindingKey, _Retry] = {}
        self._notify: dict[BindingKey, Uevent] = {}  # the latest change to tell
        self._dirty: set[BindingKey] = set()
        # Bindings made since take_skipped() that cannot apply (SkipRule): the daemon logs why.
        self._new_skipped: list[Binding] = []
        # key -> what was last handed out about that binding's skips.
        self._told: dict[BindingKey, tuple[str, ...]] = {}
        self._now = 0.0

    # -- what the relay knows --------------------------------------------------------

    @property
    def containers(self) -> Mapping[tuple[Runtime, str], ContainerRef]:
        return self._containers

    @property
    def desired(self) -> Mapping[BindingKey, Binding]:
        return self._desired

    @property
    def applied(self) -> Mapping[BindingKey, str]:
        return self._applied

    @property
    def inflight(self) -> Mapping[BindingKey, Job]:
        return self._inflight

    @property
    def held(self) -> frozenset[BindingKey]:
        """Applied interface moves kept without a device the host can see (restart)."""
        return frozenset(k for k in self._held if k not in self._desired and self._holds(k))

    def failing(self) -> dict[BindingKey, str]:
        return {key: retry.error for key, retry in self._retry.items()}

    def is_settled(self) -> bool:
        """Nothing in flight and nothing left to do (retries pending count as work)."""
        if self._inflight or self._notify or self._retry:
            return False
        return all(self._applied.get(k) == b.fingerprint for k, b in self._desired.items()) and all(
            k in self._desired or self._holds(k) for k in self._applied
        )

    # -- inputs -------------------------------------------------------------------------

    def device_event(self, uevent: Uevent, device: DeviceView | None = None) -> None:
        """A uevent from the source (or coldplug); ``device`` is its sysfs view."""
        self.stats.events += 1
        if uevent.action == "remove" and self._moved_netdev(uevent.devpath):
            # We moved this interface into a container: the host hears it leave.
            return
        rules = tuple(self._memory.match(self.rules, uevent, device))
        if rules:
            self.stats.matched_events += 1
        devpath = uevent.devpath
        if uevent.action == "remove":
            self._forget_device(devpath)
        elif uevent.action == "move" and uevent.get("DEVPATH_OLD"):
            self._forget_device(uevent.properties["DEVPATH_OLD"])
            self._set_device(uevent, rules)
        elif uevent.action == "add" or devpath not in self._devices:
            self._set_device(uevent, rules)
        else:
            self._changed(uevent, rules)

    def resync_devices(self, devices: Iterable[tuple[Uevent, DeviceView | None]]) -> None:
        """The complete set of devices now present (after an overflow, a reload, start)."""
        self.stats.resyncs += 1
        seen: set[str] = set()
        for uevent, device in devices:
            seen.add(uevent.devpath)
            rules = tuple(self._memory.match(self.rules, uevent, device))
            self._set_device(uevent, rules)
        for devpath in [p for p in self._devices if p not in seen]:
            if self._moved_netdev(devpath):
                # In a container, so the host cannot list it: kept, for the rules that
                # still do the same (a changed or removed rule undoes the move).
                self._rematch_moved(devpath)
            else:
                self._forget_device(devpath)
                self._memory.forget(devpath)

    def replace_rules(self, rules: RuleSet) -> None:
        """New rules; the daemon follows with :meth:`resync_devices` to re-match."""
        self.rules = rules
        self._memory = MatchMemory()
        self._dirty.update(self._held)

    def container_started(self, container: ContainerRef) -> None:
        """A container is running (new, restarted under the same name, or refreshed)."""
        old = self._containers.get(container.key)
        self._containers[container.key] = container
        if old is not None:
            self._dirty.update(self._by_container.get(old.key, ()))
        self._dirty.update(self._held_of(container.key))
        for devpath, dev in self._devices.items():
            self._bind_device(devpath, dev, only=container)

    def container_stopped(self, runtime: Runtime, name: str) -> None:
        if self._containers.pop((runtime, name), None) is None:
            return
        self._dirty.update(self._held_of((runtime, name)))
        for key in list(self._by_container.get((runtime, name), ())):
            self._drop_desired(key)

    def resync_containers(self, containers: Iterable[ContainerRef]) -> None:
        """The complete set of running containers (at start-up, after a watcher restart)."""
        running = {c.key: c for c in containers}
        for key in [k for k in self._containers if k not in running]:
            self.container_stopped(*key)
        for container in running.values():
            if self._containers.get(container.key) != container:
                self.container_started(container)

    def restore(
        self,
        applied: Mapping[BindingKey, str],
        *,
        moved_netdevs: Mapping[BindingKey, tuple[int, int | None]] | None = None,
    ) -> None:
        """Bindings the ledger says are applied (key -> fingerprint), at start-up.

        ``moved_netdevs``: those of them that moved a network interface into a
        container, with that container's (pid, start time). Such an interface is in
        the container's netns, so the host's enumeration cannot show it; it is not
        undone for that, only when its container goes or its rule no longer names it.
        """
        self._applied.update(applied)
        self._dirty.update(applied)
        for key, incarnation in (moved_netdevs or {}).items():
            if key in applied and applied[key] != "partial":
                self._held[key] = incarnation

    def job_done(self, job: Job, *, error: str | None = None, leftover: bool = False) -> None:
        """A job finished. ``error`` None is success. ``leftover`` after a failed apply
        means part of it stayed applied (and is in the ledger): it must be undone."""
        key = job.key
        if self._inflight.get(key) == job:
            del self._inflight[key]
        self._dirty.add(key)
        if isinstance(job, NotifyJob):
            return
        if error is None:
            retry = self._retry.get(key)
            # Undoing a failed apply's leftovers does not make the apply succeed: keep
            # its back-off, so a device that always fails is not hammered.
            if retry is not None and (isinstance(job, ApplyJob) or retry.kind is _Failure.UNDO):
                del self._retry[key]
            self._held.pop(key, None)
            if isinstance(job, ApplyJob):
                self._applied[key] = job.binding.fingerprint
                self.stats.applied += 1
            else:
                self._applied.pop(key, None)
                self.stats.undone += 1
            return
        self.stats.failures += 1
        kind = _Failure.APPLY if isinstance(job, ApplyJob) else _Failure.UNDO
        if kind is _Failure.APPLY and leftover:
            self._applied[key] = "partial"
        previous = self._retry.get(key)
        attempts = previous.attempts + 1 if previous and previous.kind is kind else 1
        delay = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
        self._retry[key] = _Retry(kind, attempts, self._now + delay, error)

    def tick(self, now: float) -> None:
        """The clock (any monotonic seconds); retries whose time has come become due."""
        self._now = now
        self._dirty.update(k for k, r in self._retry.items() if r.due <= now)

    def retry_everything(self) -> None:
        """Forget back-offs (an operator asked for a reload or a heal)."""
        for retry in self._retry.values():
            retry.due = self._now
        self._dirty.update(self._retry)

    # -- output -------------------------------------------------------------------------

    def take_skipped(self) -> list[Binding]:
        """Bindings made since the last call that a rule cannot apply (a template with no
        value, an unsafe path, ...) or that leave a symlink out, so that the daemon logs
        each once, with why."""
        skipped, self._new_skipped = self._new_skipped, []
        return skipped

    def next_jobs(self) -> list[Job]:
        """Jobs to run now. Each returned job is in flight until :meth:`job_done`."""
        jobs: list[Job] = []
        for key in sorted(self._dirty, key=str):  # a stable order for logs and tests
            job = self._job_for(key)
            if job is not None:
                self._inflight[key] = job
                jobs.append(job)
        self._dirty.clear()
        for key in list(self._notify):
            binding = self._desired.get(key)
            if binding is None:
                del self._notify[key]
            elif key not in self._inflight and self._applied.get(key) is not None:
                notify = _notify_job(binding, self._notify.pop(key))
                if notify is not None:
                    self._inflight[key] = notify
                    jobs.append(notify)
        return jobs

    def _job_for(self, key: BindingKey) -> Job | None:
        if key in self._inflight:
            return None  # taken again when that job is done
        want = self._desired.get(key)
        have = self._applied.get(key)
        job: Job | None = None
        settled = want is not None and have == want.fingerprint
        # An interface moved in before a restart: no device shows it, yet it is kept.
        held = want is None and have is not None and self._holds(key)
        if settled or held:
            job = None
        elif have is not None:
            job = UndoJob(key)  # gone, changed or partial: undo first, re-apply after
        elif want is not None and not want.skipped:
            job = ApplyJob(want)
        if job is None:
            self._retry.pop(key, None)  # whatever failed no longer needs doing
            return None
        retry = self._retry.get(key)
        if retry is not None and retry.due > self._now:
            return None
        return job

    # -- internals ----------------------------------------------------------------------

    def _holds(self, key: BindingKey) -> bool:
        """Is this restored interface move still wanted, though no device shows it?"""
        incarnation = self._held.get(key)
        if incarnation is None:
            return False
        container = self._containers.get((key.runtime, key.container))
        if container is None or (container.pid, container.start_time) != incarnation:
            return False
        rule = self.rules.get(key.rule)
        return rule is not None and any(t.selects(container) for t in rule.targets)

    def _rematch_moved(self, devpath: str) -> None:
        dev = self._devices[devpath]
        kept = tuple(
            new
            for old in dev.rules
            if (new := self.rules.get(old.name)) is not None and _same_effect(old, new)
        )
        if kept != dev.rules:
            self._set_device(dev.uevent, kept)

    def _held_of(self, container: tuple[Runtime, str]) -> list[BindingKey]:
        return [k for k in self._held if (k.runtime, k.container) == container]

    def _moved_netdev(self, devpath: str) -> bool:
        dev = self._devices.get(devpath)
        return (
            dev is not None
            and dev.uevent.subsystem == "net"
            and any(
                k in self._applied or k in self._inflight for k in self._by_devpath.get(devpath, ())
            )
        )

    def _set_device(self, uevent: Uevent, rules: Sequence[Rule]) -> None:
        devpath = uevent.devpath
        self._unbind_device(devpath)
        if not rules:
            self._devices.pop(devpath, None)
            return
        dev = _Device(uevent, tuple(rules))
        self._devices[devpath] = dev
        self._bind_device(devpath, dev)

    def _forget_device(self, devpath: str) -> None:
        self._devices.pop(devpath, None)
        for key in self._by_devpath.get(devpath, ()):
            self._told.pop(key, None)
        self._unbind_device(devpath)

    def _unbind_device(self, devpath: str) -> None:
        for key in list(self._by_devpath.get(devpath, ())):
            self._drop_desired(key)

    def _add_desired(self, binding: Binding) -> None:
        key = binding.key
        self._desired[key] = binding
        said = tuple(
            [skip.describe() for skip in binding.skipped]
            + [left.describe() for left in binding.left_out]
        )
        if said and self._told.get(key) != said:
            # Said once per binding and reason: a resync or a change plans it again.
            self._told[key] = said
            self._new_skipped.append(binding)
        self._by_devpath.setdefault(key.devpath, set()).add(key)
        self._by_container.setdefault((key.runtime, key.container), set()).add(key)
        self._dirty.add(key)

    def _drop_desired(self, key: BindingKey) -> None:
        del self._desired[key]
        _discard(self._by_devpath, key.devpath, key)
        _discard(self._by_container, (key.runtime, key.container), key)
        self._dirty.add(key)

    def _bind_device(self, devpath: str, dev: _Device, *, only: ContainerRef | None = None) -> None:
        containers = self._containers.values() if only is None else (only,)
        for container in containers:
            bindings = [
                Binding.build(container, dev.uevent, rule)
                for rule in dev.rules
                if any(target.selects(container) for target in rule.targets)
            ]
            for binding in _share_grant(bindings):
                if self._desired.get(binding.key) != binding:
                    self._add_desired(binding)

    def _changed(self, uevent: Uevent, rules: Sequence[Rule]) -> None:
        """A change/bind/... to a present device: re-bind if the rules differ, else notify."""
        dev = self._devices[uevent.devpath]
        if {r.name for r in rules} != {r.name for r in dev.rules}:
            self._set_device(dev.uevent, rules)
            return
        for key in self._by_devpath.get(uevent.devpath, ()):
            # Only the latest change is told, when the container's queue is free: the
            # job is built then (a storm of changes to a device relayed into a hundred
            # containers once built a hundred messages per event to throw away).
            self._notify[key] = uevent


def _same_effect(old: Rule, new: Rule) -> bool:
    """Would ``new`` relay a device exactly as ``old`` did (file and line aside)?"""
    return (old.targets, old.conditions, old.device, old.netdev) == (
        new.targets,
        new.conditions,
        new.device,
        new.netdev,
    )


def _share_grant(bindings: Sequence[Binding]) -> list[Binding]:
    """One device-cgroup grant per container and device, however many rules relay it.

    A grant is not reference-counted by the kernel (v1) nor by the effector, so two
    bindings granting the same device would see the second one's revoke take access
    the first still needs. The first binding (in rule order) carries the grant, with
    the union of every rule's access; the others carry none. When the set of rules
    changes, the first binding's actions change, so it is re-applied.
    """
    grants = [a for b in bindings for a in b.actions if isinstance(a, GrantDevice)]
    if len(grants) < 2:
        return list(bindings)
    access = grants[0].device.access
    for grant in grants[1:]:
        access = access | grant.device.access
    union = dataclasses.replace(grants[0].device, access=access)
    holder = next(
        i for i, b in enumerate(bindings) if any(isinstance(a, GrantDevice) for a in b.actions)
    )
    return [b.with_grant(union if i == holder else None) for i, b in enumerate(bindings)]


def _notify_job(binding: Binding, uevent: Uevent) -> NotifyJob | None:
    """The change ``uevent`` told to the binding's container, as its rule says (None:
    the rule sends no uevents)."""
    injections = tuple(
        InjectUevent(binding.container, _inside_view(uevent, binding.actions), a.wire, a.origin)
        for a in binding.actions
        if isinstance(a, InjectUevent)
    )
    return NotifyJob(binding.key, injections) if injections else None


def _inside_view(uevent: Uevent, actions: Sequence[Action]) -> Uevent:
    """The event with the container's paths: DEVNAME is where the node is made inside,
    DEVLINKS the links made inside (the host's would point at nothing there)."""
    node = next((a.path for a in actions if isinstance(a, MakeNode)), None)
    if node is None:
        return uevent
    links = " ".join(a.link for a in actions if isinstance(a, MakeSymlink))
    devname = node if uevent.wire is Wire.UDEV else node.removeprefix("/dev/")
    return uevent.replace(DEVNAME=devname, DEVLINKS=links or None)


def _as_seen_inside(actions: Sequence[Action]) -> list[Action]:
    return [
        InjectUevent(a.container, _inside_view(a.uevent, actions), a.wire, a.origin)
        if isinstance(a, InjectUevent)
        else a
        for a in actions
    ]


def _discard(index: dict[_K, set[BindingKey]], group: _K, key: BindingKey) -> None:
    keys = index[group]
    keys.discard(key)
    if not keys:
        del index[group]
