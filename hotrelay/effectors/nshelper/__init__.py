"""Namespace helpers: the processes that act inside containers for the daemon.

- ``protocol``: every request and reply, one frozen dataclass each, and their codec;
- ``confined``: what a helper does, through the container's root fd, never by a path
  of the daemon's or the container's choosing, and never inside its mount namespace;
- ``mountns``: the only code that ever runs in a container's mount namespace, a
  sealed child forked for one mount operation;
- ``server``: the fork server and the helper processes it forks;
- ``client`` and ``pool``: the daemon's (trio) side.

See docs/injection.md for the invariant these keep: nothing a container plants can
ever run.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hotrelay.effectors.nshelper.client import NamespaceHelper
    from hotrelay.effectors.nshelper.confined import split_dev_path
    from hotrelay.effectors.nshelper.errors import (
        HelperError,
        InjectionError,
        TargetExistsError,
        UnsafePathError,
    )
    from hotrelay.effectors.nshelper.pool import NamespaceHelpers, shares_host_network
    from hotrelay.effectors.nshelper.protocol import Created, Removed

__all__ = [
    "Created",
    "HelperError",
    "InjectionError",
    "NamespaceHelper",
    "NamespaceHelpers",
    "Removed",
    "TargetExistsError",
    "UnsafePathError",
    "shares_host_network",
    "split_dev_path",
]

# Imported on first use: the helper processes run modules of this package and must
# not load the daemon's side (trio) with it.
_HOMES = {
    "NamespaceHelper": "client",
    "split_dev_path": "confined",
    "HelperError": "errors",
    "InjectionError": "errors",
    "TargetExistsError": "errors",
    "UnsafePathError": "errors",
    "NamespaceHelpers": "pool",
    "shares_host_network": "pool",
    "Created": "protocol",
    "Removed": "protocol",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
