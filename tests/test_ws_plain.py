"""The plain JSON WebSocket at /ws/<topic>/, at the ASGI level.

``channels.testing.WebsocketCommunicator`` drives the real websocket application
(notify_project.asgi's routing) for protocol details; where a test needs a peer that stops
reading, a small ASGI harness stands in for the server side of the connection. The end-to-end
behaviour over a real uvicorn process is in test_ws_plain_uvicorn.py.

Every test runs in both modes: embedded (in-process hub) and, with REDIS_URL, through Redis.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import threading
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.core import signing

from channels_app import socket_auth, tokens
from channels_app.hub import hub
from channels_app.routing import websocket_application
from channels_app.ws_plain import plain_socket_app
from routing_app.ingest import NotificationIn, ingest
from routing_app.models import Notification, Topic
from routing_app.stream_writes import trim_retention

WAIT_S = 10  # upper bound for one awaited frame; passing runs take milliseconds

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def rules(_db_pool_closed_at_end):
    """The fresh-install topic rules (a transactional test's flush removes the migration's), a
    clean principal cache, and a hub that is closed after the test (no Redis subscription or task
    outlives it)."""
    from django.apps import apps

    migration = importlib.import_module("channels_app.migrations.0002_default_topic_rules")
    await sync_to_async(migration.create_defaults)(apps, None)
    socket_auth.forget_principals()
    yield
    await hub.aclose()
    socket_auth.forget_principals()


def token_for(user) -> str:
    return tokens.mint(user.pk).token


async def publish(topic: str, count: int = 1, **fields) -> list[int]:
    """Ingest ``count`` notifications (committed, routed, published); return their seqs."""
    items = [
        NotificationIn(topic=topic, event=fields.get("event", "tick"), data={"i": i})
        for i in range(count)
    ]
    results = await sync_to_async(ingest)(items)
    return [r.seq for r in results]


async def connect(path: str, headers=None) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(websocket_application, path, headers=headers or [])
    connected, _ = await comm.connect(timeout=WAIT_S)
    assert connected
    return comm


async def frame(comm) -> dict:
    return await comm.receive_json_from(timeout=WAIT_S)


async def close_code(comm) -> int:
    """Read frames until the server closes; return its close code."""
    while True:
        output = await comm.receive_output(timeout=WAIT_S)
        if output["type"] == "websocket.close":
            return output.get("code", 1000)


async def subscribed(comm) -> tuple[list[int], dict]:
    """Read until the ``subscribed`` frame: (seqs of notifications before it, that frame)."""
    seqs = []
    while True:
        msg = await frame(comm)
        if msg["type"] == "subscribed":
            return seqs, msg
        if msg["type"] == "notification":
            seqs.append(msg["seq"])


async def seqs_until(comm, last: int) -> list[int]:
    """Notification seqs received until seq ``last`` arrives (other frame types skipped)."""
    seqs: list[int] = []
    while not seqs or seqs[-1] < last:
        msg = await frame(comm)
        if msg["type"] == "notification":
            seqs.append(msg["seq"])
    return seqs


async def wait_until(predicate, what: str) -> None:
    """Poll ``predicate`` (a condition on state another task or process changes) up to WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def redis_subscribers(topic: str) -> int:
    """PUBSUB NUMSUB of the hub's channel for ``topic`` (0 in the embedded mode)."""
    if not settings.REDIS_URL:
        return 0
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.REDIS_URL)
    try:
        [(_, count)] = await client.pubsub_numsub(hub.topic_channel(topic))
        return count
    finally:
        await client.aclose()


async def assert_nothing_subscribed(topic: str) -> None:
    await wait_until(lambda: hub.stats()["subscribers"] == 0, "the hub to forget its sockets")
    assert hub.stats()["topics"] == 0 and hub.stats()["redis_channels"] == 0
    deadline = time.monotonic() + WAIT_S
    while await redis_subscribers(topic):
        assert time.monotonic() < deadline, "the Redis subscription was not dropped"
        await asyncio.sleep(0.02)


# --- live, resume, reset -----------------------------------------------------------------------


async def test_live_notification_arrives_with_its_seq(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    _, hello = await subscribed(comm)
    assert hello == {"type": "subscribed", "topic": "alerts.k8s", "last_seq": 0}
    [seq] = await publish("alerts.k8s", event="pod.crash")
    msg = await frame(comm)
    stored = await sync_to_async(Notification.objects.get)(seq=seq)
    assert msg == {
        "type": "notification",
        "topic": "alerts.k8s",
        "seq": 1,
        "id": str(stored.id),
        "event": "pod.crash",
        "data": {"i": 0},
        "severity": "info",
        "source": "api",
        "ts": stored.created_at.isoformat(),
    }
    await comm.disconnect()
    await assert_nothing_subscribed("alerts.k8s")


async def test_resume_with_since_replays_missed_then_live_with_no_gap_or_duplicate(
    rules, subscriber
):
    from django.db import connection

    await publish("alerts.seam", 30)
    total = 130
    # The seam under load: another thread publishes while the socket replays. (Not with SQLite:
    # its shared in-memory test database fails concurrent readers with "table is locked".)
    concurrent = connection.vendor == "postgresql"

    def keep_publishing() -> None:
        for _ in range(total - 30):
            ingest([NotificationIn(topic="alerts.seam", event="tick")])

    thread = threading.Thread(target=keep_publishing)
    if concurrent:
        thread.start()
    try:
        comm = await connect(f"/ws/alerts.seam/?token={token_for(subscriber)}&since=10")
        replayed, hello = await subscribed(comm)
        assert replayed == list(range(11, hello["last_seq"] + 1))
        if not concurrent:
            await sync_to_async(keep_publishing)()
        live = await seqs_until(comm, total)
    finally:
        if concurrent:
            thread.join()
    assert replayed + live == list(range(11, total + 1))
    await comm.disconnect()


async def test_resume_frame_replays_after_the_given_seq_then_continues_live(rules, subscriber):
    await publish("alerts.resume", 5)
    comm = await connect(f"/ws/alerts.resume/?token={token_for(subscriber)}")
    assert (await subscribed(comm))[1]["last_seq"] == 5
    await comm.send_json_to({"type": "resume", "since": 2})
    replayed, hello = await subscribed(comm)
    assert (replayed, hello["last_seq"]) == ([3, 4, 5], 5)
    await publish("alerts.resume", 2)
    assert await seqs_until(comm, 7) == [6, 7]
    await comm.send_json_to({"type": "resume", "since": "x"})
    assert (await frame(comm))["code"] == "bad_frame"
    await comm.disconnect()
    await assert_nothing_subscribed("alerts.resume")


async def test_since_older_than_retention_gets_reset_then_live(rules, subscriber):
    await publish("alerts.short", 1)
    await sync_to_async(Topic.objects.filter(name="alerts.short").update)(retention_count=3)
    await publish("alerts.short", 9)
    topic = await sync_to_async(Topic.objects.get)(name="alerts.short")
    await sync_to_async(trim_retention)(topic)  # keeps seqs 8, 9, 10
    comm = await connect(f"/ws/alerts.short/?token={token_for(subscriber)}&since=2")
    reset = await frame(comm)
    assert reset == {
        "type": "reset",
        "topic": "alerts.short",
        "since": 2,
        "oldest_seq": 8,
        "last_seq": 10,
    }
    assert await subscribed(comm) == (
        [],
        {"type": "subscribed", "topic": "alerts.short", "last_seq": 10},
    )
    await publish("alerts.short", 1)
    assert await seqs_until(comm, 11) == [11]
    await comm.disconnect()


async def test_since_within_retention_is_not_a_reset(rules, subscriber):
    await publish("alerts.kept", 4)
    comm = await connect(f"/ws/alerts.kept/?token={token_for(subscriber)}&since=0")
    replayed, hello = await subscribed(comm)
    assert (replayed, hello["last_seq"]) == ([1, 2, 3, 4], 4)
    await comm.disconnect()


async def test_since_must_be_a_non_negative_integer(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}&since=-1")
    assert await close_code(comm) == 4400
    await comm.disconnect()


# --- bad frames, sizes, heartbeats ----------------------------------------------------------


async def test_malformed_frames_get_error_frames_and_the_socket_stays_open(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    await comm.send_to(text_data="{not json")
    assert (await frame(comm))["code"] == "bad_json"
    await comm.send_to(text_data="[1, 2]")
    assert (await frame(comm))["code"] == "bad_frame"
    await comm.send_json_to({"type": "dance", "ref": "r1"})
    error = await frame(comm)
    assert (error["type"], error["code"], error["ref"]) == ("error", "unknown_type", "r1")
    await comm.send_to(bytes_data=b"\x00\x01")
    assert (await frame(comm))["code"] == "binary_unsupported"
    await comm.send_json_to({"type": "ping"})
    assert await frame(comm) == {"type": "pong"}
    await comm.disconnect()


async def test_deeply_nested_frame_gets_an_error_frame_and_the_socket_stays_open(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    await comm.send_to(text_data="[" * 10_000 + "]" * 10_000)  # 20 KB, deeper than json allows
    error = await frame(comm)
    assert (error["type"], error["code"]) == ("error", "bad_frame")
    assert "nested deeper than" in error["message"]
    await comm.send_to(text_data='{"type": "ping", "x": ' + "[" * 100 + "]" * 100 + "}")
    assert (await frame(comm))["code"] == "bad_frame"  # parses, but past the depth bound
    await comm.send_json_to({"type": "ping"})
    assert await frame(comm) == {"type": "pong"}
    await comm.disconnect()


async def test_frame_with_a_lone_surrogate_is_refused_without_echoing_it(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    for text in ('{"type": "bogus", "ref": "\\ud800"}', '{"type": "ping", "x": "\\udc00"}'):
        await comm.send_to(text_data=text)
        output = await comm.receive_output(timeout=WAIT_S)
        output["text"].encode()  # sendable: a real server would have failed here
        error = json.loads(output["text"])
        assert (error["code"], "ref" in error) == ("bad_frame", False)
        assert "surrogate" in error["message"]
    await comm.send_json_to({"type": "ping", "ref": "\U0001f600"})  # a pair is fine
    assert await frame(comm) == {"type": "pong"}
    await comm.disconnect()


async def test_frames_over_the_rate_get_rate_limited_errors(rules, subscriber, monkeypatch):
    from channels_app.frame_limits import CLIENT_FRAMES_PER_S, FrameBudget

    monkeypatch.setattr(FrameBudget, "clock", staticmethod(lambda: 0.0))  # no refill meanwhile
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    burst = 2 * CLIENT_FRAMES_PER_S
    for _ in range(burst + 10):
        await comm.send_json_to({"type": "ping"})
    answers = [await frame(comm) for _ in range(burst + 10)]
    assert answers[:burst] == [{"type": "pong"}] * burst
    assert {a["code"] for a in answers[burst:]} == {"rate_limited"}
    await comm.disconnect()


async def test_frame_over_64_kb_closes_with_1009(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    await comm.send_to(text_data=json.dumps({"type": "ping", "pad": "x" * 65536}))
    assert await close_code(comm) == 1009
    await comm.disconnect()
    await assert_nothing_subscribed("alerts.k8s")


async def test_frame_of_exactly_64_kb_is_accepted(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    body = json.dumps({"type": "ping", "pad": ""})
    await comm.send_to(text_data=body[:-2] + "x" * (65536 - len(body)) + '"}')
    assert await frame(comm) == {"type": "pong"}
    await comm.disconnect()


async def test_silent_client_is_pinged_then_closed_with_4408(rules, subscriber, settings):
    settings.HEARTBEAT_INTERVAL_S = 0.1
    settings.HEARTBEAT_TIMEOUT_S = 0.3
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    assert await frame(comm) == {"type": "ping"}
    assert await close_code(comm) == 4408
    await comm.disconnect()
    await assert_nothing_subscribed("alerts.k8s")


async def test_client_answering_pings_stays_connected(rules, subscriber, settings):
    settings.HEARTBEAT_INTERVAL_S = 0.1
    settings.HEARTBEAT_TIMEOUT_S = 0.3
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    for _ in range(6):  # 6 intervals = twice the timeout
        assert await frame(comm) == {"type": "ping"}
        await comm.send_json_to({"type": "pong"})
    [seq] = await publish("alerts.k8s")
    assert await seqs_until(comm, seq) == [seq]
    await comm.disconnect()


# --- who may connect -------------------------------------------------------------------------


async def test_forged_token_is_refused_with_4401(rules, subscriber):
    forged = token_for(subscriber)[:-3] + "abc"
    comm = await connect(f"/ws/alerts.k8s/?token={forged}")
    assert await close_code(comm) == 4401
    await comm.disconnect()


async def test_expired_token_is_refused_with_4401(rules, subscriber):
    expired = signing.dumps({"u": subscriber.pk, "e": int(time.time()) - 1}, salt=tokens.SALT)
    comm = await connect(f"/ws/alerts.k8s/?token={expired}")
    assert await close_code(comm) == 4401
    await comm.disconnect()


async def test_anonymous_client_is_refused_with_4401(rules):
    comm = await connect("/ws/alerts.k8s/")
    assert await close_code(comm) == 4401
    await comm.disconnect()


async def test_forbidden_topic_is_refused_with_4403(rules, subscriber, outsider):
    comm = await connect(f"/ws/system.health/?token={token_for(subscriber)}")
    assert await close_code(comm) == 4403
    await comm.disconnect()
    comm = await connect(f"/ws/user:{subscriber.pk}/?token={token_for(outsider)}")
    assert await close_code(comm) == 4403
    await comm.disconnect()
    await assert_nothing_subscribed("system.health")


async def test_bad_topic_name_is_refused_with_4400(rules, subscriber):
    comm = await connect(f"/ws/Not%20A%20Topic/?token={token_for(subscriber)}")
    assert await close_code(comm) == 4400
    await comm.disconnect()


async def test_topic_with_a_trailing_newline_is_refused_with_4400(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s%0A/?token={token_for(subscriber)}")
    assert await close_code(comm) == 4400
    await comm.disconnect()


async def test_session_cookie_authenticates_the_socket(rules, subscriber):
    from django.test import Client

    client = Client()
    await sync_to_async(client.force_login)(subscriber)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    comm = await connect(f"/ws/user:{subscriber.pk}/", headers=[(b"cookie", cookie.encode())])
    assert (await subscribed(comm))[1]["topic"] == f"user:{subscriber.pk}"
    await comm.disconnect()


async def test_page_of_another_origin_cannot_open_a_socket(rules, subscriber):
    comm = WebsocketCommunicator(
        websocket_application,
        f"/ws/alerts.k8s/?token={token_for(subscriber)}",
        headers=[(b"origin", b"http://evil.example"), (b"host", b"testserver")],
    )
    connected, _ = await comm.connect(timeout=WAIT_S)
    assert not connected


def over(scheme: str):
    """The websocket application as a server speaking ``scheme`` (ws or wss) would call it."""

    async def app(scope, receive, send):
        return await websocket_application(dict(scope, scheme=scheme), receive, send)

    return app


async def test_allowed_origin_and_same_host_may_open_a_socket(rules, subscriber):
    for origin, host, scheme in (
        (settings.NOTIFY_ALLOWED_ORIGINS[0], "api.example", "ws"),
        ("http://notify.example", "notify.example", "ws"),
        ("https://notify.example", "notify.example", "wss"),
    ):
        comm = WebsocketCommunicator(
            over(scheme),
            f"/ws/alerts.k8s/?token={token_for(subscriber)}",
            headers=[(b"origin", origin.encode()), (b"host", host.encode())],
        )
        connected, _ = await comm.connect(timeout=WAIT_S)
        assert connected, (origin, scheme)
        await subscribed(comm)
        await comm.disconnect()


@pytest.mark.parametrize(
    ("origin", "scheme"),
    [("https://notify.example", "ws"), ("http://notify.example", "wss")],
    ids=["https-page-to-ws", "http-page-to-wss"],
)
async def test_same_host_page_of_the_other_scheme_cannot_open_a_socket(
    rules, subscriber, origin, scheme
):
    comm = WebsocketCommunicator(
        over(scheme),
        f"/ws/alerts.k8s/?token={token_for(subscriber)}",
        headers=[(b"origin", origin.encode()), (b"host", b"notify.example")],
    )
    connected, code = await comm.connect(timeout=WAIT_S)
    assert (connected, code) == (False, 4403)


async def test_proxy_ssl_header_makes_the_connection_secure_for_the_origin_check(
    rules, subscriber, settings
):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    comm = WebsocketCommunicator(
        over("ws"),
        f"/ws/alerts.k8s/?token={token_for(subscriber)}",
        headers=[
            (b"origin", b"https://notify.example"),
            (b"host", b"notify.example"),
            (b"x-forwarded-proto", b"https"),
        ],
    )
    connected, _ = await comm.connect(timeout=WAIT_S)
    assert connected
    await subscribed(comm)
    await comm.disconnect()


# --- publishing from the socket --------------------------------------------------------------


async def test_publish_goes_through_ingest_as_a_user_notification_and_is_acked(
    rules, operator, subscriber
):
    reader = await connect(f"/ws/alerts.ops/?token={token_for(subscriber)}")
    await subscribed(reader)
    writer = await connect(f"/ws/alerts.ops/?token={token_for(operator)}")
    await subscribed(writer)
    await writer.send_json_to(
        {"type": "publish", "event": "deploy.start", "data": {"v": 2}, "ref": "p1"}
    )
    frames = [await frame(writer), await frame(writer)]
    ack = next(f for f in frames if f["type"] == "ack")
    stored = await sync_to_async(Notification.objects.get)(seq=ack["seq"], topic__name="alerts.ops")
    assert ack == {"type": "ack", "ref": "p1", "seq": 1, "id": str(stored.id)}
    assert (stored.source, stored.event, stored.data) == ("user", "deploy.start", {"v": 2})
    received = await frame(reader)
    assert (received["seq"], received["source"], received["event"]) == (1, "user", "deploy.start")
    await reader.disconnect()
    await writer.disconnect()


async def test_publish_is_refused_when_the_topic_rule_does_not_allow_it(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    await comm.send_json_to({"type": "publish", "event": "x", "data": {}, "ref": 9})
    error = await frame(comm)
    assert (error["type"], error["code"], error["ref"]) == ("error", "forbidden", 9)
    assert await sync_to_async(Notification.objects.count)() == 0
    await comm.send_json_to({"type": "ping"})
    assert await frame(comm) == {"type": "pong"}
    await comm.disconnect()


async def test_invalid_publish_gets_an_error_naming_the_field(rules, operator):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(operator)}")
    await subscribed(comm)
    await comm.send_json_to({"type": "publish", "event": "", "data": {}})
    error = await frame(comm)
    assert (error["code"], "event" in error["message"]) == ("invalid", True)
    await comm.disconnect()


# --- events, presence ----------------------------------------------------------------------


async def test_topic_event_reaches_subscribers_of_that_topic(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    hub.broadcast_event("alerts.k8s", "reverse_flow_update", {"state": 1})
    assert await frame(comm) == {
        "type": "event",
        "topic": "alerts.k8s",
        "event": "reverse_flow_update",
        "payload": {"state": 1},
    }
    await comm.disconnect()


async def test_presence_frame_is_answered_with_the_topic_users(rules, subscriber):
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    await subscribed(comm)
    await comm.send_json_to({"type": "presence", "ref": 3})
    answer = await frame(comm)
    assert (answer["type"], answer["topic"], answer["ref"]) == ("presence", "alerts.k8s", 3)
    assert isinstance(answer["users"], list)
    await comm.disconnect()


# --- slow readers ----------------------------------------------------------------------------


class Peer:
    """The server side of one connection, for a client that can stop reading: ``send`` waits
    while ``reading`` is clear, as uvicorn's does when the transport's buffer is full."""

    def __init__(self, topic: str, token: str) -> None:
        self.scope = {
            "type": "websocket",
            "path": f"/ws/{topic}/",
            "query_string": f"token={token}".encode(),
            "headers": [],
            "subprotocols": [],
            "url_route": {"args": (), "kwargs": {"topic": topic}},
        }
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.reading = asyncio.Event()
        self.reading.set()
        self.task: asyncio.Task | None = None

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send(self, event: dict) -> None:
        await self.reading.wait()
        self.sent.append(event)

    def start(self) -> None:
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.get_running_loop().create_task(
            plain_socket_app(self.scope, self.receive, self.send)
        )

    def frames(self) -> list[dict]:
        return [json.loads(e["text"]) for e in self.sent if e["type"] == "websocket.send"]

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames() if f["type"] == "notification"]

    def close_code(self) -> int | None:
        return next((e["code"] for e in self.sent if e["type"] == "websocket.close"), None)

    async def disconnect(self) -> None:
        self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(self.task, WAIT_S)


async def test_slow_reader_is_closed_with_4429_while_others_keep_receiving(
    rules, subscriber, settings
):
    settings.SOCKET_SEND_QUEUE = 8
    token = token_for(subscriber)
    fast, slow = Peer("alerts.flood", token), Peer("alerts.flood", token)
    for peer in (fast, slow):
        peer.start()
        await wait_until(
            lambda p=peer: any(f["type"] == "subscribed" for f in p.frames()), "subscribed"
        )
    slow.reading.clear()  # stops reading: its sends now wait
    seqs = await publish("alerts.flood", 30)
    await wait_until(lambda: fast.seqs()[-1:] == [30], "the fast reader to get seq 30")
    assert fast.seqs() == seqs
    assert hub.stats()["subscribers"] == 1  # the slow one is already out of the fanout
    slow.reading.set()  # what it finally reads: what was sent before, then the close
    await wait_until(lambda: slow.close_code() is not None, "the slow reader's close")
    assert slow.close_code() == 4429
    assert slow.seqs() == list(range(1, len(slow.seqs()) + 1))
    assert len(slow.seqs()) < 30
    await slow.disconnect()
    await publish("alerts.flood", 1)
    await wait_until(lambda: fast.seqs()[-1:] == [31], "the fast reader to get seq 31")
    await fast.disconnect()
    await assert_nothing_subscribed("alerts.flood")


async def test_many_sockets_leaving_at_once_leave_nothing_subscribed(rules, subscriber):
    token = token_for(subscriber)
    peers = [Peer("alerts.crowd", token) for _ in range(50)]
    for peer in peers:
        peer.start()
    await wait_until(
        lambda: all(any(f["type"] == "subscribed" for f in p.frames()) for p in peers),
        "every socket to be subscribed",
    )
    assert hub.stats()["subscribers"] == 50
    await asyncio.gather(*(p.disconnect() for p in peers))
    await assert_nothing_subscribed("alerts.crowd")


# --- a send that fails ----------------------------------------------------------------------


class EncodingSend:
    """An ASGI send that encodes text frames as a server does; ``gate`` makes sends wait."""

    def __init__(self):
        self.events: list[dict] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, event: dict) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if event["type"] == "websocket.send":
            event["text"].encode()
        self.events.append(event)


@pytest.mark.parametrize("queued", [False, True], ids=["at-once", "behind-a-waiting-send"])
async def test_a_send_that_fails_closes_the_socket_with_1011(queued, caplog):
    from channels_app.close_codes import CloseCode
    from channels_app.sender import ConnectionSender

    send = EncodingSend()
    sender = ConnectionSender(send, 10, lambda: None, CloseCode.INTERNAL_ERROR)
    if queued:
        send.gate = asyncio.Event()
        assert sender.push({"type": "websocket.send", "text": "first"})  # waits at the gate
    sender.push({"type": "websocket.send", "text": "\ud800"})
    if queued:
        send.gate.set()
    await sender.flushed()
    assert sender.closed and sender.close_code == CloseCode.INTERNAL_ERROR
    assert send.events[-1]["type"] == "websocket.close" and send.events[-1]["code"] == 1011
    assert "could not be sent" in caplog.text
    assert not sender.push({"type": "websocket.send", "text": "later"})
    sender.dispose()
