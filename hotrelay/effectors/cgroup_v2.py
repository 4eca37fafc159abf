"""Device grants on cgroup v2: replace each device program with one that also allows.

On cgroup v2 the runtime's device policy is a BPF program attached to the container's
cgroup. Programs attached together are ANDed, so adding an "allow" program never
widens anything: a grant has to *replace* every program that decides for the
container. For each cgroup of the container's tree that has device programs:

1. read each program back (its verified instructions); if it uses maps or cannot be
   loaded again as read back, rebuild it from the runtime's own rule list instead,
   and log that;
2. build the granted version: allow blocks for *all* current grants of that cgroup in
   front of the original instructions (``core.bpf_program.prepend_grants``), so the
   cgroup keeps one program per original, never one per grant;
3. swap it in atomically (``BPF_F_ALLOW_MULTI | BPF_F_REPLACE``, or a plain re-attach in
   the exclusive modes, which replaces by itself);
4. keep the original program's fd, so the last revoke puts back the very same program
   (same id). After a restart the original is recovered from our own program, whose
   prefix is recognisable and followed by the original's instructions unchanged.

No program anywhere in the tree means the runtime lets the container use every
device on v2: a grant then changes nothing (it never creates a block-all program).
``reconcile`` notices programs swapped in or removed behind our back (systemd's on
``systemctl daemon-reload``; ``runc update`` leaves them alone), and programs that
appeared later, and re-applies.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotrelay.core import bpf_program as bp
from hotrelay.core.containers import ContainerRef
from hotrelay.core.device_access import DeviceRule
from hotrelay.effectors import GrantError
from hotrelay.effectors.cgroup_tree import heal_tree, walk_tree
from hotrelay.kernel import bpf

__all__ = [
    "CgroupV2Devices",
    "V2Grant",
    "V2Reconciled",
    "find_unified_root",
    "parse_rule",
    "render_rule",
]

log = logging.getLogger("hotrelay.effectors.cgroup_v2")

PROGRAM_NAME = "hotrelay_grant"
_REPLACE_RETRIES = 3


def find_unified_root() -> Path | None:
    """Where cgroup2 is mounted: /sys/fs/cgroup/unified on hybrid hosts, else the root."""
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.procs").exists() and (candidate / "cgroup.controllers").exists():
            return candidate
    return None


def render_rule(rule: DeviceRule) -> str:
    """``allow c 1:3 rwm`` / ``deny a *:* rwm``: a rule with its action, for records."""
    return f"{'allow' if rule.allow else 'deny'} {rule.render()}"


def parse_rule(text: str) -> DeviceRule:
    action, _, line = text.partition(" ")
    if action not in ("allow", "deny"):
        raise ValueError(f"base rule {text!r} does not start with allow or deny")
    return DeviceRule.parse(line, allow=action == "allow")


@dataclass(frozen=True, slots=True)
class V2Grant:
    """A grant on one container's cgroup2 tree.

    ``cgroups``: the cgroups (relative to the cgroup2 root) whose device programs now
    hold the grant; empty when no program decides there (nothing was changed).
    ``base_rules``: the runtime's own rules (``render_rule`` form), to rebuild a
    program that cannot be read back, also after a restart.
    """

    cgroup: str
    rule: str
    cgroups: tuple[str, ...]
    base_rules: tuple[str, ...] = ()

    @property
    def device_rule(self) -> DeviceRule:
        return DeviceRule.parse(self.rule)

    @property
    def changed(self) -> bool:
        return bool(self.cgroups)

    def to_json(self) -> dict[str, Any]:
        return {
            "cgroup": self.cgroup,
            "rule": self.rule,
            "cgroups": list(self.cgroups),
            "base_rules": list(self.base_rules),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> V2Grant:
        return cls(
            str(data["cgroup"]),
            str(data["rule"]),
            tuple(str(c) for c in data["cgroups"]),
            tuple(str(r) for r in data.get("base_rules", ())),
        )


@dataclass(slots=True)
class _Program:
    fd: int
    id: int


@dataclass(slots=True)
class _Slot:
    """One program position on a cgroup: what was there, and what is there now."""

    original: _Program | None  # None when adopted after a restart (only its code is known)
    original_code: bytes  # what grants are prepended to: read back, or rebuilt
    rebuilt: bool
    current: _Program
    holds: frozenset[DeviceRule]  # the grants the current program contains


@dataclass(slots=True)
class _CgroupState:
    path: Path
    relative: str
    attach_flags: int = 0
    slots: list[_Slot] = field(default_factory=list)
    grants: list[DeviceRule] = field(default_factory=list)  # a multiset: one per record
    ignored: set[int] = field(default_factory=set)  # unreadable programs we must leave be


@dataclass(frozen=True, slots=True)
class V2Reconciled:
    """Records with up-to-date ``cgroups``, heals done, and errors (one per tree)."""

    records: tuple[V2Grant, ...]
    heals: int
    errors: tuple[str, ...] = ()
    checked: int = 0  # cgroups looked at


class _Unreadable(Exception):
    pass


def _dedupe(rules: Iterable[DeviceRule]) -> tuple[DeviceRule, ...]:
    return tuple(dict.fromkeys(rules))


def _close(program: _Program | None) -> None:
    if program is not None:
        with contextlib.suppress(OSError):
            os.close(program.fd)


class CgroupV2Devices:
    """The v2 layer: holds the fds of original and granted programs between calls.

    One instance per daemon. ``close()`` releases fds but leaves every grant in force;
    a new instance adopts them (``revoke`` and ``reconcile`` read our programs back).
    """

    def __init__(self, root: Path | None = None) -> None:
        found = root if root is not None else find_unified_root()
        if found is None:
            raise GrantError("no cgroup2 hierarchy is mounted", cgroup="/")
        self.root = found
        self._states: dict[str, _CgroupState] = {}

    # -- public API ------------------------------------------------------------------

    def grant(self, container: ContainerRef, rule: DeviceRule) -> V2Grant:
        """Allow ``rule`` in every device program of the container's cgroup2 tree."""
        if container.unified_cgroup is None:
            raise GrantError(f"{container.target} has no cgroup2 path", cgroup="?")
        base = tuple(render_rule(r) for r in container.base_device_rules)
        return self.grant_cgroup(container.unified_cgroup, rule, base_rules=base)

    def grant_cgroup(
        self, cgroup: str, rule: DeviceRule, *, base_rules: Sequence[str] = ()
    ) -> V2Grant:
        if not rule.allow:
            raise ValueError(f"grant of a deny rule {rule.render()!r}")
        top = self._abs(cgroup)
        if top == self.root:
            # The tree below the root is every container on the host.
            raise GrantError(
                "cgroup v2 /: refusing to grant on the root cgroup (the whole host)",
                cgroup="/",
                rule=rule.render(),
            )
        if not top.is_dir():
            raise GrantError(
                f"cgroup v2 {cgroup}: no such cgroup (container stopped?)",
                cgroup=cgroup,
                rule=rule.render(),
                errno=errno.ENOENT,
            )
        base = tuple(parse_rule(r) for r in base_rules)
        touched: list[_CgroupState] = []
        current = cgroup
        try:
            for path in self._tree(top):
                current = self._rel(path)
                try:
                    state = self._sync(path, base if path == top else None)
                except FileNotFoundError:
                    if path == top:
                        raise
                    continue  # a child cgroup removed while we walk: nothing to grant
                if state is None:
                    continue
                state.grants.append(rule)
                touched.append(state)
                self._apply_retrying(state, base if path == top else None)
        except (OSError, GrantError, bp.ProgramError) as exc:
            self._roll_back(touched, rule)
            raise self._error(current, rule, "grant", exc) from exc
        if not touched:
            # The usual case on hosts where v1 is the device gate (v2 then has no
            # device program): nothing to do here, and nothing to alarm anyone about.
            log.debug(
                "v2 %s: no device program in this cgroup tree (v2 does not restrict "
                "devices here); nothing to add for %s",
                cgroup,
                rule.render(),
            )
        return V2Grant(cgroup, rule.render(), tuple(s.relative for s in touched), tuple(base_rules))

    def revoke(self, record: V2Grant) -> None:
        """Take the grant out; the last grant of a cgroup puts its original programs back.

        A cgroup that no longer exists has nothing left to revoke and is skipped.
        """
        rule = record.device_rule
        base = tuple(parse_rule(r) for r in record.base_rules)
        for relative in reversed(record.cgroups):
            path = self._abs(relative)
            if not path.is_dir():
                self._forget(relative)
                continue
            try:
                state = self._sync(path, base if relative == record.cgroup else None)
                if state is None:
                    continue  # every program was detached: nothing of ours is left
                if rule in state.grants:
                    state.grants.remove(rule)
                    try:
                        self._apply(state)
                    except BaseException:
                        state.grants.append(rule)  # still in force: a retry must revoke it
                        raise
                else:
                    self._apply(state)
                if not state.grants:
                    self._forget(relative)
            except (OSError, GrantError, bp.ProgramError) as exc:
                if not path.is_dir():
                    self._forget(relative)  # removed while we worked: nothing to revoke
                    continue
                raise self._error(relative, rule, "revoke", exc) from exc

    def reconcile(self, records: Iterable[V2Grant]) -> V2Reconciled:
        """Make every device program hold exactly the recorded grants; count the heals.

        A heal is one program re-granted: swapped or re-attached behind our back,
        appeared in a cgroup later, or lost after a restart. Returns the records with
        their ``cgroups`` brought up to date, the number of heals, and one error per
        container tree that could not be brought in line (the others still are).
        """
        records = tuple(records)
        by_top: dict[str, list[V2Grant]] = {}
        for record in records:
            by_top.setdefault(record.cgroup, []).append(record)
        heals = checked = 0
        errors: list[str] = []
        updated: dict[int, V2Grant] = {}
        for top_rel, group in by_top.items():
            top = self._abs(top_rel)
            if not top.is_dir():
                continue  # the container is gone; the daemon revokes its records
            desired = [r.device_rule for r in group]
            base = tuple(parse_rule(r) for r in group[0].base_rules)
            touched: list[str] = []
            try:
                for path in heal_tree(top):
                    checked += 1
                    relative = self._rel(path)
                    try:
                        state = self._sync(path, base if path == top else None)
                        if state is None:
                            continue
                        state.grants = list(desired)
                        healed = self._apply(state)
                    except FileNotFoundError:
                        continue  # a child cgroup removed while we walk
                    except (OSError, bp.ProgramError) as exc:
                        raise self._error(relative, desired[0], "reconcile", exc) from exc
                    touched.append(relative)
                    if healed:
                        heals += healed
                        log.warning("v2 %s: %d device program(s) re-granted", relative, healed)
            except GrantError as exc:
                errors.append(str(exc))
                continue
            for record in group:
                updated[id(record)] = V2Grant(
                    record.cgroup, record.rule, tuple(touched), record.base_rules
                )
        return V2Reconciled(
            tuple(updated.get(id(r), r) for r in records), heals, tuple(errors), checked
        )

    def tree(self, cgroup: str) -> tuple[str, ...]:
        """The cgroup and every cgroup below it, relative to the root, parents first
        (empty if it is gone): where a grant of that container may be."""
        top = self._abs(cgroup)
        return tuple(self._rel(path) for path in self._tree(top)) if top.is_dir() else ()

    def attached(self, cgroup: str) -> tuple[int, ...]:
        """Program ids attached to a cgroup now (for tests and status)."""
        fd = bpf.open_cgroup(self._abs(cgroup))
        try:
            return bpf.prog_query(fd, subject=cgroup).prog_ids
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release every fd; grants stay in force."""
        for state in self._states.values():
            self._release(state)
        self._states.clear()

    # -- state ---------------------------------------------------------------------------

    def _abs(self, cgroup: str) -> Path:
        path = Path(os.path.normpath(self.root / cgroup.lstrip("/")))
        if path != self.root and self.root not in path.parents:
            raise GrantError(f"cgroup v2 {cgroup!r} is outside {self.root}", cgroup=cgroup)
        return path

    def _rel(self, path: Path) -> str:
        return "/" + str(path.relative_to(self.root)) if path != self.root else "/"

    @staticmethod
    def _tree(top: Path) -> list[Path]:
        return walk_tree(top)[0]

    def _forget(self, relative: str) -> None:
        state = self._states.pop(relative, None)
        if state is not None:
            self._release(state)

    @staticmethod
    def _release(state: _CgroupState) -> None:
        for slot in state.slots:
            if slot.original is None or slot.current.fd != slot.original.fd:
                _close(slot.current)
            _close(slot.original)
        state.slots.clear()

    def _sync(self, path: Path, base: tuple[DeviceRule, ...] | None) -> _CgroupState | None:
        """Bring our view of one cgroup in line with what is attached to it now.

        Slots whose current program is gone are dropped; programs we do not know are
        adopted as new originals. Returns None when no device program is attached.
        """
        relative = self._rel(path)
        fd = bpf.open_cgroup(path)
        try:
            query = bpf.prog_query(fd, subject=relative)
        finally:
            os.close(fd)
        state = self._states.get(relative)
        fresh = state is None
        attached = set(query.prog_ids) - (state.ignored if state else set())
        if not attached:
            self._forget(relative)
            return None
        if state is None:
            state = _CgroupState(path, relative)
            self._states[relative] = state
        state.attach_flags = query.attach_flags
        keep: list[_Slot] = []
        for slot in state.slots:
            if slot.current.id in attached:
                keep.append(slot)
            else:
                log.warning(
                    "v2 %s: program %d is no longer attached (replaced behind our back?)",
                    relative,
                    slot.current.id,
                )
                if slot.original is None or slot.current.fd != slot.original.fd:
                    _close(slot.current)
                _close(slot.original)
        state.slots = keep
        known = {slot.current.id for slot in keep}
        for prog_id in query.prog_ids:
            if prog_id in known or prog_id in state.ignored:
                continue
            try:
                slot = self._adopt(prog_id, relative, base, state)
            except _Unreadable as why:
                if base is None:
                    # A descendant's own program (a nested runtime's): without its rules
                    # we cannot rebuild it, and it still denies, which is the safe side.
                    log.warning("v2 %s: leaving program %d alone: %s", relative, prog_id, why)
                    state.ignored.add(prog_id)
                    continue
                raise GrantError(
                    f"cgroup v2 {relative}: program {prog_id} {why}, and the runtime "
                    "states no device rules to rebuild it from",
                    cgroup=relative,
                ) from None
            except bpf.BpfError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # detached and freed between query and open
                raise
            state.slots.append(slot)
        if not state.slots:
            self._forget(relative)
            return None
        if fresh:
            # Adopted after a restart: the grants are the ones our programs hold.
            held = {grant for slot in state.slots for grant in slot.holds}
            state.grants = sorted(held, key=DeviceRule.render)
        return state

    def _adopt(
        self,
        prog_id: int,
        relative: str,
        base: tuple[DeviceRule, ...] | None,
        state: _CgroupState,
    ) -> _Slot:
        fd = bpf.get_prog_fd_by_id(prog_id)
        program = _Program(fd, prog_id)
        try:
            info, raw = bpf.prog_xlated(fd)
            reason: str | None
            if info.nr_map_ids:
                reason = f"uses {info.nr_map_ids} map(s)"
            elif not raw:
                reason = "cannot be read back (kernel.kptr_restrict?)"
            else:
                insns = bp.decode(raw)
                reason = bp.check_replayable(insns)
                if reason is None:
                    ours = bp.split_prepended(insns)
                    if ours is not None:
                        # Ours, from before a restart: the original follows our prefix.
                        return _Slot(
                            None, bp.encode(ours.original), False, program, frozenset(ours.grants)
                        )
                    return _Slot(program, raw, False, program, frozenset())
                reason = f"cannot be loaded again as read back: {reason}"
            if base is None or not base:
                raise _Unreadable(reason)
            log.warning(
                "v2 %s: program %d %s; rebuilding it from the runtime's %d device rules",
                relative,
                prog_id,
                reason,
                len(base),
            )
            return _Slot(program, bp.encode(bp.assemble(base)), True, program, frozenset())
        except BaseException:
            _close(program)
            raise

    # -- doing ---------------------------------------------------------------------------

    def _apply(self, state: _CgroupState, slots: Sequence[_Slot] | None = None) -> int:
        """Swap in, for every slot, a program holding exactly ``state.grants``.

        Returns how many programs were replaced. With no grants left, each slot gets
        its original back: the same program object when we still hold it.
        """
        wanted = _dedupe(state.grants)
        replaced = 0
        for slot in state.slots if slots is None else slots:
            if slot.holds == frozenset(wanted):
                continue
            if wanted:
                code = bp.prepend_code(slot.original_code, wanted)
                new = _Program(bpf.prog_load(code, name=PROGRAM_NAME), 0)
                new.id = bpf.prog_info(new.fd).id
            elif slot.original is not None:
                new = slot.original
            else:
                new = _Program(bpf.prog_load(slot.original_code, name="restored"), 0)
                new.id = bpf.prog_info(new.fd).id
                log.info("v2 %s: original program reloaded from its code", state.relative)
            try:
                self._swap(state, slot.current, new)
            except BaseException:
                if slot.original is None or new.fd != slot.original.fd:
                    _close(new)
                raise
            if slot.original is None or slot.current.fd != slot.original.fd:
                _close(slot.current)
            slot.current = new
            slot.holds = frozenset(wanted)
            replaced += 1
        return replaced

    def _apply_retrying(self, state: _CgroupState, base: tuple[DeviceRule, ...] | None) -> None:
        """``_apply``, again after a fresh look if a program was swapped under our hands
        (REPLACE then fails with ENOENT: the program it names is no longer attached)."""
        for attempt in range(_REPLACE_RETRIES):
            try:
                self._apply(state)
                return
            except bpf.BpfError as exc:
                if exc.errno != errno.ENOENT or attempt == _REPLACE_RETRIES - 1:
                    raise
            resynced = self._sync(state.path, base)
            if resynced is None:
                return
            state = resynced

    def _swap(self, state: _CgroupState, old: _Program, new: _Program) -> None:
        fd = bpf.open_cgroup(state.path)
        try:
            if state.attach_flags & bpf.BPF_F_ALLOW_MULTI:
                bpf.prog_attach(
                    fd,
                    new.fd,
                    flags=bpf.BPF_F_ALLOW_MULTI,
                    replace_fd=old.fd,
                    subject=f"{state.relative}: program {old.id} -> {new.id}",
                )
            else:
                # Exclusive modes hold one program; attaching again replaces it.
                bpf.prog_attach(fd, new.fd, flags=state.attach_flags, subject=state.relative)
        except bpf.BpfError as exc:
            if exc.errno != errno.E2BIG:
                raise
            # The kernel checks the limit before it looks for the program to replace,
            # so a full cgroup refuses even a one-for-one swap, and detaching first would
            # widen access for a moment. Refuse instead: the cgroup stays as it is.
            raise GrantError(
                f"cgroup v2 {state.relative} holds {bpf.MAX_PROGS_PER_CGROUP} device "
                "programs, the kernel's limit, where it refuses even an atomic replace "
                f"(E2BIG); program {old.id} left in place",
                cgroup=state.relative,
                errno=errno.E2BIG,
            ) from exc
        finally:
            os.close(fd)

    def _roll_back(self, touched: list[_CgroupState], rule: DeviceRule) -> None:
        for state in reversed(touched):
            if rule in state.grants:
                state.grants.remove(rule)
            # Only the programs this grant changed: others (one that just appeared)
            # are reconcile's business, not the failed grant's.
            changed = [slot for slot in state.slots if rule in slot.holds]
            try:
                self._apply(state, changed)
            except (OSError, GrantError, bp.ProgramError) as exc:
                log.error("v2 %s: rolling back %s failed: %s", state.relative, rule.render(), exc)
            if not state.grants:
                self._forget(state.relative)

    @staticmethod
    def _error(cgroup: str, rule: DeviceRule, action: str, exc: BaseException) -> GrantError:
        if isinstance(exc, GrantError):
            if rule.render() in str(exc):
                return exc
            return GrantError(
                f"{action} {rule.render()}: {exc}",
                cgroup=exc.cgroup,
                rule=rule.render(),
                errno=exc.errno,
                log=exc.log,
            )
        err = getattr(exc, "errno", None)
        log_text = getattr(exc, "log", "") or ""
        reason = str(exc)
        if isinstance(exc, FileNotFoundError):
            reason = "the cgroup is gone (container stopped?)"
        elif err == errno.EPERM:
            reason += " (needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN, or CAP_BPF)"
        return GrantError(
            f"cgroup v2 {cgroup}: {action} {rule.render()} failed: {reason}",
            cgroup=cgroup,
            rule=rule.render(),
            errno=err,
            log=log_text,
        )
