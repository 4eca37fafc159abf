"""Prometheus metrics: the text format exactly, and a scrape over a real loopback socket."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from hotrelay.daemon.metrics import (
    CONTENT_TYPE,
    MAX_REQUEST_HEAD,
    DaemonMetrics,
    Registry,
    answer,
    serve_metrics,
)


def test_counter_gauge_histogram_text_format() -> None:
    registry = Registry()
    events = registry.counter("t_events_total", "Events.\nSecond line \\ here.", ("source",))
    grants = registry.gauge("t_grants", "Grants now.")
    latency = registry.histogram("t_latency_seconds", "Latency.", buckets=(0.01, 0.1, 1))
    events.inc(source="udev")
    events.inc(2, source="kernel")
    events.inc(source='we"ird\\\nname')
    grants.set(5)
    grants.dec()
    for value in (0.005, 0.05, 0.05, 5):
        latency.observe(value)
    assert registry.render() == (
        "# HELP t_events_total Events.\\nSecond line \\\\ here.\n"
        "# TYPE t_events_total counter\n"
        't_events_total{source="kernel"} 2\n'
        't_events_total{source="udev"} 1\n'
        't_events_total{source="we\\"ird\\\\\\nname"} 1\n'
        "# HELP t_grants Grants now.\n"
        "# TYPE t_grants gauge\n"
        "t_grants 4\n"
        "# HELP t_latency_seconds Latency.\n"
        "# TYPE t_latency_seconds histogram\n"
        't_latency_seconds_bucket{le="0.01"} 1\n'
        't_latency_seconds_bucket{le="0.1"} 3\n'
        't_latency_seconds_bucket{le="1"} 3\n'
        't_latency_seconds_bucket{le="+Inf"} 4\n'
        "t_latency_seconds_sum 5.105\n"
        "t_latency_seconds_count 4\n"
    )
    assert events.value(source="kernel") == 2
    assert latency.count() == 4


def test_labelled_histogram_and_special_values() -> None:
    registry = Registry()
    duration = registry.histogram("t_d", "D.", ("kind",), buckets=(1,))
    duration.observe(0.5, kind="grant")
    gauge = registry.gauge("t_g", "G.", ("k",))
    gauge.set(math.inf, k="a")
    gauge.set(math.nan, k="b")
    gauge.set(-math.inf, k="c")
    gauge.set(0.25, k="d")
    text = registry.render()
    assert 't_d_bucket{kind="grant",le="1"} 1\n' in text
    assert 't_d_bucket{kind="grant",le="+Inf"} 1\n' in text
    assert 't_d_sum{kind="grant"} 0.5\n' in text
    assert 't_g{k="a"} +Inf\nt_g{k="b"} NaN\nt_g{k="c"} -Inf\nt_g{k="d"} 0.25\n' in text


def test_misuse_is_refused() -> None:
    registry = Registry()
    counter = registry.counter("t_c", "C.", ("a",))
    with pytest.raises(ValueError, match="cannot go down"):
        counter.inc(-1, a="x")
    with pytest.raises(ValueError, match=r"labels \['b'\] given, \['a'\] expected"):
        counter.inc(b="x")
    with pytest.raises(ValueError, match="registered twice"):
        registry.counter("t_c", "again")
    with pytest.raises(ValueError, match="invalid metric name"):
        registry.gauge("1bad", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        registry.gauge("t_ok", "x", ("__reserved",))
    with pytest.raises(ValueError, match="'le' is reserved"):
        registry.histogram("t_h", "x", ("le",))


def test_daemon_metrics_are_all_there() -> None:
    metrics = DaemonMetrics()
    metrics.events.inc(source="udev", verdict="matched")
    metrics.actions.inc(kind="grant", outcome="ok")
    metrics.latency.observe(0.003)
    metrics.grants.set(1)
    metrics.containers.set(2, runtime="lxc")
    metrics.heals.inc()
    metrics.overflows.inc()
    metrics.reloads.inc(outcome="ok")
    text = metrics.registry.render()
    for line in (
        'hotrelay_events_total{source="udev",verdict="matched"} 1',
        'hotrelay_actions_total{kind="grant",outcome="ok"} 1',
        'hotrelay_job_duration_seconds_bucket{le="0.005"} 1',
        "hotrelay_job_duration_seconds_count 1",
        "hotrelay_grants 1",
        'hotrelay_containers{runtime="lxc"} 2',
        "hotrelay_heals_total 1",
        "hotrelay_overflows_total 1",
        'hotrelay_reloads_total{outcome="ok"} 1',
    ):
        assert line + "\n" in text
    assert re.search(r"^hotrelay_start_time_seconds \d+\.\d+$", text, re.MULTILINE)
    # Every sample line belongs to a declared metric (what a Prometheus parser checks).
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    for sample in re.findall(r"^([a-z_]+)[{ ]", text, re.MULTILINE):
        assert re.sub(r"_(bucket|sum|count)$", "", sample) in declared | {sample}


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK"),
        (b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", b"HTTP/1.1 200 OK"),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.1 405 Method Not Allowed"),
        (b"GET /metrics\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
        (b"\x16\x03\x01\x02\x00", b"HTTP/1.1 400 Bad Request"),  # TLS to a plain port
    ],
)
def test_answers(head: bytes, status: bytes) -> None:
    registry = Registry()
    registry.counter("t_c", "C.").inc()
    response = answer(registry, head)
    assert response.split(b"\r\n", 1)[0] == status
    body = response.split(b"\r\n\r\n", 1)[1]
    if head.startswith(b"HEAD"):
        assert body == b""
        assert f"Content-Length: {len(registry.render())}".encode() in response
    elif status.endswith(b"200 OK"):
        assert body == registry.render().encode()


@asynccontextmanager
async def serving(registry: Registry) -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        address: tuple[str, int] = await nursery.start(serve_metrics, registry, "127.0.0.1", 0)
        yield address
        nursery.cancel_scope.cancel()


async def fetch(address: tuple[str, int], request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    return response


async def test_scrape_over_loopback() -> None:
    metrics = DaemonMetrics()
    metrics.events.inc(source="kernel", verdict="matched")
    async with serving(metrics.registry) as address:
        host, port = address
        assert host == "127.0.0.1"
        assert port > 0
        response = await fetch(address, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, body = response.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 200 OK"
        assert f"Content-Type: {CONTENT_TYPE}".encode() in lines
        assert f"Content-Length: {len(body)}".encode() in lines
        assert b"Connection: close" in lines
        assert b'hotrelay_events_total{source="kernel",verdict="matched"} 1\n' in body
        # The registry is read at each scrape.
        metrics.events.inc(source="kernel", verdict="matched")
        again = await fetch(address, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert b'hotrelay_events_total{source="kernel",verdict="matched"} 2\n' in again
        assert (await fetch(address, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 404 Not Found\r\n"
        )


async def test_oversized_and_silent_clients() -> None:
    async with serving(Registry()) as address:
        huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * (MAX_REQUEST_HEAD + 10)
        response = await fetch(address, huge + b"\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        # A client that connects and says nothing does not hold up the next one.
        silent = await trio.open_tcp_stream(*address)
        async with silent:
            response = await fetch(address, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_binds_only_the_configured_address() -> None:
    async with serving(Registry()) as (host, port):
        # Another loopback address on the same port is not served: only 127.0.0.1 was bound.
        with pytest.raises(OSError, match=r"Connection refused|all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.2", port)
        response = await fetch((host, port), b"GET /metrics HTTP/1.1\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200 OK")
