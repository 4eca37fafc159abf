"""Device-grant latency on cgroup v1, v2 and both, with 1, 10 and 100 grants in place.

For each layer and each number of grants already on the cgroup, one more device is
granted and revoked ``--rounds`` times; the table gives p50/p99 of each call. The
v2 runs start from a runtime-like program (runc's OCI defaults) attached to the
benchmark's own cgroup, so every grant is a real read-back, prepend, load (verifier)
and atomic swap. A second table shows how the v2 program grows per grant. The target
is p99 < 2 ms per grant at 100 grants. Run as root: ``python -m bench cgroups``.

Only cgroups this benchmark creates are ever written to, attached to or detached from.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from hotrelay.core import bpf_program as bp
from hotrelay.core.containers import ContainerRef, Runtime
from hotrelay.core.device_access import DeviceRule
from hotrelay.effectors import cgroup_v1
from hotrelay.effectors.cgroup_v2 import find_unified_root
from hotrelay.effectors.cgroups import DeviceGrants
from hotrelay.kernel import bpf
from hotrelay.testing.sandbox import OCI_DEFAULT_RULES

EXISTING = (1, 10, 100)
TARGET_MS = 2.0
# A major no real device uses here, so the grants never matter to anything running.
BENCH_MAJOR = 240


@dataclass(frozen=True)
class Row:
    layer: str
    existing: int
    grant: list[float]  # milliseconds
    revoke: list[float]


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@contextmanager
def bench_cgroups() -> Iterator[ContainerRef]:
    """A v1 devices cgroup (OCI default whitelist) and a cgroup2 directory with a
    runtime-like device program, both made here and removed at the end."""
    name = f"hotrelay-bench-{os.getpid()}"
    devices = cgroup_v1.DEVICES_ROOT / name
    unified_root = find_unified_root()
    if unified_root is None:
        raise SystemExit("no cgroup2 hierarchy mounted")
    unified = unified_root / name
    devices.mkdir()
    unified.mkdir()
    prog_fd = -1
    try:
        (devices / "devices.deny").write_text("a")
        for rule in OCI_DEFAULT_RULES[1:]:
            (devices / "devices.allow").write_text(rule.render())
        prog_fd = bpf.prog_load(bp.encode(bp.assemble(OCI_DEFAULT_RULES)), name="runtime_like")
        cg = bpf.open_cgroup(unified)
        try:
            bpf.prog_attach(cg, prog_fd, flags=bpf.BPF_F_ALLOW_MULTI)
        finally:
            os.close(cg)
        yield ContainerRef(
            runtime=Runtime.CGROUP,
            name=name,
            pid=os.getpid(),
            devices_cgroup=f"/{name}",
            unified_cgroup=f"/{name}",
            base_device_rules=OCI_DEFAULT_RULES,
        )
    finally:
        if prog_fd >= 0:
            os.close(prog_fd)
        for path in (devices, unified):
            if path.exists():
                path.rmdir()  # detaches whatever programs are still attached


def measure(layer: str, grants: DeviceGrants, ref: ContainerRef, existing: int, rounds: int) -> Row:
    standing = [
        grants.grant(ref, DeviceRule.parse(f"b {BENCH_MAJOR}:{minor} rw"))
        for minor in range(existing)
    ]
    granted: list[float] = []
    revoked: list[float] = []
    rule = DeviceRule.parse(f"b {BENCH_MAJOR}:{existing + 1000} rw")
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            record = grants.grant(ref, rule)
            middle = time.perf_counter()
            grants.revoke(record)
            end = time.perf_counter()
            granted.append((middle - start) * 1000)
            revoked.append((end - middle) * 1000)
    finally:
        for record in reversed(standing):
            grants.revoke(record)
    return Row(layer, existing, granted, revoked)


def program_growth(ref: ContainerRef) -> list[tuple[int, int, int]]:
    """(grants, instructions, xlated bytes) of the program on the cgroup."""
    grants = DeviceGrants(devices_root=None)
    unified_root = find_unified_root()
    assert unified_root is not None
    assert ref.unified_cgroup is not None
    path = unified_root / ref.unified_cgroup.lstrip("/")
    out: list[tuple[int, int, int]] = []
    standing = []
    try:
        for count in range(101):
            if count in (0, 1, 2, 10, 100):
                cg = bpf.open_cgroup(path)
                try:
                    (prog_id,) = bpf.prog_query(cg).prog_ids
                finally:
                    os.close(cg)
                fd = bpf.get_prog_fd_by_id(prog_id)
                try:
                    info, raw = bpf.prog_xlated(fd)
                finally:
                    os.close(fd)
                out.append((count, len(raw) // 8, info.xlated_len))
            standing.append(grants.grant(ref, DeviceRule.parse(f"b {BENCH_MAJOR}:{count} rw")))
    finally:
        for record in reversed(standing):
            grants.revoke(record)
        grants.close()
    return out


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench cgroups")
    parser.add_argument("--rounds", type=int, default=200, help="grant+revoke pairs per row")
    args = parser.parse_args(list(argv or []))
    rows: list[Row] = []
    layers: dict[str, Callable[[], DeviceGrants]] = {
        "v1": lambda: DeviceGrants(unified_root=None),
        "v2": lambda: DeviceGrants(devices_root=None),
        "v1+v2": DeviceGrants,
    }
    with bench_cgroups() as ref:
        for layer, make in layers.items():
            grants = make()
            try:
                for existing in EXISTING:
                    rows.append(measure(layer, grants, ref, existing, args.rounds))
            finally:
                grants.close()
        growth = program_growth(ref)

    lines = [
        f"## Device grant latency ({args.rounds} grant+revoke pairs per row, ms)",
        "",
        "| layer | grants in place | grant p50 | grant p99 | revoke p50 | revoke p99 |"
        " p99 < 2 ms |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        g99 = percentile(row.grant, 0.99)
        lines.append(
            f"| {row.layer} | {row.existing} | {statistics.median(row.grant):.3f} | "
            f"{g99:.3f} | {statistics.median(row.revoke):.3f} | "
            f"{percentile(row.revoke, 0.99):.3f} | {'yes' if g99 < TARGET_MS else 'NO'} |"
        )
    lines += [
        "",
        "## v2 program size (runtime program + one allow block per grant)",
        "",
        "| grants | instructions | xlated bytes |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {count} | {insns} | {size} |" for count, insns, size in growth]
    base = growth[0][1]
    last_count, last_insns, _ = growth[-1]
    per_grant = (last_insns - base) / last_count
    lines += [
        "",
        f"Growth: {per_grant:.2f} instructions ({per_grant * 8:.0f} bytes) per grant, plus a "
        f"fixed {growth[1][1] - base - per_grant:.0f}-instruction header (context loads, "
        "marker) for the first.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(None))
