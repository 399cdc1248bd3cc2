"""The seam between replay and live for a joining subscriber: registered first (live messages
wait in its ``Join`` buffer), then the stored stream after ``since`` is read from the database
page by page until the buffer continues it, so the subscriber sees every seq once, in order.

The shape is centrifuge's recovery (``recovery/sync.go``): buffer live publications while the
history is read, then merge at the seam by offset.
"""

from __future__ import annotations

from routing_app import stream_reads

from .. import edge_metrics
from .messages import Message
from .sequencer import REPLAY_PAGE, Topic
from .subscribers import Subscriber, SubscribeResult, Unsubscribed, wait_live

# Live messages held per subscriber while its replay runs; past it, the replay reads on from the
# database instead.
JOIN_BUFFER_MAX = 1_000


class Join:
    """A subscriber between registration and the end of its replay: live messages wait here."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer: list[Message] = []

    def offer(self, message: Message) -> None:
        if len(self.buffer) >= JOIN_BUFFER_MAX:
            self.buffer.clear()  # the replay reads these back from the database instead
        self.buffer.append(message)


async def join(topic: Topic, sub: Subscriber, join: Join, since: int | None) -> SubscribeResult:
    """Replay ``topic`` after ``since`` to ``sub`` (registered in ``topic.joining`` with
    ``join``), then make it a live member. Raises HubUnavailable when the topic's subscription is
    not confirmed in time, Unsubscribed when ``sub`` left meanwhile, and the database's errors."""
    if not topic.started:
        await wait_live(topic.ready)
    reset = False
    oldest: int | None = None
    if since is None:
        cursor = topic.last_seq
    else:
        cursor, reset, oldest = await _resume_point(topic, since)
    cursor = await _replay(topic, sub, join, cursor)
    cursor = _go_live(topic, sub, join, cursor)
    return SubscribeResult(last_seq=cursor, reset=reset, oldest_seq=oldest)


async def _resume_point(topic: Topic, since: int) -> tuple[int, bool, int | None]:
    """``(cursor, reset, oldest_seq)`` for a subscriber that has seen up to ``since``."""
    db_last, oldest = await stream_reads.topic_state(topic.name)
    gone = oldest - 1 if oldest is not None else db_last  # seqs <= gone were deleted
    if since > db_last or since < gone:
        return topic.last_seq, True, oldest
    if since > topic.last_seq:  # the client saw seqs this process has not yet
        await topic.fill_to(since)
    return since, False, oldest


async def _replay(topic: Topic, sub: Subscriber, join: Join, cursor: int) -> int:
    """Deliver stored messages after ``cursor`` until the live buffer continues seamlessly;
    returns the last seq delivered."""
    while True:
        _check_joining(topic, sub, join)
        topic.flush()  # everything accepted so far is now in members' and our buffer
        buffer = join.buffer
        if buffer and buffer[0].seq <= cursor + 1:
            return cursor
        target = topic.last_seq
        if cursor >= target:
            return cursor
        rows = await stream_reads.read_after(topic.name, cursor, REPLAY_PAGE, upto_seq=target)
        _check_joining(topic, sub, join)
        if not rows:  # deleted by retention while we read: nothing left to send
            cursor = target
            continue
        await _deliver_rows(topic, sub, rows)
        cursor = rows[-1]["seq"]


async def _deliver_rows(topic: Topic, sub: Subscriber, rows: list[dict]) -> None:
    encoding = sub.encoding
    drained = getattr(sub, "drained", None)
    for envelope in rows:
        message = Message(topic.name, envelope["seq"], envelope)
        sub.deliver(message.encoded(encoding), message)
        if drained is not None:
            # Paced by the reader (no wait while its writes complete at once): a page of
            # big notifications would otherwise overflow the bounded send queue of a
            # reader that keeps up, since the replay writes it all in one go.
            await drained()
    if edge_metrics.ENABLED:
        edge_metrics.replayed(encoding, len(rows))


def _go_live(topic: Topic, sub: Subscriber, join: Join, cursor: int) -> int:
    """Deliver the buffered live messages past ``cursor`` and make ``sub`` a member; returns the
    last seq it has."""
    encoding = sub.encoding
    topic.flush()
    buffered = 0
    for message in join.buffer:
        if message.seq > cursor:
            sub.deliver(message.encoded(encoding), message)
            cursor = message.seq
            buffered += 1
    if buffered and edge_metrics.ENABLED:
        edge_metrics.replayed(encoding, buffered)
    del topic.joining[sub]
    topic.members.setdefault(encoding, {})[sub] = None
    return cursor


def _check_joining(topic: Topic, sub: Subscriber, join: Join) -> None:
    if topic.closed or topic.joining.get(sub) is not join:
        raise Unsubscribed("unsubscribed while its replay ran")
