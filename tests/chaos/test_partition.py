"""A network partition between one server process and Redis, the other process unaffected.

Server A runs in a network namespace of its own (tests/chaos/cluster_support.py): its clients
reach it over one veth pair, it reaches Redis over another, and Postgres over the Unix socket.
Server B runs on the host. The partition downs the Redis link alone: A's packets to Redis vanish
without a reset while its clients still reach it. Then:

- A notices: its health counts (``GET /api/v1/realtime/hub``) say ``redis_connected: false`` and
  its ``/metrics`` say ``notify_realtime_bus_disconnected 1``;
- A closes its realtime clients with 1013 (SSE: ends their streams with ``unavailable``), counted
  in its ``notify_connections_closed_total{reason="try_later"}``; they resume on B with ``since``;
- ingest on A still answers (202, or 503 with Retry-After while its rate limiter cannot reach
  Redis), never hangs;
- notifications published through B meanwhile, and through A once the link is back, reach every
  client exactly once, in order: nothing is lost when the partition heals.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import httpx
import pytest
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.cluster_support import (
    Namespace,
    NamespacedServer,
    clients_on_both,
    netns_unusable,
    postgres_socket_missing,
    tally,
    unix_socket_database_url,
)
from tests.chaos.report import record
from tests.servers import NotifyServer, RedisServer, seed, server_environment, spawned
from tests.test_cross_process import (
    ORIGIN,
    Poster,
    running,
    wait_live,
)

CLIENTS_PER_KIND = 2  # on each server, of each protocol
BEFORE, DURING, AFTER = 20, 30, 20  # notifications published before, during and after the cut
NOTICE_TIMEOUT_S = 60  # upper bound for the cut-off process to notice, close and recover
INGEST_ANSWER_TIMEOUT_S = 60  # upper bound for an answer of the cut-off process's ingest
METRICS_TOKEN = "partition-metrics-token"
# The bus's timings, short so that the partition is noticed within seconds here.
BUS_TIMINGS = {
    "REALTIME_BUS_PING_AFTER_S": "1",
    "REALTIME_BUS_SILENT_MAX_S": "1",
    "REALTIME_BUS_OUTAGE_S": "1",
}

_unusable = netns_unusable()
_database_url = os.environ.get("DATABASE_URL", "")
_no_socket = (
    postgres_socket_missing(_database_url)
    if _database_url.startswith(("postgres://", "postgresql://"))
    else "DATABASE_URL is not a Postgres URL"
)
pytestmark = [
    pytest.mark.skipif(
        not settings.REDIS_URL,
        reason="two server processes share fanout only through Redis: set REDIS_URL",
    ),
    pytest.mark.skipif(
        _unusable is not None,
        reason=f"network namespaces are not usable here ({_unusable}); run as root",
    ),
    pytest.mark.skipif(
        _no_socket is not None,
        reason="the process in its own network namespace reaches Postgres by its Unix socket: "
        f"set DATABASE_URL to a Postgres on this host ({_no_socket})",
    ),
    pytest.mark.timeout(240),
]


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory) -> Iterator[dict]:
    """Server A in its namespace, B on the host, one database, our own Redis on both the host's
    loopback and the host end of A's Redis link. Yields {"namespace", "a", "b", "api_key",
    "tokens"}."""
    workdir = tmp_path_factory.mktemp("partition")
    with Namespace(f"notify-part-{os.getpid()}", subnet=40) as namespace:
        # Bound to loopback and the namespace's private link only: no protected mode needed.
        bind = ("--bind", "127.0.0.1", namespace.redis_host, "--protected-mode", "no")
        redis = RedisServer(workdir, *bind)
        with (
            redis,
            server_environment(
                workdir,
                "partition",
                REDIS_URL=redis.url,
                NOTIFY_ALLOWED_ORIGINS=ORIGIN,
                METRICS_TOKEN=METRICS_TOKEN,
                **BUS_TIMINGS,
            ) as env,
        ):
            setup = seed(env)
            # Each process is a host of its own for the metrics, so A's /metrics are A's.
            env_a = {
                **env,
                "REDIS_URL": f"redis://{namespace.redis_host}:{redis.port}/0",
                "DATABASE_URL": unix_socket_database_url(env["DATABASE_URL"]),
                "ALLOWED_HOSTS": f"127.0.0.1,{namespace.address}",
                "METRICS_DIR": str(workdir / "metrics-a"),
                "NOTIFY_HOST": "cut-off",
            }
            env_b = {**env, "METRICS_DIR": str(workdir / "metrics-b"), "NOTIFY_HOST": "peer"}
            a = NamespacedServer(env_a, workdir / "server-a.log", namespace)
            b = NotifyServer(env_b, workdir / "server-b.log")
            with spawned([a, b]):
                yield {
                    "namespace": namespace,
                    "a": a,
                    "b": b,
                    "api_key": setup["api_key"],
                    "tokens": setup["tokens"],
                }


def _health(server: NotifyServer, api_key: str) -> dict:
    return server.hub_stats(api_key)


def _metrics(server: NotifyServer) -> dict[tuple[str, tuple], float]:
    """``/metrics`` of ``server``'s host as {(sample name, sorted labels): value}."""
    answer = httpx.get(
        f"{server.base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def _bus_disconnected(metrics: dict) -> float:
    return metrics[("notify_realtime_bus_disconnected", ())]


def _closed_try_later(metrics: dict) -> int:
    return int(
        sum(
            value
            for (name, labels), value in metrics.items()
            if name == "notify_connections_closed_total" and ("reason", "try_later") in labels
        )
    )


async def _until(what: str, check, timeout_s: float = NOTICE_TIMEOUT_S):
    """Poll ``check()`` (in a thread) until it returns something true; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await asyncio.to_thread(check)
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.1)  # polling a server's state: no event tells us it changed


async def test_partition_from_redis_closes_clients_1013_they_resume_elsewhere_nothing_lost(
    partitioned,
):
    a, b, namespace = partitioned["a"], partitioned["b"], partitioned["namespace"]
    api_key, token = partitioned["api_key"], partitioned["tokens"]["sam"]
    topic = "faults.partition"
    clients, coros = clients_on_both(a, b, topic, token, CLIENTS_PER_KIND)
    everyone = clients["a"] + clients["b"]
    async with running(*coros), httpx.AsyncClient() as http:
        await wait_live(*everyone)
        # The bus connects with the first subscription: A holds it now.
        assert (await asyncio.to_thread(_health, a, api_key))["redis_connected"]
        poster = Poster(http, api_key)
        published: list[int] = []

        async def publish(server: NotifyServer, count: int) -> None:
            for _ in range(count):
                seq, _ = await poster.post_until_accepted(server.base, topic, len(published))
                published.append(seq)

        await publish(b, BEFORE)
        for got in clients["a"]:  # A's clients are live on A, mid-stream
            await got.wait_for(published[-1])
        before = await asyncio.to_thread(_metrics, a)
        assert _bus_disconnected(before) == 0
        closed_before = _closed_try_later(before)

        await asyncio.to_thread(namespace.cut)
        cut_at = time.monotonic()
        during = asyncio.ensure_future(publish(b, DURING))  # B keeps publishing meanwhile

        def cut_off_health() -> dict | None:
            health = _health(a, api_key)
            return None if health["redis_connected"] else health

        def cut_off_metrics() -> dict | None:
            metrics = _metrics(a)
            closed = _closed_try_later(metrics) - closed_before
            down = _bus_disconnected(metrics) == 1
            return metrics if down and closed >= len(clients["a"]) else None

        health = await _until("A's health says Redis is unreachable", cut_off_health)
        noticed_s = time.monotonic() - cut_at
        metrics = await _until(
            "A's /metrics say the bus is down and A closed its clients with 1013",
            cut_off_metrics,
        )
        # Only the cut-off process says so: B's host still holds its bus.
        assert _bus_disconnected(await asyncio.to_thread(_metrics, b)) == 0
        assert (await asyncio.to_thread(_health, b, api_key))["redis_connected"]
        await during
        # Ingest on the cut-off process answers (Postgres is the truth: 202, or 503 with
        # Retry-After while its limiter cannot reach Redis), never hangs.
        probe_started = time.monotonic()
        probe = await http.post(
            f"{a.base}/api/v1/notifications",
            json={"topic": "faults.partition-probe", "event": "probe", "data": {}},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=INGEST_ANSWER_TIMEOUT_S,
        )
        probe_s = time.monotonic() - probe_started
        assert probe.status_code == 202 or (
            probe.status_code == 503 and probe.headers.get("retry-after")
        ), probe.text
        for got in clients["a"]:  # resumed on B: every seq published meanwhile arrived
            await got.wait_for(published[-1])
        await asyncio.to_thread(namespace.heal)

        def reconnected() -> bool:
            health = _health(a, api_key)
            return health["redis_connected"] and health["reconnects"] >= 1

        await _until("A reconnects to Redis once the partition heals", reconnected)
        assert _bus_disconnected(await asyncio.to_thread(_metrics, a)) == 0
        await publish(a, AFTER)  # A serves ingest again
        for got in everyone:
            await got.wait_for(published[-1])
    figures = tally(everyone, published)
    record(
        "server process partitioned from Redis",
        faults=1,
        clients=len(everyone),
        **figures,
        noticed_after_s=round(noticed_s, 1),
        ingest_on_cut_off_process=probe.status_code,
        ingest_answered_after_s=round(probe_s, 1),
        closed_with_1013=_closed_try_later(metrics) - closed_before,
        reconnects_of_cut_off_clients=sum(got.reconnects for got in clients["a"]),
        reconnects_of_other_clients=sum(got.reconnects for got in clients["b"]),
    )
    assert health["redis_connected"] is False
    assert published == list(range(1, BEFORE + DURING + AFTER + 1))
    for got in everyone:
        assert got.seqs == published, f"{got.name} after {got.reconnects} reconnect(s)"
    assert all(got.reconnects >= 1 for got in clients["a"]), "a cut-off client stayed on A"
