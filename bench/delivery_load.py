"""Load and waiting for bench/delivery.py: notifications posted through the ingest API (in
batches, or paced single posts), arrivals awaited at a peer, Delivery rows read back, and
percentiles."""

from __future__ import annotations

import asyncio
import json
import time

from delivery_peers import Peer
from ingest import Http11Connection

POLL_S = 0.002  # how often a waiting phase asks a peer for its count
POSTERS = 4  # concurrent batch posters
POST_TIMEOUT_S = 30  # one ingest request; the server answers in milliseconds when healthy


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float]) -> str:
    p50, p95, p99 = (pct(values, q) for q in (0.5, 0.95, 0.99))
    return f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms"


def rate_of(times: list[float]) -> float:
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


# --- posting -----------------------------------------------------------------------------------


def notification(topic: str, i: int) -> dict:
    return {
        "topic": topic,
        "event": "bench.tick",
        "severity": "info",
        "data": {"n": i, "host": "web-1", "note": "a typical small payload of some bytes"},
    }


async def post_burst(
    base: str, key: str, topic: str, n: int, batch: int
) -> list[tuple[str, float]]:
    """Post ``n`` notifications in batches from ``POSTERS`` connections; (id, post time) each."""
    port = int(base.rsplit(":", 1)[1])
    batches = iter(range(0, n, batch))
    posted: list[tuple[str, float]] = []

    async def poster() -> None:
        connection = Http11Connection("127.0.0.1", port, "/api/v1/notifications/batch", key)
        for first in batches:
            items = [notification(topic, i) for i in range(first, min(n, first + batch))]
            at = time.time()
            body = json.dumps({"notifications": items}).encode()
            status, body = await asyncio.wait_for(connection.post(body), POST_TIMEOUT_S)
            if status != 202:
                raise SystemExit(f"ingest answered {status}: {body[:300]!r}")
            posted.extend((r["id"], at) for r in json.loads(body)["results"])
        connection.close()

    await asyncio.gather(*(poster() for _ in range(POSTERS)))
    return posted


async def post_paced(base: str, key: str, topic: str, rate: float, duration_s: float):
    """Post single notifications open-loop at ``rate``/s for ``duration_s``; (id, post time)."""
    port = int(base.rsplit(":", 1)[1])
    free = [Http11Connection("127.0.0.1", port, "/api/v1/notifications", key) for _ in range(8)]
    posted: list[tuple[str, float]] = []
    count = int(rate * duration_s)
    t0 = time.monotonic()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        waited = time.monotonic()
        while not free:  # all 8 busy: ingest is behind, the post waits (bounded)
            if time.monotonic() - waited > POST_TIMEOUT_S:
                raise SystemExit("no ingest connection came free in time")
            await asyncio.sleep(0.001)
        connection = free.pop()
        at = time.time()
        payload = json.dumps(notification(topic, i)).encode()
        try:
            status, body = await asyncio.wait_for(connection.post(payload), POST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError):
            # The server closed a connection idle past its keep-alive (uvicorn: 5 s) before
            # this request: nothing was stored; the connection reconnects for the resend.
            at = time.time()
            status, body = await asyncio.wait_for(connection.post(payload), POST_TIMEOUT_S)
        free.append(connection)
        if status != 202:
            raise SystemExit(f"ingest answered {status}: {body[:300]!r}")
        posted.append((json.loads(body)["id"], at))

    await asyncio.gather(*(one(i) for i in range(count)))
    for connection in free:
        connection.close()
    return posted


def wait_received(peer: Peer, start: int, n: int, timeout_s: float, on_poll=None):
    """The records of the next ``n`` arrivals at ``peer`` (from index ``start``); raises
    SystemExit with the count so far after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while peer.count() < start + n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {peer.count() - start} of {n} arrived in {timeout_s:.0f} s")
        polls += 1
        if on_poll and polls % 100 == 0:
            on_poll()
        time.sleep(POLL_S)
    return peer.received(start)


def rows_of(ids: list[str]) -> dict[str, tuple[int, int | None, str]]:
    """notification id -> (delivery id, latency_ms, status) of its delivery."""
    from routing_app.models import Delivery

    rows = Delivery.objects.filter(notification_id__in=ids).values_list(
        "notification_id", "pk", "latency_ms", "status"
    )
    return {str(n): (pk, latency, status) for n, pk, latency, status in rows}


# --- phases ------------------------------------------------------------------------------------
