"""The rule language: model, TOML loading with ``path:line:`` errors, matching, index.

Pure like the rest of ``hotrelay.core``: rule text comes in as strings, sysfs through
the ``DeviceView`` protocol. See docs/rules.md for the language itself.
"""

from __future__ import annotations

from hotrelay.core.rules.device import CachedDevice, DeviceView, RecordedDevice
from hotrelay.core.rules.errors import RuleError, RuleSetError
from hotrelay.core.rules.glob import GlobError, Pattern
from hotrelay.core.rules.index import RuleIndex
from hotrelay.core.rules.loader import load_rules_text
from hotrelay.core.rules.match import (
    Attr,
    Attrs,
    Condition,
    Driver,
    Env,
    EventField,
    MatchContext,
    Pci,
    Tag,
    Usb,
)
from hotrelay.core.rules.model import (
    DeviceSpec,
    NetdevSpec,
    Rule,
    Source,
    Target,
    TargetError,
    UeventMode,
)
from hotrelay.core.rules.ruleset import MatchMemory, Recorded, RuleSet, Verdict
from hotrelay.core.rules.template import Template, TemplateError, confine_to_dev

__all__ = [
    "Attr",
    "Attrs",
    "CachedDevice",
    "Condition",
    "DeviceSpec",
    "DeviceView",
    "Driver",
    "Env",
    "EventField",
    "GlobError",
    "MatchContext",
    "MatchMemory",
    "NetdevSpec",
    "Pattern",
    "Pci",
    "Recorded",
    "RecordedDevice",
    "Rule",
    "RuleError",
    "RuleIndex",
    "RuleSet",
    "RuleSetError",
    "Source",
    "Tag",
    "Target",
    "TargetError",
    "Template",
    "TemplateError",
    "UeventMode",
    "Usb",
    "Verdict",
    "confine_to_dev",
    "load_rules_text",
]
