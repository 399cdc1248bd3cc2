"""The per-process fanout hub: one subscription per topic per process, one decode per message,
one encode per encoding, the same frame handed to every local subscriber at once.

DESIGN.md flow steps 5-6 and LIBRARY-NOTES.md ("An experiment: a per-process fanout hub") give
the shape; notes/REALTIME-CONTRACT.md is the API the edges (plain socket, Phoenix, SSE) code
against.

Modes:
- Redis (``REDIS_URL`` set): ``fanout.publish`` PUBLISHes notification envelopes on
  ``<REDIS_PREFIX>:hub:<topic>``, one envelope (a JSON object) or a batch's consecutive envelopes
  of the topic (a JSON array of them) per payload; every process holds one redis.asyncio pub/sub
  connection with one SUBSCRIBE per topic it has local subscribers for, and drops it with the
  last one.
- Embedded: ``fanout.publish`` hands messages to this process's hub thread-safely.

Guarantee, per topic and process: subscribers get seqs contiguously and in order. A seq that
arrives early (out of order across publishers) or never (lost in Redis, or during an outage) is
read from the database once per process, not per subscriber. After a Redis outage the hub
reconnects and resubscribes by itself and back-fills every subscribed topic from the database.
Only where retention deleted rows does a topic's stream jump (then logged).

Everything here runs on one event loop (the server's); ``publish_local`` is the one thread-safe
entry. The hub binds lazily to the running loop and starts afresh if the loop changes (tests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from django.conf import settings

from routing_app import stream_reads

log = logging.getLogger(__name__)

# An out-of-order publish (two ingest threads committing seq 5 then 6 but PUBLISHing 6 first)
# normally closes its gap within this time; only then is the database asked for the hole.
GAP_GRACE_S = 0.02
# Live messages held per topic while a gap is being filled; past it they are dropped and read
# back from the database instead (bounded memory under overload).
PENDING_MAX = 5_000
# Live messages held per subscriber while its replay runs; past it, the replay reads on from the
# database instead.
JOIN_BUFFER_MAX = 1_000
REPLAY_PAGE = 500  # rows per database read during replay and back-fill
SUBSCRIBE_TIMEOUT_S = 5.0  # waiting for Redis to confirm a SUBSCRIBE (HubUnavailable after)
RECONNECT_DELAY_S = (0.1, 5.0)  # first and longest wait between Redis reconnect attempts
FILL_RETRY_S = 1.0  # database unreachable during a fill: try again after this
DISPATCH_YIELD_EVERY = 20  # during fills, let the loop breathe after this many messages
# Messages that arrive together (a burst read from Redis in one go, a fill) are handed to
# subscribers as one batch: one socket write for several frames. A batch is flushed when the
# loop has nothing more to read right now, or at these bounds (a batch must fit the transport's
# and the kernel's buffers, or every socket would fall onto its slow path).
BATCH_MAX_MESSAGES = 64
BATCH_MAX_BYTES = 32 * 1024
READ_YIELD_EVERY = 64  # Redis messages read in a row before letting other tasks run
# A Redis host that vanishes without a TCP reset (partition, frozen VM) leaves a connection that
# just stays silent: ping it when nothing came for this long, and reconnect if still nothing.
REDIS_PING_AFTER_S = 15.0
REDIS_SILENT_MAX_S = 10.0

JSON_SEPARATORS = (",", ":")
# json's C scanner: decodes one value at an index and says where it ended, so each envelope of a
# multi-message payload keeps its own text (sent verbatim to plain sockets, never re-encoded).
_scan_once = json.JSONDecoder().scan_once


class HubUnavailable(Exception):
    """The hub cannot subscribe now (Redis unreachable): the edge asks the client to retry."""


class Unsubscribed(Exception):
    """``subscribe`` gave up because the subscriber was unsubscribed meanwhile (it closed)."""


class Message:
    """One published notification, decoded once per process; frames cached per encoding."""

    __slots__ = ("topic", "seq", "envelope", "_raw", "_frames")

    def __init__(self, topic: str, seq: int, envelope: dict, raw: str | bytes | None = None):
        self.topic = topic
        self.seq = seq
        self.envelope = envelope  # Notification.envelope(); treat as read-only: it is shared
        self._raw = raw  # the compact JSON as published, when it came over Redis
        self._frames: dict[str, str | bytes] = {}

    def encoded(self, encoding: str) -> str | bytes:
        """The frame for ``encoding``, computed on first use and cached for every subscriber."""
        frame = self._frames.get(encoding)
        if frame is None:
            frame = self._frames[encoding] = _encoders[encoding](self)
        return frame

    def ws_frame(self, encoding: str) -> bytes:
        """The complete unmasked, uncompressed WebSocket text frame of ``encoded(encoding)``,
        built once per message (for ConnectionSender.push_text's prebuilt-frame path)."""
        key = "ws-frame:" + encoding
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = websocket_text_frame(self.encoded(encoding))
        return frame

    def __repr__(self) -> str:
        return f"<Message {self.topic}#{self.seq}>"


def websocket_text_frame(text: str | bytes) -> bytes:
    """A final, unmasked text frame (RFC 6455 section 5.2) carrying ``text``."""
    payload = text.encode() if isinstance(text, str) else text
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


def encode_plain(message: Message) -> str:
    """The plain socket's frame: the envelope as compact JSON (reused verbatim from Redis)."""
    raw = message._raw
    if raw is not None:
        return raw if isinstance(raw, str) else raw.decode()
    return json.dumps(message.envelope, separators=JSON_SEPARATORS, ensure_ascii=False)


_encoders: dict[str, Callable[[Message], str | bytes]] = {"plain": encode_plain}


def _split_array(text: str) -> list[tuple[Any, str | None]]:
    """The values of the JSON array ``text``, each with its own JSON text. Compact arrays (what
    ``fanout.publish`` sends) are cut by the C scanner; anything else is parsed whole (then the
    values carry no text and are encoded again where needed). Raises ValueError if not an array."""
    items: list[tuple[Any, str | None]] = []
    index, end = 1, len(text)
    try:
        if text[index] != "]":
            while True:
                value, stop = _scan_once(text, index)
                items.append((value, text[index:stop]))
                if text[stop] == "]":
                    index = stop + 1
                    break
                if text[stop] != ",":
                    raise ValueError("not compact")
                index = stop + 1
        else:
            index += 1
        if index != end:
            raise ValueError("not compact")
    except (StopIteration, IndexError, ValueError):
        whole = json.loads(text)
        if not isinstance(whole, list):
            raise ValueError("not a JSON array") from None
        return [(value, None) for value in whole]
    return items


class Batch:
    """Consecutive messages of one topic delivered together; per-encoding results cached."""

    __slots__ = ("messages", "_cache")

    def __init__(self, messages: list[Message]):
        self.messages = messages
        self._cache: dict[tuple[str, str], Any] = {}

    def frames(self, encoding: str) -> list:
        """Each message's frame for ``encoding``, in order."""
        key = ("frames", encoding)
        frames = self._cache.get(key)
        if frames is None:
            frames = self._cache[key] = [m.encoded(encoding) for m in self.messages]
        return frames

    def ws_bytes(self, encoding: str) -> bytes:
        """The messages' prebuilt WebSocket frames (``Message.ws_frame``), concatenated."""
        key = ("ws", encoding)
        data = self._cache.get(key)
        if data is None:
            data = self._cache[key] = b"".join(m.ws_frame(encoding) for m in self.messages)
        return data


class Subscriber(Protocol):
    """What an edge registers with the hub (a plain socket, a Phoenix channel join, an SSE stream).

    Optional: ``async def drained(self)`` -- if present, replay awaits it after each message, so
    a long replay waits for the peer instead of overflowing the send queue.
    Optional: ``def deliver_batch(self, batch: Batch)`` -- several consecutive messages at once
    (else ``deliver`` is called for each).
    """

    encoding: str

    def deliver(self, frame: Any, message: Message) -> None:
        """Called in the loop; must not block; queue (bounded) or ``overflow`` when behind."""

    def deliver_event(self, topic: str, event: str, payload: dict) -> None:
        """An ephemeral topic event (not persisted, no seq)."""

    def overflow(self) -> None:
        """Fell too far behind: close with a "too slow" code."""


@dataclass(frozen=True)
class SubscribeResult:
    last_seq: int  # the subscriber has everything up to here; live continues at last_seq + 1
    reset: bool  # ``since`` was older than retention (or ahead of the stream): nothing replayed
    oldest_seq: int | None  # the oldest stored seq (None when nothing is stored or not asked)


class _Join:
    """A subscriber between registration and the end of its replay: live messages wait here."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer: list[Message] = []

    def offer(self, message: Message) -> None:
        if len(self.buffer) >= JOIN_BUFFER_MAX:
            self.buffer.clear()  # the replay reads these back from the database instead
        self.buffer.append(message)


class _Topic:
    """A topic this process has local subscribers for."""

    __slots__ = (
        "name",
        "channel",
        "members",
        "joining",
        "last_seq",
        "started",
        "subscribed",
        "ready",
        "pending",
        "behind_to",
        "gap_timer",
        "fill_task",
        "open_task",
        "needs_backfill",
        "closed",
        "outbox",
        "outbox_bytes",
        "flush_scheduled",
    )

    def __init__(self, name: str, channel: bytes):
        self.name = name
        self.channel = channel
        self.members: dict[str, dict[Subscriber, None]] = {}  # encoding -> live subscribers
        self.joining: dict[Subscriber, _Join] = {}
        self.last_seq = 0  # last seq dispatched in this process
        self.started = False  # last_seq known (Redis subscription confirmed, then DB read)
        self.subscribed: asyncio.Future | None = None  # Redis confirmed the SUBSCRIBE
        self.ready: asyncio.Future | None = None  # started
        self.pending: dict[int, Message] = {}  # arrived ahead of last_seq + 1
        self.behind_to = 0  # seqs up to here are known published but not held: read from DB
        self.gap_timer: asyncio.TimerHandle | None = None
        self.fill_task: asyncio.Task | None = None
        self.open_task: asyncio.Task | None = None
        self.needs_backfill = False
        self.closed = False
        self.outbox: list[Message] = []  # accepted in order (last_seq), not yet handed out
        self.outbox_bytes = 0
        self.flush_scheduled = False

    def is_empty(self) -> bool:
        return not self.members and not self.joining

    def count(self) -> int:
        return sum(len(subs) for subs in self.members.values()) + len(self.joining)


class _Done:
    """An already-finished awaitable: lets ``unlisten`` be called with or without ``await``."""

    def __await__(self):
        return iter(())


class Hub:
    """One per process: ``from channels_app.hub import hub``. See the module docstring."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._init_state()

    # --- binding, state -------------------------------------------------------------------

    def _init_state(self) -> None:
        self._topics: dict[str, _Topic] = {}
        self._listeners: dict[str, list[Callable[[dict], Any]]] = {}
        self._handlers: dict[bytes, Callable[[bytes], None]] = {}  # Redis channel -> handler
        self._channel_states: dict[bytes, _Topic] = {}  # Redis channel -> its topic/listen state
        self._redis_url = settings.REDIS_URL
        self._prefix = settings.REDIS_PREFIX
        self._redis_task: asyncio.Task | None = None
        self._pubsub = None  # the live redis.asyncio PubSub, None while disconnected
        self._commands: deque[tuple[str, bytes, _Topic | None]] = deque()
        self._command_task: asyncio.Task | None = None
        self._sub_waiters: dict[bytes, deque[_Topic | None]] = {}
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._outbox_task: asyncio.Task | None = None
        self._publisher = None  # redis.asyncio client for hub.send / broadcast_event
        self._tasks: set[asyncio.Task] = set()
        self.reconnects = 0  # Redis reconnections so far (tests and stats read it)
        self._last_heard = 0.0  # loop time of the last reply on the pub/sub connection

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                log.debug("hub rebinding to a new event loop; previous state dropped")
            self._init_state()
            self._loop = loop
        return loop

    @property
    def redis_mode(self) -> bool:
        return bool(self._redis_url)

    def topic_channel(self, topic: str) -> bytes:
        return f"{self._prefix}:hub:{topic}".encode()

    def listen_channel(self, name: str) -> bytes:
        return f"{self._prefix}:hubx:{name}".encode()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def register_encoder(self, encoding: str, fn: Callable[[Message], str | bytes]) -> None:
        """Register how ``encoding`` frames a Message ("plain" is built in)."""
        _encoders[encoding] = fn

    def stats(self) -> dict:
        """Counts for tests and the debug endpoint (no topic names)."""
        return {
            "topics": len(self._topics),
            "subscribers": sum(t.count() for t in self._topics.values()),
            "listeners": sum(len(v) for v in self._listeners.values()),
            "redis_channels": len(self._handlers),
            "redis_connected": self._pubsub is not None,
            "reconnects": self.reconnects,
            "pending": sum(len(t.pending) for t in self._topics.values()),
        }

    # --- subscribe / unsubscribe ----------------------------------------------------------

    async def subscribe(
        self, topic: str, subscriber: Subscriber, since: int | None = None
    ) -> SubscribeResult:
        """Register ``subscriber`` for live messages of ``topic``, then replay stored ones after
        ``since`` (None: live only), with no gap and no duplicate at the seam.

        Calling it again for a subscriber already registered re-runs the replay (a resume).
        Raises HubUnavailable when Redis does not confirm the subscription in time, and the
        database's errors when replay cannot read; the subscriber is then not registered.
        """
        self._bind()
        state = self._topics.get(topic)
        if state is None:
            state = self._open(topic)
        else:
            self._remove_member(state, subscriber)  # a resume: back to joining
        join = _Join()
        state.joining[subscriber] = join
        try:
            result = await self._join(state, subscriber, join, since)
        except BaseException:
            if state.joining.get(subscriber) is join:
                del state.joining[subscriber]
                self._maybe_close(state)
            raise
        return result

    async def _join(
        self, state: _Topic, sub: Subscriber, join: _Join, since: int | None
    ) -> SubscribeResult:
        if not state.started:
            assert state.ready is not None
            try:
                await asyncio.wait_for(asyncio.shield(state.ready), SUBSCRIBE_TIMEOUT_S)
            except TimeoutError:
                raise HubUnavailable("the realtime bus (Redis) is not reachable") from None
        reset = False
        oldest: int | None = None
        if since is None:
            cursor = state.last_seq
        else:
            db_last, oldest = await stream_reads.topic_state(state.name)
            gone = oldest - 1 if oldest is not None else db_last  # seqs <= gone were deleted
            if since > db_last or since < gone:
                reset, cursor = True, state.last_seq
            else:
                cursor = since
                if since > state.last_seq:  # the client saw seqs this process has not yet
                    await self._fill_to(state, since)
        while True:  # replay from the database until the live buffer continues seamlessly
            self._check_joining(state, sub, join)
            self._flush(state)  # everything accepted so far is now in members' and our buffer
            buffer = join.buffer
            if buffer and buffer[0].seq <= cursor + 1:
                break
            target = state.last_seq
            if cursor >= target:
                break
            rows = await stream_reads.read_after(state.name, cursor, REPLAY_PAGE, upto_seq=target)
            self._check_joining(state, sub, join)
            if not rows:  # deleted by retention while we read: nothing left to send
                cursor = target
                continue
            encoding = sub.encoding
            drained = getattr(sub, "drained", None)
            for envelope in rows:
                message = Message(state.name, envelope["seq"], envelope)
                sub.deliver(message.encoded(encoding), message)
                if drained is not None:
                    # Paced by the reader (no wait while its writes complete at once): a page of
                    # big notifications would otherwise overflow the bounded send queue of a
                    # reader that keeps up, since the replay writes it all in one go.
                    await drained()
            cursor = rows[-1]["seq"]
        encoding = sub.encoding
        self._flush(state)
        for message in join.buffer:
            if message.seq > cursor:
                sub.deliver(message.encoded(encoding), message)
                cursor = message.seq
        del state.joining[sub]
        state.members.setdefault(encoding, {})[sub] = None
        return SubscribeResult(last_seq=cursor, reset=reset, oldest_seq=oldest)

    @staticmethod
    def _check_joining(state: _Topic, sub: Subscriber, join: _Join) -> None:
        if state.closed or state.joining.get(sub) is not join:
            raise Unsubscribed("unsubscribed while its replay ran")

    async def unsubscribe(self, topic: str, subscriber: Subscriber) -> None:
        """Stop delivering ``topic`` to ``subscriber`` (idempotent; always call in a finally).
        The last local subscriber of a topic drops the process's Redis subscription for it."""
        self.detach(topic, subscriber)

    def detach(self, topic: str, subscriber: Subscriber) -> None:
        """``unsubscribe`` without awaiting: safe to call from ``deliver``/``overflow``."""
        state = self._topics.get(topic)
        if state is None:
            return
        self._remove_member(state, subscriber)
        state.joining.pop(subscriber, None)
        self._maybe_close(state)

    @staticmethod
    def _remove_member(state: _Topic, sub: Subscriber) -> None:
        subs = state.members.get(sub.encoding)
        if subs is not None and sub in subs:
            del subs[sub]
            if not subs:
                del state.members[sub.encoding]

    def _open(self, topic: str) -> _Topic:
        channel = self.topic_channel(topic)
        state = _Topic(topic, channel)
        state.ready = self._loop.create_future()
        self._topics[topic] = state
        if self.redis_mode:
            state.subscribed = self._loop.create_future()
            self._handlers[channel] = lambda data, s=state: self._on_topic_payload(s, data)
            self._channel_states[channel] = state
            self._command("SUBSCRIBE", channel, state)
        state.open_task = self._spawn(self._start_topic(state))
        return state

    async def _start_topic(self, state: _Topic) -> None:
        """Wait for the Redis subscription (if any), then learn the topic's last seq: from then on
        every later seq reaches this process live or through a fill."""
        try:
            if state.subscribed is not None:
                await state.subscribed  # resolved by the reader on Redis's "subscribe" reply
            while True:
                try:
                    last_seq, _ = await stream_reads.topic_state(state.name)
                    break
                except Exception as exc:  # noqa: BLE001  (database down: retry, joiners wait)
                    log.warning("topic %s: cannot read its state (%s); retrying", state.name, exc)
                    await asyncio.sleep(FILL_RETRY_S)
            if state.closed:
                return
            state.last_seq = last_seq
            state.started = True
            if not state.ready.done():
                state.ready.set_result(None)
            self._drain_pending(state)
        finally:
            state.open_task = None

    def _maybe_close(self, state: _Topic) -> None:
        if state.closed or not state.is_empty():
            return
        state.closed = True
        if self._topics.get(state.name) is state:
            del self._topics[state.name]
        for task in (state.fill_task, state.open_task):
            if task is not None:
                task.cancel()
        if state.gap_timer is not None:
            state.gap_timer.cancel()
        state.pending.clear()
        state.outbox = []
        for future in (state.ready, state.subscribed):
            if future is not None and not future.done():
                future.cancel()
        if self.redis_mode and self._channel_states.get(state.channel) is state:
            del self._handlers[state.channel]
            del self._channel_states[state.channel]
            self._command("UNSUBSCRIBE", state.channel, None)

    # --- live path -----------------------------------------------------------------------

    def publish_local(self, messages: list[tuple[str, dict]]) -> None:
        """Embedded mode: deliver ``(topic, envelope)`` pairs to this process's subscribers.
        Thread-safe; a no-op when no loop runs the hub (then nobody here is listening)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._accept_local(messages)
            return
        try:
            loop.call_soon_threadsafe(self._accept_local, messages)
        except RuntimeError:  # the loop closed meanwhile: nobody to deliver to
            return

    def _accept_local(self, messages: list[tuple[str, dict]]) -> None:
        for topic, envelope in messages:
            if envelope.get("type") == "event":
                self._dispatch_event(topic, envelope["event"], envelope["payload"])
                continue
            state = self._topics.get(topic)
            if state is not None:
                self._on_live(state, Message(topic, envelope["seq"], envelope))

    def _on_topic_payload(self, state: _Topic, data: bytes) -> None:
        """One bus payload: an envelope (JSON object), or several of the topic's in order (a JSON
        array, ``fanout.publish``'s batch), which are accepted together and so reach each
        subscriber as one batch."""
        if data[:1] == b"[":
            try:
                items = _split_array(data.decode())
            except (ValueError, TypeError) as exc:
                log.warning("topic %s: ignored a malformed bus message (%s)", state.name, exc)
                return
            for decoded, raw in items:
                self._on_envelope(state, decoded, raw)
            return
        try:
            decoded = json.loads(data)
        except ValueError as exc:
            log.warning("topic %s: ignored a malformed bus message (%s)", state.name, exc)
            return
        if isinstance(decoded, list):  # an array laid out otherwise (whitespace first)
            for item in decoded:
                self._on_envelope(state, item, None)
            return
        self._on_envelope(state, decoded, data)

    def _on_envelope(self, state: _Topic, decoded: Any, raw: str | bytes | None) -> None:
        try:
            kind = decoded["type"]
            if kind == "notification":
                self._on_live(state, Message(state.name, int(decoded["seq"]), decoded, raw))
            elif kind == "event":
                self._dispatch_event(state.name, decoded["event"], decoded["payload"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("topic %s: ignored a malformed bus message (%s)", state.name, exc)

    def _on_live(self, state: _Topic, message: Message) -> None:
        if state.closed:
            return
        seq = message.seq
        if state.started and seq <= state.last_seq:
            return  # already delivered (a fill got it from the database first)
        if state.started and seq == state.last_seq + 1 and state.fill_task is None:
            self._dispatch(state, message)
            if state.pending:
                self._drain_pending(state)
            return
        if len(state.pending) >= PENDING_MAX:
            # Overloaded or the database is slow: stop holding, read these back later.
            state.behind_to = max(state.behind_to, seq, *state.pending)
            state.pending.clear()
        else:
            state.pending[seq] = message
        if state.started and state.fill_task is None and state.gap_timer is None:
            state.gap_timer = self._loop.call_later(GAP_GRACE_S, self._gap_timeout, state)

    def _drain_pending(self, state: _Topic) -> None:
        """Dispatch held messages that are now next in line; start a fill for a remaining gap."""
        pending = state.pending
        while pending:
            message = pending.pop(state.last_seq + 1, None)
            if message is None:
                break
            self._dispatch(state, message)
        for seq in [s for s in pending if s <= state.last_seq]:
            del pending[seq]
        if (pending or state.behind_to > state.last_seq) and state.started:
            if state.fill_task is None and state.gap_timer is None:
                state.gap_timer = self._loop.call_later(GAP_GRACE_S, self._gap_timeout, state)
        elif state.gap_timer is not None:
            state.gap_timer.cancel()
            state.gap_timer = None

    def _gap_timeout(self, state: _Topic) -> None:
        state.gap_timer = None
        if state.closed or state.fill_task is not None:
            return
        if state.pending or state.behind_to > state.last_seq:
            state.fill_task = self._spawn(self._fill(state, None))

    def _dispatch(self, state: _Topic, message: Message) -> None:
        """Accept ``message`` as the topic's next: it is handed to subscribers at the next flush
        (this loop iteration's end, or now when the batch is full)."""
        state.last_seq = message.seq
        state.outbox.append(message)
        raw = message._raw
        state.outbox_bytes += len(raw) if raw is not None else 512
        if len(state.outbox) >= BATCH_MAX_MESSAGES or state.outbox_bytes >= BATCH_MAX_BYTES:
            self._flush(state)
        elif not state.flush_scheduled:
            state.flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush, state)

    def _scheduled_flush(self, state: _Topic) -> None:
        state.flush_scheduled = False
        self._flush(state)

    def _flush(self, state: _Topic) -> None:
        """Hand the accepted messages to every live subscriber: one encode per encoding per
        message, one batch per subscriber, no awaiting; and to joiners' buffers."""
        messages = state.outbox
        if not messages:
            return
        state.outbox = []
        state.outbox_bytes = 0
        if len(messages) == 1:
            message = messages[0]
            for encoding, subs in tuple(state.members.items()):
                frame = message.encoded(encoding)
                for sub in tuple(subs):
                    try:
                        sub.deliver(frame, message)
                    except Exception:  # one broken edge must not stop the fanout to the others
                        log.exception("deliver failed on %s; subscriber dropped", state.name)
                        self._remove_member(state, sub)
        else:
            batch = Batch(messages)
            for _encoding, subs in tuple(state.members.items()):
                for sub in tuple(subs):
                    try:
                        deliver_batch = getattr(sub, "deliver_batch", None)
                        if deliver_batch is not None:
                            deliver_batch(batch)
                        else:
                            for message in messages:
                                sub.deliver(message.encoded(sub.encoding), message)
                    except Exception:
                        log.exception("deliver failed on %s; subscriber dropped", state.name)
                        self._remove_member(state, sub)
        for join in state.joining.values():
            for message in messages:
                join.offer(message)

    # --- filling gaps from the database ------------------------------------------------------

    async def _fill_to(self, state: _Topic, upto: int) -> None:
        """Bring the topic's live stream up to ``upto`` from the database, then return."""
        while state.last_seq < upto and not state.closed:
            if state.fill_task is None:
                if state.gap_timer is not None:
                    state.gap_timer.cancel()
                    state.gap_timer = None
                state.fill_task = self._spawn(self._fill(state, upto))
            task = state.fill_task
            await asyncio.shield(task)

    async def _fill(self, state: _Topic, upto: int | None) -> None:
        """Read the holes in the topic's stream from the database and dispatch in order: up to
        ``upto``, up to the held messages, and up to what is known published (``behind_to``)."""
        try:
            sent = 0
            while not state.closed:
                self._drain_pending(state)  # what is next in line, and drops what is stale
                if state.pending:
                    target = min(state.pending) - 1
                else:
                    target = max(upto or 0, state.behind_to)
                if target <= state.last_seq:
                    break
                try:
                    rows = await stream_reads.read_after(
                        state.name, state.last_seq, REPLAY_PAGE, upto_seq=target
                    )
                except Exception as exc:  # noqa: BLE001  (database down: hold and retry)
                    log.warning("topic %s: gap fill failed (%s); retrying", state.name, exc)
                    await asyncio.sleep(FILL_RETRY_S)
                    continue
                if state.closed:
                    return
                if not rows:
                    log.warning(
                        "topic %s: seqs %d..%d are gone (retention); the stream jumps",
                        state.name,
                        state.last_seq + 1,
                        target,
                    )
                    state.last_seq = target
                    continue
                for envelope in rows:
                    seq = envelope["seq"]
                    if seq <= state.last_seq:
                        continue
                    message = state.pending.pop(seq, None) or Message(state.name, seq, envelope)
                    self._dispatch(state, message)
                    sent += 1
                    if sent % DISPATCH_YIELD_EVERY == 0:
                        await asyncio.sleep(0)
                        if state.closed:
                            return
            if state.behind_to <= state.last_seq:
                state.behind_to = 0
        finally:
            if state.fill_task is asyncio.current_task():
                state.fill_task = None
        if not state.closed:
            self._drain_pending(state)

    async def _backfill(self, state: _Topic) -> None:
        """After a Redis outage: deliver whatever was published while this process was deaf."""
        while not state.closed:
            try:
                db_last, _ = await stream_reads.topic_state(state.name)
                break
            except Exception as exc:  # noqa: BLE001
                log.warning("topic %s: back-fill cannot read state (%s)", state.name, exc)
                await asyncio.sleep(FILL_RETRY_S)
        else:
            return
        state.behind_to = max(state.behind_to, db_last)
        if state.fill_task is None and state.behind_to > state.last_seq:
            if state.gap_timer is not None:
                state.gap_timer.cancel()
                state.gap_timer = None
            state.fill_task = self._spawn(self._fill(state, None))

    # --- ephemeral topic events and generic channels ----------------------------------------

    def broadcast_event(self, topic: str, event: str, payload: dict) -> None:
        """Deliver an ephemeral event to the topic's subscribers in every process (no seq, not
        stored). Thread-safe."""
        body = {"type": "event", "topic": topic, "event": event, "payload": payload}
        if self.redis_mode:
            self._post(self.topic_channel(topic), body)
        else:
            self.publish_local([(topic, body)])

    def _dispatch_event(self, topic: str, event: str, payload: dict) -> None:
        state = self._topics.get(topic)
        if state is None:
            return
        self._flush(state)  # an event published after a notification arrives after it
        subs = [s for group in state.members.values() for s in group]
        subs += [s for s in state.joining]  # joiners miss no event either (events carry no seq)
        for sub in subs:
            try:
                sub.deliver_event(topic, event, payload)
            except Exception:
                log.exception("deliver_event failed on topic %s", topic)

    async def listen(self, name: str, callback: Callable[[dict], Any]) -> None:
        """Call ``callback(payload)`` (in the loop; may return an awaitable) for every
        ``send(name, payload)`` in any process. Returns once the subscription is live."""
        self._bind()
        callbacks = self._listeners.setdefault(name, [])
        callbacks.append(callback)
        if not self.redis_mode or len(callbacks) > 1:
            return
        channel = self.listen_channel(name)
        state = _Topic(f"listen:{name}", channel)
        state.subscribed = self._loop.create_future()
        self._handlers[channel] = lambda data, n=name: self._on_listen_payload(n, data)
        self._channel_states[channel] = state
        self._command("SUBSCRIBE", channel, state)
        try:
            await asyncio.wait_for(asyncio.shield(state.subscribed), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            raise HubUnavailable("the realtime bus (Redis) is not reachable") from None

    def unlisten(self, name: str, callback: Callable[[dict], Any]) -> _Done:
        """Stop calling ``callback``; may be awaited or not."""
        if self._loop is None:
            return _Done()
        callbacks = self._listeners.get(name, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            self._listeners.pop(name, None)
            channel = self.listen_channel(name)
            if self.redis_mode and self._handlers.pop(channel, None) is not None:
                self._channel_states.pop(channel, None)
                self._command("UNSUBSCRIBE", channel, None)
        return _Done()

    def send(self, name: str, payload: dict) -> None:
        """Publish ``payload`` to every ``listen(name, ...)`` callback in every process.
        Thread-safe; in order per sending process."""
        if self.redis_mode:
            self._post(self.listen_channel(name), payload)
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._call_listeners(name, payload)
        else:
            loop.call_soon_threadsafe(self._call_listeners, name, payload)

    def _on_listen_payload(self, name: str, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except ValueError as exc:
            log.warning("channel %s: ignored a malformed bus message (%s)", name, exc)
            return
        self._call_listeners(name, payload)

    def _call_listeners(self, name: str, payload: dict) -> None:
        for callback in list(self._listeners.get(name, ())):
            try:
                result = callback(payload)
                if asyncio.iscoroutine(result):
                    self._spawn(result)
            except Exception:
                log.exception("listener on %s failed", name)

    def _post(self, channel: bytes, body: dict) -> None:
        """Redis mode: queue a PUBLISH on the hub's own publisher connection (in order)."""
        data = json.dumps(body, separators=JSON_SEPARATORS, ensure_ascii=False).encode()
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None or running is not loop:
            # Another thread (or no loop bound yet): a plain synchronous PUBLISH.
            from routing_app.pubsub import sync_redis

            sync_redis().publish(channel, data)
            return
        self._outbox.append((channel, data))
        if self._outbox_task is None:
            self._outbox_task = self._spawn(self._flush_outbox())

    async def _flush_outbox(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        try:
            while self._outbox:
                if self._publisher is None:
                    self._publisher = aioredis.Redis.from_url(
                        self._redis_url, socket_connect_timeout=2, socket_timeout=5
                    )
                batch = list(self._outbox)
                self._outbox.clear()
                try:
                    async with self._publisher.pipeline(transaction=False) as pipe:
                        for channel, data in batch:
                            pipe.publish(channel, data)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    log.warning("hub: %d ephemeral message(s) lost, Redis: %s", len(batch), exc)
        finally:
            self._outbox_task = None

    # --- Redis connection ----------------------------------------------------------------

    def _command(self, command: str, channel: bytes, state: _Topic | None) -> None:
        """Queue a SUBSCRIBE/UNSUBSCRIBE; sent in call order on the pub/sub connection."""
        self._commands.append((command, channel, state))
        if self._redis_task is None:
            self._redis_task = self._spawn(self._redis_loop())
        elif self._pubsub is not None and self._command_task is None:
            self._command_task = self._spawn(self._send_commands())

    async def _send_commands(self) -> None:
        from redis.exceptions import RedisError

        try:
            while self._commands and self._pubsub is not None:
                command, channel, state = self._commands.popleft()
                if command == "SUBSCRIBE":
                    self._sub_waiters.setdefault(channel, deque()).append(state)
                try:
                    await self._pubsub.execute_command(command, channel)
                except (RedisError, OSError) as exc:
                    # The reader sees the broken connection too; reconnecting resubscribes
                    # every wanted channel, so this command needs no retry of its own.
                    log.debug("hub: %s failed (%s); reconnect will resync", command, exc)
                    return
        finally:
            self._command_task = None

    async def _redis_loop(self) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        delay = RECONNECT_DELAY_S[0]
        connected_before = False
        reader: asyncio.Task | None = None
        watchdog: asyncio.Task | None = None
        while True:
            client = aioredis.Redis.from_url(
                self._redis_url,
                socket_connect_timeout=2,
                socket_keepalive=True,
                # Errors must reach us (we resubscribe and back-fill); redis-py's own retries
                # would reconnect silently and skip the back-fill.
                retry=Retry(NoBackoff(), 0),
            )
            pubsub = client.pubsub()
            try:
                await pubsub.connect()
                # What we want subscribed now; later changes go through _command as usual.
                self._commands.clear()
                self._sub_waiters.clear()
                wanted = list(self._handlers)
                for channel in wanted:
                    self._sub_waiters[channel] = deque([self._channel_states.get(channel)])
                self._pubsub = pubsub
                if wanted:
                    await pubsub.execute_command("SUBSCRIBE", *wanted)
                if connected_before:
                    self.reconnects += 1
                    log.warning(
                        "hub: Redis reconnected; resubscribed %d channel(s), back-filling",
                        len(wanted),
                    )
                    for state in self._topics.values():
                        state.needs_backfill = True
                connected_before = True
                delay = RECONNECT_DELAY_S[0]
                if self._commands and self._command_task is None:
                    self._command_task = self._spawn(self._send_commands())
                # The reader and a watchdog race: the reader ends by an error, the watchdog by
                # declaring a silent connection dead; either way the connection is replaced.
                reader = self._spawn(self._read(pubsub))
                watchdog = self._spawn(self._watch())
                await asyncio.wait((reader, watchdog), return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    reader.result()  # raises the reader's error
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("hub: Redis connection lost (%s); reconnecting", exc)
            except Exception:  # a bug must not leave the process deaf: log it, reconnect
                log.exception("hub: Redis reader failed; reconnecting")
            finally:
                for task in (reader, watchdog):
                    if task is not None:
                        task.cancel()
                reader = watchdog = None
                self._pubsub = None
                try:
                    await pubsub.aclose()
                    await client.aclose()
                except (RedisError, OSError):
                    pass  # the connection is already broken; nothing left to release
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_S[1])

    async def _watch(self) -> None:
        """Ping a connection that has been silent; return (it is then replaced) if it stays
        silent. Pings go through the command queue's connection, the pub/sub one."""
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        while True:
            await asyncio.sleep(REDIS_PING_AFTER_S)
            if loop.time() - self._last_heard < REDIS_PING_AFTER_S:
                continue  # messages are flowing: alive
            sent = loop.time()
            pubsub = self._pubsub
            if pubsub is None:
                return
            try:
                await asyncio.wait_for(pubsub.execute_command("PING"), REDIS_SILENT_MAX_S)
            except TimeoutError:
                pass  # could not even write: as silent as can be
            await asyncio.sleep(max(0.0, sent + REDIS_SILENT_MAX_S - loop.time()))
            if self._last_heard < sent:
                log.warning(
                    "hub: Redis silent for %.0f s after a ping; reconnecting", loop.time() - sent
                )
                return

    async def _read(self, pubsub) -> None:
        parse = pubsub.parse_response
        handlers = self._handlers
        clock = asyncio.get_running_loop().time
        in_a_row = 0
        while True:
            # Returns without suspending while Redis's data is already buffered: a burst is read
            # whole and flushed as batches once the reader has to wait (or at batch bounds).
            response = await parse(block=True)
            self._last_heard = clock()
            if response is None or isinstance(response, bytes):
                continue  # a pong outside subscribed mode
            kind = response[0]
            if kind == b"message":
                handler = handlers.get(response[1])
                if handler is not None:
                    handler(response[2])
                in_a_row += 1
                if in_a_row >= READ_YIELD_EVERY:
                    in_a_row = 0
                    await asyncio.sleep(0)  # let sockets' own tasks run during a long burst
            elif kind == b"subscribe":
                self._on_subscribed(response[1])

    def _on_subscribed(self, channel: bytes) -> None:
        waiters = self._sub_waiters.get(channel)
        state = waiters.popleft() if waiters else None
        if waiters is not None and not waiters:
            del self._sub_waiters[channel]
        if state is None:
            state = self._channel_states.get(channel)
        if state is None:
            return
        if state.subscribed is not None and not state.subscribed.done():
            state.subscribed.set_result(None)
        if state.needs_backfill and state.started and not state.closed:
            state.needs_backfill = False
            self._spawn(self._backfill(state))

    async def aclose(self) -> None:
        """Stop background tasks and drop every subscription (tests, shutdown)."""
        if self._loop is not asyncio.get_running_loop():
            return
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110
                pass  # shutting down: a task's last error no longer matters
        if self._publisher is not None:
            await self._publisher.aclose()
        self._init_state()
        self._loop = None


hub = Hub()


def get_hub() -> Hub:
    return hub
