"""A server process killed (SIGKILL) mid-stream: its clients resume on the other process.

Two uvicorn processes of ``manage.py serve`` share one database and a redis-server of this
module's own. Plain WebSocket, Phoenix and SSE clients are connected to both; notifications are
published through the process that survives while the other is killed. Every client reconnects
(to the survivor) with ``since`` / ``Last-Event-ID`` / a rejoin's ``since`` = the last seq it saw,
as the JS client does, and must end with every seq exactly once, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from django.conf import settings

from tests.chaos.cluster_support import clients_on_both, tally
from tests.chaos.report import record
from tests.servers import NotifyServer, RedisServer, seed, server_environment, spawned
from tests.test_cross_process import (
    ORIGIN,
    Poster,
    running,
    wait_live,
)

CLIENTS_PER_KIND = 3  # on each server, of each protocol
TOTAL = 120  # notifications published
KILL_AFTER = 40  # the victim is killed once every client has this many
HUB_EMPTY_TIMEOUT_S = 20  # the survivor's hub drops the topics the clients held once they leave

pytestmark = [
    pytest.mark.skipif(
        not settings.REDIS_URL,
        reason="two server processes share fanout only through Redis: set REDIS_URL",
    ),
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[dict]:
    """Two server processes on one database and our own Redis: {"servers": [victim, survivor],
    "api_key", "tokens"}."""
    workdir = tmp_path_factory.mktemp("server-faults")
    with (
        RedisServer(workdir) as redis,
        server_environment(
            workdir, "faults", REDIS_URL=redis.url, NOTIFY_ALLOWED_ORIGINS=ORIGIN
        ) as env,
    ):
        setup = seed(env)
        servers = [NotifyServer(env, workdir / f"server-{name}.log") for name in ("a", "b")]
        with spawned(servers):
            yield {"servers": servers, "api_key": setup["api_key"], "tokens": setup["tokens"]}


async def _hub_empties(server: NotifyServer, api_key: str) -> dict:
    """The server's hub counts once it holds no topic and no subscriber (its named listen
    channels stay: they are the process's own)."""
    deadline = time.monotonic() + HUB_EMPTY_TIMEOUT_S
    while True:
        stats = await asyncio.to_thread(server.hub_stats, api_key)
        if stats["topics"] == 0 and stats["subscribers"] == 0:
            assert stats["redis_channels"] <= stats["listeners"], stats
            return stats
        assert time.monotonic() < deadline, f"still subscribed after the clients left: {stats}"
        await asyncio.sleep(0.1)  # polling the counts: no event tells us they changed


async def test_kill_9_of_one_server_every_client_ends_with_every_seq_once_in_order(pair):
    victim, survivor = pair["servers"]
    token = pair["tokens"]["sam"]
    topic = "faults.kill"
    clients, coros = clients_on_both(victim, survivor, topic, token, CLIENTS_PER_KIND)
    everyone = clients["a"] + clients["b"]
    async with running(*coros), httpx.AsyncClient() as http:
        await wait_live(*everyone)
        poster = Poster(http, pair["api_key"])
        published: list[int] = []
        for i in range(TOTAL):
            if i == KILL_AFTER:
                for got in clients["a"]:  # the victim's clients are mid-stream on it
                    await got.wait_for(published[-1])
                kill = asyncio.ensure_future(asyncio.to_thread(victim.kill))
            seq, _ = await poster.post_until_accepted(survivor.base, topic, i)
            published.append(seq)
        await kill
        for got in everyone:
            await got.wait_for(published[-1])
    figures = tally(everyone, published)
    record(
        "server process SIGKILLed mid-stream",
        faults=1,
        clients=len(everyone),
        **figures,
        reconnects_of_victims_clients=sum(got.reconnects for got in clients["a"]),
        reconnects_of_survivors_clients=sum(got.reconnects for got in clients["b"]),
    )
    assert published == list(range(1, TOTAL + 1))
    for got in everyone:
        assert got.seqs == published, f"{got.name} after {got.reconnects} reconnect(s)"
    assert all(got.reconnects >= 1 for got in clients["a"]), "a victim's client never reconnected"
    await _hub_empties(survivor, pair["api_key"])
