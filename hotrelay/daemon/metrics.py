"""Prometheus metrics: a small registry the daemon updates, served as text on GET /metrics.

No client library: counters, gauges and histograms with labels, rendered in the
Prometheus text exposition format 0.0.4, and a minimal HTTP/1.1 server that answers
GET (and HEAD) /metrics and closes the connection. It binds only the address in the
config (``metrics = "127.0.0.1:9477"``); nothing is served unless one is configured.

    metrics = DaemonMetrics()
    metrics.events.inc(source="udev", verdict="matched")
    metrics.actions.inc(kind="apply", outcome="ok")
    metrics.latency.observe(0.004)
    address = await nursery.start(serve_metrics, metrics.registry, "127.0.0.1", 9477)
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
from collections.abc import Iterable, Sequence

import trio

__all__ = [
    "LATENCY_BUCKETS",
    "Counter",
    "DaemonMetrics",
    "Gauge",
    "Histogram",
    "Registry",
    "serve_metrics",
]

log = logging.getLogger("hotrelay.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From 0.5 ms (a grant on a warm path) to 10 s (a runtime API that is struggling).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 32

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

LabelValues = tuple[str, ...]


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labels:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: invalid label name {label!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{name}: duplicate label names {labels!r}")
        self.name = name
        self.help = help
        self.label_names = tuple(labels)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(
                f"{self.name}: labels {sorted(labels)} given, {sorted(self.label_names)} expected"
            )
        return tuple(str(labels[n]) for n in self.label_names)

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class _Value(_Metric):
    """One number per label set. Without labels it is exported as 0 from the start."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[str]:
        for key, value in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {_number(value)}"


class Counter(_Value):
    """Only goes up."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        self._add(amount, labels)


class Gauge(_Value):
    """Goes up and down, or is set."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1, **labels: str) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        if "le" in labels:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        super().__init__(name, help, labels)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers")
        self.buckets = (*bounds, math.inf)
        # Per label set: counts per bucket (not cumulative), sum, count.
        self._data: dict[LabelValues, tuple[list[int], list[float]]] = {}
        if not labels:
            self._series(())

    def _series(self, key: LabelValues) -> tuple[list[int], list[float]]:
        series = self._data.get(key)
        if series is None:
            series = self._data[key] = ([0] * len(self.buckets), [0.0, 0.0])
        return series

    def observe(self, value: float, **labels: str) -> None:
        counts, totals = self._series(self._key(labels))
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
                break
        totals[0] += value
        totals[1] += 1

    def count(self, **labels: str) -> int:
        series = self._data.get(self._key(labels))
        return 0 if series is None else int(series[1][1])

    def samples(self) -> Iterable[str]:
        names = (*self.label_names, "le")
        for key, (counts, totals) in sorted(self._data.items()):
            cumulative = 0
            for bound, count in zip(self.buckets, counts, strict=True):
                cumulative += count
                yield f"{self.name}_bucket{_labels(names, (*key, _number(bound)))} {cumulative}"
            labels = _labels(self.label_names, key)
            yield f"{self.name}_sum{labels} {_number(totals[0])}"
            yield f"{self.name}_count{labels} {_number(totals[1])}"


class Registry:
    """Metrics in registration order; names are unique."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help, labels)
        self._add(metric)
        return metric

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help, labels)
        self._add(metric)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        metric = Histogram(name, help, labels, buckets)
        self._add(metric)
        return metric

    def render(self) -> str:
        return "".join(metric.render() for metric in self._metrics.values())


class DaemonMetrics:
    """The daemon's metrics, on their own registry. Label values are the daemon's words:
    source (kernel, udev), verdict (matched, unmatched, untrusted, malformed, mismatch),
    kind (apply, undo, notify: one per job), outcome (ok, failed). docs/operations.md
    lists them, and a test holds the two together."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry()
        r = self.registry
        self.events = r.counter(
            "hotrelay_events_total", "Uevents heard, by source and verdict.", ("source", "verdict")
        )
        self.actions = r.counter(
            "hotrelay_actions_total", "Actions run, by kind and outcome.", ("kind", "outcome")
        )
        self.latency = r.histogram(
            "hotrelay_job_duration_seconds",
            "Time to run one apply, undo or notify job (all of one binding's actions).",
        )
        self.grants = r.gauge("hotrelay_grants", "Devices granted to containers now.")
        self.containers = r.gauge(
            "hotrelay_containers", "Running containers known, by runtime.", ("runtime",)
        )
        self.heals = r.counter(
            "hotrelay_heals_total", "Repairs made by the self-healing pass (grants, nodes)."
        )
        self.overflows = r.counter(
            "hotrelay_overflows_total", "Event-source overflows, each followed by a resync."
        )
        self.reloads = r.counter(
            "hotrelay_reloads_total", "Config and rule reloads, by outcome.", ("outcome",)
        )
        self.start_time = r.gauge(
            "hotrelay_start_time_seconds", "When the daemon started, in unix time."
        )
        self.start_time.set(time.time())


# The HTTP endpoint.


def _response(status: str, body: bytes, *, head_only: bool, extra: str = "") -> bytes:
    content_type = CONTENT_TYPE if status.startswith("200") else "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def answer(registry: Registry, head: bytes) -> bytes:
    """The HTTP response for a request head (pure: the server only moves bytes)."""
    request_line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response("400 Bad Request", b"bad request\n", head_only=False)
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        return _response(
            "405 Method Not Allowed", b"GET only\n", head_only=False, extra="Allow: GET, HEAD\r\n"
        )
    head_only = method == b"HEAD"
    if target.split(b"?", 1)[0] != b"/metrics":
        return _response("404 Not Found", b"try /metrics\n", head_only=head_only)
    return _response("200 OK", registry.render().encode("utf-8"), head_only=head_only)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head; None if it is over MAX_REQUEST_HEAD, b"" if the client said nothing."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            end = data.find(b"\n\n")
        if end >= 0:
            return data if end <= MAX_REQUEST_HEAD else None
        if len(data) > MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return data
        data += chunk


class _MetricsServer:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.connections = 0

    async def handle(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        self.connections += 1
        try:
            async with stream:
                if self.connections > MAX_CONNECTIONS:
                    return
                with trio.move_on_after(REQUEST_TIMEOUT):
                    head = await _read_head(stream)
                    if head is None:
                        response = _response(
                            "431 Request Header Fields Too Large", b"too large\n", head_only=False
                        )
                    elif not head:
                        return
                    else:
                        response = answer(self.registry, head)
                    await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics: client went away: %s", exc)
        finally:
            self.connections -= 1


async def open_metrics_socket(host: str, port: int) -> trio.socket.SocketType:
    """A listening TCP socket on exactly ``host``:``port`` (the first address it resolves to)."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
    )
    if not infos:
        raise OSError(f"{host}: no address to listen on")
    family, kind, proto, _, address = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(address)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_metrics(
    registry: Registry,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics on ``host``:``port`` until cancelled; ``started`` gets the bound
    (host, port), so port 0 picks a free one."""
    sock = await open_metrics_socket(host, port)
    server = _MetricsServer(registry)
    bound = sock.getsockname()
    try:
        async with trio.open_nursery() as nursery:
            log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
            task_status.started((bound[0], bound[1]))
            while True:
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:
                    log.warning("metrics: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(server.handle, conn)
    finally:
        sock.close()
