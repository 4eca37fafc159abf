"""A container that makes thousands of child cgroups costs the heal pass no more.

A container owns the cgroups below its own. Before the bound, the heal pass walked
each container's whole tree for every grant, every few seconds, inside the daemon's
event loop: 2,000 empty child cgroups stalled the pump 631 ms per pass, and more of
them tripped the watchdog. Now the pass looks at no more than ``HEAL_TREE_LIMIT``
cgroups of each tree (parents first), once per tree whatever the number of grants.
Here a real daemon heals a real sandbox that made 2,000 child cgroups in both of its
hierarchies; the daemon's own debug log says how many cgroups each pass checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest
from adversarial_support import inside_state, ours, zram_rules

from hotrelay.effectors.cgroup_tree import HEAL_TREE_LIMIT
from hotrelay.testing.daemon import RunningDaemon, eventually
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.sandbox import Sandbox

pytestmark = pytest.mark.privileged

CHILDREN = 2000
CONFIG = "heal_interval = 0.2\n[runtimes]\nenabled = []\n"
CHECKED = re.compile(r"reconcile: (\d+) grant\(s\), (\d+) cgroup\(s\) checked")


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def all_in_state(box: Sandbox, paths: list[str], state: str) -> bool:
    return set(inside_state(box, paths).values()) == {state}


def checked_per_pass(log: str) -> list[int]:
    return [int(cgroups) for _, cgroups in CHECKED.findall(log)]


def test_thousands_of_child_cgroups_cost_the_heal_pass_a_bounded_walk(stack: ExitStack) -> None:
    zram = stack.enter_context(ZramDevice())
    daemon = stack.enter_context(
        RunningDaemon(zram_rules(ours("manycg"), kernel=zram.name), config=CONFIG)
    )
    box = Sandbox.create(devices="default-deny", name_prefix="manycg")
    stack.callback(box.close)
    node = f"/dev/disks/{zram.name}"
    eventually(partial(all_in_state, box, [node], "ok"), timeout=5)

    # The container's doing: 2,000 child cgroups in each hierarchy (they inherit the
    # grant on v1). Our sandbox's own cgroups: removed with it.
    for parent in (box.devices_cgroup, box.unified_cgroup):
        for i in range(CHILDREN):
            (parent / f"c{i:04d}").mkdir()
    seen = len(checked_per_pass(daemon.log()))
    # A runtime takes the grant away in the first child: still healed.
    first = box.devices_cgroup / "c0000"
    (first / "devices.deny").write_text(f"b {zram.major}:{zram.minor} rwm")

    def healed() -> bool:
        return f"b {zram.major}:{zram.minor} rwm" in (first / "devices.list").read_text()

    eventually(healed, timeout=5)
    eventually(lambda: len(checked_per_pass(daemon.log())) >= seen + 5, timeout=10)
    passes = checked_per_pass(daemon.log())[seen:]
    # v1 and v2 trees each cut at the limit, whatever the container made.
    assert passes, "no heal pass logged"
    assert max(passes) <= 2 * HEAL_TREE_LIMIT, passes
    assert f"has more than {HEAL_TREE_LIMIT} cgroups in its tree" in daemon.log()
    # And the device still works from inside.
    assert all_in_state(box, [node], "ok")
    assert daemon.process is not None
    assert daemon.process.poll() is None


def test_the_walk_is_parents_first_and_cut_at_the_limit(tmp_path: Path) -> None:
    from hotrelay.effectors.cgroup_tree import walk_tree

    for i in range(3):
        for j in range(3):
            (tmp_path / f"a{i}" / f"b{j}").mkdir(parents=True)
    tree, cut = walk_tree(tmp_path)
    assert not cut
    assert tree[0] == tmp_path
    assert tree[1:4] == [tmp_path / f"a{i}" for i in range(3)]
    assert len(tree) == 13
    tree, cut = walk_tree(tmp_path, limit=5)
    assert cut
    assert tree == [tmp_path, *(tmp_path / f"a{i}" for i in range(3)), tmp_path / "a0" / "b0"]
