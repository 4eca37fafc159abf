"""Device grants on cgroup v1: ``devices.allow`` and ``devices.deny``, and nothing else.

A grant writes ``TYPE MAJOR:MINOR ACCESS`` to ``devices.allow`` of the container's
devices cgroup and of every cgroup below it, top-down (a child may never allow more
than its parent, so the parent goes first). Before writing, each cgroup's
``devices.list`` says what it already allows: a device that was allowed before (by an
exact entry, a wider wildcard or allow-all mode ``a *:* rwm``) is recorded as such and
left alone, so a revoke never takes away access the runtime gave. A revoke writes
``devices.deny`` bottom-up for exactly the access bits the grant added.

Two kernel details shape the records:
* a deny on a cgroup also removes the exact-pattern exception from all its
  descendants, so after the denies every access an exact entry had before the grant
  (``kept``) is checked and put back if a parent's deny took it;
* in allow-all mode devices.list shows only ``a *:* rwm`` and hides deny exceptions,
  so such a cgroup is taken as allowing the device and is not written to.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotrelay.core.device_access import Access, DeviceRule, DeviceType, parse_devices_list
from hotrelay.effectors import GrantError
from hotrelay.effectors.cgroup_tree import walk_tree

__all__ = [
    "DEVICES_ROOT",
    "V1Entry",
    "V1Grant",
    "cgroup_path",
    "grant",
    "heal",
    "missing",
    "revoke",
]

log = logging.getLogger("hotrelay.effectors.cgroup_v1")

DEVICES_ROOT = Path("/sys/fs/cgroup/devices")
_ALLOW_ALL = DeviceRule(DeviceType.ALL, None, None, Access())


@dataclass(frozen=True, slots=True)
class V1Entry:
    """What a grant found and did in one cgroup (path relative to the hierarchy root).

    ``added``: access bits written to devices.allow ("" when it was already allowed);
    ``kept``: access the exact-pattern entry had before ("" if none);
    ``allow_all``: the cgroup was in allow-all mode.
    """

    cgroup: str
    added: str = ""
    kept: str = ""
    allow_all: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "cgroup": self.cgroup,
            "added": self.added,
            "kept": self.kept,
            "allow_all": self.allow_all,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> V1Entry:
        return cls(
            str(data["cgroup"]), str(data["added"]), str(data["kept"]), bool(data["allow_all"])
        )


@dataclass(frozen=True, slots=True)
class V1Grant:
    """A grant on one container's devices cgroup tree; entries top-down."""

    cgroup: str
    rule: str
    entries: tuple[V1Entry, ...]

    @property
    def device_rule(self) -> DeviceRule:
        return DeviceRule.parse(self.rule)

    @property
    def changed(self) -> bool:
        """Did the grant write anything (False: the device was allowed throughout)?"""
        return any(entry.added for entry in self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "cgroup": self.cgroup,
            "rule": self.rule,
            "entries": [entry.to_json() for entry in self.entries],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> V1Grant:
        return cls(
            str(data["cgroup"]),
            str(data["rule"]),
            tuple(V1Entry.from_json(entry) for entry in data["entries"]),
        )


# -- pure decisions --------------------------------------------------------------------


def _access(text: str) -> Access | None:
    return Access.parse(text) if text else None


def _text(access: Access | None) -> str:
    return "" if access is None else str(access)


def _minus(have: Access, drop: Access | None) -> Access | None:
    if drop is None:
        return have
    bits = (
        have.read and not drop.read,
        have.write and not drop.write,
        have.mknod and not drop.mknod,
    )
    return Access(*bits) if any(bits) else None


def _exact(listed: tuple[DeviceRule, ...], rule: DeviceRule) -> Access | None:
    """The access of the entry with exactly rule's pattern (v1 merges them into one)."""
    for entry in listed:
        if (entry.type, entry.major, entry.minor) == (rule.type, rule.major, rule.minor):
            return entry.access
    return None


def _is_allow_all(listed: tuple[DeviceRule, ...]) -> bool:
    return listed == (_ALLOW_ALL,)


def _allows(listed: tuple[DeviceRule, ...], rule: DeviceRule) -> bool:
    return _is_allow_all(listed) or any(entry.covers(rule) for entry in listed)


# -- the kernel side -------------------------------------------------------------------


def _abs(root: Path, cgroup: str) -> Path:
    path = Path(os.path.normpath(root / cgroup.lstrip("/")))
    if path != root and root not in path.parents:
        raise GrantError(f"cgroup v1 {cgroup!r} is outside {root}", cgroup=cgroup)
    return path


def _rel(root: Path, path: Path) -> str:
    return "/" + str(path.relative_to(root)) if path != root else "/"


def _read_list(path: Path) -> tuple[DeviceRule, ...]:
    return parse_devices_list((path / "devices.list").read_text())


def _write(path: Path, name: str, line: str) -> None:
    # One record per write(2), as cgroup control files want.
    fd = os.open(path / name, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def cgroup_path(cgroup: str, *, root: Path = DEVICES_ROOT) -> Path:
    """The directory of a devices cgroup (refused if it would leave ``root``)."""
    return _abs(root, cgroup)


def _tree(top: Path) -> list[Path]:
    """The cgroup and all cgroups below it, parents before children."""
    return walk_tree(top)[0]


def _eperm_hint(path: Path | None, line: str) -> str:
    """Why devices.allow said EPERM: a parent that does not allow it, or no capability."""
    if path is not None:
        try:
            parent_allows = _allows(_read_list(path.parent), DeviceRule.parse(line))
        except (OSError, ValueError):
            parent_allows = True
        if not parent_allows:
            return f" (the parent cgroup {path.parent.name!r} does not allow this device)"
    return " (hotrelay needs root with CAP_SYS_ADMIN)"


def _error(
    action: str, cgroup: str, line: str, exc: OSError, path: Path | None = None
) -> GrantError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = ""
    if exc.errno == errno.EPERM:
        hint = _eperm_hint(path if action == "devices.allow" else None, line)
    elif exc.errno == errno.ENOENT:
        hint = " (the cgroup is gone: container stopped?)"
    return GrantError(
        f"cgroup v1 {cgroup}: writing {line!r} to {action} failed: {reason}{hint}",
        cgroup=cgroup,
        rule=line,
        errno=exc.errno,
    )


def grant(cgroup: str, rule: DeviceRule, *, root: Path = DEVICES_ROOT) -> V1Grant:
    """Allow ``rule`` in the devices cgroup ``cgroup`` and all its descendants.

    On failure nothing stays changed (what was written is denied again) and a
    GrantError names the cgroup, the line and the reason.
    """
    if not rule.allow:
        raise ValueError(f"grant of a deny rule {rule.render()!r}")
    top = _abs(root, cgroup)
    if top == root:
        # The tree below the root is every container on the host.
        raise GrantError(
            "cgroup v1 /: refusing to grant on the root cgroup (the whole host)",
            cgroup="/",
            rule=rule.render(),
        )
    if not (top / "devices.list").exists():
        raise GrantError(
            f"cgroup v1 {cgroup}: no such devices cgroup (container stopped?)",
            cgroup=cgroup,
            rule=rule.render(),
            errno=errno.ENOENT,
        )
    entries: list[V1Entry] = []
    line = rule.render()
    try:
        for path in _tree(top):
            relative = _rel(root, path)
            try:
                listed = _read_list(path)
            except FileNotFoundError:
                continue  # a child removed while we walk: nothing to grant there
            kept = _exact(listed, rule)
            if _allows(listed, rule):
                entries.append(V1Entry(relative, "", _text(kept), _is_allow_all(listed)))
                continue
            try:
                _write(path, "devices.allow", line)
            except FileNotFoundError:
                if path == top:
                    raise
                continue
            entries.append(V1Entry(relative, _text(_minus(rule.access, kept)), _text(kept)))
    except OSError as exc:
        failed = V1Grant(cgroup, line, tuple(entries))
        _revoke_quietly(failed, root)
        raise _error("devices.allow", _rel(root, path), line, exc, path) from exc
    record = V1Grant(cgroup, line, tuple(entries))
    log.debug("v1 %s: allowed %s in %d cgroup(s)", cgroup, line, len(entries))
    return record


def _revoke_quietly(record: V1Grant, root: Path) -> None:
    try:
        revoke(record, root=root)
    except GrantError as exc:
        log.error("rolling back a failed v1 grant: %s", exc)


def revoke(record: V1Grant, *, root: Path = DEVICES_ROOT) -> None:
    """Deny, bottom-up, exactly what ``record``'s grant added; restore what a parent's
    deny took from entries that existed before. Cgroups that are gone are skipped."""
    rule = record.device_rule
    for entry in reversed(record.entries):
        added = _access(entry.added)
        if added is None:
            continue
        line = DeviceRule(rule.type, rule.major, rule.minor, added).render()
        try:
            _write(_abs(root, entry.cgroup), "devices.deny", line)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _error("devices.deny", entry.cgroup, line, exc) from exc
    for entry in record.entries:
        kept = _access(entry.kept)
        if kept is None or entry.allow_all:
            continue
        path = _abs(root, entry.cgroup)
        try:
            now = _exact(_read_list(path), rule)
            lost = _minus(kept, now)
            if lost is not None:
                line = DeviceRule(rule.type, rule.major, rule.minor, lost).render()
                _write(path, "devices.allow", line)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _error("devices.allow", entry.cgroup, rule.render(), exc) from exc


def missing(
    record: V1Grant, *, root: Path = DEVICES_ROOT, tree: list[Path] | None = None
) -> list[str]:
    """Cgroups of the tree (recorded or new) that no longer allow the granted device.

    ``tree``: the cgroups to look at (default: the whole tree below the grant's).
    """
    rule = record.device_rule
    top = _abs(root, record.cgroup)
    lost: list[str] = []
    for path in tree if tree is not None else _tree(top):
        try:
            if not _allows(_read_list(path), rule):
                lost.append(_rel(root, path))
        except FileNotFoundError:
            continue
    return lost


def heal(
    record: V1Grant, *, root: Path = DEVICES_ROOT, tree: list[Path] | None = None
) -> tuple[V1Grant, int]:
    """Re-allow the grant wherever it was lost (a runtime rewrote devices.list, a new
    child cgroup); returns the updated record and how many cgroups were healed.

    ``tree``: the cgroups to check (the heal pass passes a bounded one, see
    ``cgroup_tree``); default: the whole tree below the grant's cgroup.
    """
    if tree is None:
        tree = _tree(_abs(root, record.cgroup))
    rule = record.device_rule
    line = rule.render()
    by_cgroup = {entry.cgroup: entry for entry in record.entries}
    healed = 0
    for relative in missing(record, root=root, tree=tree):
        path = _abs(root, relative)
        try:
            listed = _read_list(path)
            _write(path, "devices.allow", line)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _error("devices.allow", relative, line, exc) from exc
        old = by_cgroup.get(relative)
        kept = _exact(listed, rule)
        if old is not None and old.added:
            # What we added before is still ours to deny, whatever the runtime did.
            by_cgroup[relative] = V1Entry(relative, _text(_minus(rule.access, kept)), old.kept)
        else:
            by_cgroup[relative] = V1Entry(relative, _text(_minus(rule.access, kept)), _text(kept))
        healed += 1
        log.warning("v1 %s: %s had been lost, allowed it again", relative, line)
    if not healed:
        return record, 0
    order = [_rel(root, path) for path in tree]
    ordered = [by_cgroup[c] for c in order if c in by_cgroup]
    ordered += [e for c, e in by_cgroup.items() if c not in order]
    return V1Grant(record.cgroup, record.rule, tuple(ordered)), healed
