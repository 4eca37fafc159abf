"""Errors of the runtime adapters, each meaning one thing to the caller."""

from __future__ import annotations

from hotrelay.errors import HotrelayError

__all__ = ["ContainerGone", "RuntimeApiError", "RuntimeUnavailable"]


class ContainerGone(HotrelayError):
    """The container (or its init process) disappeared while we looked at it.

    Not a failure: a watcher reports the container stopped, a lookup returns nothing.
    """


class RuntimeUnavailable(HotrelayError):
    """The runtime is not installed or not running here (no socket, no tool).

    Adapters raise it so the caller can skip that runtime with one log line.
    """


class RuntimeApiError(HotrelayError):
    """The runtime answered, but not as its API promises (HTTP error, bad JSON, odd output)."""
