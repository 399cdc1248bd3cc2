"""In-order delivery per topic: the state of one topic this process has local subscribers for.

Per topic and process, subscribers get seqs contiguously and in order. A seq that arrives early
(out of order across publishers) or never (lost in Redis, or during an outage) is read from the
database once per process, not per subscriber. After a bus reconnect every subscribed topic is
back-filled from the database. Only where retention deleted rows does a topic's stream jump (then
logged). Accepted messages are handed out in batches (``flush``): one socket write for several
frames.

Everything here runs on the hub's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from routing_app import stream_reads

from .. import edge_metrics
from . import wire
from .messages import Batch, Message

if TYPE_CHECKING:
    from .replay import Join
    from .subscribers import Subscriber

log = logging.getLogger(__name__)

# An out-of-order publish (two ingest threads committing seq 5 then 6 but PUBLISHing 6 first)
# normally closes its gap within this time; only then is the database asked for the hole.
GAP_GRACE_S = 0.02
# Live messages held per topic while a gap is being filled; past it they are dropped and read
# back from the database instead (bounded memory under overload).
PENDING_MAX = 5_000
REPLAY_PAGE = 500  # rows per database read during replay and back-fill
FILL_RETRY_S = 1.0  # database unreachable during a fill: try again after this
DISPATCH_YIELD_EVERY = 20  # during fills, let the loop breathe after this many messages
# Messages that arrive together (a burst read from Redis in one go, a fill) are handed to
# subscribers as one batch: one socket write for several frames. A batch is flushed when the
# loop has nothing more to read right now, or at these bounds (a batch must fit the transport's
# and the kernel's buffers, or every socket would fall onto its slow path).
BATCH_MAX_MESSAGES = 64
BATCH_MAX_BYTES = 32 * 1024

Spawn = Callable[[Coroutine[Any, Any, Any]], asyncio.Task]


class Topic:
    """A topic this process has local subscribers for: its members and joiners, and the in-order
    delivery to them. ``spawn`` runs a background task the hub cancels on ``aclose``."""

    __slots__ = (
        "name",
        "channel",
        "loop",
        "spawn",
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
        "closed",
        "outbox",
        "outbox_bytes",
        "flush_scheduled",
    )

    def __init__(self, name: str, channel: bytes, loop: asyncio.AbstractEventLoop, spawn: Spawn):
        self.name = name
        self.channel = channel
        self.loop = loop
        self.spawn = spawn
        self.members: dict[str, dict[Subscriber, None]] = {}  # encoding -> live subscribers
        self.joining: dict[Subscriber, Join] = {}
        self.last_seq = 0  # last seq dispatched in this process
        self.started = False  # last_seq known (bus subscription confirmed, then DB read)
        self.subscribed: asyncio.Future | None = None  # the bus confirmed the subscription
        self.ready: asyncio.Future = loop.create_future()  # started
        self.pending: dict[int, Message] = {}  # arrived ahead of last_seq + 1
        self.behind_to = 0  # seqs up to here are known published but not held: read from DB
        self.gap_timer: asyncio.TimerHandle | None = None
        self.fill_task: asyncio.Task | None = None
        self.open_task: asyncio.Task | None = None
        self.closed = False
        self.outbox: list[Message] = []  # accepted in order (last_seq), not yet handed out
        self.outbox_bytes = 0
        self.flush_scheduled = False

    # --- members ---------------------------------------------------------------------------

    def is_empty(self) -> bool:
        return not self.members and not self.joining

    def count(self) -> int:
        return sum(len(subs) for subs in self.members.values()) + len(self.joining)

    def remove_member(self, sub: Subscriber) -> None:
        subs = self.members.get(sub.encoding)
        if subs is not None and sub in subs:
            del subs[sub]
            if not subs:
                del self.members[sub.encoding]

    # --- start and close -----------------------------------------------------------------

    async def start(self) -> None:
        """Wait for the bus subscription (if any), then learn the topic's last seq: from then on
        every later seq reaches this process live or through a fill."""
        try:
            if self.subscribed is not None:
                await self.subscribed  # resolved by the bus on Redis's "subscribe" reply
            last_seq = await self._stored_last_seq("topic %s: cannot read its state (%s); retrying")
            if last_seq is None or self.closed:
                return
            self.last_seq = last_seq
            self.started = True
            if not self.ready.done():
                self.ready.set_result(None)
            self.drain_pending()
        finally:
            self.open_task = None

    async def _stored_last_seq(self, failure: str) -> int | None:
        """The topic's last stored seq, read again every ``FILL_RETRY_S`` while the database is
        down (joiners wait); None once the topic is closed."""
        while not self.closed:
            try:
                last_seq, _ = await stream_reads.topic_state(self.name)
                return last_seq
            except Exception as exc:  # noqa: BLE001  (database down: retry, joiners wait)
                log.warning(failure, self.name, exc)
                await asyncio.sleep(FILL_RETRY_S)
        return None

    def close(self) -> None:
        """Stop every task and timer of the topic and drop what it holds (no members left)."""
        self.closed = True
        for task in (self.fill_task, self.open_task):
            if task is not None:
                task.cancel()
        if self.gap_timer is not None:
            self.gap_timer.cancel()
        self.pending.clear()
        self.outbox = []
        for future in (self.ready, self.subscribed):
            if future is not None and not future.done():
                future.cancel()

    # --- live path -----------------------------------------------------------------------

    def on_payload(self, data: bytes) -> None:
        """The bus's callback: one payload, an envelope or several of the topic's in order
        (``wire.topic_payloads``' batch), accepted together so that they reach each subscriber
        as one batch."""
        try:
            items = wire.decode_topic_payload(data)
        except (ValueError, TypeError) as exc:
            log.warning("topic %s: ignored a malformed bus message (%s)", self.name, exc)
            return
        for decoded, raw in items:
            self.on_envelope(decoded, raw)

    def on_envelope(self, decoded: Any, raw: str | bytes | None) -> None:
        try:
            kind = decoded["type"]
            if kind == "notification":
                self.on_live(Message(self.name, int(decoded["seq"]), decoded, raw))
            elif kind == "event":
                self.deliver_event(decoded["event"], decoded["payload"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("topic %s: ignored a malformed bus message (%s)", self.name, exc)

    def on_live(self, message: Message) -> None:
        if self.closed:
            return
        seq = message.seq
        if self.started and seq <= self.last_seq:
            return  # already delivered (a fill got it from the database first)
        if self.started and seq == self.last_seq + 1 and self.fill_task is None:
            self.dispatch(message)
            if self.pending:
                self.drain_pending()
            return
        if len(self.pending) >= PENDING_MAX:
            # Overloaded or the database is slow: stop holding, read these back later.
            self.behind_to = max(self.behind_to, seq, *self.pending)
            self.pending.clear()
        else:
            self.pending[seq] = message
        if self.started and self.fill_task is None and self.gap_timer is None:
            self.gap_timer = self.loop.call_later(GAP_GRACE_S, self._gap_timeout)

    def drain_pending(self) -> None:
        """Dispatch held messages that are now next in line; start a fill for a remaining gap."""
        pending = self.pending
        while pending:
            message = pending.pop(self.last_seq + 1, None)
            if message is None:
                break
            self.dispatch(message)
        for seq in [s for s in pending if s <= self.last_seq]:
            del pending[seq]
        if (pending or self.behind_to > self.last_seq) and self.started:
            if self.fill_task is None and self.gap_timer is None:
                self.gap_timer = self.loop.call_later(GAP_GRACE_S, self._gap_timeout)
        elif self.gap_timer is not None:
            self.gap_timer.cancel()
            self.gap_timer = None

    def _gap_timeout(self) -> None:
        self.gap_timer = None
        if self.closed or self.fill_task is not None:
            return
        if self.pending or self.behind_to > self.last_seq:
            self.fill_task = self.spawn(self._fill(None))

    def dispatch(self, message: Message) -> None:
        """Accept ``message`` as the topic's next: it is handed to subscribers at the next flush
        (this loop iteration's end, or now when the batch is full)."""
        self.last_seq = message.seq
        self.outbox.append(message)
        raw = message._raw
        self.outbox_bytes += len(raw) if raw is not None else 512
        if len(self.outbox) >= BATCH_MAX_MESSAGES or self.outbox_bytes >= BATCH_MAX_BYTES:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self.flush_scheduled = False
        self.flush()

    # --- fanout to local subscribers ---------------------------------------------------------

    def flush(self) -> None:
        """Hand the accepted messages to every live subscriber: one encode per encoding per
        message, one batch per subscriber, no awaiting; and to joiners' buffers."""
        messages = self.outbox
        if not messages:
            return
        self.outbox = []
        self.outbox_bytes = 0
        record = edge_metrics.FanoutRecord(messages) if edge_metrics.ENABLED else None
        if len(messages) == 1:
            self._deliver_one(messages[0], record)
        else:
            self._deliver_batch(messages, record)
        if record is not None:
            record.done()
        for join in self.joining.values():
            for message in messages:
                join.offer(message)

    def _deliver_one(self, message: Message, record: edge_metrics.FanoutRecord | None) -> None:
        for encoding, subs in tuple(self.members.items()):
            frame = message.encoded(encoding)
            for sub in tuple(subs):
                try:
                    sub.deliver(frame, message)
                except Exception:  # one broken edge must not stop the fanout to the others
                    log.exception("deliver failed on %s; subscriber dropped", self.name)
                    self.remove_member(sub)
            if record is not None:
                record.handed(encoding, len(subs))

    def _deliver_batch(
        self, messages: list[Message], record: edge_metrics.FanoutRecord | None
    ) -> None:
        batch = Batch(messages)
        for encoding, subs in tuple(self.members.items()):
            for sub in tuple(subs):
                try:
                    deliver_batch = getattr(sub, "deliver_batch", None)
                    if deliver_batch is not None:
                        deliver_batch(batch)
                    else:
                        for message in messages:
                            sub.deliver(message.encoded(sub.encoding), message)
                except Exception:
                    log.exception("deliver failed on %s; subscriber dropped", self.name)
                    self.remove_member(sub)
            if record is not None:
                record.handed(encoding, len(subs))

    def deliver_event(self, event: str, payload: dict) -> None:
        """An ephemeral event of this topic, to its members and joiners."""
        self.flush()  # an event published after a notification arrives after it
        subs = [s for group in self.members.values() for s in group]
        subs += [s for s in self.joining]  # joiners miss no event either (events carry no seq)
        for sub in subs:
            try:
                sub.deliver_event(self.name, event, payload)
            except Exception:
                log.exception("deliver_event failed on topic %s", self.name)

    # --- filling gaps from the database ------------------------------------------------------

    async def fill_to(self, upto: int) -> None:
        """Bring the topic's live stream up to ``upto`` from the database, then return."""
        while self.last_seq < upto and not self.closed:
            if self.fill_task is None:
                self._cancel_gap_timer()
                self.fill_task = self.spawn(self._fill(upto))
            task = self.fill_task
            await asyncio.shield(task)

    def _cancel_gap_timer(self) -> None:
        if self.gap_timer is not None:
            self.gap_timer.cancel()
            self.gap_timer = None

    async def _fill(self, upto: int | None) -> None:
        """Read the holes in the topic's stream from the database and dispatch in order: up to
        ``upto``, up to the held messages, and up to what is known published (``behind_to``)."""
        try:
            while not self.closed:
                self.drain_pending()  # what is next in line, and drops what is stale
                target = min(self.pending) - 1 if self.pending else max(upto or 0, self.behind_to)
                if target <= self.last_seq:
                    break
                if not await self._fill_page(target):
                    return
            if self.behind_to <= self.last_seq:
                self.behind_to = 0
        finally:
            if self.fill_task is asyncio.current_task():
                self.fill_task = None
        if not self.closed:
            self.drain_pending()

    async def _fill_page(self, target: int) -> bool:
        """Dispatch one page of the stream after ``last_seq``, up to ``target``. Returns False
        when the topic closed meanwhile."""
        try:
            rows = await stream_reads.read_after(
                self.name, self.last_seq, REPLAY_PAGE, upto_seq=target
            )
        except Exception as exc:  # noqa: BLE001  (database down: hold and retry)
            log.warning("topic %s: gap fill failed (%s); retrying", self.name, exc)
            await asyncio.sleep(FILL_RETRY_S)
            return True
        if self.closed:
            return False
        if not rows:
            log.warning(
                "topic %s: seqs %d..%d are gone (retention); the stream jumps",
                self.name,
                self.last_seq + 1,
                target,
            )
            self.last_seq = target
            return True
        return await self._dispatch_rows(rows)

    async def _dispatch_rows(self, rows: list[dict]) -> bool:
        sent = 0
        for envelope in rows:
            seq = envelope["seq"]
            if seq <= self.last_seq:
                continue
            message = self.pending.pop(seq, None) or Message(self.name, seq, envelope)
            self.dispatch(message)
            sent += 1
            if sent % DISPATCH_YIELD_EVERY == 0:
                await asyncio.sleep(0)
                if self.closed:
                    return False
        return True

    def on_reconnect(self) -> None:
        """The bus's callback when this topic's subscription is live again after the bus lost
        its connection: what was published meanwhile never arrived."""
        if self.started and not self.closed:
            self.spawn(self._backfill())

    async def _backfill(self) -> None:
        """After a bus outage: deliver whatever was published while this process was deaf."""
        db_last = await self._stored_last_seq("topic %s: back-fill cannot read state (%s)")
        if db_last is None:
            return
        self.behind_to = max(self.behind_to, db_last)
        if self.fill_task is None and self.behind_to > self.last_seq:
            self._cancel_gap_timer()
            self.fill_task = self.spawn(self._fill(None))
