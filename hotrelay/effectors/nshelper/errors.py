"""Errors of the namespace helpers, as the daemon sees them.

Each names the container and, where there is one, the path inside it; ``errno`` is
set when the kernel gave one. Nothing else is affected by one: the daemon reports it
and goes on.
"""

from __future__ import annotations

from hotrelay.errors import HotrelayError

__all__ = [
    "AccountReadError",
    "HelperError",
    "HelperTimeoutError",
    "InjectionError",
    "TargetExistsError",
    "UnsafePathError",
    "error_for_kind",
]


class InjectionError(HotrelayError):
    """Putting something into a container, or taking it out, failed."""

    def __init__(
        self,
        container: str,
        message: str,
        *,
        path: str | None = None,
        errno: int | None = None,
    ) -> None:
        where = f"container {container}: {path}: " if path else f"container {container}: "
        super().__init__(where + message)
        self.container = container
        self.path = path
        self.errno = errno


class UnsafePathError(InjectionError):
    """The path would leave the container's /dev (a symlink on the way, '..', ...)."""


class TargetExistsError(InjectionError):
    """Something we did not create is already at the target; it was left alone."""


class HelperError(InjectionError):
    """The namespace helper could not be started, died, or missed its deadline."""


class HelperTimeoutError(HelperError):
    """The helper missed its deadline (and was killed)."""


class AccountReadError(InjectionError):
    """The container's /etc/passwd or /etc/group could not be read safely."""


_KINDS: dict[str, type[InjectionError]] = {
    "unsafe": UnsafePathError,
    "exists": TargetExistsError,
    "account": AccountReadError,
}


def error_for_kind(kind: str) -> type[InjectionError]:
    """The exception class for a failure kind the helper reported."""
    return _KINDS.get(kind, InjectionError)
