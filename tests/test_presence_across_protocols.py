"""Presence across protocols: a logged-in reader on the plain socket (/ws/<topic>/) or an SSE
stream (/events/<topic>/) is present like a Phoenix join, so Phoenix's presence_state /
presence_diff, the plain socket's presence frame and GET /api/v1/topics/{topic}/presence all list
the union, and the entry is gone once the connection ends.

In-process: WebsocketCommunicator for the sockets (helpers of test_ws_plain.py and
test_phoenix_protocol.py), an ASGI communicator for the SSE app. Redis mode with REDIS_URL (hub and
presence through Redis), embedded otherwise.
"""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.test import AsyncClient

from channels_app import tokens
from channels_app.authz import Principal
from channels_app.models import TopicRule
from channels_app.presence import ConnectionPresence, get_presence
from channels_app.sse import with_sse
from tests.servers import free_port
from tests.test_phoenix_protocol import connect as phoenix_connect
from tests.test_phoenix_protocol import join as phoenix_join
from tests.test_presence import Diffs, backend, needs_redis, redis_prefix
from tests.test_ws_plain import WAIT_S, connect, frame, rules, subscribed, token_for

pytestmark = pytest.mark.django_db(transaction=True)

TOPIC = "room.ops"  # readable by any logged-in user under the fresh-install rules

__all__ = ["redis_prefix", "rules"]  # fixtures, imported for their setup and teardown


@pytest.fixture
async def edge_rules(rules):
    """test_ws_plain's ``rules`` (default topic rules, hub closed after the test), and this loop's
    presence backend closed too (Redis: its heartbeat task and connections)."""
    yield
    await get_presence().close()


# --- an SSE reader, in process --------------------------------------------------------------------


def _unrouted(scope, receive, send):
    raise AssertionError(f"{scope['path']} did not reach the SSE app")


class SseReader:
    """One open stream on ``with_sse``'s routing of /events/<topic>/."""

    def __init__(self, topic: str, query: str) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/events/{topic}/",
            "raw_path": f"/events/{topic}/".encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.comm = ApplicationCommunicator(with_sse(_unrouted), scope)
        self.received = b""

    async def open(self) -> SseReader:
        """Send the request and read until the ``subscribed`` event (the stream is live)."""
        await self.comm.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await self.comm.receive_output(WAIT_S)
        assert (start["type"], start["status"]) == ("http.response.start", 200), start
        while b"event: subscribed" not in self.received:
            body = await self.comm.receive_output(WAIT_S)
            assert body["type"] == "http.response.body" and body.get("more_body"), body
            self.received += body["body"]
        return self

    async def close(self) -> None:
        """The client goes away; returns once the app has finished (its ``finally`` ran)."""
        await self.comm.send_input({"type": "http.disconnect"})
        await self.comm.wait(WAIT_S)


async def open_sse(user=None) -> SseReader:
    query = f"token={tokens.mint(user.pk).token}" if user is not None else ""
    return await SseReader(TOPIC, query).open()


# --- asking who is here ----------------------------------------------------------------------


async def api_presence(user) -> dict:
    client = AsyncClient()
    await client.aforce_login(user)
    response = await client.get(f"/api/v1/topics/{TOPIC}/presence")
    assert response.status_code == 200, response.content
    return response.json()


async def plain_presence(comm) -> list[dict]:
    """Ask the plain socket ``{"type": "presence"}``; its answer's ``users``."""
    await comm.send_json_to({"type": "presence", "ref": "who"})
    while True:
        msg = await frame(comm)
        if msg["type"] == "presence":
            assert msg["topic"] == TOPIC and msg["ref"] == "who"
            return msg["users"]


async def next_joins(client, keys: set[str]) -> dict:
    """presence_diff joins until every key in ``keys`` joined (other joins are skipped)."""
    joined: dict = {}
    while not keys <= set(joined):
        diff = (await client.until("presence_diff", TOPIC))[4]
        assert diff["leaves"] == {}
        joined.update({key: entry for key, entry in diff["joins"].items() if key in keys})
    return joined


async def next_leaves(client) -> dict:
    """The next presence_diff with leaves (joins, e.g. the client's own, are skipped)."""
    while True:
        diff = (await client.until("presence_diff", TOPIC))[4]
        if diff["leaves"]:
            assert diff["joins"] == {}
            return diff["leaves"]


def vias(state: dict) -> dict[str, list]:
    return {key: [m.get("via") for m in entry["metas"]] for key, entry in state.items()}


# --- tests -------------------------------------------------------------------------------------


async def test_plain_socket_and_sse_readers_are_listed_everywhere_until_they_disconnect(
    edge_rules, subscriber, operator, admin_user, outsider
):
    sam, oscar, alice, olga = (str(u.pk) for u in (subscriber, operator, admin_user, outsider))
    phoenix = await phoenix_connect(admin_user)
    await phoenix_join(phoenix, TOPIC)
    assert list((await phoenix.until("presence_state", TOPIC))[4]) == [alice]

    sam_ws = await connect(f"/ws/{TOPIC}/?token={token_for(subscriber)}")
    await subscribed(sam_ws)
    oscar_sse = await open_sse(operator)
    joined = await next_joins(phoenix, {sam, oscar})  # tracked once live, announced to Phoenix
    assert vias(joined) == {sam: ["websocket"], oscar: ["sse"]}
    [meta] = joined[sam]["metas"]
    assert meta["user_id"] == subscriber.pk and meta["username"] == "sam"
    assert meta["phx_ref"] and meta["online_at"]  # what phoenix's Presence needs

    late = await phoenix_connect(outsider)
    await phoenix_join(late, TOPIC)
    state = (await late.until("presence_state", TOPIC))[4]
    assert vias(state) == {sam: ["websocket"], oscar: ["sse"], alice: [None], olga: [None]}
    assert state[sam] == joined[sam] and state[oscar] == joined[oscar]

    body = await api_presence(subscriber)
    assert body["presences"] == state
    assert sorted(u["username"] for u in body["users"]) == ["alice", "olga", "oscar", "sam"]
    assert body["users"] == await plain_presence(sam_ws)

    await sam_ws.disconnect()
    assert await next_leaves(phoenix) == {sam: {"metas": [meta]}}
    assert set((await api_presence(operator))["presences"]) == {oscar, alice, olga}

    await oscar_sse.close()
    assert await next_leaves(phoenix) == {oscar: joined[oscar]}
    assert set((await api_presence(operator))["presences"]) == {alice, olga}

    for client in (phoenix, late):
        await client.ws.disconnect()
    assert await get_presence().list(TOPIC) == {}


async def test_anonymous_readers_are_not_present(edge_rules, subscriber):
    await sync_to_async(TopicRule.objects.create)(
        position=1, pattern=TOPIC, audience=TopicRule.Audience.ANYONE
    )
    anonymous_ws = await connect(f"/ws/{TOPIC}/")
    await subscribed(anonymous_ws)
    anonymous_sse = await open_sse()
    sam_ws = await connect(f"/ws/{TOPIC}/?token={token_for(subscriber)}")
    await subscribed(sam_ws)

    # sam's own request is read after sam was tracked; the anonymous ones never are
    assert [u["username"] for u in await plain_presence(sam_ws)] == ["sam"]
    assert [u["username"] for u in await plain_presence(anonymous_ws)] == ["sam"]
    assert list(await get_presence().list(TOPIC)) == [str(subscriber.pk)]

    for ws in (anonymous_ws, sam_ws):
        await ws.disconnect()
    await anonymous_sse.close()
    assert await get_presence().list(TOPIC) == {}


async def test_connection_cancelled_while_being_tracked_leaves_no_entry(edge_rules):
    diffs = Diffs()
    await get_presence().watch(TOPIC, diffs)
    presence = ConnectionPresence(TOPIC, Principal(user_id=7, username="sam"), "websocket")
    tracking = asyncio.ensure_future(presence.track())
    await asyncio.sleep(0)  # tracking now waits on the store
    tracking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await tracking

    await presence.untrack()  # waits for the track still in flight, then undoes it
    assert await get_presence().list(TOPIC) == {}
    joined, left = await diffs.next(), await diffs.next()
    assert list(joined["joins"]) == list(left["leaves"]) == ["7"]  # it was tracked, then not
    await presence.untrack()  # twice is no error
    get_presence().unwatch(TOPIC, diffs)


@needs_redis
async def test_entry_whose_untrack_could_not_reach_redis_is_removed_on_the_next_beat(redis_prefix):
    """The process is alive, so the dead-process sweep would never remove it."""
    import redis.asyncio as aioredis

    presence = backend(redis_prefix, "alive")
    tracked = await presence.track("room.a", "7", {"username": "sam"})
    port = free_port()  # nothing listens there
    reachable, presence.redis = presence.redis, aioredis.Redis.from_url(f"redis://127.0.0.1:{port}")
    await presence.untrack(tracked)  # Redis unreachable: logged, no error
    await presence.redis.aclose()
    presence.redis = reachable
    assert list(await presence.list("room.a")) == ["7"]

    await presence.beat()
    assert await presence.list("room.a") == {}
    await presence.close()
