"""hotrelay: relay host hotplug events into running containers."""

from __future__ import annotations

__version__ = "0.1.0"
