"""Errors a user sees. Only the CLI turns them into exit codes; the daemon logs and goes on."""

from __future__ import annotations


class HotrelayError(Exception):
    """An error with a message meant for the operator."""

    exit_code = 1


class NotRootError(HotrelayError):
    """The verb needs root in the host's namespaces (netlink groups, cgroups, mounts)."""

    exit_code = 2
