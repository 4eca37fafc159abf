"""Real kernel objects for tests and the demo: sandbox containers and hotplug generators."""

from __future__ import annotations
