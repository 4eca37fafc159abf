"""Effectors: the thin layer that carries out planned actions on the real kernel.

Each module does one family of actions and hands back plain, JSON-ready records of
what it did, so the daemon can persist them and undo exactly that later, also after a
restart. ``cgroups`` is the device-cgroup façade (v1 ``devices.allow`` and v2 BPF
programs); ``cgroup_v1`` and ``cgroup_v2`` are its two layers.
"""

from __future__ import annotations

from hotrelay.errors import HotrelayError

__all__ = ["GrantError"]


class GrantError(HotrelayError):
    """A device grant, revoke or heal failed on one cgroup.

    The message names the cgroup, the device rule and the reason; ``errno`` and the
    verifier ``log`` are there when the kernel gave them. Nothing else is affected:
    the daemon reports it for that action and carries on.
    """

    def __init__(
        self,
        message: str,
        *,
        cgroup: str,
        rule: str | None = None,
        errno: int | None = None,
        log: str = "",
    ) -> None:
        if log and log not in message:
            message = f"{message}\nverifier log:\n{log.rstrip()}"
        super().__init__(message)
        self.cgroup = cgroup
        self.rule = rule
        self.errno = errno
        self.log = log
