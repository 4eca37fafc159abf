"""Thin, typed wrappers around the syscalls and kernel interfaces hotrelay uses."""

from __future__ import annotations
