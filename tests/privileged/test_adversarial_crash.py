"""Crash consistency: kill -9 in every step of a random history, then check the outcome.

Each step does one random thing (plug or unplug zram devices, start or stop a
container, user-namespaced or not, some with a cgroup-v2 device program) and SIGKILLs
the daemon at a random moment while it works on it: either after a random delay, or
at a named point inside an action (``HOTRELAY_TEST_CRASH_AT``: after a grant but
before its ledger record, after a node but before the next step is recorded, ...).
The daemon is restarted on the same state directory, and once it has settled, what
every running container sees must be exactly what the rules say:

- each present device: its node opens and reads inside, its symlink is there, its
  devices.list has the entry, and (v2) the program on the cgroup is ours, one, with
  the runtime's original instructions unchanged behind our prefix;
- each device that left: no node, no devices.list entry, no grant in the program;
- the ledger: one complete entry per (running container, present device), and none
  for a container that is gone.

``HOTRELAY_CRASH_STEPS`` (default 8) sets the number of steps; ``HOTRELAY_SEED`` makes
a failing history repeatable (the seed is printed).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from adversarial_support import (
    RUNTIME_PROGRAM,
    about,
    children,
    host_has,
    inside_state,
    intent_violations,
    ledger_for,
    unexpected_tracebacks,
    v2_attach,
    v2_programs,
)

from hotrelay.core import bpf_program as bp
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.sandbox import IdMap, Sandbox

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

PREFIX = "crash"
RULES = {
    "10-crash.toml": f"""
[[rule]]
name = "crash"
target = "cgroup:/hotrelay-test/{PREFIX}-{os.getpid()}-*"
[rule.match]
subsystem = "block"
kernel = "zram*"
[rule.device]
path = "/dev/crash/{{kernel}}"
mode = "0660"
symlinks = ["crash-by-name/{{kernel}}"]
"""
}
# No runtime watchers: the sandboxes are cgroup: targets, and a killed daemon must not
# leave watcher processes (``podman events``) behind.
CONFIG = "heal_interval = 1\n[runtimes]\nenabled = []\n"
CRASH_POINTS = (
    "recorded:GrantDevice",
    "applied:GrantDevice",
    "recorded:MakeNode",
    "applied:MakeNode",
    "recorded:MakeSymlink",
    "applied:MakeSymlink",
    "applied:InjectUevent",
)


@dataclass
class World:
    """What the test made, so it knows the intent (and can take it all down)."""

    rng: random.Random
    devices: list[ZramDevice] = field(default_factory=list)
    gone: list[ZramDevice] = field(default_factory=list)
    boxes: list[Sandbox] = field(default_factory=list)
    with_program: set[str] = field(default_factory=set)  # sandbox names
    stopped_pids: set[int] = field(default_factory=set)

    def plug(self) -> str:
        added = [ZramDevice().add() for _ in range(self.rng.randint(1, 2))]
        self.devices += added
        return "plug " + " ".join(d.name for d in added)

    def unplug(self) -> str:
        device = self.devices.pop(self.rng.randrange(len(self.devices)))
        device.remove()
        self.gone.append(device)
        return f"unplug {device.name}"

    def start(self) -> str:
        userns = IdMap(0, 100000, 65536) if self.rng.random() < 0.4 else None
        box = Sandbox.create(userns=userns, devices="default-deny", name_prefix=PREFIX)
        self.boxes.append(box)
        if self.rng.random() < 0.5:
            v2_attach(box)
            self.with_program.add(box.name)
        return f"start {box.name}{' (userns)' if userns else ''}"

    def stop(self) -> str:
        box = self.boxes.pop(self.rng.randrange(len(self.boxes)))
        self.stopped_pids.add(box.pid)
        box.close()
        return f"stop {box.name}"

    def random_step(self) -> str:
        choices = ["plug", "start"]
        if self.devices:
            choices += ["unplug", "unplug"]
        if len(self.boxes) > 1:
            choices.append("stop")
        action = self.rng.choice(choices)
        step: str = getattr(self, action)()
        return step

    def close(self) -> None:
        """Everything, even when one of them fails to go."""
        with ExitStack() as stack:
            for box in self.boxes:
                stack.callback(box.close)
            for device in self.devices + self.gone:
                stack.callback(device.remove)


@pytest.fixture
def world() -> Iterator[World]:
    seed = int(os.environ.get("HOTRELAY_SEED", "0")) or time.time_ns() % 2**32
    print(f"HOTRELAY_SEED={seed}")
    made = World(random.Random(seed))
    try:
        yield made
    finally:
        made.close()


def settle(daemon: RunningDaemon, world: World, timeout: float = 30.0) -> None:
    last: list[str] = []

    def right() -> bool:
        nonlocal last
        last = intent_violations(
            daemon,
            boxes=world.boxes,
            devices=world.devices,
            gone=world.gone,
            with_program=world.with_program,
            node_dir="/dev/crash",
            link_dir="/dev/crash-by-name",
            rule="crash",
        )
        return not last

    try:
        eventually(right, timeout=timeout, every=0.2)
    except TimeoutError:
        pytest.fail(
            "not as the rules say after the restart:\n  "
            + "\n  ".join(last)
            + "\nwhat the daemon said about it:\n"
            + about(daemon, last)
        )


def test_kill_9_at_random_points_always_ends_as_the_rules_say(world: World) -> None:
    steps = int(os.environ.get("HOTRELAY_CRASH_STEPS", "8"))
    rng = world.rng
    with ExitStack() as stack:
        world.start()
        world.plug()
        daemon = RunningDaemon(RULES, config=CONFIG)
        stack.callback(daemon.close)
        daemon.start()
        settle(daemon, world)
        history = []
        for number in range(steps):
            if rng.random() < 0.5:
                # A plain kill -9 while the daemon works on this step.
                step = world.random_step()
                delay = rng.uniform(0, 0.15)
                time.sleep(delay)
                daemon.kill9()
                how = f"kill -9 after {delay * 1000:.0f} ms"
            else:
                # Down while the step happens; restarted with a crash point armed, so it
                # dies inside the first action of that kind its reconciliation runs.
                daemon.kill9()
                step = world.random_step()
                point = rng.choice(CRASH_POINTS)
                daemon.start(env={"HOTRELAY_TEST_CRASH_AT": point}, wait=False)
                assert daemon.process is not None
                try:
                    status: int | None = daemon.process.wait(5)
                except subprocess.TimeoutExpired:
                    status = None  # it never reached that point: kill it ourselves
                daemon.kill9()  # (also closes its log)
                how = f"crash at {point} ({'hit' if status == -9 else 'not reached'})"
            history.append(f"{number}: {step}; {how}")
            print(history[-1])
            daemon.start()
            settle(daemon, world)
        assert daemon.process is not None
        assert not [c for c in children(daemon.process.pid) if c.state == "Z"]
        assert unexpected_tracebacks(daemon.log()) == [], "\n".join(history)
        # Finally everything leaves: nothing of ours stays anywhere.
        while world.devices:
            world.unplug()
        settle(daemon, world)
        for box in world.boxes:
            if box.name in world.with_program:
                # The runtime's program again, or ours granting only devices still
                # present (the host's own zram devices match the rule too).
                (program,) = v2_programs(box)
                found = bp.split_prepended(program)
                if found is None:
                    assert program == RUNTIME_PROGRAM
                else:
                    assert found.original == RUNTIME_PROGRAM
                    for grant in found.grants:
                        assert grant.major is not None
                        assert grant.minor is not None
                        assert host_has(grant.major, grant.minor), grant


SINGLE = """
[[rule]]
name = "single"
target = "pid:{pid}"
[rule.match]
kernel = "{name}"
[rule.device]
path = "/dev/single/{{kernel}}"
symlinks = ["single-by-name/{{kernel}}"]
"""


@pytest.mark.parametrize(
    ("point", "userns"),
    [
        ("applied:MakeNode", False),
        ("applied:MakeNode", True),
        ("applied:MakeSymlink", False),
        ("applied:MakeSymlink", True),
        ("recorded:MakeNode", False),
        ("applied:InjectUevent", False),
    ],
)
def test_kill_9_after_a_node_or_link_is_made_but_not_recorded(point: str, userns: bool) -> None:
    """SIGKILL after the node (or symlink) exists in the container but before the ledger
    says so. Before the fix the restarted daemon found it in its own way: every apply
    failed with "already exists ... not created by hotrelay", retried forever, and the
    container never got its device. test_daemon_e2e.py covers the grant's crash points."""
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        box = Sandbox.create(userns=IdMap(0, 100000, 65536) if userns else None)
        stack.callback(box.close)
        rules = {"10-single.toml": SINGLE.format(pid=box.pid, name=zram.name)}
        daemon = RunningDaemon(rules, config=CONFIG)
        stack.callback(daemon.close)
        daemon.start(env={"HOTRELAY_TEST_CRASH_AT": point}, wait=False)
        assert daemon.wait_exit() == -9
        daemon.start()
        node, link = f"/dev/single/{zram.name}", f"/dev/single-by-name/{zram.name}"

        def relayed() -> bool:
            entries = ledger_for(daemon, zram.devpath)
            return (
                len(entries) == 1
                and entries[0]["record"]["complete"]
                and inside_state(box, [node, link]) == {node: "ok", link: "symlink"}
            )

        eventually(relayed, timeout=5)
        assert "already exists" not in daemon.log()
        zram.remove()

        def gone() -> bool:
            if Path("/sys/block", zram.name).exists():
                return True  # the name was taken again by another device: it is relayed
            return ledger_for(daemon, zram.devpath) == [] and inside_state(box, [node, link]) == {
                node: "absent",
                link: "absent",
            }

        eventually(gone, timeout=10)


def test_kill_9_after_a_v2_grant_then_unplug_leaves_no_grant_in_the_program() -> None:
    """SIGKILL after the grant is in the container's cgroup-v2 device program but before
    the ledger says so, and the device leaves while the daemon is down. The restart
    undoes the unfinished grant: before the fix only on v1 (which on this hybrid host
    hides it), so the v2 program kept allowing the device for good, and on a pure
    cgroup2 host nothing else would have closed it."""
    with ExitStack() as stack:
        zram = stack.enter_context(ZramDevice())
        box = Sandbox.create()
        stack.callback(box.close)
        v2_attach(box)
        rules = {"10-single.toml": SINGLE.format(pid=box.pid, name=zram.name)}
        daemon = RunningDaemon(rules, config=CONFIG)
        stack.callback(daemon.close)
        daemon.start(env={"HOTRELAY_TEST_CRASH_AT": "applied:GrantDevice"}, wait=False)
        assert daemon.wait_exit() == -9
        (program,) = v2_programs(box)
        found = bp.split_prepended(program)
        assert found is not None  # the crash left our grant in the program
        assert [(g.major, g.minor) for g in found.grants] == [(zram.major, zram.minor)]
        zram.remove()
        daemon.start()
        eventually(lambda: ledger_for(daemon, zram.devpath) == [], timeout=10)
        eventually(lambda: v2_programs(box) == (RUNTIME_PROGRAM,), timeout=5)
