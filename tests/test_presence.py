"""Presence: the backends' shapes and lifecycle, dead-process expiry through Redis, and
GET /api/v1/topics/{topic}/presence. Clients' view of presence (presence_state / presence_diff) is
in test_phoenix_protocol.py and, with the official phoenix client, in
test_phoenix_official_client.py."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient

from channels_app.hub import hub
from channels_app.presence import MemoryPresence, PresenceUnavailable, get_presence, users
from channels_app.presence_redis import RedisPresence
from tests.apiclient import bearer, create_key
from tests.servers import free_port

WAIT_S = 10  # upper bound for an awaited diff; passing runs take milliseconds

needs_redis = pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL")


@pytest.fixture(autouse=True)
async def clean_hub():
    yield
    await hub.aclose()


@pytest.fixture
async def redis_prefix():
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis.asyncio as aioredis

    prefix = f"{settings.REDIS_PREFIX}-presence-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def backend(prefix: str, process_id: str, clock=time.time, ttl_s: float = 30) -> RedisPresence:
    # beat=False: the tests drive beats and sweeps themselves instead of waiting for a timer
    return RedisPresence(settings.REDIS_URL, prefix, ttl_s, process_id, clock=clock, beat=False)


class Diffs:
    """Collects presence diffs of one topic, as a Phoenix channel would receive them."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.arrived = asyncio.Event()

    def __call__(self, topic: str, change: dict) -> None:
        self.items.append(change)
        self.arrived.set()

    async def next(self) -> dict:
        while not self.items:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), WAIT_S)
        return self.items.pop(0)


# --- shapes ------------------------------------------------------------------------------------


async def test_state_has_phoenix_shape_with_one_meta_per_track():
    presence = MemoryPresence()
    tab1 = await presence.track("room.a", "7", {"username": "sam"})
    await presence.track("room.a", "7", {"username": "sam"})
    await presence.track("room.a", "8", {"username": "oscar"})

    state = await presence.list("room.a")
    assert set(state) == {"7", "8"}
    assert len(state["7"]["metas"]) == 2
    meta = state["7"]["metas"][0]
    assert set(meta) == {"username", "phx_ref", "online_at"}
    assert len({m["phx_ref"] for m in state["7"]["metas"]}) == 2  # one ref per track

    await presence.untrack(tab1)
    await presence.untrack(tab1)  # twice is no error
    state = await presence.list("room.a")
    assert len(state["7"]["metas"]) == 1 and tab1.ref not in str(state)
    assert await presence.list("room.b") == {}


def test_users_summarizes_each_key_for_clients_without_phoenix_presence():
    state = {
        "7": {
            "metas": [
                {"phx_ref": "b", "online_at": 20, "user_id": 7, "username": "sam"},
                {"phx_ref": "a", "online_at": 10, "user_id": 7, "username": "sam"},
            ]
        }
    }
    assert users(state) == [
        {"key": "7", "user_id": 7, "username": "sam", "connections": 2, "online_at": 10}
    ]


async def test_track_and_untrack_send_join_and_leave_diffs_to_watchers():
    presence = MemoryPresence()
    diffs = Diffs()
    await presence.watch("room.a", diffs)
    tracked = await presence.track("room.a", "7", {"username": "sam"})
    assert await diffs.next() == {"joins": {"7": {"metas": [tracked.meta]}}, "leaves": {}}
    await presence.untrack(tracked)
    assert await diffs.next() == {"joins": {}, "leaves": {"7": {"metas": [tracked.meta]}}}
    presence.unwatch("room.a", diffs)


# --- Redis: shared by processes, expiring with a dead one -----------------------------------------


@needs_redis
async def test_redis_presence_is_the_union_of_processes(redis_prefix):
    one, two = backend(redis_prefix, "one"), backend(redis_prefix, "two")
    await one.track("room.a", "7", {"username": "sam"})
    await two.track("room.a", "8", {"username": "oscar"})
    assert set(await one.list("room.a")) == set(await two.list("room.a")) == {"7", "8"}
    await one.close()
    await two.close()


@needs_redis
async def test_entries_of_a_process_that_stopped_beating_expire_and_leave(redis_prefix):
    long_ago = time.time() - 120
    dead = backend(redis_prefix, "dead", clock=lambda: long_ago)  # its last beat: 2 min ago
    alive = backend(redis_prefix, "alive")
    await alive.track("room.a", "8", {"username": "oscar"})  # (its beat sweeps: nothing yet)
    ghost = await dead.track("room.a", "7", {"username": "sam"})
    diffs = Diffs()
    await alive.watch("room.a", diffs)

    assert set(await alive.list("room.a")) == {"8"}  # not listed, even before any sweep
    assert await alive.sweep() == 1
    assert await diffs.next() == {"joins": {}, "leaves": {"7": {"metas": [ghost.meta]}}}
    assert await alive.sweep() == 0  # claimed once
    raw = await alive.redis.hkeys(alive.keys.topic("room.a"))
    assert [f.decode().split("|")[0] for f in raw] == ["alive"]
    await dead.close()
    await alive.close()


@needs_redis
async def test_only_one_of_several_sweepers_removes_a_dead_process(redis_prefix):
    long_ago = time.time() - 120
    dead = backend(redis_prefix, "dead", clock=lambda: long_ago)
    for key in ("1", "2", "3"):
        await dead.track("room.a", key, {})
    sweepers = [backend(redis_prefix, f"sweeper-{i}") for i in range(3)]
    removed = await asyncio.gather(*(s.sweep() for s in sweepers))
    assert sorted(removed) == [0, 0, 3]
    for presence in (dead, *sweepers):
        await presence.close()


@needs_redis
async def test_process_puts_its_entries_back_when_its_heartbeat_vanished(redis_prefix):
    """A Redis restart (or being swept while stalled) loses our entries; the next beat restores."""
    presence = backend(redis_prefix, "survivor")
    diffs = Diffs()
    await presence.watch("room.a", diffs)
    tracked = await presence.track("room.a", "7", {"username": "sam"})
    await diffs.next()
    await presence.redis.delete(presence.keys.processes, presence.keys.topic("room.a"))
    assert await presence.list("room.a") == {}

    await presence.beat()
    assert await presence.list("room.a") == {"7": {"metas": [tracked.meta]}}
    assert await diffs.next() == {"joins": {"7": {"metas": [tracked.meta]}}, "leaves": {}}
    await presence.close()


async def test_unreachable_redis_raises_presence_unavailable():
    port = free_port()  # nothing listens there
    presence = RedisPresence(f"redis://127.0.0.1:{port}/0", "x", 30, "p", beat=False)
    with pytest.raises(PresenceUnavailable):
        await presence.track("room.a", "7", {})
    with pytest.raises(PresenceUnavailable):
        await presence.list("room.a")
    await presence.close()


# --- GET /api/v1/topics/{topic}/presence ---------------------------------------------------------


@pytest.fixture
async def default_rules(transactional_db, _db_pool_closed_at_end):
    """The fresh-install topic rules (a transactional test's flush removes the migration's)."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module("channels_app.migrations.0002_default_topic_rules")
    await sync_to_async(migration.create_defaults)(apps, None)


@pytest.fixture
async def sam_is_here(subscriber):
    presence = get_presence()
    meta = {"user_id": subscriber.pk, "username": "sam"}
    tracked = await presence.track("room.ops", str(subscriber.pk), meta)
    yield tracked
    await presence.untrack(tracked)
    if isinstance(presence, RedisPresence):
        await presence.close()


def url(topic: str) -> str:
    return f"/api/v1/topics/{topic}/presence"


@pytest.mark.django_db(transaction=True)
async def test_logged_in_reader_sees_who_is_on_the_topic(subscriber, default_rules, sam_is_here):
    client = AsyncClient()
    await client.aforce_login(subscriber)
    response = await client.get(url("room.ops"))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["topic"] == "room.ops"
    assert body["presences"] == {str(subscriber.pk): {"metas": [sam_is_here.meta]}}
    assert body["users"] == [
        {
            "key": str(subscriber.pk),
            "user_id": subscriber.pk,
            "username": "sam",
            "connections": 1,
            "online_at": sam_is_here.meta["online_at"],
        }
    ]


@pytest.mark.django_db(transaction=True)
async def test_presence_needs_the_right_to_read_the_topic(outsider, default_rules):
    client = AsyncClient()
    await client.aforce_login(outsider)
    response = await client.get(url("system.audit"))
    assert response.status_code == 403 and "system.audit" in response.json()["detail"]
    response = await client.get(url("Not.A.Topic"))
    assert response.status_code == 400


@pytest.mark.django_db(transaction=True)
async def test_presence_without_session_or_key_is_401(default_rules):
    response = await AsyncClient().get(url("room.ops"))
    assert response.status_code == 401


@pytest.mark.django_db(transaction=True)
async def test_api_key_with_tokens_scope_sees_presence_and_ingest_only_key_does_not(
    subscriber, default_rules, sam_is_here
):
    _, tokens_key = await sync_to_async(create_key)("presence-reader", scopes=["tokens"])
    _, ingest_key = await sync_to_async(create_key)("ingest-only", scopes=["ingest"])
    client = AsyncClient()
    response = await client.get(url("room.ops"), headers=bearer(tokens_key))
    assert response.status_code == 200 and list(response.json()["presences"]) == [
        str(subscriber.pk)
    ]
    response = await client.get(url("room.ops"), headers=bearer(ingest_key))
    assert response.status_code == 403 and "tokens" in response.json()["detail"]
