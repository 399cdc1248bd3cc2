"""Every frame sent to clients has one documented shape (channels_app/frames.py), and every edge
sends exactly that: the plain socket, the Phoenix socket and SSE, driven in-process.

The shapes are written out below as schemas, independently of the builders (Zulip's
``zerver/lib/event_schema.py`` is the model): a missing key, an extra key or a value of another
type fails the check. Each edge test drives one connection through every frame it can send and
checks each frame received against its schema, and the exact count per frame type.

Redis mode with REDIS_URL (hub and presence through Redis), embedded otherwise.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from datetime import datetime

import pytest
from asgiref.sync import sync_to_async

from channels_app import frames, handlers, presence, tokens
from channels_app.close_codes import CloseCode
from channels_app.frames import ErrorCode
from channels_app.hub import hub
from channels_app.presence import get_presence
from channels_app.sse import with_sse
from routing_app import stream_reads
from routing_app.models import Notification, Topic
from routing_app.stream_writes import trim_retention
from tests.test_phoenix_protocol import connect as phoenix_connect
from tests.test_phoenix_protocol import post
from tests.test_ws_plain import WAIT_S, close_code, connect, publish, rules, token_for, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

__all__ = ["rules"]  # a fixture, imported for its setup and teardown


# --- the schema language -------------------------------------------------------------------------


class SchemaError(AssertionError):
    pass


@dataclass(frozen=True)
class Equals:
    value: object


@dataclass(frozen=True)
class OneOf:
    values: tuple


@dataclass(frozen=True)
class ListOf:
    item: object


@dataclass(frozen=True)
class MapOf:
    """An object with any string keys, each value of one schema (a presence state)."""

    value: object


@dataclass(frozen=True)
class Parses:
    """A string that ``parse`` accepts (a UUID, a timestamp)."""

    parse: object


@dataclass(frozen=True)
class AnyOf:
    schemas: tuple


@dataclass(frozen=True)
class Obj:
    """An object with exactly the ``required`` keys, and any of the ``optional`` ones."""

    required: dict
    optional: dict | None = None


def check(schema, value, where: str = "frame") -> None:
    """Raise SchemaError naming the first place where ``value`` does not have ``schema``'s shape.
    A schema is a type (or tuple of types; ``None`` for null), or one of the classes above."""
    if isinstance(schema, type | tuple):
        types = schema if isinstance(schema, tuple) else (schema,)
        allowed = tuple(type(None) if t is None else t for t in types)
        if isinstance(value, bool) and bool not in allowed:  # bool is an int in Python, not JSON
            raise SchemaError(f"{where}: {value!r} is a boolean, expected {types}")
        if not isinstance(value, allowed):
            raise SchemaError(f"{where}: {value!r} is not of {types}")
    elif isinstance(schema, Equals):
        if type(value) is not type(schema.value) or value != schema.value:
            raise SchemaError(f"{where}: {value!r} != {schema.value!r}")
    elif isinstance(schema, OneOf):
        if value not in schema.values:
            raise SchemaError(f"{where}: {value!r} is none of {schema.values}")
    elif isinstance(schema, ListOf):
        check(list, value, where)
        for i, item in enumerate(value):
            check(schema.item, item, f"{where}[{i}]")
    elif isinstance(schema, MapOf):
        check(dict, value, where)
        for key, item in value.items():
            check(str, key, f"{where} key")
            check(schema.value, item, f"{where}[{key!r}]")
    elif isinstance(schema, Parses):
        check(str, value, where)
        try:
            schema.parse(value)
        except ValueError as exc:
            raise SchemaError(f"{where}: {value!r} does not parse: {exc}") from None
    elif isinstance(schema, AnyOf):
        errors = []
        for option in schema.schemas:
            try:
                return check(option, value, where)
            except SchemaError as exc:
                errors.append(str(exc))
        raise SchemaError(" / ".join(errors))
    elif isinstance(schema, Obj):
        check(dict, value, where)
        optional = schema.optional or {}
        missing = set(schema.required) - set(value)
        extra = set(value) - set(schema.required) - set(optional)
        if missing or extra:
            raise SchemaError(f"{where}: missing keys {sorted(missing)}, extra {sorted(extra)}")
        for key, item in value.items():
            check({**schema.required, **optional}[key], item, f"{where}.{key}")
    else:
        raise TypeError(f"not a schema: {schema!r}")


def aware_timestamp(text: str) -> datetime:
    stamp = datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        raise ValueError("no UTC offset")
    return stamp


# --- the shapes ----------------------------------------------------------------------------------

UUID = Parses(uuid.UUID)
REF = (str, int, float, bool, dict, list)  # the client's own ref, echoed back as it was sent
SINCE = (int, None)

NOTIFICATION = Obj(
    {
        "type": Equals("notification"),
        "topic": str,
        "seq": int,
        "id": UUID,
        "event": str,
        "data": dict,
        "severity": str,
        "source": str,
        "ts": Parses(aware_timestamp),
    }
)
RESET_FIELDS = {"topic": str, "since": SINCE, "oldest_seq": (int, None), "last_seq": int}
ERROR_CODES = (
    "bad_json",
    "bad_frame",
    "binary_unsupported",
    "unknown_type",
    "rate_limited",
    "forbidden",
    "invalid",
    "unavailable",
    "too_slow",
)
USER = Obj(
    {
        "key": str,
        "user_id": (int, None),
        "username": (str, None),
        "connections": int,
        "online_at": int,
    }
)

# The plain socket's frames by "type"; SSE's data lines are the same objects.
PLAIN = {
    "subscribed": Obj({"type": Equals("subscribed"), "topic": str, "last_seq": int}),
    "notification": NOTIFICATION,
    "reset": Obj({"type": Equals("reset"), **RESET_FIELDS}),
    "event": Obj({"type": Equals("event"), "topic": str, "event": str, "payload": dict}),
    "error": Obj(
        {"type": Equals("error"), "code": OneOf(ERROR_CODES), "message": str}, {"ref": REF}
    ),
    "ack": Obj({"type": Equals("ack"), "seq": int, "id": UUID}, {"ref": REF}),
    "presence": Obj(
        {"type": Equals("presence"), "topic": str, "users": ListOf(USER)}, {"ref": REF}
    ),
    "ping": Obj({"type": Equals("ping")}),
    "pong": Obj({"type": Equals("pong")}),
}

META = Obj(
    {"phx_ref": str, "online_at": int, "user_id": (int, None), "username": (str, None)},
    {"via": OneOf(("websocket", "sse"))},
)
PRESENCE_STATE = MapOf(Obj({"metas": ListOf(META)}))
CURRENT_STATE = Obj(
    {
        "topic": str,
        "last_seq": int,
        "oldest_seq": (int, None),
        "notifications": ListOf(NOTIFICATION),
    }
)
REASON = Obj({"reason": str})
EMPTY = Obj({})

# Phoenix payloads by event (reverse_flow_update: the built-in handler's broadcast).
PHOENIX = {
    "phx_reply": AnyOf(
        (
            Obj({"status": Equals("ok"), "response": AnyOf((EMPTY, CURRENT_STATE))}),
            Obj({"status": Equals("error"), "response": REASON}),
        )
    ),
    "current_state": CURRENT_STATE,
    "notification": NOTIFICATION,
    "reset": Obj(RESET_FIELDS),
    "presence_state": PRESENCE_STATE,
    "presence_diff": Obj({"joins": PRESENCE_STATE, "leaves": PRESENCE_STATE}),
    "reverse_flow_update": CURRENT_STATE,
    "phx_close": EMPTY,
    "phx_error": EMPTY,  # a failed channel; on the socket's own topic it carries a reason
}
SOCKET_TOPIC_ERROR = REASON


def check_plain(frame: dict) -> str:
    """Check one plain frame (or SSE data object) against the schema its type names."""
    kind = frame.get("type")
    if kind not in PLAIN:
        raise SchemaError(f"unknown frame type {kind!r}")
    check(PLAIN[kind], frame, kind)
    return kind


def check_phoenix(frame: list) -> str:
    """Check one Phoenix V2 frame ``[join_ref, ref, topic, event, payload]``; return its event."""
    check(list, frame)
    if len(frame) != 5:
        raise SchemaError(f"a Phoenix frame has 5 elements, not {len(frame)}")
    join_ref, ref, topic, event, payload = frame
    check((str, None), join_ref, "join_ref")
    check((str, None), ref, "ref")
    check(str, topic, "topic")
    check(OneOf(tuple(PHOENIX)), event, "event")
    if event == "phx_error" and topic == "phoenix":
        check(SOCKET_TOPIC_ERROR, payload, event)
    else:
        check(PHOENIX[event], payload, event)
    return event


# --- the schemas and the builders ----------------------------------------------------------------


def test_the_schema_check_rejects_a_missing_key_an_extra_key_and_a_wrong_type():
    good = {"type": "ack", "seq": 1, "id": str(uuid.uuid4())}
    check(PLAIN["ack"], good)
    check(PLAIN["ack"], {**good, "ref": "p1"})
    for bad in (
        {"type": "ack", "seq": 1},
        {**good, "extra": 1},
        {**good, "seq": "1"},
        {**good, "seq": True},
        {**good, "id": "not-a-uuid"},
        {**good, "type": "Ack"},
    ):
        with pytest.raises(SchemaError):
            check(PLAIN["ack"], bad)
    with pytest.raises(SchemaError):
        check_plain({"type": "hello"})
    with pytest.raises(SchemaError):
        check_phoenix([None, None, "t", "notification"])


def test_each_builder_builds_its_documented_shape():
    state = presence.one(
        "7", {"phx_ref": "r1", "online_at": 1, "user_id": 7, "username": "sam", "via": "sse"}
    )
    built = [
        frames.subscribed("alerts.k8s", 0),
        frames.reset("alerts.k8s", 2, 8, 10),
        frames.reset("alerts.k8s", None, None, 0),
        frames.event("alerts.k8s", "reverse_flow_update", {"state": 1}),
        frames.error(ErrorCode.BAD_JSON, "frame is not valid JSON"),
        frames.error(ErrorCode.UNKNOWN_TYPE, "unknown frame type", "r1"),
        frames.ack(3, str(uuid.uuid4())),
        frames.ack(3, str(uuid.uuid4()), 9),
        frames.presence("alerts.k8s", presence.users(state)),
        frames.presence("alerts.k8s", [], "who"),
        frames.ping(),
        frames.pong(),
    ]
    assert sorted(check_plain(frame) for frame in built) == sorted(
        ["subscribed", "reset", "reset", "event", "error", "error", "ack", "ack"]
        + ["presence", "presence", "ping", "pong"]
    )
    assert frames.error(ErrorCode.BAD_JSON, "x") == {
        "type": "error",
        "code": "bad_json",
        "message": "x",
    }
    assert "ref" not in frames.ack(1, "i") and frames.ack(1, "i", 0)["ref"] == 0

    check(PHOENIX["reset"], frames.reset_payload("a.b", 2, 8, 10))
    assert frames.reset("a.b", 2, 8, 10) == {
        "type": "reset",
        **frames.reset_payload("a.b", 2, 8, 10),
    }
    check(PHOENIX["phx_reply"], frames.phoenix_reply("ok", {}))
    check(PHOENIX["phx_reply"], frames.phoenix_reply("error", frames.reason("unmatched topic")))
    check(SOCKET_TOPIC_ERROR, frames.reason("malformed frame: not JSON"))
    check(PHOENIX["presence_state"], state)
    check(PHOENIX["presence_diff"], presence.diff(joins=state))


def test_error_codes_are_the_ones_clients_know():
    assert sorted(code.value for code in ErrorCode) == sorted(ERROR_CODES)


def test_close_codes_keep_their_numbers():
    assert {code.name: int(code) for code in CloseCode} == {
        "TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "TRY_LATER": 1013,
        "BAD_REQUEST": 4400,
        "UNAUTHENTICATED": 4401,
        "FORBIDDEN": 4403,
        "HEARTBEAT_TIMEOUT": 4408,
        "TOO_SLOW": 4429,
    }


async def test_a_stored_notification_and_its_replayed_copy_have_the_notification_shape(rules):
    [seq] = await publish("alerts.shape", event="pod.crash")
    stored = await sync_to_async(Notification.objects.select_related("topic").get)(seq=seq)
    check(NOTIFICATION, stored.envelope())
    [replayed] = await stream_reads.read_after("alerts.shape", 0)
    check(NOTIFICATION, replayed)
    assert replayed == stored.envelope()
    state = await stream_reads.current_state("alerts.shape")
    check(CURRENT_STATE, state)
    assert state["notifications"] == [replayed]


# --- the plain socket ----------------------------------------------------------------------------


async def trimmed_topic(name: str) -> None:
    """A topic whose retention kept seqs 8..10 of 10: resuming after 2 is a reset."""
    await publish(name, 1)
    await sync_to_async(Topic.objects.filter(name=name).update)(retention_count=3)
    await publish(name, 9)
    topic = await sync_to_async(Topic.objects.get)(name=name)
    await sync_to_async(trim_retention)(topic)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def edges(rules, settings):
    """test_ws_plain's ``rules`` (default topic rules, hub closed after the test); no heartbeat
    ping during the test; this loop's presence backend closed after it."""
    settings.HEARTBEAT_INTERVAL_S = 600
    settings.HEARTBEAT_TIMEOUT_S = 1200
    yield
    await get_presence().close()


class PlainRecorder:
    """Every frame one plain socket receives, checked against its schema as it arrives."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.kinds: list[str] = []
        self.frames: list[dict] = []

    async def take(self, count: int) -> list[dict]:
        taken = []
        for _ in range(count):
            text = await self.comm.receive_from(timeout=WAIT_S)
            frame = json.loads(text)
            self.kinds.append(check_plain(frame))
            self.frames.append(frame)
            taken.append(frame)
        return taken

    def count(self) -> dict[str, int]:
        return {kind: self.kinds.count(kind) for kind in sorted(set(self.kinds))}


async def test_every_frame_the_plain_socket_sends_has_its_shape(edges, operator):
    topic = unique("alerts.wire")
    await trimmed_topic(topic)
    comm = await connect(f"/ws/{topic}/?token={token_for(operator)}&since=2")
    socket = PlainRecorder(comm)
    assert [f["type"] for f in await socket.take(2)] == ["reset", "subscribed"]

    await comm.send_json_to({"type": "ping"})
    await socket.take(1)
    await comm.send_to(text_data="{not json")
    await comm.send_json_to({"type": "dance", "ref": "r1"})
    assert [(f["code"], f.get("ref")) for f in await socket.take(2)] == [
        ("bad_json", None),
        ("unknown_type", "r1"),
    ]
    await comm.send_json_to({"type": "presence", "ref": 3})
    [answer] = await socket.take(1)
    assert [user["username"] for user in answer["users"]] == ["oscar"]
    await comm.send_json_to({"type": "publish", "event": "deploy.start", "data": {}, "ref": "p1"})
    assert sorted(f["type"] for f in await socket.take(2)) == ["ack", "notification"]
    await publish(topic, 1)
    await socket.take(1)
    hub.broadcast_event(topic, "reverse_flow_update", {"state": 1})
    await socket.take(1)
    await comm.send_json_to({"type": "resume", "since": 9})
    assert [f.get("seq") for f in await socket.take(4)] == [10, 11, 12, None]

    await comm.send_json_to({"type": "ping"})  # everything sent before its pong has arrived
    await socket.take(1)
    assert await comm.receive_nothing()
    assert socket.count() == {
        "ack": 1,
        "error": 2,
        "event": 1,
        "notification": 5,
        "pong": 2,
        "presence": 1,
        "reset": 1,
        "subscribed": 2,
    }
    await comm.disconnect()


async def test_the_plain_socket_heartbeat_ping_has_its_shape(rules, subscriber, settings):
    settings.HEARTBEAT_INTERVAL_S = 0.1
    settings.HEARTBEAT_TIMEOUT_S = 0.3
    comm = await connect(f"/ws/alerts.k8s/?token={token_for(subscriber)}")
    socket = PlainRecorder(comm)
    assert [f["type"] for f in await socket.take(2)] == ["subscribed", "ping"]
    assert await close_code(comm) == CloseCode.HEARTBEAT_TIMEOUT
    await comm.disconnect()


# --- the Phoenix socket --------------------------------------------------------------------------


class PhoenixRecorder:
    """Every frame one Phoenix socket receives, checked against its schema as it arrives."""

    def __init__(self, client) -> None:
        self.client = client
        self.events: list[str] = []

    async def frame(self) -> list:
        frame = await self.client.frame()
        self.events.append(check_phoenix(frame))
        return frame

    async def until(self, event: str, topic: str | None = None, ref: str | None = None) -> list:
        while True:
            frame = await self.frame()
            if frame[3] == event and topic in (None, frame[2]) and ref in (None, frame[1]):
                return frame

    async def join(self, topic: str, payload: dict | None = None) -> str:
        """Join like phoenix.js (join_ref = the join's ref), read up to the own presence join."""
        ref = self.client.next_ref()
        await self.client.ws.send_to(
            text_data=json.dumps([ref, ref, topic, "phx_join", payload or {}])
        )
        reply = await self.until("phx_reply", topic, ref)
        assert reply[4]["status"] == "ok", reply
        await self.until("presence_diff", topic)  # every joiner also gets its own join
        return ref

    async def request(self, topic: str, event: str, join_ref: str | None = None) -> list:
        ref = await self.client.push(topic, event, {}, join_ref=join_ref)
        return await self.until("phx_reply", topic, ref)

    def count(self) -> dict[str, int]:
        return {event: self.events.count(event) for event in sorted(set(self.events))}


async def test_every_frame_the_phoenix_socket_sends_has_its_shape(edges, operator):
    flow, alerts, crash = unique("reverse_flow:wire"), unique("alerts.wire"), unique("crash:wire")
    await post(flow, step="plan")
    await post(flow, step="apply")
    await trimmed_topic(alerts)

    @handlers.register("crash:*")
    async def crashing(request):
        raise RuntimeError("the handler failed")

    try:
        socket = PhoenixRecorder(await phoenix_connect(operator))
        await socket.request("phoenix", "heartbeat")
        flow_ref = await socket.join(flow, {"since": 1})  # current_state, seq 2, presence_state
        await post(flow, step="done")
        await socket.until("notification", flow)
        update = await socket.request(flow, "request_update", flow_ref)
        assert (await socket.until("reverse_flow_update", flow))[4] == update[4]["response"]
        alerts_ref = await socket.join(alerts, {"since": 2})  # current_state, reset, presence
        assert (await socket.request(alerts, "shout", alerts_ref))[4]["status"] == "error"
        assert (await socket.request("alerts.elsewhere", "request_update"))[4]["status"] == "error"
        await socket.client.ws.send_to(text_data="not json")
        await socket.until("phx_error", "phoenix")
        crash_ref = await socket.join(crash)
        await socket.client.push(crash, "request_update", {}, join_ref=crash_ref)
        await socket.until("phx_error", crash)
        await socket.request(alerts, "phx_leave", alerts_ref)
        await socket.until("phx_close", alerts)

        await socket.request("phoenix", "heartbeat")  # everything sent before it has arrived
        assert await socket.client.ws.receive_nothing()
        assert socket.count() == {
            "current_state": 3,
            "notification": 2,
            "phx_close": 1,
            "phx_error": 2,
            "phx_reply": 9,
            "presence_diff": 3,
            "presence_state": 3,
            "reset": 1,
            "reverse_flow_update": 1,
        }
        await socket.client.ws.disconnect()
    finally:
        handlers.unregister("crash:*")


# --- SSE -----------------------------------------------------------------------------------------


def _unrouted(scope, receive, send):
    raise AssertionError(f"{scope['path']} did not reach the SSE app")


class SseRecorder:
    """One stream of ``with_sse``'s /events/<topic>/, its events parsed and checked as they
    arrive. ``reading`` cleared makes the server's sends wait, as a full transport's do."""

    def __init__(self, topic: str, token: str, last_event_id: str | None = None) -> None:
        headers = [(b"host", b"testserver")]
        if last_event_id is not None:
            headers.append((b"last-event-id", last_event_id.encode()))
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/events/{topic}/",
            "raw_path": f"/events/{topic}/".encode(),
            "root_path": "",
            "query_string": f"token={token}".encode(),
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.chunks: asyncio.Queue = asyncio.Queue()
        self.reading = asyncio.Event()
        self.reading.set()
        self.buffer = ""
        self.names: list[str] = []
        self.task: asyncio.Task | None = None

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send(self, event: dict) -> None:
        await self.reading.wait()
        if event["type"] == "http.response.start":
            assert event["status"] == 200, event
        else:
            self.chunks.put_nowait(event["body"])
            if not event.get("more_body"):
                self.chunks.put_nowait(None)  # the server ended the stream

    def open(self) -> SseRecorder:
        self.inbox.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        app = with_sse(_unrouted)
        self.task = asyncio.get_running_loop().create_task(app(self.scope, self.receive, self.send))
        return self

    async def next(self) -> dict | None:
        """The next event (comments skipped) as ``{"event", "id", "retry", "data"}`` with data
        parsed and checked; None once the server ended the stream."""
        while True:
            block, sep, rest = self.buffer.partition("\n\n")
            if sep:
                self.buffer = rest
                item = self._parse(block)
                if item is not None:
                    return item
                continue
            chunk = await asyncio.wait_for(self.chunks.get(), WAIT_S)
            if chunk is None:
                assert self.buffer == "", self.buffer
                return None
            self.buffer += chunk.decode()

    def _parse(self, block: str) -> dict | None:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                continue  # the opening comment, keep-alives
            name, _, value = line.partition(": ")
            assert name in ("event", "id", "retry", "data") and name not in fields, block
            fields[name] = value
        if not fields:
            return None
        item = {"event": fields.get("event"), "id": fields.get("id"), "retry": fields.get("retry")}
        item["data"] = json.loads(fields["data"])
        self.names.append(check_sse(item))
        return item

    async def until(self, name: str) -> dict:
        while (item := await self.next()) is not None:
            if self.names[-1] == name:
                return item
        raise AssertionError(f"the stream ended before {name}")

    async def close(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(self.task, WAIT_S)
        self.chunks.put_nowait(None)
        while await self.next() is not None:
            pass

    def count(self) -> dict[str, int]:
        return {name: self.names.count(name) for name in sorted(set(self.names))}


def check_sse(item: dict) -> str:
    """Check one SSE event: its data against the plain frame of that type, its event name and id
    against the protocol (sse.py's docstring); return a name for its kind."""
    data = item["data"]
    kind = check_plain(data)
    expected = {
        "notification": (data.get("event"), str(data.get("seq")), None),
        "reset": ("reset", str(data.get("last_seq")), None),
        "subscribed": ("subscribed", None, None),
        "event": (data.get("event"), None, None),
    }
    if kind == "error":
        assert (item["event"], item["id"]) == ("stream-error", None), item
        assert item["retry"] is None or item["retry"].isdigit(), item
        return "stream-error"
    assert kind in expected, item
    assert (item["event"], item["id"], item["retry"]) == expected[kind], item
    return kind


async def test_every_event_an_sse_stream_sends_has_its_shape(edges, operator):
    topic = unique("alerts.wire")
    await trimmed_topic(topic)
    stream = SseRecorder(topic, token_for(operator), last_event_id="2").open()
    assert (await stream.next())["event"] == "reset"
    await stream.until("subscribed")
    await publish(topic, 1)
    assert (await stream.until("notification"))["id"] == "11"
    hub.broadcast_event(topic, "reverse_flow_update", {"state": 1})
    await stream.until("event")
    await stream.close()  # everything the stream sent is read
    assert stream.count() == {"event": 1, "notification": 1, "reset": 1, "subscribed": 1}


async def test_an_sse_stream_too_slow_to_read_ends_with_a_stream_error_of_its_shape(
    edges, subscriber, settings
):
    settings.SOCKET_SEND_QUEUE = 8
    topic = unique("alerts.slow")
    stream = SseRecorder(topic, tokens.mint(subscriber.pk).token).open()
    await stream.until("subscribed")
    stream.reading.clear()
    for _ in range(30):  # one at a time: a burst would leave as one chunk, a queue of one
        await publish(topic, 1)
    await wait_until(lambda: hub.stats()["subscribers"] == 0, "the slow stream's overflow")
    stream.reading.set()
    items = []
    while (item := await stream.next()) is not None:
        items.append(item)
    *notifications, last = items
    assert [n["data"]["seq"] for n in notifications] == list(range(1, len(notifications) + 1))
    assert len(notifications) < 30
    assert (stream.names[-1], last["data"]["code"]) == ("stream-error", "too_slow")
    assert stream.count() == {
        "notification": len(notifications),
        "stream-error": 1,
        "subscribed": 1,
    }
    await stream.close()
