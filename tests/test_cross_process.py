"""Cross-process fanout: two uvicorn server processes sharing Redis and the database behave as
one edge.

- a notification posted to one server reaches plain WebSocket and SSE clients on both;
- presence is the union of both servers (Phoenix joins tracked on each, read back through
  ``GET /api/v1/topics/<topic>/presence`` and the plain socket's ``presence`` frame on each);
- Redis restarted while notifications are being posted: every client (plain socket and SSE, on
  both servers) ends with every seq exactly once, in order. Clients that get disconnected
  reconnect with ``since`` / ``Last-Event-ID`` = the last seq they saw, as the JS client does.

The servers (tests/servers.py) get a database of their own (a fresh Postgres database next to
DATABASE_URL's, else a SQLite file) and a redis-server this module starts on a free port, never
the shared one, so restarting it disturbs nobody else. In the embedded mode (no REDIS_URL) the
test is skipped: there, each process has its own in-memory hub and presence, so two processes
share nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.servers import NotifyServer, RedisServer, seed, server_environment

EVENT_TIMEOUT_S = 20  # upper bound for one awaited event; passing runs take far less
ORIGIN = "http://xproc.test"
RECONNECT_DELAY_S = 0.1  # a client's pause before reconnecting (as a real client backs off)

pytestmark = pytest.mark.skipif(
    not settings.REDIS_URL,
    reason="cross-process fanout needs REDIS_URL: in the embedded mode every process has its own "
    "in-memory hub and presence, so two server processes share no state to test",
)


# --- processes: our own redis-server, two uvicorn servers -----------------------------------


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("xproc-redis")) as redis:
        yield redis


@pytest.fixture(scope="module")
def deployment(own_redis, tmp_path_factory) -> Iterator[dict]:
    """Two uvicorn processes on one database and our Redis. Yields {"urls": [a, b], "api_key",
    "tokens": {"sam", "olga", ...}, "logs"}."""
    workdir = tmp_path_factory.mktemp("xproc")
    with server_environment(
        workdir, "xproc", REDIS_URL=own_redis.url, NOTIFY_ALLOWED_ORIGINS=ORIGIN
    ) as env:
        setup = seed(env)
        servers = [NotifyServer(env, workdir / f"server-{name}.log") for name in ("a", "b")]
        try:
            for server in servers:  # both start at once: a cold start takes seconds
                server.spawn()
            for server in servers:
                server.wait_ready()
            yield {
                "urls": [server.base for server in servers],
                "api_key": setup["api_key"],
                "tokens": setup["tokens"],
                "logs": [server.log for server in servers],
            }
        finally:
            for server in servers:
                server.stop()


# --- clients ------------------------------------------------------------------------------------


class Received:
    """What one client saw: the seqs of notifications in arrival order, across reconnects."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seqs: list[int] = []
        self.live = asyncio.Event()  # "subscribed" seen: from here on the client is live
        self.reconnects = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []

    @property
    def last(self) -> int | None:
        return self.seqs[-1] if self.seqs else None

    def add(self, seq: int) -> None:
        self.seqs.append(seq)
        for target, event in self._waiters:
            if seq >= target:
                event.set()

    async def wait_for(self, seq: int) -> None:
        if self.seqs and max(self.seqs) >= seq:
            return
        event = asyncio.Event()
        self._waiters.append((seq, event))
        try:
            await asyncio.wait_for(event.wait(), EVENT_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} never got seq {seq}; it has {self.seqs[-10:]} "
                f"after {self.reconnects} reconnect(s)"
            ) from None


def server_for(base: str | Sequence[str], got: Received) -> str:
    """The server a client (re)connects to: ``base``, or with several, the next one after each
    reconnect (as a load balancer spreads reconnecting clients over the servers left)."""
    bases = [base] if isinstance(base, str) else list(base)
    return bases[got.reconnects % len(bases)]


async def plain_client(
    base: str | Sequence[str], topic: str, token: str, got: Received, since: int | None
):
    """A plain-protocol client that reconnects with ``since`` = the last seq it saw."""
    while True:
        resume = got.last if got.last is not None else since
        ws_base = server_for(base, got).replace("http://", "ws://")
        url = f"{ws_base}/ws/{topic}/?token={token}"
        if resume is not None:
            url += f"&since={resume}"
        try:
            async with ws_connect(url, origin=ORIGIN, open_timeout=EVENT_TIMEOUT_S) as ws:
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame["type"] == "notification":
                        got.add(frame["seq"])
                    elif frame["type"] == "subscribed":
                        got.live.set()
                    elif frame["type"] == "ping":
                        await ws.send('{"type":"pong"}')
        except (OSError, ConnectionClosed, InvalidStatus, TimeoutError):
            pass
        got.reconnects += 1
        await asyncio.sleep(RECONNECT_DELAY_S)  # a client's backoff, not a wait for an event


async def sse_client(
    base: str | Sequence[str], topic: str, token: str, got: Received, since: int | None
):
    """An SSE client that reconnects with ``Last-Event-ID`` = the last seq it saw."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
        while True:
            resume = got.last if got.last is not None else since
            headers = {"Accept": "text/event-stream", "Origin": ORIGIN}
            if resume is not None:
                headers["Last-Event-ID"] = str(resume)
            try:
                url = f"{server_for(base, got)}/events/{topic}/?token={token}"
                async with http.stream("GET", url, headers=headers) as response:
                    if response.status_code == 200:
                        data: list[str] = []
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                data.append(line[5:].strip())
                            elif line == "" and data:
                                payload = json.loads("\n".join(data))
                                data = []
                                if payload["type"] == "notification":
                                    got.add(payload["seq"])
                                elif payload["type"] == "subscribed":
                                    got.live.set()
            except (httpx.HTTPError, OSError):
                pass
            got.reconnects += 1
            await asyncio.sleep(RECONNECT_DELAY_S)  # a client's backoff


class Poster:
    """Posts notifications through the ingest API of one of the servers."""

    def __init__(self, http: httpx.AsyncClient, api_key: str) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {api_key}"}

    async def post(self, base: str, topic: str, i: int) -> httpx.Response:
        body = {"topic": topic, "event": "xproc.tick", "data": {"i": i}}
        body["idempotency_key"] = f"{topic}-{i}"  # a retried post after an outage is safe
        return await self.http.post(f"{base}/api/v1/notifications", json=body, headers=self.headers)

    async def post_until_accepted(self, base: str, topic: str, i: int) -> tuple[int, int]:
        """Retry while Redis is down (the limiter answers 503); returns (seq, refusals)."""
        refused = 0
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while True:
            try:
                response = await self.post(base, topic, i)
                if response.status_code == 202:
                    return response.json()["seq"], refused
                assert response.status_code in (503, 429), response.text
            except httpx.TransportError:
                pass
            refused += 1
            assert time.monotonic() < deadline, f"post {i} still refused after {refused} tries"
            await asyncio.sleep(RECONNECT_DELAY_S)  # a publisher's backoff


@contextlib.asynccontextmanager
async def running(*coros):
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_live(*received: Received) -> None:
    for got in received:
        try:
            await asyncio.wait_for(got.live.wait(), EVENT_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"{got.name} never subscribed") from None


# --- tests --------------------------------------------------------------------------------------


async def test_notification_posted_to_one_server_reaches_sockets_and_sse_on_both(deployment):
    a, b = deployment["urls"]
    token = deployment["tokens"]["sam"]
    topic = "xproc.reach"
    clients = {
        f"{kind} on {name}": Received(f"{kind} on {name}")
        for kind in ("socket", "sse")
        for name in ("a", "b")
    }
    bases = {"a": a, "b": b}
    coros = []
    for label, got in clients.items():
        kind, _, name = label.split(" ")
        client = plain_client if kind == "socket" else sse_client
        coros.append(client(bases[name], topic, token, got, None))
    async with running(*coros), httpx.AsyncClient() as http:
        await wait_live(*clients.values())
        poster = Poster(http, deployment["api_key"])
        first = await poster.post(a, topic, 1)
        assert first.status_code == 202, first.text
        second = await poster.post(b, topic, 2)
        assert second.status_code == 202, second.text
        seqs = [first.json()["seq"], second.json()["seq"]]
        for got in clients.values():
            await got.wait_for(seqs[1])
    for got in clients.values():
        assert got.seqs == seqs, got.name


async def _phoenix_join(base: str, topic: str, token: str):
    url = base.replace("http://", "ws://") + f"/socket/websocket?vsn=2.0.0&token={token}"
    ws = await ws_connect(url, origin=ORIGIN, open_timeout=EVENT_TIMEOUT_S)
    await ws.send(json.dumps(["1", "1", topic, "phx_join", {}]))
    while True:
        join_ref, ref, frame_topic, event, payload = json.loads(
            await asyncio.wait_for(ws.recv(), EVENT_TIMEOUT_S)
        )
        if event == "phx_reply" and ref == "1":
            assert payload["status"] == "ok", payload
        if event == "presence_state":
            return ws, payload


def _usernames(state: dict) -> list[str]:
    return sorted({meta["username"] for entry in state.values() for meta in entry["metas"]})


async def _presence_join_of(ws, username: str) -> dict:
    """The next ``presence_diff`` on this Phoenix socket whose joins include ``username``."""
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), EVENT_TIMEOUT_S))
        if frame[3] == "presence_diff" and username in _usernames(frame[4]["joins"]):
            return frame[4]


async def test_presence_is_the_union_of_both_servers(deployment):
    a, b = deployment["urls"]
    tokens = deployment["tokens"]
    topic = "xproc.presence"
    sam_ws, _ = await _phoenix_join(a, topic, tokens["sam"])
    try:
        olga_ws, olga_state = await _phoenix_join(b, topic, tokens["olga"])
        try:
            # olga's first state, from server b, holds sam, tracked on server a; sam hears olga
            # join through the other process.
            assert _usernames(olga_state) == ["olga", "sam"]
            await _presence_join_of(sam_ws, "olga")
            headers = {"Authorization": f"Bearer {deployment['api_key']}"}
            async with httpx.AsyncClient() as http:
                for base in (a, b):
                    r = await http.get(f"{base}/api/v1/topics/{topic}/presence", headers=headers)
                    assert r.status_code == 200, r.text
                    assert sorted(u["username"] for u in r.json()["users"]) == ["olga", "sam"]
            for base in (a, b):
                url = base.replace("http://", "ws://") + f"/ws/{topic}/?token={tokens['sam']}"
                async with ws_connect(url, origin=ORIGIN, open_timeout=EVENT_TIMEOUT_S) as plain:
                    await plain.send('{"type":"presence"}')
                    while True:
                        frame = json.loads(await asyncio.wait_for(plain.recv(), EVENT_TIMEOUT_S))
                        if frame["type"] == "presence":
                            break
                    assert sorted(u["username"] for u in frame["users"]) == ["olga", "sam"]
        finally:
            await olga_ws.close()
    finally:
        await sam_ws.close()


async def test_redis_restart_mid_stream_every_client_gets_every_seq_exactly_once(
    deployment, own_redis
):
    a, b = deployment["urls"]
    token = deployment["tokens"]["sam"]
    topic = "xproc.restart"
    total, restart_after = 40, 15
    clients = [Received(f"{kind} on {name}") for kind in ("socket", "sse") for name in ("a", "b")]
    bases = {"a": a, "b": b}
    coros = []
    for got in clients:
        kind, _, name = got.name.split(" ")
        client = plain_client if kind == "socket" else sse_client
        # since=0: the stream from its start, so nothing depends on when a client got live.
        coros.append(client(bases[name], topic, token, got, 0))
    async with running(*coros), httpx.AsyncClient() as http:
        await wait_live(*clients)
        poster = Poster(http, deployment["api_key"])
        seqs = []
        for i in range(total):
            base = bases["ab"[i % 2]]
            if i == restart_after:
                # Mid-stream: this post meets Redis down (refused, or stored and then retried
                # under its idempotency key), then Redis comes back empty; the servers must
                # reconnect, resubscribe and back-fill by themselves.
                await asyncio.to_thread(own_redis.kill)
                with contextlib.suppress(httpx.TransportError):
                    await poster.post(base, topic, i)
                await asyncio.to_thread(own_redis.start)
            seq, _ = await poster.post_until_accepted(base, topic, i)
            seqs.append(seq)
        assert seqs == list(range(1, total + 1))
        for got in clients:
            await got.wait_for(total)
    for got in clients:
        assert got.seqs == seqs, f"{got.name} after {got.reconnects} reconnect(s)"
