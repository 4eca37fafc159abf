"""The executor's bookkeeping: write-ahead ledger, rollback, leftovers, ordering.

The effector here records calls instead of touching the kernel: what is under test is
the executor's promise that the ledger always says what may have been done. The real
effectors are tested against the real kernel in tests/privileged/.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio

from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.relay import ApplyJob, Binding, UndoJob
from hotrelay.core.rules import RuleSet
from hotrelay.core.uevent import Uevent
from hotrelay.daemon.executor import EffectorError, Executor, JobResult, restore_applied
from hotrelay.daemon.ledger import Ledger

RULES = RuleSet.from_texts(
    [("t.toml", '[[rule]]\nname = "z"\ntarget = ["lxc:*"]\n[rule.match]\nkernel = "zram*"\n')]
)


def binding(name: str = "ha", n: int = 1) -> Binding:
    uevent = Uevent.from_properties(
        {"ACTION": "add", "DEVPATH": f"/devices/virtual/block/zram{n}", "SUBSYSTEM": "block",
         "DEVNAME": f"zram{n}", "MAJOR": "253", "MINOR": str(n)}
    )  # fmt: skip
    return Binding.build(ContainerRef(Runtime.LXC, name, pid=7), uevent, RULES.rules[0])


class Recorder:
    """An effector that logs what it is asked to do and fails on request."""

    def __init__(self, kind: str, log: list[str], ledger: Ledger) -> None:
        self.kind = kind
        self.log = log
        self.ledger = ledger
        self.fail_apply = False
        self.fail_undo = False

    def prepare(self, action: Any) -> dict[str, Any]:
        return {"kind": self.kind, "what": action.describe()}

    async def apply(self, action: Any, record: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        # Write-ahead: while we apply, the ledger already holds this step as pending.
        (entry,) = self.ledger.entries()
        assert entry.record["steps"][-1]["state"] == "pending"
        self.log.append(f"apply {self.kind}")
        if self.fail_apply:
            raise EffectorError(f"{self.kind} refused")
        return {**record, "done": True}

    async def undo(self, record: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        self.log.append(f"undo {self.kind} done={record.get('done', False)}")
        if self.fail_undo:
            raise EffectorError(f"{self.kind} undo refused")

    async def notify(self, action: Any) -> None:
        self.log.append(f"notify {self.kind}")


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.ledger = Ledger(tmp_path / "ledger")
        self.log: list[str] = []
        self.results: list[JobResult] = []
        kinds = ["GrantDevice", "MakeNode", "InjectUevent"]
        self.effectors = {k: Recorder(k, self.log, self.ledger) for k in kinds}
        self.done = trio.Event()

    async def report(self, result: JobResult) -> None:
        self.results.append(result)
        self.done.set()


async def run_jobs(h: Harness, *jobs: ApplyJob | UndoJob) -> None:
    executor = Executor(h.ledger, h.effectors, h.report)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        for job in jobs:
            executor.submit(job)
        with trio.fail_after(5):
            while len(h.results) < len(jobs):
                h.done = trio.Event()
                await h.done.wait()
        nursery.cancel_scope.cancel()


async def test_apply_runs_steps_in_order_and_records_them(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    b = binding()
    await run_jobs(h, ApplyJob(b))
    assert h.log == ["apply GrantDevice", "apply MakeNode", "apply InjectUevent"]
    assert h.results[0].error is None
    (entry,) = h.ledger.entries()
    assert [s["state"] for s in entry.record["steps"]] == ["done"] * 3
    assert restore_applied(h.ledger) == {b.key: b.fingerprint}


async def test_failed_step_rolls_back_grant_first_then_newest_first(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.effectors["MakeNode"].fail_apply = True
    await run_jobs(h, ApplyJob(binding()))
    assert h.log == [
        "apply GrantDevice",
        "apply MakeNode",
        "undo GrantDevice done=True",
        "undo MakeNode done=False",  # the pending step is undone too: it may have half-run
    ]
    (result,) = h.results
    assert result.error is not None
    assert "MakeNode refused" in result.error
    assert not result.leftover
    assert list(h.ledger.entries()) == []


async def test_rollback_that_fails_leaves_a_leftover_in_the_ledger(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.effectors["MakeNode"].fail_apply = True
    h.effectors["GrantDevice"].fail_undo = True
    b = binding()
    await run_jobs(h, ApplyJob(b))
    (result,) = h.results
    assert result.leftover
    assert restore_applied(h.ledger) == {b.key: "partial"}
    # Later the relay asks for an undo, which now succeeds and clears the entry.
    h.effectors["GrantDevice"].fail_undo = False
    h.results.clear()
    h.log.clear()
    await run_jobs(h, UndoJob(b.key))
    assert h.log == ["undo GrantDevice done=True", "undo MakeNode done=False"]
    assert list(h.ledger.entries()) == []


async def test_undo_revokes_first_then_reverses_the_rest_and_forgets(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    b = binding()
    await run_jobs(h, ApplyJob(b), UndoJob(b.key))
    assert h.log[3:] == [
        "undo GrantDevice done=True",
        "undo InjectUevent done=True",
        "undo MakeNode done=True",
    ]
    assert list(h.ledger.entries()) == []


async def test_a_node_the_container_keeps_us_from_removing_never_keeps_the_grant(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    h.effectors["MakeNode"].fail_undo = True
    b = binding()
    await run_jobs(h, ApplyJob(b), UndoJob(b.key))
    assert h.log[3:] == [
        "undo GrantDevice done=True",
        "undo InjectUevent done=True",
        "undo MakeNode done=True",
    ]
    assert h.results[-1].leftover
    (entry,) = h.ledger.entries()
    assert [step["kind"] for step in entry.record["steps"]] == ["MakeNode"]


async def test_undo_of_unknown_binding_is_a_no_op(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await run_jobs(h, UndoJob(binding().key))
    assert h.results[0].error is None
    assert h.log == []


@pytest.mark.parametrize("containers", [1, 3])
async def test_jobs_of_one_container_keep_their_order(tmp_path: Path, containers: int) -> None:
    h = Harness(tmp_path)
    jobs: list[ApplyJob | UndoJob] = []
    for c in range(containers):
        b = binding(f"c{c}", n=c)
        jobs += [ApplyJob(b), UndoJob(b.key)]
    await run_jobs(h, *jobs)
    for c in range(containers):
        mine = [r.job for r in h.results if (r.job.key.container == f"c{c}")]
        assert [type(j).__name__ for j in mine] == ["ApplyJob", "UndoJob"]
    assert list(h.ledger.entries()) == []


async def test_tasks_run_in_the_container_queue_one_queued_at_a_time(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    executor = Executor(h.ledger, h.effectors, h.report)
    container = (Runtime.LXC, "ha")
    ran = trio.Event()

    async def task() -> None:
        # Behind the apply queued first: its steps are all done, in the ledger too.
        (entry,) = h.ledger.entries()
        assert entry.record["complete"]
        h.log.append("task")
        ran.set()

    async def failing() -> None:
        raise OSError("a helper went away")

    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        executor.submit(ApplyJob(binding()))
        assert executor.submit_task(container, task)
        assert not executor.submit_task(container, task)  # one is queued already
        with trio.fail_after(5):
            await ran.wait()
        # A failing task is logged; the queue goes on with the next job.
        assert executor.submit_task(container, failing)
        executor.submit(UndoJob(binding().key))
        with trio.fail_after(5):
            while len(h.results) < 2:
                h.done = trio.Event()
                await h.done.wait()
        nursery.cancel_scope.cancel()
    assert h.log[-4:] == [
        "task",
        "undo GrantDevice done=True",
        "undo InjectUevent done=True",
        "undo MakeNode done=True",
    ]
    assert [r.error for r in h.results] == [None, None]


def test_the_executor_is_the_ledgers_only_writer() -> None:
    """No module but the executor (and the ledger itself) writes or deletes entries: the
    heal pass hands its new records to the executor (record_heals)."""
    root = Path(__file__).resolve().parents[2] / "hotrelay"
    allowed = {root / "daemon" / "executor.py", root / "daemon" / "ledger.py"}
    writers = []
    for path in sorted(root.rglob("*.py")):
        if path in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"ledger\w*\.(put|delete)\(", line, re.IGNORECASE):
                writers.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert writers == []


async def test_heals_are_kept_by_the_executor_step_by_step(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    b = binding()
    await run_jobs(h, ApplyJob(b))
    executor = Executor(h.ledger, h.effectors, h.report)
    (entry,) = h.ledger.entries()
    kept = executor.record_heals(
        [
            (entry.key, 0, "GrantDevice", {"healed": 1}),
            (entry.key, 1, "MakeNode", {"healed": 2}),
            (entry.key, 1, "GrantDevice", {"wrong": "kind"}),  # not that step any more
            ("no such key", 0, "GrantDevice", {}),
        ]
    )
    assert kept == 2
    (entry,) = h.ledger.entries()
    steps = entry.record["steps"]
    assert [s["record"] for s in steps[:2]] == [{"healed": 1}, {"healed": 2}]
