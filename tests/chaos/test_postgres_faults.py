"""Postgres faults under a live stream: a server process on a Postgres of the test's own
(tests/chaos/pg_support.py), Redis of its own, posters posting all along and clients on a plain
socket and on SSE.

- Paused (SIGSTOP, every process of the cluster): ingest answers 503 with Retry-After by its
  deadline (INGEST_DEADLINE_S, here 1 s), never 202 while paused; the sockets stay up; after
  SIGCONT every 202'd notification is stored and reaches every client exactly once, in order, and
  no 503'd one is ever stored (a 504, commit sent but unconfirmed, is counted either way).
- Restarted (fast shutdown, start again): the server reconnects by itself; posts are answered
  (503 while it is down) and accepted again once it is back, with the same process.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.chaos.faults_support import METRICS_TOKEN, Posters, delivery_figures, metric
from tests.chaos.pg_support import PostgresServer, own_environment
from tests.chaos.report import record
from tests.servers import NotifyServer, RedisServer, seed
from tests.test_cross_process import ORIGIN, Received, plain_client, running, sse_client, wait_live

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

# The bounded form; the long one (a 10 s pause under the default 4 s deadline) is
# CHAOS_PG_PAUSE_S=10 CHAOS_INGEST_DEADLINE_S=4.
DEADLINE_S = int(os.environ.get("CHAOS_INGEST_DEADLINE_S", "1"))  # the server's INGEST_DEADLINE_S
PAUSE_S = float(os.environ.get("CHAOS_PG_PAUSE_S", "3"))  # and until each poster got a 503


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[dict]:
    directory = tmp_path_factory.mktemp("pg-faults")
    with PostgresServer() as postgres, RedisServer(directory) as redis:
        env = own_environment(
            "pg_faults",
            postgres.url,
            redis.url,
            INGEST_DEADLINE_S=str(DEADLINE_S),
            NOTIFY_ALLOWED_ORIGINS=ORIGIN,
            METRICS_TOKEN=METRICS_TOKEN,
            METRICS_DIR=str(directory / "metrics"),
        )
        setup = seed(env)
        with NotifyServer(env, directory / "server.log") as server:
            yield {
                "postgres": postgres,
                "server": server,
                "api_key": setup["api_key"],
                "token": setup["tokens"]["sam"],
            }


def committed(postgres: PostgresServer, topic: str) -> dict[str, int]:
    rows = postgres.execute(
        "SELECT n.idempotency_key, n.seq FROM routing_app_notification n "
        "JOIN routing_app_topic t ON t.id = n.topic_id WHERE t.name = %s",
        (topic,),
    )
    return dict(rows)


def subscribers(deployment: dict, topic: str) -> tuple[list[Received], list]:
    """A plain socket and an SSE client of ``topic`` from its first seq, resuming with ``since``
    / ``Last-Event-ID``: what each received, and the coroutines to run."""
    base, token = deployment["server"].base, deployment["token"]
    clients = [Received("socket"), Received("sse")]
    coros = [plain_client(base, topic, token, clients[0], 0)]
    coros.append(sse_client(base, topic, token, clients[1], 0))
    return clients, coros


async def test_postgres_paused_answers_503_by_the_deadline_and_loses_nothing(deployment):
    postgres, server = deployment["postgres"], deployment["server"]
    topic = "faults.pg-pause"
    clients, coros = subscribers(deployment, topic)
    async with running(*coros), httpx.AsyncClient() as http:
        await wait_live(*clients)
        posters = Posters(http, [server.base], deployment["api_key"], topic, count=8)
        async with posters.posting():
            await posters.wait_for(
                "20 posts accepted", lambda a: Counter(x.status for x in a)[202] >= 20
            )
            await asyncio.to_thread(postgres.pause)
            paused_at = time.monotonic()
            try:
                await posters.each_answered(503, paused_at)
                await asyncio.sleep(max(0.0, paused_at + PAUSE_S - time.monotonic()))
            finally:
                await asyncio.to_thread(postgres.resume)
            resumed_at = time.monotonic()
            await posters.each_answered(202, resumed_at)
        reconnects = [client.reconnects for client in clients]
        # A 504 is in doubt: its client retries under the same key and learns which it was.
        retried = [await posters.repost(a) for a in posters.answers if a.status == 504]
        stored = committed(postgres, topic)
        for client in clients:
            await client.wait_for(max(stored.values()))
    answers = posters.answers
    during = [a for a in answers if a.started > paused_at and a.answered < resumed_at]
    assert during, "no post was answered while Postgres was paused"
    assert {a.status for a in during} == {503}, Counter(a.status for a in during)
    assert all(a.retry_after for a in answers if a.status in (503, 504))
    assert all(a.status is not None for a in answers), "a post got no HTTP answer"
    assert reconnects == [0, 0], "a client's connection dropped while Postgres was paused"
    for again, _ in retried:
        assert again.status == 202 and stored[again.key] == again.seq, again
    figures = delivery_figures(answers, stored, clients)
    missed = {
        outcome: metric(server.base, "notify_ingest_deadline_missed_total", outcome=outcome)
        for outcome in ("not_stored", "in_doubt")
    }
    assert missed == {"not_stored": figures["answered_503"], "in_doubt": figures["answered_504"]}
    log = server.log.read_text(errors="replace")
    assert log.count("did not commit a post within INGEST_DEADLINE_S") == 1, "once per outage"
    record(
        "postgres paused",
        faults_injected=1,
        pause_s=round(resumed_at - paused_at, 1),
        deadline_s=DEADLINE_S,
        answered_while_paused=len(during),
        longest_answer_while_paused_s=round(max(a.answered - a.started for a in during), 2),
        reconnects=sum(reconnects),
        **figures,
        retried_504=len(retried),
        retried_504_replayed=sum(replayed for _, replayed in retried),
    )


async def test_postgres_restarted_connections_come_back_without_a_server_restart(deployment):
    postgres, server = deployment["postgres"], deployment["server"]
    topic = "faults.pg-restart"
    pid = server.pid
    clients, coros = subscribers(deployment, topic)
    async with running(*coros), httpx.AsyncClient() as http:
        await wait_live(*clients)
        posters = Posters(http, [server.base], deployment["api_key"], topic, count=8)
        async with posters.posting():
            await posters.wait_for(
                "20 posts accepted", lambda a: Counter(x.status for x in a)[202] >= 20
            )
            restarted_at = time.monotonic()
            await asyncio.to_thread(postgres.restart)
            back_at = time.monotonic()
            await posters.each_answered(202, back_at)
        stored = committed(postgres, topic)
        for client in clients:
            await client.wait_for(max(stored.values()))
    assert server.pid == pid and server.proc.poll() is None, "the server process was restarted"
    answers = posters.answers
    meanwhile = Counter(
        a.status for a in answers if a.answered > restarted_at and a.started < back_at
    )
    figures = delivery_figures(answers, stored, clients)
    record(
        "postgres restarted",
        faults_injected=1,
        down_s=round(back_at - restarted_at, 1),
        answered_while_down_202=meanwhile[202],
        answered_while_down_503=meanwhile[503],
        answered_while_down_504=meanwhile[504],
        reconnects=sum(client.reconnects for client in clients),
        **figures,
    )
