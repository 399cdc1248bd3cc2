"""Reading a topic's durable stream from the database: the one home for reads of stored
notifications and topic seqs (writes, and retention trimming, are stream_writes.py's).

- ``read_after`` and ``topic_state``: replay and gap filling. Every realtime edge (plain socket,
  Phoenix, SSE) and the hub read stored history through them, at connect/resume time or when the
  hub back-fills a gap: never per delivered message.
- ``current_state``: what a Phoenix joiner (and a ``reverse_flow`` update) gets first.
- ``history_page``: the API's ``GET topics/<topic>/notifications?after=``.
- ``topic_last_seq``: django-eventstream's storage interface (``sse.NotificationStorage``).

The async functions run their queries on routing_app.db_threads' pool, not on Django's one shared
sync thread: a burst of reconnecting clients resuming at once must not queue behind other sync
work, and the pool drops connections broken by a database restart. The sync ones are for callers
already on a database thread (the API, which checks the key's rate in the same hop) or in sync
code.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Min

from . import db_threads
from .models import Notification, Topic

READ_PAGE_MAX = 1000  # rows per query; callers page with after_seq
LATEST_COUNT = 20  # notifications included in a topic's current state


def _read_after(topic: str, after_seq: int, limit: int, upto_seq: int | None) -> list[dict]:
    rows = Notification.objects.filter(topic__name=topic, seq__gt=after_seq)
    if upto_seq is not None:
        rows = rows.filter(seq__lte=upto_seq)
    rows = rows.order_by("seq").only(
        "id", "seq", "event", "data", "severity", "source", "created_at"
    )
    return [row.envelope(topic) for row in rows[: min(limit, READ_PAGE_MAX)]]


def _topic_state(topic: str) -> tuple[int, int | None]:
    found = (
        Topic.objects.filter(name=topic)
        .annotate(oldest=Min("notifications__seq"))
        .values_list("last_seq", "oldest")
        .first()
    )
    return (0, None) if found is None else (found[0], found[1])


async def read_after(
    topic: str, after_seq: int, limit: int = READ_PAGE_MAX, upto_seq: int | None = None
) -> list[dict]:
    """Stored envelopes of ``topic`` with ``after_seq < seq <= upto_seq``, in seq order.

    At most ``min(limit, READ_PAGE_MAX)`` rows; page by calling again with the last seq returned.
    Seqs may jump where retention deleted rows. Each item is ``Notification.envelope()``.
    Raises the database's errors (OperationalError when it is unreachable).
    """
    return await db_threads.run(_read_after, topic, after_seq, limit, upto_seq)


async def topic_state(topic: str) -> tuple[int, int | None]:
    """``(last_seq, oldest_seq)`` of ``topic``: the last seq taken, and the oldest seq retention
    kept (None when nothing is stored). An unknown topic is ``(0, None)``."""
    return await db_threads.run(_topic_state, topic)


async def current_state(topic: str) -> dict:
    """The topic's latest state from the durable stream: ``{"topic", "last_seq", "oldest_seq",
    "notifications": [envelope, ...]}`` with at most LATEST_COUNT newest notifications, oldest
    first. A topic nothing was published on yet has last_seq 0 and no notifications."""
    last_seq, oldest_seq = await topic_state(topic)
    latest = []
    if last_seq:
        latest = await read_after(topic, max(last_seq - LATEST_COUNT, 0), LATEST_COUNT)
    return {"topic": topic, "last_seq": last_seq, "oldest_seq": oldest_seq, "notifications": latest}


def topic_last_seq(topic: str) -> int:
    """The last seq ``topic`` took (0 for an unknown topic). Sync: one query on this thread."""
    return Topic.objects.filter(name=topic).values_list("last_seq", flat=True).first() or 0


@dataclass(frozen=True)
class HistoryPage:
    last_seq: int  # the topic's newest seq (0: nothing stored yet)
    notifications: list[dict]  # Notification.envelope() of each row, oldest first
    next_after: int  # the last seq returned (``after_seq`` when none): where the next page starts


def history_page(topic: str, after_seq: int, limit: int) -> HistoryPage:
    """Up to ``limit`` stored notifications of ``topic`` with seq > ``after_seq``, oldest first.

    Retention may have trimmed the oldest: the first seq is then above ``after_seq + 1``. Sync:
    two queries on this thread (callers run it on a database thread). Raises the database's
    errors.
    """
    last_seq = topic_last_seq(topic)
    rows = Notification.objects.filter(topic__name=topic, seq__gt=after_seq).order_by("seq")
    envelopes = [row.envelope(topic) for row in rows[:limit]]
    next_after = envelopes[-1]["seq"] if envelopes else after_seq
    return HistoryPage(last_seq=last_seq, notifications=envelopes, next_after=next_after)
