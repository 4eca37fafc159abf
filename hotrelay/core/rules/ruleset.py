"""A loaded rule set, and the memory that lets ``remove`` match what ``add`` matched.

``RuleSet`` is immutable: a reload builds a new one (all or nothing) and the relay
swaps it in. ``MatchMemory`` is the relay's small piece of matching state: per devpath,
what matching saw in sysfs at ``add`` (a ``RecordedDevice``) and the add's properties,
because by the time a ``remove`` arrives the device has left sysfs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from hotrelay.core.rules.device import DeviceView, RecordedDevice
from hotrelay.core.rules.errors import RuleError, RuleSetError
from hotrelay.core.rules.index import RuleIndex
from hotrelay.core.rules.loader import Declared, check_unique_names, load_rules_text
from hotrelay.core.rules.match import MatchContext
from hotrelay.core.rules.model import Rule
from hotrelay.core.uevent import Uevent

__all__ = ["MatchMemory", "Recorded", "RuleSet", "Verdict"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """One rule's answer for one event: matched, or the first condition that failed."""

    rule: Rule
    failure: str | None

    @property
    def matched(self) -> bool:
        return self.failure is None


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules from one or more files, in load order (file name order, then position)."""

    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()
    index: RuleIndex = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        errors = check_unique_names((rule.name, rule.source) for rule in self.rules)
        if errors:
            raise RuleSetError(errors)
        object.__setattr__(self, "index", RuleIndex(self.rules))

    @classmethod
    def from_texts(cls, sources: Iterable[tuple[str, str]]) -> RuleSet:
        """Load ``(path, text)`` pairs in the given order; every error of every file, or none."""
        rules: list[Rule] = []
        errors: list[RuleError] = []
        declared: list[Declared] = []
        files = []
        for path, text in sources:
            files.append(path)
            try:
                loaded = load_rules_text(text, path)
            except RuleSetError as exc:
                errors += exc.errors
                declared += exc.declared
            else:
                rules += loaded
                declared += [(rule.name, rule.source) for rule in loaded]
        errors += check_unique_names(declared, across_files_only=True)
        if errors:
            order = {path: number for number, path in enumerate(files)}
            raise RuleSetError(
                sorted(errors, key=lambda e: (order.get(e.path, len(order)), e.line or 0))
            )
        return cls(tuple(rules), tuple(files))

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def get(self, name: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.name == name), None)

    def match(
        self,
        event: Uevent,
        device: DeviceView | None = None,
        *,
        recorded_properties: Mapping[str, str] | None = None,
    ) -> list[Rule]:
        """The rules ``event`` matches, in rule order, trying only the index's candidates."""
        return self.index.match(MatchContext(event, device, recorded_properties))

    def explain(self, event: Uevent, device: DeviceView | None = None) -> list[Verdict]:
        """Every rule's verdict (no index: each rule is tried and explained)."""
        ctx = MatchContext(event, device)
        return [Verdict(rule, rule.explain(ctx)) for rule in self.rules]


@dataclass(frozen=True, slots=True)
class Recorded:
    """What matching saw of one device at its last matching event."""

    device: RecordedDevice | None
    properties: Mapping[str, str]


class MatchMemory:
    """Per-devpath records so that a ``remove`` matches the rules its ``add`` matched.

    Pure and in memory; the relay owns one. Only devices that matched some rule are
    remembered, so it holds as many entries as there are relayed devices.
    """

    __slots__ = ("_records",)

    def __init__(self) -> None:
        self._records: dict[str, Recorded] = {}

    def __len__(self) -> int:
        return len(self._records)

    def devpaths(self) -> Sequence[str]:
        return tuple(self._records)

    def recall(self, devpath: str) -> Recorded | None:
        return self._records.get(devpath)

    def forget(self, devpath: str) -> None:
        """Forget ``devpath`` and everything below it (its own removes may have been lost)."""
        self._records.pop(devpath, None)
        prefix = devpath + "/"
        for stale in [p for p in self._records if p.startswith(prefix)]:
            del self._records[stale]

    def match(self, rules: RuleSet, event: Uevent, device: DeviceView | None) -> list[Rule]:
        """Match ``event``; ``device`` is its sysfs view (ignored for ``remove``)."""
        if event.action == "remove":
            recorded = self._records.get(event.devpath)
            self.forget(event.devpath)
            if recorded is None:
                # Never seen matching (or lost): the event alone is all there is.
                return rules.match(event)
            return rules.match(event, recorded.device, recorded_properties=recorded.properties)
        if event.action == "move":
            old = event.get("DEVPATH_OLD")
            if old:
                self.forget(old)
        ctx = MatchContext(event, device)
        matched = rules.index.match(ctx)
        if matched:
            self._records[event.devpath] = Recorded(
                ctx.record(), MappingProxyType(dict(event.properties))
            )
        elif event.action == "add":
            # A reused devpath: whatever was remembered belongs to an older device.
            self._records.pop(event.devpath, None)
        return matched
