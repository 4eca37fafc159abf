"""Device grants on every cgroup layer a container has.

On hybrid hosts (v1 devices controller plus cgroup2, like the machines hotrelay is
developed on) the kernel checks both layers at open() and mknod(): v1's device list
and v2's device programs must both allow. A grant therefore goes to each layer the
container has, and a revoke takes it out of each; a failure on the second layer
rolls the first back, so a grant is all or nothing.

The daemon keeps the :class:`GrantRecord` it gets back (``to_json()``), hands it to
:meth:`DeviceGrants.revoke` to undo exactly that grant, and passes all current records
to :meth:`DeviceGrants.reconcile` periodically and after a restart, which re-applies
whatever a runtime took away behind our back and counts the heals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hotrelay.core.containers import ContainerRef
from hotrelay.core.device_access import DeviceRule
from hotrelay.effectors import GrantError, cgroup_v1
from hotrelay.effectors.cgroup_tree import heal_tree
from hotrelay.effectors.cgroup_v1 import V1Grant
from hotrelay.effectors.cgroup_v2 import CgroupV2Devices, V2Grant, find_unified_root

__all__ = ["DeviceGrants", "GrantError", "GrantRecord", "Reconciled"]

log = logging.getLogger("hotrelay.effectors.cgroups")


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """One device grant to one container, on each layer it has (None: no such layer).

    Plain data: ``to_json()``/``from_json()`` round-trip through the daemon's ledger.
    Each layer's part says what was there before, so a revoke removes only what the
    grant added.
    """

    container: str
    rule: str
    v1: V1Grant | None = None
    v2: V2Grant | None = None

    @property
    def device_rule(self) -> DeviceRule:
        return DeviceRule.parse(self.rule)

    def to_json(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "rule": self.rule,
            "v1": None if self.v1 is None else self.v1.to_json(),
            "v2": None if self.v2 is None else self.v2.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GrantRecord:
        return cls(
            str(data["container"]),
            str(data["rule"]),
            None if data.get("v1") is None else V1Grant.from_json(data["v1"]),
            None if data.get("v2") is None else V2Grant.from_json(data["v2"]),
        )

    def describe(self) -> str:
        layers = []
        if self.v1 is not None:
            layers.append("v1" if self.v1.changed else "v1 (already allowed)")
        if self.v2 is not None:
            layers.append(
                f"v2 ({len(self.v2.cgroups)} cgroup(s))" if self.v2.changed else "v2 (no program)"
            )
        return f"{self.rule} for {self.container}: {', '.join(layers) or 'no device cgroup'}"


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What a reconcile pass found: updated records, heals done, errors per record."""

    records: tuple[GrantRecord, ...]
    heals: int
    errors: tuple[str, ...] = ()
    checked: int = 0  # cgroups looked at, v1 and v2


class DeviceGrants:
    """Grant, revoke and heal device access on v1 and v2 (both, on hybrid hosts).

    ``devices_root``/``unified_root`` default ("auto") to the host's hierarchies;
    None turns a layer off. Keeps the v2 layer's program fds; ``close()`` releases them and leaves
    every grant in force.
    """

    def __init__(
        self,
        *,
        devices_root: Path | Literal["auto"] | None = "auto",
        unified_root: Path | Literal["auto"] | None = "auto",
    ) -> None:
        if devices_root == "auto":
            devices_root = cgroup_v1.DEVICES_ROOT
        if devices_root is not None and not (devices_root / "devices.list").exists():
            devices_root = None
        if unified_root == "auto":
            unified_root = find_unified_root()
        self.devices_root = devices_root
        self.v2 = CgroupV2Devices(unified_root) if unified_root is not None else None
        self.heals = 0

    def grant(self, container: ContainerRef, rule: DeviceRule) -> GrantRecord:
        """Allow ``rule`` to the container on every layer it has; all or nothing."""
        v1 = None
        if self.devices_root is not None and container.devices_cgroup is not None:
            v1 = cgroup_v1.grant(container.devices_cgroup, rule, root=self.devices_root)
        v2 = None
        if self.v2 is not None and container.unified_cgroup is not None:
            try:
                v2 = self.v2.grant(container, rule)
            except BaseException:
                if v1 is not None:
                    try:
                        cgroup_v1.revoke(v1, root=self.devices_root or cgroup_v1.DEVICES_ROOT)
                    except GrantError as exc:
                        log.error("rolling back v1 after a failed v2 grant: %s", exc)
                raise
        record = GrantRecord(container.target, rule.render(), v1, v2)
        log.info("granted %s", record.describe())
        return record

    def revoke(self, record: GrantRecord) -> None:
        """Undo exactly what ``record``'s grant did, on both layers; idempotent."""
        errors: list[GrantError] = []
        if record.v2 is not None and record.v2.changed and self.v2 is not None:
            try:
                self.v2.revoke(record.v2)
            except GrantError as exc:
                errors.append(exc)
        if record.v1 is not None and record.v1.changed and self.devices_root is not None:
            try:
                cgroup_v1.revoke(record.v1, root=self.devices_root)
            except GrantError as exc:
                errors.append(exc)
        if errors:
            if len(errors) == 1:
                raise errors[0]
            raise GrantError(
                "; ".join(str(e) for e in errors), cgroup=errors[0].cgroup, rule=record.rule
            )
        log.info("revoked %s from %s", record.rule, record.container)

    def reconcile(self, records: Iterable[GrantRecord]) -> Reconciled:
        """Re-apply every recorded grant a runtime took away; count and log the heals.

        Each record is checked on its own: one failing container leaves the others
        healed, and its error is reported in ``errors``.
        """
        records = tuple(records)
        heals = 0
        errors: list[str] = []
        out: list[GrantRecord] = []
        # One bounded walk per container tree, whatever the number of its grants: the
        # container decides how many cgroups it has (see cgroup_tree).
        trees: dict[str, list[Path]] = {}
        for record in records:
            v1 = record.v1
            if v1 is not None and self.devices_root is not None:
                try:
                    tree = trees.get(v1.cgroup)
                    if tree is None:
                        top = cgroup_v1.cgroup_path(v1.cgroup, root=self.devices_root)
                        tree = trees[v1.cgroup] = heal_tree(top)
                    v1, healed = cgroup_v1.heal(v1, root=self.devices_root, tree=tree)
                    heals += healed
                except GrantError as exc:
                    errors.append(str(exc))
            out.append(GrantRecord(record.container, record.rule, v1, record.v2))
        checked = sum(len(tree) for tree in trees.values())
        if self.v2 is not None:
            v2_records = [r.v2 for r in out if r.v2 is not None]
            result = self.v2.reconcile(v2_records)
            checked += result.checked
            heals += result.heals
            errors += result.errors
            by_identity = {
                id(old): new for old, new in zip(v2_records, result.records, strict=True)
            }
            out = [
                GrantRecord(r.container, r.rule, r.v1, by_identity.get(id(r.v2), r.v2)) for r in out
            ]
        self.heals += heals
        if heals:
            log.warning("reconcile healed %d grant(s)", heals)
        log.debug("reconcile: %d grant(s), %d cgroup(s) checked", len(records), checked)
        return Reconciled(tuple(out), heals, tuple(errors), checked)

    def close(self) -> None:
        if self.v2 is not None:
            self.v2.close()
