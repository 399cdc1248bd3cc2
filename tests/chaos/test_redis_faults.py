"""Redis killed mid-stream and restarted empty, under two server processes (a Redis of the test's
own; the database is a fresh one beside DATABASE_URL's), posters on both and clients on both (plain
socket and SSE, resuming with ``since`` / ``Last-Event-ID``), Phoenix sockets tracked in presence
on both.

While Redis is away ingest keeps answering 202 (Postgres is the truth: each process counts its
share of the key's rate, says so once in its log and in ``notify_limiter_fallback``); once it is
back, empty, presence is tracked again by the processes themselves, every client has every seq
exactly once and in order, and neither process was restarted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.chaos.faults_support import METRICS_TOKEN, Posters, delivery_figures, metric
from tests.chaos.report import record
from tests.servers import NotifyServer, RedisServer, run_script, seed, server_environment
from tests.test_cross_process import (
    ORIGIN,
    RECONNECT_DELAY_S,
    Received,
    plain_client,
    running,
    sse_client,
    wait_live,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

OUTAGE_S = 5  # Redis stays away at least this long, and until every poster was answered meanwhile
FALLBACK_ON = "the rate limiter's store does not answer"
FALLBACK_OFF = "the rate limiter's store answers again"
PRESENCE_TTL_S = 3  # the servers renew presence every 1 s: it comes back soon after Redis does


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[dict]:
    directory = tmp_path_factory.mktemp("redis-faults")
    with (
        RedisServer(directory) as redis,
        server_environment(
            directory,
            "redis_faults",
            REDIS_URL=redis.url,
            NOTIFY_ALLOWED_ORIGINS=ORIGIN,
            INGEST_SERVER_PROCESSES="2",
            PRESENCE_TTL_S=str(PRESENCE_TTL_S),
            METRICS_TOKEN=METRICS_TOKEN,
            METRICS_DIR=str(directory / "metrics"),
        ) as env,
    ):
        setup = seed(env)
        servers = [NotifyServer(env, directory / f"server-{name}.log") for name in ("a", "b")]
        try:
            for server in servers:
                server.spawn()
            for server in servers:
                server.wait_ready()
            yield {"redis": redis, "servers": servers, **setup}
        finally:
            for server in servers:
                server.stop()


def fallback_gauge(base: str) -> float:
    return metric(base, "notify_limiter_fallback")


async def presence_users(http: httpx.AsyncClient, base: str, topic: str, api_key: str) -> list:
    answer = await http.get(
        f"{base}/api/v1/topics/{topic}/presence", headers={"Authorization": f"Bearer {api_key}"}
    )
    if answer.status_code != 200:
        return []
    return sorted(user["username"] for user in answer.json()["users"])


async def wait_presence(http, bases: list[str], topic: str, api_key: str, wanted: list) -> None:
    """Poll the presence API of every server (presence has no event a client can await from
    outside) until each lists ``wanted``; AssertionError after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        seen = [await presence_users(http, base, topic, api_key) for base in bases]
        if all(users == wanted for users in seen):
            return
        assert time.monotonic() < deadline, f"presence never came back: {seen}"
        await asyncio.sleep(0.2)


async def said(servers: list[NotifyServer], text: str) -> None:
    """Poll the servers' logs (a log line has no event to await) until each holds ``text``;
    AssertionError after 30 s."""
    deadline = time.monotonic() + 30
    while not all(text in server.log.read_text(errors="replace") for server in servers):
        assert time.monotonic() < deadline, f"not every server logged {text!r}"
        await asyncio.sleep(0.2)


async def member(base: str, topic: str, token: str, joins: list[int]) -> None:
    """A Phoenix client that stays joined to ``topic`` (so tracked in its presence): it reads
    every frame and, when the server closes it (1013 once the server lost Redis for
    REALTIME_BUS_OUTAGE_S) or refuses its join, connects and joins again, as the official client
    does. ``joins`` counts its accepted joins."""
    url = base.replace("http://", "ws://") + f"/socket/websocket?vsn=2.0.0&token={token}"
    while True:
        try:
            async with ws_connect(url, origin=ORIGIN, open_timeout=20) as ws:
                await ws.send(json.dumps(["1", "1", topic, "phx_join", {}]))
                async for raw in ws:
                    _, ref, _, event, payload = json.loads(raw)
                    if event == "phx_reply" and ref == "1":
                        if payload["status"] != "ok":
                            break  # refused while Redis is away: connect and join again
                        joins.append(1)
        except (OSError, ConnectionClosed, InvalidStatus, TimeoutError):
            pass
        await asyncio.sleep(RECONNECT_DELAY_S)  # the client's backoff, not a wait for an event


async def test_redis_killed_and_restarted_empty_ingest_keeps_accepting(deployment):
    redis, servers = deployment["redis"], deployment["servers"]
    bases = [server.base for server in servers]
    pids = [server.pid for server in servers]
    api_key, tokens = deployment["api_key"], deployment["tokens"]
    topic, room = "faults.redis-kill", "faults.redis-room"
    clients = [Received(f"{kind} on {name}") for kind in ("socket", "sse") for name in ("a", "b")]
    coros = []
    for got in clients:
        kind, _, name = got.name.split(" ")
        client = plain_client if kind == "socket" else sse_client
        coros.append(client(bases["ab".index(name)], topic, tokens["sam"], got, 0))
    joins: dict[str, list[int]] = {"sam": [], "olga": []}
    coros.append(member(bases[0], room, tokens["sam"], joins["sam"]))
    coros.append(member(bases[1], room, tokens["olga"], joins["olga"]))
    async with running(*coros), httpx.AsyncClient(timeout=30) as http:
        await wait_live(*clients)
        await wait_presence(http, bases, room, api_key, ["olga", "sam"])
        posters = Posters(http, bases, api_key, topic)
        async with posters.posting():
            await posters.wait_for(
                "20 posts accepted", lambda a: Counter(x.status for x in a)[202] >= 20
            )
            await asyncio.to_thread(redis.kill)
            killed_at = time.monotonic()
            try:
                await posters.each_answered(202, killed_at)
                await asyncio.sleep(max(0.0, killed_at + OUTAGE_S / 2 - time.monotonic()))
                gauges = [await asyncio.to_thread(fallback_gauge, base) for base in bases]
                await asyncio.sleep(max(0.0, killed_at + OUTAGE_S - time.monotonic()))
            finally:
                await asyncio.to_thread(redis.start)
            back_at = time.monotonic()
            await posters.each_answered(202, back_at)
            await said(servers, FALLBACK_OFF)  # each process found the shared counter again
        await wait_presence(http, bases, room, api_key, ["olga", "sam"])
        presence_back_s = time.monotonic() - back_at
        stored = await asyncio.to_thread(committed, deployment, topic)
        for got in clients:
            await got.wait_for(max(stored.values()))
        gauges_after = [await asyncio.to_thread(fallback_gauge, base) for base in bases]
    answers = posters.answers
    during = [a for a in answers if a.started > killed_at and a.answered < back_at]
    assert during and {a.status for a in during} == {202}, Counter(a.status for a in during)
    assert [server.pid for server in servers] == pids
    assert all(server.proc.poll() is None for server in servers), "a server process died"
    logs = [server.log.read_text(errors="replace") for server in servers]
    assert [log.count(FALLBACK_ON) for log in logs] == [1, 1], "one warning per outage each"
    assert [log.count(FALLBACK_OFF) for log in logs] == [1, 1]
    # Both processes write one metrics directory (one host): the gauge sums them.
    assert gauges == [2.0, 2.0] and gauges_after == [0.0, 0.0], (gauges, gauges_after)
    figures = delivery_figures(answers, stored, clients)
    record(
        "redis killed and restarted empty",
        faults_injected=1,
        outage_s=round(back_at - killed_at, 1),
        answered_while_down=len(during),
        answered_while_down_202=sum(a.status == 202 for a in during),
        presence_back_after_s=round(presence_back_s, 1),
        reconnects=sum(got.reconnects for got in clients),
        presence_rejoins=sum(len(j) - 1 for j in joins.values()),
        processes_restarted=0,
        **figures,
    )


COMMITTED_SCRIPT = """
import json, sys
from routing_app.models import Notification
rows = Notification.objects.filter(topic__name=sys.argv[1]).values_list("idempotency_key", "seq")
print("ROWS " + json.dumps(dict(rows)))
"""


def committed(deployment: dict, topic: str) -> dict[str, int]:
    env = deployment["servers"][0].env
    line = next(
        x for x in run_script(env, COMMITTED_SCRIPT, topic).splitlines() if x[:5] == "ROWS "
    )
    return json.loads(line[5:])
