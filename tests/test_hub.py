"""The per-process fanout hub (channels_app/hub/): order, gap filling, one encode per encoding,
thread-safe publishing, and recovery after a Redis outage.

Subscribers here are small recorders implementing the hub's Subscriber protocol; the sockets
built on them are tested in test_ws_plain.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from channels_app.hub import Message, hub, wire
from routing_app import pubsub, router, stream_reads
from routing_app.ingest import NotificationIn, ingest
from tests.servers import RedisServer

WAIT_S = 10

pytestmark = pytest.mark.django_db(transaction=True)


class Recorder:
    """A Subscriber that keeps what it is given."""

    def __init__(self, encoding: str = "plain") -> None:
        self.encoding = encoding
        self.frames: list = []
        self.seqs: list[int] = []
        self.events: list[tuple[str, str, dict]] = []
        self.changed = asyncio.Event()

    def deliver(self, frame, message: Message) -> None:
        self.frames.append(frame)
        self.seqs.append(message.seq)
        self.changed.set()

    def deliver_event(self, topic: str, event: str, payload: dict) -> None:
        self.events.append((topic, event, payload))
        self.changed.set()

    def overflow(self) -> None:
        raise AssertionError("a recorder never overflows")

    async def wait_for(self, seq: int) -> list[int]:
        deadline = time.monotonic() + WAIT_S
        while not self.seqs or self.seqs[-1] < seq:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), deadline - time.monotonic())
        return self.seqs


@pytest.fixture
async def clean_hub(_db_pool_closed_at_end):
    yield hub
    await hub.aclose()


@pytest.fixture
def held_publishes(monkeypatch) -> list[tuple[str, dict]]:
    """Stop the router's publishes from reaching the hub; the test hands them over itself."""
    held: list[tuple[str, dict]] = []
    monkeypatch.setattr(router, "_after_commit_publisher", lambda messages: held.extend(messages))
    return held


async def store(topic: str, count: int) -> None:
    await sync_to_async(ingest)([NotificationIn(topic=topic, event="tick") for _ in range(count)])


async def test_out_of_order_publishes_reach_subscribers_in_seq_order(clean_hub, held_publishes):
    recorder = Recorder()
    await hub.subscribe("hub.order", recorder)
    await store("hub.order", 4)
    by_seq = {env["seq"]: (topic, env) for topic, env in held_publishes}
    hub.publish_local([by_seq[3], by_seq[1], by_seq[4], by_seq[2]])
    assert await recorder.wait_for(4) == [1, 2, 3, 4]
    await hub.unsubscribe("hub.order", recorder)


async def test_lost_publishes_are_read_once_per_process_from_the_database(
    clean_hub, held_publishes, monkeypatch
):
    reads = []
    real_read_after = stream_reads.read_after

    async def counting_read_after(*args, **kwargs):
        reads.append(args)
        return await real_read_after(*args, **kwargs)

    monkeypatch.setattr(stream_reads, "read_after", counting_read_after)
    recorders = [Recorder() for _ in range(5)]
    for recorder in recorders:
        await hub.subscribe("hub.lost", recorder)
    await store("hub.lost", 6)
    by_seq = {env["seq"]: (topic, env) for topic, env in held_publishes}
    hub.publish_local([by_seq[1], by_seq[6]])  # 2..5 never arrive
    for recorder in recorders:
        assert await recorder.wait_for(6) == [1, 2, 3, 4, 5, 6]
    assert len(reads) == 1  # one database read for the hole, not one per subscriber
    for recorder in recorders:
        await hub.unsubscribe("hub.lost", recorder)


async def test_each_message_is_encoded_once_per_encoding(clean_hub):
    calls = []

    def counting(message: Message) -> str:
        calls.append(message.seq)
        return f"seq={message.seq}"

    hub.register_encoder("counted", counting)
    counted = [Recorder("counted") for _ in range(5)]
    plain = [Recorder() for _ in range(5)]
    for recorder in counted + plain:
        await hub.subscribe("hub.encode", recorder)
    await store("hub.encode", 3)
    for recorder in counted + plain:
        await recorder.wait_for(3)
    assert calls == [1, 2, 3]
    assert counted[0].frames == ["seq=1", "seq=2", "seq=3"]
    assert all(
        r.frames is not p.frames and r.frames == counted[0].frames for r in counted for p in plain
    )
    assert plain[0].frames[0] is plain[4].frames[0]  # the same frame object for every socket
    for recorder in counted + plain:
        await hub.unsubscribe("hub.encode", recorder)


class BatchRecorder(Recorder):
    """A Subscriber taking several consecutive messages at once, as the socket edges do."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    def deliver_batch(self, batch) -> None:
        self.batches.append([m.seq for m in batch.messages])
        for frame, message in zip(batch.frames(self.encoding), batch.messages, strict=True):
            self.deliver(frame, message)


async def test_a_batch_reaches_each_subscriber_as_one_batch_per_topic_in_order(clean_hub):
    from routing_app.models import Notification

    first, second = BatchRecorder(), BatchRecorder()
    await hub.subscribe("hub.batch.a", first)
    await hub.subscribe("hub.batch.b", second)
    items = [NotificationIn(topic=f"hub.batch.{t}", event="tick") for t in "abab" * 5]
    await sync_to_async(ingest)(items)
    assert await first.wait_for(10) == list(range(1, 11))
    assert await second.wait_for(10) == list(range(1, 11))
    assert first.batches == [list(range(1, 11))]  # one PUBLISH, one delivery for the batch
    stored = await sync_to_async(list)(
        Notification.objects.filter(topic__name="hub.batch.a").order_by("seq")
    )
    assert [json.loads(f) for f in first.frames] == [n.envelope("hub.batch.a") for n in stored]
    await hub.unsubscribe("hub.batch.a", first)
    await hub.unsubscribe("hub.batch.b", second)


async def test_an_sse_stream_gets_a_burst_as_one_body_chunk_in_order(clean_hub):
    """The SSE edge writes a burst in one send (one chunk), its events unchanged and in order."""
    from channels_app.authz import Principal
    from channels_app.sse import EventStream, encode_sse

    chunks: list[bytes] = []
    got_ten = asyncio.Event()

    async def send(event: dict) -> None:
        chunks.append(event["body"])
        if b"id: 10\n" in event["body"]:
            got_ten.set()

    stream = EventStream("hub.sse.burst", send, Principal(None))
    await hub.subscribe("hub.sse.burst", stream)
    await sync_to_async(ingest)([NotificationIn(topic="hub.sse.burst", event="tick")] * 10)
    await asyncio.wait_for(got_ten.wait(), 10)
    assert len(chunks) == 1
    stored = await sync_to_async(stream_reads.history_page)("hub.sse.burst", 0, 100)
    expected = [
        encode_sse(Message("hub.sse.burst", env["seq"], env)) for env in stored.notifications
    ]
    assert chunks[0] == b"".join(expected)
    await hub.unsubscribe("hub.sse.burst", stream)


@pytest.mark.skipif(not settings.REDIS_URL, reason="bus payloads need Redis")
async def test_a_bus_array_in_any_json_layout_is_accepted_in_order(clean_hub, held_publishes):
    import redis.asyncio as aioredis

    recorder = Recorder()
    await store("hub.layout", 3)
    await hub.subscribe("hub.layout", recorder, since=0)
    await store("hub.layout", 2)  # held: the test publishes them itself, spaced out
    body = " [ " + " , ".join(wire.compact_json(envelope) for _, envelope in held_publishes) + " ] "
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    try:
        await client.publish(hub.topic_channel("hub.layout"), body.encode())
        assert await recorder.wait_for(5) == [1, 2, 3, 4, 5]
        assert [json.loads(f)["seq"] for f in recorder.frames] == [1, 2, 3, 4, 5]
    finally:
        await client.aclose()
    await hub.unsubscribe("hub.layout", recorder)


async def test_publishing_from_another_thread_reaches_the_loop(clean_hub):
    recorder = Recorder()
    await hub.subscribe("hub.thread", recorder)
    thread = threading.Thread(
        target=lambda: ingest([NotificationIn(topic="hub.thread", event="tick")] * 1)
    )
    thread.start()
    assert await recorder.wait_for(1) == [1]
    thread.join()
    await hub.unsubscribe("hub.thread", recorder)


async def test_publish_with_no_hub_loop_is_a_no_op(clean_hub):
    await hub.aclose()  # as in a management command or a Celery worker: no loop runs a hub
    await sync_to_async(ingest)([NotificationIn(topic="hub.nobody", event="tick")])


async def test_resubscribing_replays_after_since_without_duplicates(clean_hub):
    recorder = Recorder()
    await store("hub.again", 3)
    result = await hub.subscribe("hub.again", recorder, since=1)
    assert (recorder.seqs, result.last_seq, result.reset) == ([2, 3], 3, False)
    await store("hub.again", 1)
    await recorder.wait_for(4)
    result = await hub.subscribe("hub.again", recorder, since=3)  # a resume while live
    await store("hub.again", 1)
    assert await recorder.wait_for(5) == [2, 3, 4, 4, 5]
    assert hub.stats()["subscribers"] == 1
    await hub.unsubscribe("hub.again", recorder)
    assert hub.stats()["topics"] == 0


async def test_topic_events_reach_subscribers_and_not_others(clean_hub):
    mine, other = Recorder(), Recorder()
    await hub.subscribe("hub.events", mine)
    await hub.subscribe("hub.other", other)
    hub.broadcast_event("hub.events", "reverse_flow_update", {"n": 1})
    deadline = time.monotonic() + WAIT_S
    while not mine.events:
        mine.changed.clear()
        await asyncio.wait_for(mine.changed.wait(), deadline - time.monotonic())
    assert mine.events == [("hub.events", "reverse_flow_update", {"n": 1})]
    assert other.events == []
    await hub.unsubscribe("hub.events", mine)
    await hub.unsubscribe("hub.other", other)


async def test_listen_and_send_cross_the_bus(clean_hub):
    got = asyncio.Queue()
    await hub.listen("hub-test", got.put_nowait)
    hub.send("hub-test", {"hello": 1})
    assert await asyncio.wait_for(got.get(), WAIT_S) == {"hello": 1}
    await hub.unlisten("hub-test", got.put_nowait)
    assert hub.stats()["listeners"] == 0


# --- Redis outage ----------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path, settings, monkeypatch):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    settings.REDIS_URL = server.url
    monkeypatch.setattr(pubsub, "_client", None)  # publish to this Redis
    yield server
    pubsub._client = None
    if server.proc.poll() is None:
        server.kill()


async def test_after_a_redis_outage_the_hub_resubscribes_and_back_fills(clean_hub, own_redis):
    recorder = Recorder()
    await hub.subscribe("hub.outage", recorder)
    assert hub.redis_mode
    await store("hub.outage", 3)
    await recorder.wait_for(3)
    own_redis.kill()
    await store("hub.outage", 4)  # stored, but their publishes are lost with Redis
    own_redis.start()
    deadline = time.monotonic() + WAIT_S
    while hub.stats()["reconnects"] < 1:  # the hub reconnects by itself
        assert time.monotonic() < deadline, "the hub did not reconnect"
        await asyncio.sleep(0.05)
    # Nothing newer is published: only the back-fill can bring 4..7.
    assert await recorder.wait_for(7) == list(range(1, 8))
    await store("hub.outage", 2)
    assert await recorder.wait_for(9) == list(range(1, 10))
    await hub.unsubscribe("hub.outage", recorder)


async def test_a_silent_redis_connection_is_dropped_and_replaced(clean_hub, own_redis, settings):
    import signal

    settings.REALTIME_BUS_PING_AFTER_S = 0.2
    settings.REALTIME_BUS_SILENT_MAX_S = 0.5
    recorder = Recorder()
    await hub.subscribe("hub.silent", recorder)
    await store("hub.silent", 1)
    await recorder.wait_for(1)
    own_redis.proc.send_signal(signal.SIGSTOP)  # the host hangs: no reset, no answer
    try:
        deadline = time.monotonic() + WAIT_S
        while hub.stats()["redis_connected"]:  # the watchdog dropped the silent connection
            assert time.monotonic() < deadline, "the silent connection was kept"
            await asyncio.sleep(0.05)
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    await store("hub.silent", 1)
    assert await recorder.wait_for(2) == [1, 2]
    await hub.unsubscribe("hub.silent", recorder)


async def test_an_outage_past_the_bus_limit_tells_subscribers_to_resume_elsewhere(
    clean_hub, own_redis, settings
):
    settings.REALTIME_BUS_OUTAGE_S = 0.2

    class Resumer(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.told = asyncio.Event()

        def unavailable(self) -> None:
            hub.detach("hub.lost", self)
            self.told.set()

    resumer, stayer = Resumer(), Recorder()
    await hub.subscribe("hub.lost", resumer)
    await hub.subscribe("hub.lost", stayer)
    await store("hub.lost", 1)
    await stayer.wait_for(1)
    own_redis.kill()
    await asyncio.wait_for(resumer.told.wait(), WAIT_S)
    await store("hub.lost", 1)  # published while Redis is away: lost on the bus
    own_redis.start()
    # A subscriber without ``unavailable`` stays, and the back-fill brings it what it missed.
    assert await stayer.wait_for(2) == [1, 2]
    assert hub.stats()["subscribers"] == 1
    await hub.unsubscribe("hub.lost", stayer)


# --- the pubsub channel kind -----------------------------------------------------------------


@pytest.mark.skipif(not settings.REDIS_URL, reason="the pubsub channel kind needs Redis")
async def test_pubsub_channel_kind_publishes_the_envelope_on_notify_topic(clean_hub):
    import json

    import redis.asyncio as aioredis

    from routing_app.models import Channel, Notification, Route

    def configure() -> None:
        channel = Channel.objects.create(name="bus", kind="pubsub")
        route = Route.objects.create(name="to-bus", topic_pattern="bus.#")
        route.channels.add(channel)

    await sync_to_async(configure)()
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    pubsub = client.pubsub()
    await pubsub.subscribe("notify:bus.orders")
    try:
        assert (await pubsub.get_message(timeout=WAIT_S))["type"] == "subscribe"
        await store("bus.orders", 1)
        message = await pubsub.get_message(timeout=WAIT_S)
        stored = await sync_to_async(Notification.objects.get)(topic__name="bus.orders")
        assert json.loads(message["data"]) == stored.envelope("bus.orders")
    finally:
        await pubsub.aclose()
        await client.aclose()
