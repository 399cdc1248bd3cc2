"""SSE at /events/<topic>/ against a real uvicorn server process (channels_app/sse.py).

The server gets a database of its own (a fresh Postgres database next to DATABASE_URL's, else a
SQLite file) and runs in Redis mode when REDIS_URL is set (its own key prefix), else embedded.
Notifications are posted through the ingest API, as a source would. It runs with a 1 s keep-alive
and a small send queue (SSE_KEEPALIVE_S=1, SOCKET_SEND_QUEUE=32) so those paths are quick to reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from django.conf import settings
from django.core import signing

from channels_app import sse, tokens
from tests.servers import NotifyServer, RedisServer, seeded_server, trim_retention

EVENT_TIMEOUT_S = 20  # upper bound for one awaited event; passing runs take far less
APP_ORIGIN = "http://app.test"  # the server's NOTIFY_ALLOWED_ORIGINS
EVIL_ORIGIN = "http://evil.test"
SEND_QUEUE = 32  # the server's SOCKET_SEND_QUEUE


# --- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    """notify under test and what ``seed`` made for it (api_key, ids, tokens, sam_session)."""

    process: NotifyServer
    setup: dict

    @property
    def url(self) -> str:
        return self.process.base

    @property
    def env(self) -> dict[str, str]:
        return self.process.env

    @property
    def log(self) -> Path:
        return self.process.log

    def token(self, who: str) -> str:
        return self.setup["tokens"][who]

    def events_url(self, topic: str, **query) -> str:
        return str(httpx.URL(f"{self.url}/events/{topic}/", params=query))

    def threads(self) -> int:
        return self.process.threads()


@contextlib.contextmanager
def running_server(workdir: Path, name: str, **overrides: str) -> Iterator[Server]:
    """A seeded database and a uvicorn process serving notify on it (``overrides``: more env)."""
    sse_env = {"SSE_KEEPALIVE_S": "1", "SOCKET_SEND_QUEUE": str(SEND_QUEUE)}
    with seeded_server(
        workdir, name, NOTIFY_ALLOWED_ORIGINS=APP_ORIGIN, **sse_env, **overrides
    ) as (process, setup):
        yield Server(process, setup)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("sse"), "sse") as running:
        yield running
    # Whatever the clients did (left mid-replay, stalled, were refused), the server never failed.
    assert "Traceback" not in running.log.read_text(), running.log.read_text()[-3000:]


async def post(server: Server, topic: str, event: str, data: dict | None = None) -> dict:
    """Ingest one notification through the API; returns the answer {id, topic, seq}."""
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT_S) as client:
        answer = await client.post(
            f"{server.url}/api/v1/notifications",
            json={"topic": topic, "event": event, "data": data or {}},
            headers={"Authorization": f"Bearer {server.setup['api_key']}"},
        )
    assert answer.status_code == 202, answer.text
    return answer.json()


async def post_batch(server: Server, topic: str, datas: list[dict]) -> list[int]:
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT_S) as client:
        answer = await client.post(
            f"{server.url}/api/v1/notifications/batch",
            json={"notifications": [{"topic": topic, "event": "tick", "data": d} for d in datas]},
            headers={"Authorization": f"Bearer {server.setup['api_key']}"},
        )
    assert answer.status_code == 202, answer.text
    return [item["seq"] for item in answer.json()["results"]]


def unique_topic(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


# --- the client: httpx streaming and an SSE parser ----------------------------------------------


@dataclass
class Item:
    """One parsed SSE item: an event (``name``, ``id``, ``data``) or a comment (``comment``)."""

    name: str | None = None
    id: str | None = None
    data: str | None = None
    retry: str | None = None
    comment: str | None = None
    raw: str = ""

    @property
    def json(self) -> dict:
        return json.loads(self.data)


class Stream:
    """An open event stream: ``await stream.next()`` returns the next item, in order."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout_s: float = EVENT_TIMEOUT_S) -> Item:
        return await asyncio.wait_for(self._next(), timeout_s)

    async def _next(self) -> Item:
        item = Item()
        fields: list[str] = []
        async for line in self._lines:
            if line == "":
                if item.comment is not None and not fields:
                    return item
                if fields:
                    item.raw = "\n".join(fields) + "\n"
                    return item
                continue
            if line.startswith(":"):
                item.comment = line[1:].strip()
                continue
            fields.append(line)
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                item.data = value if item.data is None else f"{item.data}\n{value}"
            elif name == "event":
                item.name = value
            elif name == "id":
                item.id = value
            elif name == "retry":
                item.retry = value
        raise EOFError("the server ended the stream")

    async def next_event(self, timeout_s: float = EVENT_TIMEOUT_S) -> Item:
        """The next event, skipping comments (the opening comment, keep-alives)."""
        while True:
            item = await self.next(timeout_s)
            if item.comment is None or item.name is not None:
                return item

    async def until_subscribed(self) -> tuple[list[Item], Item]:
        """Events before ``subscribed``, and ``subscribed`` itself."""
        before = []
        while True:
            item = await self.next_event()
            if item.name == "subscribed":
                return before, item
            before.append(item)

    async def seqs_until(self, last_seq: int) -> list[int]:
        """Seqs of the notifications received until ``last_seq`` arrived (other events skipped)."""
        seqs: list[int] = []
        while not seqs or seqs[-1] < last_seq:
            item = await self.next_event()
            if item.data and item.json.get("type") == "notification":
                seqs.append(item.json["seq"])
        return seqs


@contextlib.asynccontextmanager
async def open_stream(url: str, **headers: str) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(EVENT_TIMEOUT_S, read=None)) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


async def refusal(url: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT_S) as client:
        return await client.get(url, headers=headers)


# --- event shape and resume -------------------------------------------------------------------


async def test_notification_event_has_the_plain_socket_envelope_and_seq_as_id(server):
    topic = unique_topic("sse.shape")
    async with open_stream(server.events_url(topic, token=server.token("sam"))) as stream:
        opening = await stream.next()
        assert opening.comment == "open"
        _, subscribed = await stream.until_subscribed()
        assert subscribed.json == {"type": "subscribed", "topic": topic, "last_seq": 0}
        assert subscribed.id is None  # not resumable: it must not move Last-Event-ID
        answer = await post(server, topic, "pod.crash", {"pod": "api-1", "restarts": 3})
        item = await stream.next_event()
    envelope = item.json
    assert item.raw == f"event: pod.crash\nid: {answer['seq']}\ndata: {item.data}\n"
    assert "\n" not in item.data  # one data line of compact JSON
    assert set(envelope) == {"type", "topic", "seq", "id", "event", "data", "severity"} | {
        "source",
        "ts",
    }
    assert envelope["type"] == "notification"
    assert (envelope["topic"], envelope["seq"], envelope["id"]) == (
        topic,
        answer["seq"],
        answer["id"],
    )
    assert envelope["event"] == "pod.crash"
    assert envelope["data"] == {"pod": "api-1", "restarts": 3}
    assert (envelope["severity"], envelope["source"]) == ("info", "api")
    assert datetime.fromisoformat(envelope["ts"]).tzinfo is not None


@pytest.mark.parametrize("via", ["header", "query"])
async def test_resume_while_publishing_has_no_gap_and_no_duplicate_at_the_seam(server, via):
    """Publishing goes on while the client resumes: replay from the database, then live, joined
    with every seq exactly once, in order."""
    topic = unique_topic(f"sse.seam-{via}")
    await post_batch(server, topic, [{"n": n} for n in range(1, 6)])
    last = 30

    async def publisher() -> None:
        for n in range(6, last + 1):
            await post(server, topic, "tick", {"n": n})

    publishing = asyncio.create_task(publisher())
    if via == "header":
        opened = open_stream(
            server.events_url(topic, token=server.token("sam")), **{"Last-Event-ID": "3"}
        )
    else:
        opened = open_stream(server.events_url(topic, token=server.token("sam"), lastEventId=3))
    try:
        async with opened as stream:
            seqs = await stream.seqs_until(last)
    finally:
        await publishing
    assert seqs == list(range(4, last + 1))


async def test_subscribed_comes_after_the_replay_and_before_live(server):
    topic = unique_topic("sse.order")
    await post_batch(server, topic, [{"n": n} for n in range(1, 5)])
    url = server.events_url(topic, token=server.token("sam"), lastEventId=1)
    async with open_stream(url) as stream:
        replayed, subscribed = await stream.until_subscribed()
        assert [(i.name, int(i.id)) for i in replayed] == [("tick", 2), ("tick", 3), ("tick", 4)]
        assert subscribed.json["last_seq"] == 4
        await post(server, topic, "tock")
        live = await stream.next_event()
        assert (live.name, live.id) == ("tock", "5")


async def test_unnamed_stream_sends_replay_and_live_as_message_events(server):
    """?unnamed=1: a client that cannot list event names gets every notification as an unnamed
    event with the same id and data; subscribed keeps its name."""
    topic = unique_topic("sse.unnamed")
    await post_batch(server, topic, [{"n": n} for n in range(1, 3)])
    url = server.events_url(topic, token=server.token("sam"), lastEventId=1, unnamed=1)
    async with open_stream(url) as stream:
        replayed, subscribed = await stream.until_subscribed()
        assert [(i.name, int(i.id), i.json["event"]) for i in replayed] == [("message", 2, "tick")]
        assert subscribed.name == "subscribed"
        await post(server, topic, "tock")
        live = [await stream.next_event()]
        await post_batch(server, topic, [{"n": n} for n in range(4, 7)])  # a burst, one chunk
        live += [await stream.next_event() for _ in range(3)]
    assert [(i.name, i.id, i.json["event"], i.json["seq"]) for i in live] == [
        ("message", "3", "tock", 3),
        ("message", "4", "tick", 4),
        ("message", "5", "tick", 5),
        ("message", "6", "tick", 6),
    ]


async def test_bad_unnamed_value_is_a_400(server):
    answer = await refusal(server.events_url("sse.bad", token=server.token("sam"), unnamed="yes"))
    assert answer.status_code == 400
    assert "unnamed must be 1, true, 0 or false" in answer.json()["detail"]


async def test_django_eventstream_style_last_event_id_is_accepted(server):
    topic = unique_topic("sse.compat-id")
    await post_batch(server, topic, [{"n": n} for n in range(1, 4)])
    url = server.events_url(topic, token=server.token("sam"))
    async with open_stream(url, **{"Last-Event-ID": f"{topic.replace(':', '%3A')}:2"}) as stream:
        assert await stream.seqs_until(3) == [3]


async def test_resume_beyond_retention_sends_reset_first_then_goes_on(server):
    topic = unique_topic("sse.reset")
    await post_batch(server, topic, [{"n": n} for n in range(1, 7)])
    trim_retention(server.env, topic, 2)  # keeps seqs 5 and 6
    url = server.events_url(topic, token=server.token("sam"), lastEventId=2)
    async with open_stream(url) as stream:
        before, subscribed = await stream.until_subscribed()
        [reset] = before  # nothing replayed: seqs 3 and 4 are gone
        assert reset.name == "reset"
        assert reset.id == "6"  # the browser resumes after 6 from now on
        assert reset.json == {
            "type": "reset",
            "topic": topic,
            "since": 2,
            "oldest_seq": 5,
            "last_seq": 6,
        }
        assert subscribed.json["last_seq"] == 6
        await post(server, topic, "tick", {"n": 7})
        assert await stream.seqs_until(7) == [7]
    # Just inside retention (the oldest kept is 5): a normal replay, no reset.
    url = server.events_url(topic, token=server.token("sam"), lastEventId=4)
    async with open_stream(url) as stream:
        before, _ = await stream.until_subscribed()
        assert [(i.name, i.id) for i in before] == [("tick", "5"), ("tick", "6"), ("tick", "7")]


async def test_resume_point_ahead_of_the_stream_is_a_reset(server):
    topic = unique_topic("sse.ahead")
    await post(server, topic, "tick")
    url = server.events_url(topic, token=server.token("sam"), lastEventId=99)
    async with open_stream(url) as stream:
        before, _ = await stream.until_subscribed()
        assert [(i.name, i.json["since"], i.json["last_seq"]) for i in before] == [("reset", 99, 1)]


async def test_bad_last_event_id_is_a_400(server):
    answer = await refusal(
        server.events_url("sse.bad-id", token=server.token("sam")), **{"Last-Event-ID": "abc"}
    )
    assert answer.status_code == 400
    assert "Last-Event-ID" in answer.json()["detail"]


async def test_ephemeral_topic_events_reach_sse_streams_without_an_id(server):
    """A Phoenix client's request_update on a reverse_flow topic broadcasts reverse_flow_update to
    every subscriber of the topic, SSE streams included (hub.broadcast_event -> deliver_event)."""
    from websockets.asyncio.client import connect as ws_connect

    topic = f"reverse_flow:sse-{uuid.uuid4().hex[:8]}"  # the built-in handler's reverse_flow:*
    await post(server, topic, "state.changed", {"v": 1})
    async with open_stream(server.events_url(topic, token=server.token("sam"))) as stream:
        await stream.until_subscribed()
        ws_url = server.url.replace("http://", "ws://") + "/socket/websocket"
        ws_url += f"?vsn=2.0.0&token={server.token('sam')}"
        async with ws_connect(ws_url, open_timeout=EVENT_TIMEOUT_S) as phoenix:
            await phoenix.send(json.dumps(["1", "1", topic, "phx_join", {}]))
            await phoenix.send(json.dumps(["1", "2", topic, "request_update", {}]))
            item = await stream.next_event()
            while item.name == "presence_diff":  # the Phoenix join's own presence broadcast
                item = await stream.next_event()
    assert item.name == "reverse_flow_update"
    assert item.id is None  # ephemeral: not part of the resumable stream
    assert item.json["type"] == "event"
    assert (item.json["topic"], item.json["event"]) == (topic, "reverse_flow_update")
    assert item.json["payload"]["last_seq"] == 1


# --- authorization ------------------------------------------------------------------------------


async def test_forged_token_is_refused_with_401(server):
    answer = await refusal(server.events_url("alerts.k8s", token=server.token("sam") + "x"))
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/json"
    assert "signature" in answer.json()["detail"]


async def test_expired_token_is_refused_with_401(server):
    expired = signing.dumps(
        {"u": server.setup["ids"]["sam"], "e": int(time.time()) - 60}, salt=tokens.SALT
    )
    answer = await refusal(server.events_url("alerts.k8s", token=expired))
    assert answer.status_code == 401
    assert "expired" in answer.json()["detail"]


async def test_anonymous_client_on_a_members_topic_is_refused_with_401(server):
    answer = await refusal(server.events_url("alerts.k8s"))
    assert answer.status_code == 401
    assert "token" in answer.json()["detail"]


async def test_forbidden_topics_are_refused_with_403(server):
    olga_topic = f"user:{server.setup['ids']['olga']}"
    for topic in ("system.health", olga_topic):
        answer = await refusal(server.events_url(topic, token=server.token("sam")))
        assert answer.status_code == 403, topic
        assert topic in answer.json()["detail"]


async def test_own_user_topic_is_allowed(server):
    topic = f"user:{server.setup['ids']['sam']}"
    async with open_stream(server.events_url(topic, token=server.token("sam"))) as stream:
        await stream.until_subscribed()


async def test_session_cookie_authorizes_a_stream(server):
    topic = unique_topic("sse.session")
    url = server.events_url(topic)
    cookie = f"{settings.SESSION_COOKIE_NAME}={server.setup['sam_session']}"
    async with open_stream(url, Cookie=cookie) as stream:
        await stream.until_subscribed()
        await post(server, topic, "tick")
        assert await stream.seqs_until(1) == [1]


async def test_invalid_topic_name_is_a_400(server):
    answer = await refusal(server.events_url("Bad Topic", token=server.token("sam")))
    assert answer.status_code == 400


# --- CORS ---------------------------------------------------------------------------------------


async def test_preflight_from_the_app_origin_allows_credentials_and_last_event_id(server):
    async with httpx.AsyncClient() as client:
        answer = await client.options(
            server.events_url("alerts.k8s"),
            headers={
                "Origin": APP_ORIGIN,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "last-event-id",
            },
        )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    assert answer.headers["access-control-allow-credentials"] == "true"
    assert "last-event-id" in answer.headers["access-control-allow-headers"]


async def test_stream_from_the_app_origin_with_cookie_carries_cors_grant(server):
    cookie = f"{settings.SESSION_COOKIE_NAME}={server.setup['sam_session']}"
    url = server.events_url(unique_topic("sse.cors"))
    async with open_stream(url, Origin=APP_ORIGIN, Cookie=cookie) as stream:
        assert stream.response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert stream.response.headers["access-control-allow-credentials"] == "true"
        await stream.until_subscribed()


async def test_other_origins_get_no_cors_grant_and_no_stream(server):
    async with httpx.AsyncClient() as client:
        preflight = await client.options(
            server.events_url("alerts.k8s"),
            headers={"Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "GET"},
        )
    assert "access-control-allow-origin" not in preflight.headers
    cookie = f"{settings.SESSION_COOKIE_NAME}={server.setup['sam_session']}"
    answer = await refusal(server.events_url("alerts.k8s"), Origin=EVIL_ORIGIN, Cookie=cookie)
    assert answer.status_code == 403
    assert "access-control-allow-origin" not in answer.headers


# --- keep-alive, slow readers, threads ----------------------------------------------------------


async def test_keepalive_comments_flow_on_an_idle_stream(server):
    url = server.events_url(unique_topic("sse.idle"), token=server.token("sam"))
    async with open_stream(url) as stream:
        await stream.until_subscribed()
        for _ in range(2):  # the server runs with SSE_KEEPALIVE_S=1
            item = await stream.next()
            assert (item.comment, item.name, item.data) == ("keep-alive", None, None)


def _raw_stream_request(server: Server, url: str) -> socket.socket:
    """A client with a tiny receive buffer that sends the request and then reads only on demand."""
    parsed = urlparse(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parsed.hostname, parsed.port))
    target = f"{parsed.path}?{parsed.query}"
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parsed.netloc}\r\n\r\n".encode())
    sock.settimeout(EVENT_TIMEOUT_S)
    return sock


def _read_until(sock: socket.socket, marker: bytes, buffer: bytearray) -> None:
    while marker not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"stream ended before {marker!r}")
        buffer += chunk


def _read_to_end(sock: socket.socket, buffer: bytearray) -> str:
    """Read until the server ends the stream (EOF, or a reset after it aborted), at most
    EVENT_TIMEOUT_S: keep-alives would otherwise keep a stream that was not closed going."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    with contextlib.suppress(ConnectionResetError):
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        else:
            raise AssertionError("the server did not end the stream of a reader that lagged")
    return buffer.decode(errors="replace")


async def test_slow_reader_is_closed_and_resumes_without_loss(server):
    """A reader that stops reading: its bounded queue fills, the stream ends with a
    ``stream-error`` saying why, and a reconnect with Last-Event-ID gets the rest."""
    topic = unique_topic("sse.slow")
    sock = _raw_stream_request(server, server.events_url(topic, token=server.token("sam")))
    buffer = bytearray()
    try:
        await asyncio.to_thread(_read_until, sock, b"event: subscribed", buffer)
        # ~9 MB, in 60 KB notifications: past the kernel's socket buffers (up to 4 MB send
        # buffer on loopback), the transport's 64 KB and SEND_QUEUE queued frames.
        blob = "x" * 60_000
        total = 0
        for _ in range(5):
            total = (await post_batch(server, topic, [{"blob": blob}] * 30))[-1]
        text = await asyncio.to_thread(_read_to_end, sock, buffer)
    finally:
        sock.close()
    seen = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert seen == list(range(1, len(seen) + 1))  # in order, nothing skipped
    assert len(seen) < total  # the server closed the stream before the end
    assert "event: stream-error" in text
    error = json.loads(text.split("event: stream-error", 1)[1].split("data: ", 1)[1].split("\n")[0])
    assert error["code"] == "too_slow"
    url = server.events_url(topic, token=server.token("sam"), lastEventId=seen[-1])
    async with open_stream(url) as stream:
        assert await stream.seqs_until(total) == list(range(seen[-1] + 1, total + 1))


async def test_open_streams_do_not_hold_an_os_thread_each(server):
    """django-eventstream's view (and any view inside Django's ASGI handler) holds one OS thread
    per open stream; ours must not (docs/sse.md, pitfall (a))."""
    streams = 50
    topic = unique_topic("sse.threads")
    url = server.events_url(topic, token=server.token("sam"))
    async with contextlib.AsyncExitStack() as stack:
        # Warm-up: worker pools the connect path uses (token, state reads) start their threads.
        for stream in [await stack.enter_async_context(open_stream(url)) for _ in range(5)]:
            await stream.until_subscribed()
        before = server.threads()
        opened = await asyncio.gather(
            *(stack.enter_async_context(open_stream(url)) for _ in range(streams))
        )
        await asyncio.gather(*(stream.until_subscribed() for stream in opened))
        during = server.threads()
        await post(server, topic, "tick")
        received = await asyncio.gather(*(stream.seqs_until(1) for stream in opened))
    assert received == [[1]] * streams
    # A thread per stream would add 50; worker pools may still start a few of their threads.
    assert during - before < streams // 5, (before, during)


async def hub_counts(server: Server) -> dict:
    async with httpx.AsyncClient(timeout=EVENT_TIMEOUT_S) as client:
        answer = await client.get(
            f"{server.url}/api/v1/realtime/hub",
            headers={"Authorization": f"Bearer {server.setup['api_key']}"},
        )
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_closed_streams_leave_nothing_subscribed_even_mid_replay(server):
    """Clients that leave, one of them in the middle of a long replay, leave no subscriber and no
    topic subscription behind in the server's hub."""
    topic = unique_topic("sse.leave")
    for _ in range(2):
        await post_batch(server, topic, [{"n": n} for n in range(750)])
    url = server.events_url(topic, token=server.token("sam"))
    async with open_stream(url) as first, open_stream(url) as second:
        await first.until_subscribed()
        await second.until_subscribed()
        async with open_stream(
            server.events_url(topic, token=server.token("sam"), lastEventId=0)
        ) as replaying:
            assert (await replaying.next_event()).id == "1"  # leaves with ~1,500 still to replay
        assert (await hub_counts(server))["subscribers"] >= 2
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while (counts := await hub_counts(server))["subscribers"] or counts["topics"]:
        # The server learns of each disconnect asynchronously; poll its counts until they settle.
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.05)


async def _stream_until_subscribed_or_error(url: str) -> Item:
    """Open a stream; return its ``subscribed`` or ``stream-error`` event (then close)."""
    async with open_stream(url) as stream:
        while True:
            item = await stream.next_event()
            if item.name in ("subscribed", "stream-error"):
                return item


@pytest.mark.skipif(not settings.REDIS_URL, reason="Redis outages exist only in the Redis mode")
async def test_redis_outage_gives_a_retry_hint_then_new_streams_work_again(tmp_path):
    """django-eventstream's Redis listener dies with an outage and its process then serves no
    stream, new ones included (pitfall (b)). Ours: a stream opened while Redis is down ends with
    ``stream-error`` "unavailable" and a retry hint, and once Redis is back new streams are live
    again, through the hub's own reconnect."""
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        with running_server(tmp_path, "sse_outage", REDIS_URL=redis.url) as srv:
            topic = unique_topic("sse.outage")
            url = srv.events_url(topic, token=srv.token("sam"))
            assert (await _stream_until_subscribed_or_error(url)).name == "subscribed"
            redis.kill()
            item = await _stream_until_subscribed_or_error(url)
            assert item.name == "stream-error"
            assert item.json["code"] == "unavailable"
            assert int(item.retry) > 0
            redis.start()
            deadline = time.monotonic() + EVENT_TIMEOUT_S
            while (await _stream_until_subscribed_or_error(url)).name != "subscribed":
                # An EventSource retries after ``retry``; the hub reconnects within seconds.
                assert time.monotonic() < deadline, "no live stream after Redis came back"
            async with open_stream(url) as stream:
                await stream.until_subscribed()
                await post(srv, topic, "tick")
                assert await stream.seqs_until(1) == [1]
    finally:
        redis.kill()


# --- pieces of channels_app.sse, in-process ---------------------------------------------------


def scope(query: str = "", last_event_id: str | None = None) -> dict:
    headers = [(b"last-event-id", last_event_id.encode())] if last_event_id is not None else []
    return {"query_string": query.encode(), "headers": headers}


def test_last_event_id_header_wins_over_query_and_accepts_both_forms():
    assert sse.last_event_id(scope("lastEventId=4", "7"), "a.b") == 7
    assert sse.last_event_id(scope("lastEventId=4&lastEventId="), "a.b") == 4
    assert sse.last_event_id(scope(), "a.b") is None
    assert sse.last_event_id(scope(last_event_id="user%3A42:9"), "user:42") == 9
    for bad in ("abc", "-1", "other.topic:3"):
        with pytest.raises(sse.BadRequest):
            sse.last_event_id(scope(last_event_id=bad), "a.b")


def test_reset_rule_matches_retention():
    assert not sse.needs_reset(4, last_seq=6, oldest_seq=5)  # replay 5, 6
    assert sse.needs_reset(3, last_seq=6, oldest_seq=5)  # 4 is gone
    assert not sse.needs_reset(6, last_seq=6, oldest_seq=5)  # up to date
    assert sse.needs_reset(7, last_seq=6, oldest_seq=5)  # ahead of the stream
    assert not sse.needs_reset(0, last_seq=0, oldest_seq=None)  # empty topic
    assert sse.needs_reset(2, last_seq=6, oldest_seq=None)  # everything was trimmed
    assert not sse.needs_reset(6, last_seq=6, oldest_seq=None)


@pytest.mark.django_db(transaction=True)
def test_django_eventstream_send_event_goes_into_the_durable_stream(subscriber):
    """Code written for django-eventstream keeps working: send_event persists a notification
    (seq, routed, published) and its storage/channel-manager interfaces read our stream/rules."""
    from django_eventstream import send_event
    from django_eventstream.utils import get_channelmanager, get_storage

    from routing_app.models import Notification

    send_event("compat.topic", "thing.done", {"x": 1})
    send_event("compat.topic", "thing.done", {"x": 2})
    rows = list(Notification.objects.filter(topic__name="compat.topic").order_by("seq"))
    assert [(n.seq, n.event, n.data, n.source) for n in rows] == [
        (1, "thing.done", {"x": 1}, "system"),
        (2, "thing.done", {"x": 2}, "system"),
    ]
    storage = get_storage()
    assert storage.get_current_id("compat.topic") == 2
    [event] = storage.get_events("compat.topic", 1)
    assert (event.id, event.type, json.loads(event.data)) == (2, "thing.done", rows[1].envelope())
    manager = get_channelmanager()
    assert manager.can_read_channel(subscriber, "compat.topic")
    assert not manager.can_read_channel(subscriber, "system.health")
    assert not manager.can_read_channel(None, "compat.topic")
