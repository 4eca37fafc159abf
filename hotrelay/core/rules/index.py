"""The rule index: find the few rules that can match an event without trying them all.

Level one is the event's subsystem: a rule whose ``subsystem`` is exact (or a list of
exact names) is filed under each name, every other rule under "any subsystem". Within
each of those buckets a rule is filed under the most selective *feature* it has exact
values for (USB vendor:product, serial, PCI id, kernel name, an ``env`` key, ...; see
``match.FEATURES``), or kept in the bucket's short list of rules to try on every event.

A lookup therefore costs one dict lookup per subsystem bucket, plus one feature value
and one dict lookup per feature in use there: flat in the number of rules. Features
read sysfs only when a bucket holds rules filed under them, and through the event's
cache, so the rules that are then tried find those reads already done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hotrelay.core.rules.match import EventField, MatchContext, feature_rank
from hotrelay.core.rules.model import Rule

__all__ = ["RuleIndex"]


@dataclass(slots=True)
class _Bucket:
    features: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    scan: list[int] = field(default_factory=list)

    def file(self, ordinal: int, rule: Rule) -> None:
        keys = [key for condition in rule.conditions for key in condition.index_keys()]
        if not keys:
            self.scan.append(ordinal)
            return
        name, values = min(keys, key=lambda key: feature_rank(key[0]))
        table = self.features.setdefault(name, {})
        for value in values:
            table.setdefault(value, []).append(ordinal)

    def collect(self, ctx: MatchContext, into: list[int]) -> None:
        into.extend(self.scan)
        for name, table in self.features.items():
            value = ctx.feature(name)
            if value is not None:
                hits = table.get(value)
                if hits:
                    into.extend(hits)


class RuleIndex:
    """An immutable index over ``rules``; ``candidates`` keeps the rules' order."""

    __slots__ = ("_any", "_by_subsystem", "rules")

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._by_subsystem: dict[str, _Bucket] = {}
        self._any = _Bucket()
        for ordinal, rule in enumerate(self.rules):
            subsystems = next(
                (
                    c.pattern.indexable
                    for c in rule.conditions
                    if isinstance(c, EventField) and c.key == "subsystem"
                ),
                None,
            )
            if subsystems is None:
                self._any.file(ordinal, rule)
            else:
                for subsystem in subsystems:
                    self._by_subsystem.setdefault(subsystem, _Bucket()).file(ordinal, rule)

    def candidates(self, ctx: MatchContext) -> list[Rule]:
        """Every rule that may match ``ctx`` (a superset of the matches), in rule order."""
        ordinals: list[int] = []
        bucket = self._by_subsystem.get(ctx.event.subsystem)
        if bucket is not None:
            bucket.collect(ctx, ordinals)
        self._any.collect(ctx, ordinals)
        if len(ordinals) > 1:
            # A rule is filed once per bucket and feature value, but a value list can
            # file it twice under values that both equal the event's (never, for
            # distinct exact strings) or in two buckets (never both consulted): the
            # set is for safety, the sort restores rule order across buckets.
            ordinals = sorted(set(ordinals))
        rules = self.rules
        return [rules[i] for i in ordinals]

    def match(self, ctx: MatchContext) -> list[Rule]:
        return [rule for rule in self.candidates(ctx) if rule.matches(ctx)]

    def stats(self) -> dict[str, int]:
        """How the rules are filed (for ``check`` and the benchmark)."""
        scanned = len({*self._any.scan, *(i for b in self._by_subsystem.values() for i in b.scan)})
        return {
            "rules": len(self.rules),
            "subsystems": len(self._by_subsystem),
            "scanned": scanned,
        }
