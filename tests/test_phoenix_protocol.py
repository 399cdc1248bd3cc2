"""The Phoenix Channels V2 socket at /socket/websocket?vsn=2.0.0: protocol details and edge cases.

``WebsocketCommunicator`` against the real ASGI application; frames are asserted as a client sees
them (``[join_ref, ref, topic, event, payload]``). The official ``phoenix`` client end to end is in
test_phoenix_official_client.py. Redis mode when REDIS_URL is set (hub and presence through
Redis), embedded otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from channels_app import handlers, tokens
from channels_app.hub import hub
from channels_app.presence import get_presence
from routing_app.ingest import NotificationIn, ingest

pytestmark = pytest.mark.django_db(transaction=True)

RECEIVE_TIMEOUT_S = 10  # upper bound for one awaited frame; passing runs take milliseconds
SOCKET_PATH = "/socket/websocket?vsn=2.0.0"


@pytest.fixture
async def default_rules(db, _db_pool_closed_at_end):
    """The fresh-install topic rules (a transactional test's flush removes the migration's)."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module("channels_app.migrations.0002_default_topic_rules")
    await sync_to_async(migration.create_defaults)(apps, None)


@pytest.fixture(autouse=True)
async def clean_hub():
    yield
    await hub.aclose()
    presence = get_presence()
    await presence.close()


async def post(topic: str, event: str = "step.done", **data) -> int:
    [result] = await sync_to_async(ingest)([NotificationIn(topic=topic, event=event, data=data)])
    return result.seq


class Client:
    """A raw Phoenix V2 client over WebsocketCommunicator: frames in, frames out."""

    def __init__(self, communicator: WebsocketCommunicator):
        self.ws = communicator
        self.ref = 0

    def next_ref(self) -> str:
        self.ref += 1
        return str(self.ref)

    async def push(self, topic: str, event: str, payload=None, join_ref: str | None = None) -> str:
        ref = self.next_ref()
        await self.ws.send_to(text_data=json.dumps([join_ref, ref, topic, event, payload or {}]))
        return ref

    async def frame(self) -> list:
        return json.loads(await self.ws.receive_from(timeout=RECEIVE_TIMEOUT_S))

    async def until(self, event: str, topic: str | None = None) -> list:
        """Frames up to and including the first with ``event`` (and ``topic``)."""
        while True:
            frame = await self.frame()
            if frame[3] == event and (topic is None or frame[2] == topic):
                return frame

    async def join(self, topic: str, payload=None) -> tuple[str, list]:
        ref = await self.push(topic, "phx_join", payload, join_ref=None)
        # phoenix.js sends the join with join_ref == its own ref
        return ref, await self.reply(ref)

    async def reply(self, ref: str) -> list:
        while True:
            frame = await self.frame()
            if frame[3] == "phx_reply" and frame[1] == ref:
                return frame


async def connect(user=None, query: str = "", subprotocols=None) -> Client:
    path = SOCKET_PATH + query
    if user is not None and "token=" not in query:
        path += "&token=" + tokens.mint(user.pk).token
    communicator = WebsocketCommunicator(application(), path, subprotocols=subprotocols)
    connected, _ = await communicator.connect(timeout=RECEIVE_TIMEOUT_S)
    assert connected
    return Client(communicator)


def application():
    from notify_project.asgi import application as app

    return app


async def join(client: Client, topic: str, payload=None) -> list:
    """Join like phoenix.js (join_ref = the join's ref); return the reply frame."""
    ref = client.next_ref()
    await client.ws.send_to(text_data=json.dumps([ref, ref, topic, "phx_join", payload or {}]))
    return await client.reply(ref)


# --- socket-level ------------------------------------------------------------------------------


async def test_heartbeat_on_phoenix_topic_gets_ok_reply(subscriber, default_rules):
    client = await connect(subscriber)
    ref = await client.push("phoenix", "heartbeat")
    ok = {"status": "ok", "response": {}}
    assert await client.frame() == [None, ref, "phoenix", "phx_reply", ok]
    await client.ws.disconnect()


async def test_socket_without_v2_vsn_is_refused(subscriber):
    path = "/socket/websocket?vsn=1.0.0&token=" + tokens.mint(subscriber.pk).token
    connected, _ = await WebsocketCommunicator(application(), path).connect()
    assert not connected


async def test_forged_token_is_refused_at_connect(subscriber):
    communicator = WebsocketCommunicator(application(), SOCKET_PATH + "&token=forged.token")
    connected, _ = await communicator.connect()
    assert not connected


async def test_auth_token_subprotocol_authenticates_and_phoenix_is_selected(
    subscriber, default_rules
):
    token = tokens.mint(subscriber.pk).token
    encoded = base64.b64encode(token.encode()).decode().rstrip("=")  # what phoenix.js sends
    communicator = WebsocketCommunicator(
        application(), SOCKET_PATH, subprotocols=["phoenix", f"base64url.bearer.phx.{encoded}"]
    )
    connected, subprotocol = await communicator.connect(timeout=RECEIVE_TIMEOUT_S)
    assert connected and subprotocol == "phoenix"
    client = Client(communicator)
    reply = await join(client, "alerts.k8s")  # needs a logged-in user: the token's
    assert reply[4]["status"] == "ok"
    await communicator.disconnect()


async def test_malformed_frames_get_errors_and_socket_stays_open(subscriber, default_rules):
    client = await connect(subscriber)
    await client.ws.send_to(text_data="not json")
    frame = await client.frame()
    assert frame[:4] == [None, None, "phoenix", "phx_error"]
    assert "not JSON" in frame[4]["reason"]

    await client.ws.send_to(text_data=json.dumps(["1", "7", "alerts.k8s", "phx_join"]))
    frame = await client.frame()
    assert frame[:4] == ["1", "7", "alerts.k8s", "phx_reply"]
    assert frame[4]["status"] == "error" and "malformed" in frame[4]["response"]["reason"]

    ref = await client.push("phoenix", "heartbeat")
    assert (await client.frame())[1] == ref
    await client.ws.disconnect()


@pytest.mark.parametrize("encoded", ["!!!!", "", "a", "%%%%dG9r"])
async def test_malformed_auth_token_subprotocol_is_refused_with_4401(encoded, subscriber):
    communicator = WebsocketCommunicator(
        application(), SOCKET_PATH, subprotocols=["phoenix", f"base64url.bearer.phx.{encoded}"]
    )
    connected, code = await communicator.connect(timeout=RECEIVE_TIMEOUT_S)
    assert (connected, code) == (False, 4401)


async def test_deeply_nested_frame_gets_phx_error_and_socket_stays_open(subscriber, default_rules):
    client = await connect(subscriber)
    await client.ws.send_to(text_data="[" * 10_000 + "]" * 10_000)
    frame = await client.frame()
    assert frame[:4] == [None, None, "phoenix", "phx_error"]
    assert "nested deeper than" in frame[4]["reason"]
    deep = '["1", "2", "alerts.k8s", "phx_join", {"x": ' + "[" * 80 + "]" * 80 + "}]"
    await client.ws.send_to(text_data=deep)  # parses, but past the depth bound
    assert (await client.frame())[3] == "phx_error"
    ref = await client.push("phoenix", "heartbeat")
    assert (await client.frame())[1] == ref
    await client.ws.disconnect()


@pytest.mark.parametrize(
    "text",
    [
        '[null, "\\udc00", "phoenix", "heartbeat", {}]',
        '[null, "1", "\\udc00", "phx_join", {}]',
        '["\\ud800", "1", "alerts.k8s", "phx_join", {}]',
        '[null, "1", "alerts.k8s", "phx_join", {"since": "\\ud800"}]',
    ],
)
async def test_frame_with_a_lone_surrogate_is_refused_without_echoing_it(
    text, subscriber, default_rules
):
    client = await connect(subscriber)
    await client.ws.send_to(text_data=text)
    raw = await client.ws.receive_from(timeout=RECEIVE_TIMEOUT_S)
    raw.encode()  # sendable: a real server would have failed here
    frame = json.loads(raw)
    assert frame[:4] == [None, None, "phoenix", "phx_error"]
    assert "surrogate" in frame[4]["reason"]
    ref = await client.push("phoenix", "heartbeat")
    assert (await client.frame())[1] == ref
    await client.ws.disconnect()


async def test_frames_over_the_rate_get_rate_limited_replies(
    subscriber, default_rules, monkeypatch
):
    from channels_app.frame_limits import FrameBudget

    monkeypatch.setattr(FrameBudget, "clock", staticmethod(lambda: 0.0))  # no refill meanwhile
    client = await connect(subscriber)
    burst = 2 * 50 + 100  # the plain socket's burst, plus a rejoin of 100 topics
    for _ in range(burst + 10):
        await client.push("phoenix", "heartbeat")
    frames = [await client.frame() for _ in range(burst + 10)]
    assert {f[4]["status"] for f in frames[:burst]} == {"ok"}
    for frame in frames[burst:]:
        assert frame[2:4] == ["phoenix", "phx_reply"] and frame[4]["status"] == "error"
        assert frame[4]["response"]["reason"].startswith("rate_limited")
    await client.ws.disconnect()


async def test_frame_over_64kb_closes_with_1009(subscriber, default_rules):
    client = await connect(subscriber)
    await client.push("alerts.k8s", "phx_join", {"pad": "x" * 70_000})
    closed = await client.ws.receive_output(timeout=RECEIVE_TIMEOUT_S)
    assert closed == {"type": "websocket.close", "code": 1009, "reason": closed["reason"]}


# --- joining -----------------------------------------------------------------------------------


async def test_join_replies_ok_then_current_state_then_presence_state(subscriber, default_rules):
    await post("reverse_flow:cluster-a", step="plan")
    await post("reverse_flow:cluster-a", step="apply")
    client = await connect(subscriber)

    reply = await join(client, "reverse_flow:cluster-a")
    join_ref = reply[0]
    assert reply == [join_ref, join_ref, "reverse_flow:cluster-a", "phx_reply",
                     {"status": "ok", "response": {}}]  # fmt: skip
    state = await client.frame()
    assert state[:4] == [join_ref, None, "reverse_flow:cluster-a", "current_state"]
    assert state[4]["last_seq"] == 2
    assert [n["data"]["step"] for n in state[4]["notifications"]] == ["plan", "apply"]
    assert [n["seq"] for n in state[4]["notifications"]] == [1, 2]
    presence = await client.frame()
    assert presence[:4] == [join_ref, None, "reverse_flow:cluster-a", "presence_state"]
    [(key, entry)] = presence[4].items()
    assert key == str(subscriber.pk)
    [meta] = entry["metas"]
    assert meta["username"] == "sam" and meta["phx_ref"] and meta["online_at"]
    await client.ws.disconnect()


async def test_join_of_forbidden_topic_replies_error_with_reason(subscriber, default_rules):
    client = await connect(subscriber)
    reply = await join(client, "system.audit")
    assert reply[4]["status"] == "error"
    assert "system.audit" in reply[4]["response"]["reason"]
    # nothing was subscribed for the refused join
    assert hub.stats()["subscribers"] == 0
    await client.ws.disconnect()


async def test_join_of_invalid_topic_name_replies_error(subscriber, default_rules):
    client = await connect(subscriber)
    reply = await join(client, "Not A Topic!")
    assert reply[4]["status"] == "error" and "invalid topic" in reply[4]["response"]["reason"]
    await client.ws.disconnect()


async def test_live_notification_arrives_with_null_join_ref(subscriber, default_rules):
    client = await connect(subscriber)
    await join(client, "alerts.k8s")
    await client.until("presence_state")

    seq = await post("alerts.k8s", "pod.crash", pod="api-1")
    frame = await client.until("notification")
    assert frame[:4] == [None, None, "alerts.k8s", "notification"]
    envelope = frame[4]
    assert (envelope["type"], envelope["topic"]) == ("notification", "alerts.k8s")
    assert envelope["seq"] == seq
    assert envelope["event"] == "pod.crash" and envelope["data"] == {"pod": "api-1"}
    assert {"id", "severity", "source", "ts"} <= set(envelope)
    await client.ws.disconnect()


async def test_join_with_since_replays_missed_notifications_in_order(subscriber, default_rules):
    for step in ["a", "b", "c", "d"]:
        await post("deploy.web", step=step)
    client = await connect(subscriber)
    await join(client, "deploy.web", {"since": 2})
    await client.until("current_state")
    replayed = [await client.until("notification") for _ in range(2)]
    assert [f[4]["seq"] for f in replayed] == [3, 4]
    seq = await post("deploy.web", step="e")
    live = await client.until("notification")
    assert live[4]["seq"] == seq == 5  # no gap, no duplicate at the seam
    await client.ws.disconnect()


async def test_join_with_bad_since_is_refused(subscriber, default_rules):
    client = await connect(subscriber)
    reply = await join(client, "deploy.web", {"since": "yesterday"})
    assert reply[4]["status"] == "error" and "since" in reply[4]["response"]["reason"]
    await client.ws.disconnect()


async def test_second_join_of_same_topic_closes_the_first(subscriber, default_rules):
    client = await connect(subscriber)
    first = await join(client, "alerts.k8s")
    second = await join(client, "alerts.k8s")
    assert second[4]["status"] == "ok"
    await client.until("presence_state")
    seq = await post("alerts.k8s")
    frames = []
    while True:
        frame = await client.frame()
        frames.append(frame)
        if frame[3] == "notification":
            break
    closes = [f for f in frames if f[3] == "phx_close"]
    assert closes == [] or closes[0][0] == first[0]
    assert frame[4]["seq"] == seq
    assert hub.stats()["subscribers"] == 1  # the replaced join is gone from the hub
    await client.ws.disconnect()


# --- events on a joined topic ------------------------------------------------------------------


async def test_request_update_replies_state_and_broadcasts_to_every_joined_client(
    subscriber, operator, default_rules
):
    await post("reverse_flow:cluster-b", step="plan")
    asker, other = await connect(subscriber), await connect(operator)
    await join(asker, "reverse_flow:cluster-b")
    await join(other, "reverse_flow:cluster-b")

    join_ref = (await asker.until("presence_state"))[0]
    ref = await asker.push("reverse_flow:cluster-b", "request_update", {}, join_ref=join_ref)
    reply = await asker.reply(ref)
    assert reply[4]["status"] == "ok"
    assert reply[4]["response"]["last_seq"] == 1
    assert reply[4]["response"]["notifications"][0]["data"] == {"step": "plan"}

    for client in (asker, other):
        update = await client.until("reverse_flow_update")
        assert update[:3] == [None, None, "reverse_flow:cluster-b"]
        assert update[4] == reply[4]["response"]
    await asker.ws.disconnect()
    await other.ws.disconnect()


async def test_request_update_without_handler_replies_error(subscriber, default_rules):
    client = await connect(subscriber)
    join_ref = (await join(client, "alerts.k8s"))[0]
    ref = await client.push("alerts.k8s", "request_update", {}, join_ref=join_ref)
    reply = await client.reply(ref)
    assert reply[4] == {
        "status": "error",
        "response": {"reason": "topic 'alerts.k8s' has no request_update handler"},
    }
    await client.ws.disconnect()


async def test_unknown_event_replies_error_and_unjoined_topic_is_unmatched(
    subscriber, default_rules
):
    client = await connect(subscriber)
    join_ref = (await join(client, "alerts.k8s"))[0]
    ref = await client.push("alerts.k8s", "shout", {}, join_ref=join_ref)
    reply = await client.reply(ref)
    assert reply[4] == {"status": "error", "response": {"reason": "unknown event 'shout'"}}

    ref = await client.push("alerts.other", "request_update", {})
    reply = await client.reply(ref)
    assert reply[4] == {"status": "error", "response": {"reason": "unmatched topic"}}
    await client.ws.disconnect()


async def test_crashing_handler_sends_phx_error_for_its_channel(subscriber, default_rules):
    @handlers.register("crash:*")
    async def crash(request):
        raise RuntimeError("boom")

    try:
        client = await connect(subscriber)
        join_ref = (await join(client, "crash:now"))[0]
        await client.push("crash:now", "request_update", {}, join_ref=join_ref)
        error = await client.until("phx_error")
        assert error == [join_ref, join_ref, "crash:now", "phx_error", {}]
        assert hub.stats()["subscribers"] == 0  # the crashed channel left the hub
        ref = await client.push("phoenix", "heartbeat")
        assert (await client.reply(ref))[4]["status"] == "ok"  # the socket lives on
        await client.ws.disconnect()
    finally:
        handlers.unregister("crash:*")


async def test_database_outage_in_a_handler_replies_error_and_keeps_the_channel(
    subscriber, default_rules
):
    from django.db import OperationalError

    @handlers.register("flaky:*")
    async def flaky(request):
        raise OperationalError("connection refused")

    try:
        client = await connect(subscriber)
        join_ref = (await join(client, "flaky:db"))[0]
        ref = await client.push("flaky:db", "request_update", {}, join_ref=join_ref)
        reply = await client.reply(ref)
        assert reply[4] == {
            "status": "error",
            "response": {"reason": "temporarily unavailable: try again"},
        }
        assert hub.stats()["subscribers"] == 1  # still joined
        await client.ws.disconnect()
    finally:
        handlers.unregister("flaky:*")


async def test_leave_replies_ok_then_phx_close_and_stops_delivery(subscriber, default_rules):
    client = await connect(subscriber)
    join_ref = (await join(client, "alerts.k8s"))[0]
    await client.until("presence_state")
    ref = await client.push("alerts.k8s", "phx_leave", {}, join_ref=join_ref)
    assert await client.reply(ref) == [join_ref, ref, "alerts.k8s", "phx_reply",
                                       {"status": "ok", "response": {}}]  # fmt: skip
    assert await client.frame() == [join_ref, join_ref, "alerts.k8s", "phx_close", {}]
    assert hub.stats()["subscribers"] == 0
    assert await get_presence().list("alerts.k8s") == {}
    await post("alerts.k8s")
    ref = await client.push("phoenix", "heartbeat")
    assert (await client.frame())[1] == ref  # the heartbeat reply, no notification before it
    await client.ws.disconnect()


# --- presence ----------------------------------------------------------------------------------


async def test_presence_diff_reaches_joined_clients_on_join_and_leave(
    subscriber, operator, default_rules
):
    sam = await connect(subscriber)
    await join(sam, "room.ops")
    await sam.until("presence_state")
    oscar = await connect(operator)
    await join(oscar, "room.ops")
    state = (await oscar.until("presence_state"))[4]
    assert set(state) == {str(subscriber.pk), str(operator.pk)}

    own = await sam.until("presence_diff")  # every joiner also gets its own join, as in phoenix
    assert list(own[4]["joins"]) == [str(subscriber.pk)]
    joined = await sam.until("presence_diff")
    assert joined[:3] == [None, None, "room.ops"]
    assert list(joined[4]["joins"]) == [str(operator.pk)] and joined[4]["leaves"] == {}
    [meta] = joined[4]["joins"][str(operator.pk)]["metas"]
    assert meta["username"] == "oscar"

    await oscar.ws.disconnect()
    left = await sam.until("presence_diff")
    assert left[4] == {"joins": {}, "leaves": {str(operator.pk): {"metas": [meta]}}}
    assert list(await get_presence().list("room.ops")) == [str(subscriber.pk)]
    await sam.ws.disconnect()


async def test_disconnect_leaves_nothing_subscribed_or_present(subscriber, default_rules):
    client = await connect(subscriber)
    for topic in ["a.one", "a.two", "a.three"]:
        await join(client, topic)
        await client.until("presence_state", topic)
    assert hub.stats()["subscribers"] == 3
    await client.ws.disconnect()
    await asyncio.sleep(0)  # let the app's finally run
    assert hub.stats()["subscribers"] == 0
    for topic in ["a.one", "a.two", "a.three"]:
        assert await get_presence().list(topic) == {}


async def test_silent_socket_is_closed_with_4408(subscriber, default_rules, settings):
    settings.HEARTBEAT_TIMEOUT_S = 1  # phoenix.js heartbeats every 30 s; the default is 60 s
    client = await connect(subscriber)
    closed = await client.ws.receive_output(timeout=RECEIVE_TIMEOUT_S)
    assert (closed["type"], closed["code"]) == ("websocket.close", 4408)
