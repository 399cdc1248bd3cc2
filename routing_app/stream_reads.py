"""Reading a topic's durable stream from the database, for replay and gap filling.

Every realtime edge (plain socket, Phoenix, SSE) and the hub read stored history through these two
functions, at connect/resume time or when the hub back-fills a gap: never per delivered message.

The queries run on routing_app.db_threads' pool, not on Django's one shared sync thread: a burst
of reconnecting clients resuming at once must not queue behind other sync work, and the pool
drops connections broken by a database restart.
"""

from __future__ import annotations

from django.db.models import Min

from . import db_threads
from .models import Notification, Topic

READ_PAGE_MAX = 1000  # rows per query; callers page with after_seq


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
