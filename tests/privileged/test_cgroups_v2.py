"""cgroup v2 device grants (BPF program replacement) against the real kernel.

A runtime-like program, assembled the way runc assembles one, is attached to the
sandbox's own cgroup2 directory; only cgroups the harness or the test created are
ever attached to or detached from. v2-only tests use an "allow-all" v1 sandbox so
the program alone decides; the hybrid test uses a "default-deny" one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hotrelay.core import bpf_program as bp
from hotrelay.core.bpf_program import DeviceRequest
from hotrelay.core.device_access import DeviceRule, DeviceType
from hotrelay.effectors import GrantError
from hotrelay.effectors.cgroup_v2 import CgroupV2Devices
from hotrelay.effectors.cgroups import DeviceGrants, GrantRecord
from hotrelay.kernel import bpf
from hotrelay.testing.fixtures import SandboxFactory
from hotrelay.testing.hotplug import ZramDevice
from hotrelay.testing.inside import open_inside
from hotrelay.testing.sandbox import OCI_DEFAULT_RULES, Sandbox

pytestmark = pytest.mark.privileged

# What runc attaches for the OCI defaults: mknod anything; use null, zero, full,
# random, urandom, tty, console, ptmx and the ptys.
RUNTIME_PROGRAM = bp.assemble(OCI_DEFAULT_RULES)
KMSG = (1, 11)
R, W, M = bp.DEVCG_ACC_READ, bp.DEVCG_ACC_WRITE, bp.DEVCG_ACC_MKNOD


@dataclass
class Attached:
    """Programs the test attached to its own cgroups; detached at teardown."""

    fds: list[tuple[Path, int]]

    def attach(self, cgroup: Path, program: tuple[bp.Insn, ...] = RUNTIME_PROGRAM) -> int:
        fd = bpf.prog_load(bp.encode(program), name="runtime_like")
        cg = bpf.open_cgroup(cgroup)
        try:
            bpf.prog_attach(cg, fd, flags=bpf.BPF_F_ALLOW_MULTI)
        finally:
            os.close(cg)
        self.fds.append((cgroup, fd))
        return bpf.prog_info(fd).id


@pytest.fixture
def attached() -> Iterator[Attached]:
    record = Attached([])
    try:
        yield record
    finally:
        for _, fd in record.fds:
            os.close(fd)
        for cgroup in {cg for cg, _ in record.fds}:
            detach_all(cgroup)


def detach_all(cgroup: Path) -> None:
    """Detach every device program from a cgroup this test created."""
    assert "hotrelay-test" in str(cgroup)
    if not cgroup.is_dir():
        return
    cg = bpf.open_cgroup(cgroup)
    try:
        for prog_id in bpf.prog_query(cg).prog_ids:
            with contextlib.suppress(bpf.BpfError):
                fd = bpf.get_prog_fd_by_id(prog_id)
                try:
                    bpf.prog_detach(cg, fd)
                finally:
                    os.close(fd)
    finally:
        os.close(cg)


@pytest.fixture
def grants() -> Iterator[DeviceGrants]:
    effector = DeviceGrants()
    try:
        yield effector
    finally:
        effector.close()


def mknod_inside(sandbox: Sandbox, name: str, kind: str, major: int, minor: int) -> str:
    path = f"/dev/{name}"
    sandbox.run(["mknod", path, kind, str(major), str(minor)])
    return path


def query(cgroup: Path) -> tuple[int, ...]:
    cg = bpf.open_cgroup(cgroup)
    try:
        return bpf.prog_query(cg).prog_ids
    finally:
        os.close(cg)


def read_back(prog_id: int) -> tuple[bp.Insn, ...]:
    fd = bpf.get_prog_fd_by_id(prog_id)
    try:
        return bp.decode(bpf.prog_xlated(fd)[1])
    finally:
        os.close(fd)


def sample_requests(zram: ZramDevice, count: int = 1200) -> list[DeviceRequest]:
    """Random devices, weighted towards the interesting ones (runtime's rules, zram)."""
    rng = random.Random(5)
    near = [(1, 3), (1, 5), (1, 11), (5, 2), (136, 4), (zram.major, zram.minor)]
    out = []
    for _ in range(count):
        if rng.random() < 0.5:
            major, minor = rng.choice(near)
            minor += rng.choice((0, 0, 1))
        else:
            major, minor = rng.randrange(0, 512), rng.randrange(0, 1 << 20)
        kind = rng.choice((DeviceType.BLOCK, DeviceType.CHAR))
        out.append(DeviceRequest(kind, major, minor, rng.randrange(1, 8)))
    return out


@pytest.fixture
def v2_sandbox(make_sandbox: SandboxFactory, zram: ZramDevice) -> tuple[Sandbox, str, str]:
    """An allow-all v1 sandbox (v2 decides alone) with zram and kmsg nodes inside."""
    sandbox = make_sandbox(devices="allow-all")
    node = mknod_inside(sandbox, zram.name, "b", zram.major, zram.minor)
    kmsg = mknod_inside(sandbox, "kmsg", "c", *KMSG)
    return sandbox, node, kmsg


def test_grant_and_revoke_replace_the_runtime_program(
    v2_sandbox: tuple[Sandbox, str, str],
    zram: ZramDevice,
    attached: Attached,
    grants: DeviceGrants,
) -> None:
    sandbox, node, kmsg = v2_sandbox
    original_id = attached.attach(sandbox.unified_cgroup)
    assert open_inside(sandbox, node, read=4096) == errno.EPERM
    assert open_inside(sandbox, kmsg) == errno.EPERM

    rule = DeviceRule.parse(f"b {zram.major}:{zram.minor} rw")
    record = grants.grant(sandbox.ref(), rule)
    assert record.v2 is not None
    assert record.v2.changed
    assert GrantRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    (granted_id,) = query(sandbox.unified_cgroup)
    assert granted_id != original_id
    assert open_inside(sandbox, node, os.O_RDWR, read=4096) == 0
    assert open_inside(sandbox, "/dev/null", os.O_RDWR) == 0
    assert open_inside(sandbox, kmsg) == errno.EPERM

    # The granted program, read back from the kernel: granted-or-original everywhere.
    granted = read_back(granted_id)
    requests = sample_requests(zram)
    for request in requests:
        expected = (
            rule.matches(request.kind, request.major, request.minor)
            and request.access & (R | W) == request.access
        ) or bp.rules_allow(OCI_DEFAULT_RULES, request)
        assert bp.verdict(granted, request) == expected, request

    grants.revoke(record)
    assert query(sandbox.unified_cgroup) == (original_id,)  # the very same program
    restored = read_back(original_id)
    assert restored == RUNTIME_PROGRAM
    for request in requests:
        assert bp.verdict(restored, request) == bp.rules_allow(OCI_DEFAULT_RULES, request)
    assert open_inside(sandbox, node, read=4096) == errno.EPERM
    assert open_inside(sandbox, "/dev/null", os.O_RDWR) == 0
    assert open_inside(sandbox, kmsg) == errno.EPERM


def test_many_grants_share_one_program_per_original(
    v2_sandbox: tuple[Sandbox, str, str],
    zram: ZramDevice,
    attached: Attached,
    grants: DeviceGrants,
) -> None:
    sandbox, node, _ = v2_sandbox
    original_id = attached.attach(sandbox.unified_cgroup)
    records = [
        grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor + 1 + i} r"))
        for i in range(5)
    ]
    zram_record = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} r"))
    (current,) = query(sandbox.unified_cgroup)
    held = bp.split_prepended(read_back(current))
    assert held is not None
    assert len(held.grants) == 6
    assert held.original == RUNTIME_PROGRAM
    for record in records:
        grants.revoke(record)
    assert open_inside(sandbox, node, read=4096) == 0
    grants.revoke(zram_record)
    assert query(sandbox.unified_cgroup) == (original_id,)
    assert open_inside(sandbox, node, read=4096) == errno.EPERM


LOOP = """
import os, select, sys
opens = failures = leaks = 0
errors = set()
print("ready", flush=True)
while True:
    for _ in range(100):
        try:
            os.close(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            failures += 1
            errors.add(exc.errno)
        try:
            os.close(os.open(sys.argv[1], os.O_RDONLY))
            leaks += 1
        except OSError:
            pass
        opens += 1
    if select.select([0], [], [], 0)[0]:
        break
print(opens, failures, leaks, sorted(errors), flush=True)
"""


def test_swap_is_atomic(
    v2_sandbox: tuple[Sandbox, str, str],
    zram: ZramDevice,
    attached: Attached,
    grants: DeviceGrants,
) -> None:
    sandbox, _, kmsg = v2_sandbox
    attached.attach(sandbox.unified_cgroup)
    # /dev/null must open every time, and /dev/kmsg never: a swap that went through
    # a moment with the new program missing, or with no program at all, shows up.
    opener = sandbox.popen([sys.executable, "-c", LOOP, kmsg], stdin=subprocess.PIPE)
    assert opener.stdout is not None
    assert opener.stdin is not None
    assert opener.stdout.readline() == b"ready\n"
    rule = DeviceRule.parse(f"b {zram.major}:{zram.minor} rw")
    ref = sandbox.ref()
    for _ in range(1000):
        grants.revoke(grants.grant(ref, rule))
    opener.stdin.close()
    opens, failures, leaks, errors = opener.stdout.readline().decode().split(" ", 3)
    assert opener.wait(timeout=30) == 0
    assert (int(failures), int(leaks), errors.strip()) == (0, 0, "[]")
    assert int(opens) > 1000  # it really was opening all along


def test_no_program_means_nothing_to_change(
    v2_sandbox: tuple[Sandbox, str, str],
    zram: ZramDevice,
    attached: Attached,
    grants: DeviceGrants,
) -> None:
    sandbox, node, _ = v2_sandbox
    record = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))
    assert record.v2 is not None
    assert not record.v2.changed
    assert query(sandbox.unified_cgroup) == ()  # never a block-all program
    assert open_inside(sandbox, node, read=4096) == 0

    # A program that appears later (the runtime attaches one): reconcile grants there.
    attached.attach(sandbox.unified_cgroup)
    assert open_inside(sandbox, node) == errno.EPERM
    result = grants.reconcile([record])
    assert (result.heals, result.errors) == (1, ())
    assert open_inside(sandbox, node, read=4096) == 0
    grants.revoke(result.records[0])
    assert open_inside(sandbox, node) == errno.EPERM
    grants.revoke(record)  # the stale record is harmless
    assert open_inside(sandbox, node) == errno.EPERM


def test_reconcile_heals_after_a_runtime_update(
    v2_sandbox: tuple[Sandbox, str, str],
    zram: ZramDevice,
    attached: Attached,
    grants: DeviceGrants,
) -> None:
    sandbox, node, kmsg = v2_sandbox
    attached.attach(sandbox.unified_cgroup)
    record = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))
    assert grants.reconcile([record]).heals == 0

    # What `runc update` does: attach a freshly built program, detach the old one.
    (ours,) = query(sandbox.unified_cgroup)
    new_id = attached.attach(sandbox.unified_cgroup)
    detach_one(sandbox.unified_cgroup, ours)
    assert open_inside(sandbox, node) == errno.EPERM

    result = grants.reconcile([record])
    assert (result.heals, result.errors) == (1, ())
    assert open_inside(sandbox, node, read=4096) == 0
    assert grants.reconcile(result.records).heals == 0

    # A restarted daemon (no fds, no memory) adopts our program: it learns the grants it
    # holds from the program itself, adds one, and revokes both.
    grants.close()
    fresh = DeviceGrants()
    try:
        kmsg_record = fresh.grant(sandbox.ref(), DeviceRule.parse(f"c {KMSG[0]}:{KMSG[1]} r"))
        assert open_inside(sandbox, kmsg) == 0
        assert open_inside(sandbox, node, read=4096) == 0  # the adopted grant is kept
        fresh.revoke(result.records[0])
        assert open_inside(sandbox, node) == errno.EPERM
        assert open_inside(sandbox, kmsg) == 0
        fresh.revoke(kmsg_record)
    finally:
        fresh.close()
    (restored,) = query(sandbox.unified_cgroup)
    assert restored != new_id  # reloaded from the code it held...
    assert read_back(restored) == RUNTIME_PROGRAM  # ...which is the runtime's, unchanged
    assert open_inside(sandbox, node) == errno.EPERM
    assert open_inside(sandbox, kmsg) == errno.EPERM
    assert open_inside(sandbox, "/dev/null") == 0


def test_descendants_and_the_64_program_limit(
    v2_sandbox: tuple[Sandbox, str, str],
    zram: ZramDevice,
    attached: Attached,
    grants: DeviceGrants,
) -> None:
    sandbox, node, kmsg = v2_sandbox
    top = sandbox.unified_cgroup
    child = top / "inner"
    child.mkdir()
    # One short of the kernel's limit: swaps still work, and a grant never adds one.
    originals = {attached.attach(top) for _ in range(bpf.MAX_PROGS_PER_CGROUP - 1)}
    child_original = attached.attach(child)

    record = grants.grant(sandbox.ref(), DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))
    assert record.v2 is not None
    assert [c.rsplit("/", 1)[-1] for c in record.v2.cgroups] == [top.name, "inner"]
    assert len(query(top)) == bpf.MAX_PROGS_PER_CGROUP - 1
    assert not set(query(top)) & originals
    assert query(child) != (child_original,)
    assert open_inside(sandbox, node, read=4096) == 0

    # At the limit the kernel refuses even a one-for-one REPLACE (it checks the count
    # first): a clear error, and the cgroup is left exactly as it was.
    extra = attached.attach(top)
    before = query(top)
    with pytest.raises(GrantError, match="limit") as info:
        grants.grant(sandbox.ref(), DeviceRule.parse(f"c {KMSG[0]}:{KMSG[1]} r"))
    assert info.value.errno == errno.E2BIG
    assert sandbox.name in str(info.value)
    assert query(top) == before
    # The newcomer does not hold the grant, and cannot be swapped: zram is denied
    # again, and reconcile says why instead of widening anything.
    assert open_inside(sandbox, node) == errno.EPERM
    result = grants.reconcile([record])
    assert result.heals == 0
    assert "limit" in result.errors[0]
    with pytest.raises(GrantError, match="limit"):
        grants.revoke(record)  # restoring needs a swap too: our programs stay

    detach_one(top, extra)
    assert open_inside(sandbox, node, read=4096) == 0
    grants.revoke(record)
    assert set(query(top)) == originals
    assert query(child) == (child_original,)
    assert open_inside(sandbox, node) == errno.EPERM
    assert open_inside(sandbox, kmsg) == errno.EPERM


def detach_one(cgroup: Path, prog_id: int) -> None:
    assert "hotrelay-test" in str(cgroup)
    cg = bpf.open_cgroup(cgroup)
    fd = bpf.get_prog_fd_by_id(prog_id)
    try:
        bpf.prog_detach(cg, fd)
    finally:
        os.close(fd)
        os.close(cg)


def test_hybrid_grant_needs_both_layers(
    make_sandbox: SandboxFactory,
    zram: ZramDevice,
    attached: Attached,
    grants: DeviceGrants,
) -> None:
    sandbox = make_sandbox(devices="default-deny")
    node = mknod_inside(sandbox, zram.name, "b", zram.major, zram.minor)
    attached.attach(sandbox.unified_cgroup)
    rule = DeviceRule.parse(f"b {zram.major}:{zram.minor} rw")

    # One layer alone is not enough: the kernel checks both.
    v2_only = CgroupV2Devices()
    try:
        alone = v2_only.grant(sandbox.ref(), rule)
        assert open_inside(sandbox, node) == errno.EPERM
        v2_only.revoke(alone)
    finally:
        v2_only.close()

    record = grants.grant(sandbox.ref(), rule)
    assert record.v1 is not None
    assert record.v1.changed
    assert record.v2 is not None
    assert record.v2.changed
    assert open_inside(sandbox, node, os.O_RDWR, read=4096) == 0
    grants.revoke(record)
    assert open_inside(sandbox, node) == errno.EPERM
    assert open_inside(sandbox, "/dev/null", os.O_RDWR) == 0


# -- errors ------------------------------------------------------------------------------


def test_vanished_cgroup_is_a_clear_error(
    make_sandbox: SandboxFactory, zram: ZramDevice, grants: DeviceGrants
) -> None:
    sandbox = make_sandbox(devices="allow-all")
    ref = sandbox.ref()
    sandbox.close()
    with pytest.raises(GrantError, match="no such") as info:
        grants.grant(ref, DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))
    assert info.value.errno == errno.ENOENT
    assert sandbox.name in str(info.value)
    host = dataclasses.replace(ref, devices_cgroup=None, unified_cgroup="/")
    with pytest.raises(GrantError, match="root cgroup"):
        grants.grant(host, DeviceRule.parse(f"b {zram.major}:{zram.minor} rw"))


def test_verifier_rejection_is_reported_and_nothing_changes(
    v2_sandbox: tuple[Sandbox, str, str],
    zram: ZramDevice,
    attached: Attached,
    grants: DeviceGrants,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox, node, _ = v2_sandbox
    original_id = attached.attach(sandbox.unified_cgroup)
    rule = DeviceRule.parse(f"b {zram.major}:{zram.minor} rw")

    def broken(original: object, grants_: object) -> bytes:
        return bp.encode([bp.Insn(0xBF, 0, 7), bp.Insn(0x95)])  # r0 = r7: r7 was never set

    with monkeypatch.context() as patch:
        patch.setattr(bp, "prepend_code", broken)
        with pytest.raises(GrantError) as info:
            grants.grant(sandbox.ref(), rule)
    message = str(info.value)
    assert "verifier log" in message
    assert "R7 !read_ok" in info.value.log
    assert sandbox.name in message
    assert rule.render() in message
    assert query(sandbox.unified_cgroup) == (original_id,)
    assert open_inside(sandbox, node) == errno.EPERM

    # The same effector goes on working.
    record = grants.grant(sandbox.ref(), rule)
    assert open_inside(sandbox, node, read=4096) == 0
    grants.revoke(record)


EPERM_CHILD = """
import json, sys
from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.effectors import GrantError
from hotrelay.effectors.cgroups import DeviceGrants
spec = json.loads(sys.argv[1])
ref = ContainerRef(
    Runtime.PID, "x", spec["pid"], devices_cgroup=spec["v1"], unified_cgroup=spec["v2"]
)
for layer in ("v1", "v2"):
    grants = DeviceGrants(
        devices_root=None if layer == "v2" else "auto",
        unified_root=None if layer == "v1" else "auto",
    )
    try:
        grants.grant(ref, DeviceRule.parse(spec["rule"]))
        print(json.dumps({"layer": layer, "ok": True}))
    except GrantError as exc:
        print(json.dumps({"layer": layer, "errno": exc.errno, "message": str(exc)}))
"""


def test_eperm_from_the_kernel_is_a_clear_error(
    make_sandbox: SandboxFactory, zram: ZramDevice, attached: Attached
) -> None:
    sandbox = make_sandbox(devices="default-deny")
    node = mknod_inside(sandbox, zram.name, "b", zram.major, zram.minor)
    attached.attach(sandbox.unified_cgroup)
    ref = sandbox.ref()
    spec = {
        "pid": ref.pid,
        "v1": ref.devices_cgroup,
        "v2": ref.unified_cgroup,
        "rule": f"b {zram.major}:{zram.minor} rw",
    }
    # Root without capabilities: bpf() and devices.allow both answer EPERM.
    result = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
         sys.executable, "-c", EPERM_CHILD, json.dumps(spec)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["layer"] for o in outcomes] == ["v1", "v2"]
    for outcome in outcomes:
        assert outcome.get("errno") == errno.EPERM, outcome
        assert "not permitted" in outcome["message"]
        assert "CAP_SYS_ADMIN" in outcome["message"]
        assert sandbox.name in outcome["message"]
    assert open_inside(sandbox, node) == errno.EPERM
