"""trio orchestration: the event source, coldplug and (later) the relay pump."""

from __future__ import annotations
