"""Plans: frozen actions that effectors will execute, and the planner that makes them.

Planning is separate from doing (as in mkosi's ``FSOperation``): each action is a value
with ``describe()``, so ``hotrelay simulate`` is a dry run for free, and the effectors
only ever execute what was planned. ``plan_for`` is pure.

For an ``add``, each (rule, container) pair gets, in order: the device-cgroup grant
(first, so the node is usable the moment it exists), the node, its symlinks, then the
uevent (last, so whoever reacts to it finds the node in place). A ``remove`` is the
exact reverse: the uevent first, the node and grant last. Other actions (change,
bind, ...) only replay the uevent. Network interfaces are moved instead; once moved,
the kernel itself sends their uevents into the container's network namespace.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hotrelay.core.containers import ContainerRef
from hotrelay.core.device_access import DeviceRule, DeviceType
from hotrelay.core.rules.model import Owner, Rule, Target, UeventMode
from hotrelay.core.rules.template import TemplateError, check_ifname, confine_to_dev
from hotrelay.core.uevent import Uevent, Wire

__all__ = [
    "Action",
    "Container",
    "GrantDevice",
    "InjectUevent",
    "MakeNode",
    "MakeSymlink",
    "MoveNetdev",
    "RemoveNode",
    "RemoveSymlink",
    "RevokeDevice",
    "SkipRule",
    "SkipSymlink",
    "action_to_dict",
    "plan_for",
]

# A rule's target until the relay resolves it to the live containers it names.
Container = Target | ContainerRef


def _name(container: Container | None) -> str:
    if container is None:
        return "every target"
    return str(container) if isinstance(container, Target) else container.target


def _devnum(kind: DeviceType, major: int, minor: int) -> str:
    return f"{kind.value} {major}:{minor}"


@dataclass(frozen=True, slots=True)
class GrantDevice:
    """Allow the device in the container's device cgroup (v1 devices.allow, v2 BPF)."""

    container: Container
    device: DeviceRule
    origin: str  # the rule that asked for it

    def describe(self) -> str:
        return f"grant {self.device.render()} to {_name(self.container)}"


@dataclass(frozen=True, slots=True)
class RevokeDevice:
    container: Container
    device: DeviceRule
    origin: str

    def describe(self) -> str:
        return f"revoke {self.device.render()} from {_name(self.container)}"


@dataclass(frozen=True, slots=True)
class MakeNode:
    """Create the node in the container's mount namespace; ``mode`` None copies the host's."""

    container: Container
    path: str
    type: DeviceType
    major: int
    minor: int
    mode: int | None
    owner: Owner
    group: Owner
    origin: str

    def describe(self) -> str:
        mode = "mode as on the host" if self.mode is None else f"mode {self.mode:04o}"
        return (
            f"create {self.path} ({_devnum(self.type, self.major, self.minor)}, {mode}, "
            f"owner {self.owner}, group {self.group}) in {_name(self.container)}"
        )


@dataclass(frozen=True, slots=True)
class RemoveNode:
    """Remove the node, but only if it still is this device (never someone else's file)."""

    container: Container
    path: str
    type: DeviceType
    major: int
    minor: int
    origin: str

    def describe(self) -> str:
        devnum = _devnum(self.type, self.major, self.minor)
        return f"remove {self.path} (if still {devnum}) in {_name(self.container)}"


@dataclass(frozen=True, slots=True)
class MakeSymlink:
    container: Container
    link: str
    target: str  # relative to the link's directory, as udev makes them
    origin: str

    def describe(self) -> str:
        return f"symlink {self.link} -> {self.target} in {_name(self.container)}"


@dataclass(frozen=True, slots=True)
class RemoveSymlink:
    container: Container
    link: str
    target: str  # removed only if it still points there
    origin: str

    def describe(self) -> str:
        return f"remove symlink {self.link} (if -> {self.target}) in {_name(self.container)}"


@dataclass(frozen=True, slots=True)
class InjectUevent:
    """Replay the uevent in the container's network namespace; ``wire`` None is auto."""

    container: Container
    uevent: Uevent
    wire: Wire | None
    origin: str

    def describe(self) -> str:
        wire = "auto" if self.wire is None else self.wire.value
        return (
            f"inject {self.uevent.action} uevent for {self.uevent.devpath} "
            f"({wire} wire) into {_name(self.container)}"
        )


@dataclass(frozen=True, slots=True)
class MoveNetdev:
    """Move a network interface into the container's network namespace, maybe renamed."""

    container: Container
    ifname: str
    new_name: str | None
    origin: str

    def describe(self) -> str:
        renamed = "" if self.new_name in (None, self.ifname) else f" as {self.new_name}"
        return f"move interface {self.ifname} into {_name(self.container)}{renamed}"


@dataclass(frozen=True, slots=True)
class SkipRule:
    """A matched rule that cannot apply to this event (a template with no value, ...)."""

    origin: str
    reason: str
    container: Container | None = None

    def describe(self) -> str:
        return f"skip rule {self.origin} for {_name(self.container)}: {self.reason}"


@dataclass(frozen=True, slots=True)
class SkipSymlink:
    """One symlink of a rule left out for this event (its template has no value, ...);
    the node and everything else of the rule still go in. Does nothing: it says why."""

    container: Container
    link: str  # the template, as the rule wrote it
    reason: str
    origin: str

    def describe(self) -> str:
        # The reason quotes the template already.
        return f"skip symlink in {_name(self.container)}: {self.reason}"


Action = (
    GrantDevice
    | RevokeDevice
    | MakeNode
    | RemoveNode
    | MakeSymlink
    | RemoveSymlink
    | InjectUevent
    | MoveNetdev
    | SkipRule
    | SkipSymlink
)

_WIRES: dict[UeventMode, tuple[Wire | None, ...]] = {
    UeventMode.AUTO: (None,),
    UeventMode.KERNEL: (Wire.KERNEL,),
    UeventMode.UDEV: (Wire.UDEV,),
    UeventMode.BOTH: (Wire.KERNEL, Wire.UDEV),
    UeventMode.NONE: (),
}


def _relative_link(link: str, target: str) -> str:
    """``target`` relative to ``link``'s directory (both absolute and normalized)."""
    link_dir = link.split("/")[1:-1]
    target_parts = target.split("/")[1:]
    common = 0
    while (
        common < min(len(link_dir), len(target_parts) - 1)
        and link_dir[common] == target_parts[common]
    ):
        common += 1
    return "/".join([".."] * (len(link_dir) - common) + target_parts[common:])


def _injections(rule: Rule, container: Container, uevent: Uevent) -> list[Action]:
    return [InjectUevent(container, uevent, wire, rule.name) for wire in _WIRES[rule.device.uevent]]


def _node_actions(
    rule: Rule,
    container: Container,
    uevent: Uevent,
    node: str,
    symlinks: Sequence[str],
    skipped_links: Sequence[tuple[str, str]] = (),
) -> tuple[list[Action], list[Action]]:
    """(add-order actions, remove-order actions) for one device node in one container."""
    assert uevent.major is not None
    assert uevent.minor is not None
    kind = DeviceType.BLOCK if uevent.subsystem == "block" else DeviceType.CHAR
    spec = rule.device
    device = DeviceRule(kind, uevent.major, uevent.minor, spec.access)
    links = [(link, _relative_link(link, node)) for link in symlinks]
    add: list[Action] = [
        GrantDevice(container, device, rule.name),
        MakeNode(
            container,
            node,
            kind,
            uevent.major,
            uevent.minor,
            spec.mode,
            spec.owner,
            spec.group,
            rule.name,
        ),
        *(MakeSymlink(container, link, target, rule.name) for link, target in links),
        *(SkipSymlink(container, link, why, rule.name) for link, why in skipped_links),
    ]
    remove: list[Action] = [
        *(RemoveSymlink(container, link, target, rule.name) for link, target in reversed(links)),
        RemoveNode(container, node, kind, uevent.major, uevent.minor, rule.name),
        RevokeDevice(container, device, rule.name),
    ]
    return add, remove


def _paths(rule: Rule, uevent: Uevent) -> tuple[str, list[str], list[tuple[str, str]]]:
    """The node path and symlink paths in the container, expanded and confined to /dev,
    and (template, why) for each symlink that cannot be made for this event.

    Without a node path the rule cannot apply (TemplateError); a symlink whose
    template has no value (``{ID_SERIAL}`` on a host without udevd, say) is only that
    link left out: the device still goes in.
    """
    spec = rule.device
    if spec.path is not None:
        node = confine_to_dev(spec.path.expand_path(uevent))
    elif uevent.node is not None:
        node = confine_to_dev(uevent.node)
    else:
        raise TemplateError(f"{uevent.devpath} has no DEVNAME and the rule sets no device.path")
    symlinks: list[str] = []
    skipped: list[tuple[str, str]] = []
    for link in spec.symlinks:
        try:
            symlinks.append(confine_to_dev(link.expand_path(uevent)))
        except TemplateError as exc:
            skipped.append((link.text, str(exc)))
    if node in symlinks:
        raise TemplateError(f"symlink {node} would replace the device node itself")
    return node, symlinks, skipped


def _netdev_name(rule: Rule, uevent: Uevent) -> tuple[str, str | None]:
    ifname = uevent.get("INTERFACE") or uevent.sysname
    template = rule.netdev.name
    if template is None:
        return ifname, None
    new_name = template.expand(uevent)
    problem = check_ifname(new_name)
    if problem is not None:
        raise TemplateError(f"interface name {json.dumps(new_name)} {problem}")
    return ifname, new_name


@dataclass(frozen=True, slots=True)
class _Steps:
    """One rule's actions for one container, for each kind of event."""

    add: tuple[Action, ...]
    remove: tuple[Action, ...]
    other: tuple[Action, ...] = ()


def _steps(rule: Rule, uevent: Uevent, containers: Sequence[Container]) -> list[_Steps]:
    if uevent.subsystem == "net":
        try:
            ifname, new_name = _netdev_name(rule, uevent)
        except TemplateError as exc:
            return [_Steps((SkipRule(rule.name, str(exc)),), ())]
        # Removal needs nothing: the interface lives in the container by then, and the
        # kernel tells the container itself.
        return [_Steps((MoveNetdev(c, ifname, new_name, rule.name),), ()) for c in containers]
    if uevent.major is None or uevent.minor is None:
        return []  # no node: the nodes below this device are what gets relayed
    injections = [tuple(_injections(rule, c, uevent)) for c in containers]
    try:
        node, symlinks, skipped_links = _paths(rule, uevent)
    except TemplateError as exc:
        skip = (SkipRule(rule.name, str(exc)),)
        # Replaying a change needs no path; adding or removing the node does.
        return [_Steps(skip, skip, ())] + [_Steps((), (), i) for i in injections]
    steps = []
    for container, injected in zip(containers, injections, strict=True):
        add, remove = _node_actions(rule, container, uevent, node, symlinks, skipped_links)
        steps.append(_Steps((*add, *injected), (*injected, *remove), injected))
    return steps


def plan_for(
    uevent: Uevent,
    matches: Sequence[Rule],
    *,
    resolve: Callable[[Target], Sequence[Container]] | None = None,
) -> list[Action]:
    """The actions that relay ``uevent`` for the rules it matched.

    ``resolve`` maps a rule's target to the live containers it names; without it the
    targets stand for themselves (a dry run before containers are known).
    """
    steps = [
        step
        for rule in matches
        for step in _steps(
            rule,
            uevent,
            [c for t in rule.targets for c in ((t,) if resolve is None else resolve(t))],
        )
    ]
    if uevent.action == "add":
        return [action for step in steps for action in step.add]
    if uevent.action == "remove":
        return [action for step in reversed(steps) for action in step.remove]
    # change, bind, unbind, move, online, offline: the device stays; tell the container.
    return [action for step in steps for action in step.other]


def action_to_dict(action: Action) -> dict[str, Any]:
    """A JSON-ready view of an action (for ``simulate --json`` and the control socket)."""
    out: dict[str, Any] = {"action": type(action).__name__, "describe": action.describe()}
    for f in dataclasses.fields(action):
        value = getattr(action, f.name)
        if isinstance(value, Target | ContainerRef):
            value = _name(value)
        elif isinstance(value, DeviceRule):
            value = value.render()
        elif isinstance(value, DeviceType | Wire):
            value = value.value
        elif isinstance(value, Uevent):
            value = {"action": value.action, "devpath": value.devpath, "seqnum": value.seqnum}
        out[f.name] = value
    return out
