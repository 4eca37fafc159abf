"""The relay state machine, driven by hand: no kernel, no threads, no clock but ours."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.plan import GrantDevice, InjectUevent, MakeNode
from hotrelay.core.relay import ApplyJob, Binding, BindingKey, Job, NotifyJob, Relay, UndoJob
from hotrelay.core.rules import RuleSet
from hotrelay.core.uevent import Uevent

RULES = """
[[rule]]
name = "zram"
target = ["lxc:ha*", "docker:z2m"]
[rule.match]
subsystem = "block"
kernel = "zram*"
[rule.device]
path = "/dev/disks/{DEVNAME}"
mode = "0660"

[[rule]]
name = "other"
target = ["lxc:other"]
[rule.match]
subsystem = "block"
kernel = "loop*"
"""


def rules(text: str = RULES) -> RuleSet:
    return RuleSet.from_texts([("test.toml", text)])


def zram(n: int, action: str = "add", **extra: str) -> Uevent:
    return Uevent.from_properties(
        {
            "ACTION": action,
            "DEVPATH": f"/devices/virtual/block/zram{n}",
            "SUBSYSTEM": "block",
            "DEVNAME": f"zram{n}",
            "DEVTYPE": "disk",
            "MAJOR": "253",
            "MINOR": str(n),
            **extra,
        }
    )


def container(runtime: Runtime, name: str, pid: int) -> ContainerRef:
    return ContainerRef(runtime, name, pid=pid, start_time=pid * 10)


HA = container(Runtime.LXC, "ha1", 100)
Z2M = container(Runtime.DOCKER, "z2m", 200)
OTHER = container(Runtime.LXC, "other", 300)


def finish(relay: Relay, jobs: Iterable[Job], error: str | None = None) -> None:
    for job in jobs:
        relay.job_done(job, error=error)


def drain(relay: Relay) -> list[str]:
    """Run jobs until none is left; the log of what ran."""
    log: list[str] = []
    for _ in range(100):
        jobs = relay.next_jobs()
        if not jobs:
            return log
        log += [job.describe() for job in jobs]
        finish(relay, jobs)
    raise AssertionError("the relay never settled")


def test_hotplug_then_unplug() -> None:
    relay = Relay(rules())
    relay.resync_containers([HA, Z2M, OTHER])
    relay.device_event(zram(1))
    jobs = relay.next_jobs()
    assert sorted(j.describe() for j in jobs) == [
        "apply docker:z2m /devices/virtual/block/zram1 zram",
        "apply lxc:ha1 /devices/virtual/block/zram1 zram",
    ]
    apply = next(j for j in jobs if isinstance(j, ApplyJob) and j.binding.container == HA)
    assert isinstance(apply, ApplyJob)
    kinds = [type(a).__name__ for a in apply.binding.actions]
    assert kinds == ["GrantDevice", "MakeNode", "InjectUevent"]
    node = apply.binding.actions[1]
    assert isinstance(node, MakeNode)
    assert (node.path, node.mode) == ("/dev/disks/zram1", 0o660)
    inject = apply.binding.actions[2]
    assert isinstance(inject, InjectUevent)
    # The event the container hears names the node where the container has it.
    assert inject.uevent.devname == "disks/zram1"
    assert inject.uevent.node == "/dev/disks/zram1"
    assert relay.next_jobs() == []  # in flight
    finish(relay, jobs)
    assert relay.is_settled()
    relay.device_event(zram(1, "remove"))
    assert sorted(j.describe() for j in relay.next_jobs()) == [
        "undo docker:z2m /devices/virtual/block/zram1 zram",
        "undo lxc:ha1 /devices/virtual/block/zram1 zram",
    ]


def test_remove_before_apply_finishes_ends_removed() -> None:
    relay = Relay(rules())
    relay.resync_containers([HA])
    relay.device_event(zram(2))
    (apply,) = relay.next_jobs()
    relay.device_event(zram(2, "remove"))
    assert relay.next_jobs() == []  # the apply is still in flight
    relay.job_done(apply)
    (undo,) = relay.next_jobs()
    assert isinstance(undo, UndoJob)
    relay.job_done(undo)
    assert relay.applied == {}
    assert relay.is_settled()


def test_container_started_later_gets_present_devices() -> None:
    relay = Relay(rules())
    relay.device_event(zram(1))
    relay.device_event(zram(2))
    assert relay.next_jobs() == []
    relay.container_started(HA)
    assert drain(relay) == [
        "apply lxc:ha1 /devices/virtual/block/zram1 zram",
        "apply lxc:ha1 /devices/virtual/block/zram2 zram",
    ]


def test_restart_undoes_the_old_incarnation_then_applies_to_the_new() -> None:
    relay = Relay(rules())
    relay.container_started(HA)
    relay.device_event(zram(1))
    drain(relay)
    relay.container_started(container(Runtime.LXC, "ha1", 999))
    (undo,) = relay.next_jobs()
    assert isinstance(undo, UndoJob)
    relay.job_done(undo)
    (apply,) = relay.next_jobs()
    assert isinstance(apply, ApplyJob)
    assert apply.binding.container.pid == 999


def test_stopped_container_is_undone() -> None:
    relay = Relay(rules())
    relay.resync_containers([HA, Z2M])
    relay.device_event(zram(1))
    drain(relay)
    relay.container_stopped(Runtime.DOCKER, "z2m")
    assert drain(relay) == ["undo docker:z2m /devices/virtual/block/zram1 zram"]
    assert set(relay.applied) == {BindingKey(Runtime.LXC, "ha1", zram(1).devpath, "zram")}


def test_reload_revokes_what_is_no_longer_wanted_and_applies_the_new() -> None:
    relay = Relay(rules())
    relay.resync_containers([HA, OTHER])
    relay.device_event(zram(1))
    drain(relay)
    relay.replace_rules(
        rules(
            RULES.replace('kernel = "loop*"', 'kernel = "zram*"').replace(
                'target = ["lxc:ha*", "docker:z2m"]', 'target = ["docker:z2m"]'
            )
        )
    )
    relay.resync_devices([(zram(1), None)])
    assert drain(relay) == [
        "undo lxc:ha1 /devices/virtual/block/zram1 zram",
        "apply lxc:other /devices/virtual/block/zram1 other",
    ]


def test_changed_rule_settings_reapply() -> None:
    relay = Relay(rules())
    relay.container_started(HA)
    relay.device_event(zram(1))
    drain(relay)
    relay.replace_rules(rules(RULES.replace('mode = "0660"', 'mode = "0600"')))
    relay.resync_devices([(zram(1), None)])
    assert drain(relay) == [
        "undo lxc:ha1 /devices/virtual/block/zram1 zram",
        "apply lxc:ha1 /devices/virtual/block/zram1 zram",
    ]


def test_restore_from_ledger_keeps_what_matches_and_undoes_the_rest() -> None:
    first = Relay(rules())
    first.container_started(HA)
    first.device_event(zram(1))
    drain(first)
    ledger = dict(first.applied)
    stale = BindingKey(Runtime.LXC, "ha1", "/devices/virtual/block/zram9", "zram")
    ledger[stale] = "0123"
    # A new daemon: the ledger first, then the enumeration of containers and devices.
    relay = Relay(rules())
    relay.restore(ledger)
    relay.resync_containers([HA])
    relay.resync_devices([(zram(1), None)])
    assert drain(relay) == [f"undo {stale}"]
    assert relay.is_settled()


def test_failed_apply_is_retried_with_backoff_and_leftovers_undone_first() -> None:
    relay = Relay(rules())
    relay.container_started(HA)
    relay.device_event(zram(1))
    (apply,) = relay.next_jobs()
    relay.job_done(apply, error="EPERM from bpf()", leftover=True)
    assert not relay.is_settled()
    assert relay.failing() == {apply.key: "EPERM from bpf()"}
    assert relay.next_jobs() == []  # not due yet
    relay.tick(0.5)
    assert relay.next_jobs() == []
    relay.tick(1.0)
    (undo,) = relay.next_jobs()
    assert isinstance(undo, UndoJob)  # the partial apply first
    relay.job_done(undo)
    (again,) = relay.next_jobs()
    assert isinstance(again, ApplyJob)
    relay.job_done(again, error="still failing")
    relay.tick(2.0)
    assert relay.next_jobs() == []  # the second failure waits twice as long
    relay.tick(3.0)
    (third,) = relay.next_jobs()
    relay.job_done(third)
    assert relay.is_settled()


def test_storm_of_unmatched_events_leaves_no_state() -> None:
    relay = Relay(rules())
    relay.container_started(HA)
    for n in range(5000):
        relay.device_event(
            Uevent.from_properties(
                {"ACTION": "change", "DEVPATH": f"/devices/virtual/misc/x{n}", "SUBSYSTEM": "misc"}
            )
        )
    assert relay.next_jobs() == []
    assert relay.desired == {}
    assert relay.stats.events == 5000
    assert relay.stats.matched_events == 0


def test_change_event_notifies_containers_that_have_the_device() -> None:
    relay = Relay(rules())
    relay.container_started(HA)
    relay.device_event(zram(1))
    drain(relay)
    relay.device_event(zram(1, "change", DISK_MEDIA_CHANGE="1"))
    (notify,) = relay.next_jobs()
    assert isinstance(notify, NotifyJob)
    (inject,) = notify.actions
    assert isinstance(inject, InjectUevent)
    assert inject.uevent.action == "change"
    assert inject.container == HA
    relay.job_done(notify)
    assert relay.is_settled()


def test_changes_while_a_container_is_busy_are_told_once_the_latest() -> None:
    relay = Relay(rules())
    relay.container_started(HA)
    relay.device_event(zram(1))
    drain(relay)
    relay.device_event(zram(1, "change", N="1"))
    (first,) = relay.next_jobs()  # in flight: the next changes wait
    for n in range(2, 6):
        relay.device_event(zram(1, "change", N=str(n)))
    assert relay.next_jobs() == []
    relay.job_done(first)
    (latest,) = relay.next_jobs()
    assert isinstance(latest, NotifyJob)
    (inject,) = latest.actions
    assert isinstance(inject, InjectUevent)
    assert inject.uevent.get("N") == "5"
    assert inject.uevent.get("DEVNAME") == "disks/zram1"  # the container's path, as always
    relay.job_done(latest)
    assert relay.is_settled()


def test_overflow_resync_catches_up_with_lost_events() -> None:
    relay = Relay(rules())
    relay.container_started(HA)
    relay.device_event(zram(1))
    relay.device_event(zram(2))
    drain(relay)
    # zram1 left and zram3 came while the kernel was dropping our events.
    relay.resync_devices([(zram(2), None), (zram(3), None)])
    assert drain(relay) == [
        "undo lxc:ha1 /devices/virtual/block/zram1 zram",
        "apply lxc:ha1 /devices/virtual/block/zram3 zram",
    ]


def test_a_moved_interface_leaving_the_host_is_not_an_unplug() -> None:
    text = """
[[rule]]
name = "nic"
target = ["lxc:ha*"]
[rule.match]
subsystem = "net"
kernel = "veth*"
[rule.netdev]
name = "wan0"
"""
    relay = Relay(rules(text))
    relay.container_started(HA)
    add = Uevent.from_properties(
        {"ACTION": "add", "DEVPATH": "/devices/virtual/net/veth7", "SUBSYSTEM": "net",
         "INTERFACE": "veth7", "IFINDEX": "7"}
    )  # fmt: skip
    relay.device_event(add)
    (apply,) = relay.next_jobs()
    assert [a.describe() for a in apply.binding.actions] == [  # type: ignore[union-attr]
        "move interface veth7 into lxc:ha1 as wan0"
    ]
    relay.job_done(apply)
    relay.device_event(add.replace(ACTION="remove"))  # what the host hears after the move
    assert relay.next_jobs() == []
    assert relay.is_settled()


def test_binding_fingerprint_is_stable_and_sensitive() -> None:
    rule = rules().rules[0]
    a = Binding.build(HA, zram(1), rule)
    assert a.fingerprint == Binding.build(HA, zram(1), rule).fingerprint
    assert (
        a.fingerprint
        != Binding.build(container(Runtime.LXC, "ha1", 101), zram(1), rule).fingerprint
    )
    assert isinstance(a.actions[0], GrantDevice)
    assert a.actions[0].device.render() == "b 253:1 rwm"


# -- random interleavings end where the rules say ---------------------------------------

CONTAINERS = [HA, Z2M, OTHER, container(Runtime.LXC, "ha2", 400)]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("plug"), st.integers(0, 3)),
        st.tuples(st.just("unplug"), st.integers(0, 3)),
        st.tuples(st.just("start"), st.integers(0, 3), st.integers(1, 3)),
        st.tuples(st.just("stop"), st.integers(0, 3)),
        st.tuples(st.just("finish"), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("overflow"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_any_interleaving_settles_on_the_rules_intent(script: list[tuple[int | str, ...]]) -> None:
    relay = Relay(rules())
    present: set[int] = set()
    running: dict[int, ContainerRef] = {}
    pending: list[Job] = []
    for step in script:
        match step:
            case ("plug", n):
                present.add(int(n))
                relay.device_event(zram(int(n)))
            case ("unplug", n) if int(n) in present:
                present.discard(int(n))
                relay.device_event(zram(int(n), "remove"))
            case ("start", i, generation):
                base = CONTAINERS[int(i)]
                ref = container(base.runtime, base.name, base.pid * 10 + int(generation))
                running[int(i)] = ref
                relay.container_started(ref)
            case ("stop", i) if int(i) in running:
                del running[int(i)]
                relay.container_stopped(CONTAINERS[int(i)].runtime, CONTAINERS[int(i)].name)
            case ("finish", which, fail) if pending:
                job = pending.pop(int(which) % len(pending))
                relay.job_done(job, error="boom" if fail else None, leftover=bool(fail))
            case ("overflow", _):
                relay.resync_devices([(zram(n), None) for n in sorted(present)])
        pending += relay.next_jobs()
    # Let everything finish, successfully, with time moving on for the retries.
    now = 0.0
    for _ in range(200):
        finish(relay, pending)
        now += 100
        relay.tick(now)
        pending = relay.next_jobs()
        if not pending:
            break
    assert relay.is_settled()
    intent = {
        (ref.name, ref.pid, n)
        for n in present
        for ref in running.values()
        if ref.name.startswith("ha") or ref.name == "z2m"
    }
    applied = {(relay.desired[k].container.name, relay.desired[k].container.pid, int(k.devpath[-1]))
               for k in relay.applied}  # fmt: skip
    assert applied == intent


def test_two_rules_for_one_device_share_one_grant() -> None:
    text = (
        RULES
        + """
[[rule]]
name = "zram-read"
target = ["lxc:ha1"]
[rule.match]
subsystem = "block"
kernel = "zram1"
[rule.device]
path = "/dev/readonly/{kernel}"
access = "r"
"""
    )
    relay = Relay(rules(text))
    relay.container_started(HA)
    relay.device_event(zram(1))
    jobs = relay.next_jobs()
    grants = [
        a for j in jobs if isinstance(j, ApplyJob) for a in j.binding.actions
        if isinstance(a, GrantDevice)
    ]  # fmt: skip
    assert [g.device.render() for g in grants] == ["b 253:1 rwm"]  # one grant, the union
    finish(relay, jobs)
    # The rule holding the grant goes: the other one takes it over (re-applied).
    relay.replace_rules(rules(text.replace('kernel = "zram*"', 'kernel = "nothing"')))
    relay.resync_devices([(zram(1), None)])
    log = drain(relay)
    assert "undo lxc:ha1 /devices/virtual/block/zram1 zram" in log
    (binding,) = relay.desired.values()
    assert [a.device.render() for a in binding.actions if isinstance(a, GrantDevice)] == [
        "b 253:1 r"
    ]
    assert relay.is_settled()
