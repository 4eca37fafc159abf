"""The control socket: JSON lines over a unix socket, for ``hotrelay status|list|attach|...``.

- ``protocol``: the wire format, request validation, who may use which verb, and the
  ``ControlHandler`` protocol the daemon implements (pure, fuzzable);
- ``server``: the trio server (``serve_control``), socket setup and activation, peer checks,
  and ``Broadcaster`` for the monitor feed;
- ``client``: a small synchronous client for the CLI and scripts.
"""

from __future__ import annotations

from hotrelay.control.protocol import READ_ONLY_VERBS, VERBS, ControlHandler

__all__ = ["READ_ONLY_VERBS", "VERBS", "ControlHandler"]
