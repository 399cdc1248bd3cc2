"""Hand delivery ids to whatever runs them: the Celery worker with ``REDIS_URL``, else the
embedded loop in this process (embedded.py). Both end in ``service.deliver``.

Always after commit (``schedule_on_commit``): a worker must find the rows it is given. A failed
enqueue (the broker down) is logged and left to the sweeper, which finds every due row in the
database: the row, not the broker, is the truth.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

log = logging.getLogger(__name__)
BROKER_PAUSE_S = 5
_broker_down_until = 0.0  # monotonic time before which no publish is tried


def schedule_on_commit(ids: list[int], *, at: datetime | None = None) -> None:
    """Schedule ``ids`` once the current transaction commits (at once outside one)."""
    if ids:
        transaction.on_commit(lambda: schedule(ids, at=at))


def schedule(ids: list[int], *, at: datetime | None = None) -> None:
    """Send ``ids`` to a worker now, or at ``at``. Never raises.

    A wait longer than ``DELIVERY_MAX_COUNTDOWN_S`` is not sent as a countdown (the Redis broker
    would redeliver a message held past its visibility timeout): the sweeper enqueues the row
    when its ``next_attempt_at`` comes.
    """
    if not ids:
        return
    delay = (at - timezone.now()).total_seconds() if at else 0.0
    if delay > settings.DELIVERY_MAX_COUNTDOWN_S:
        return
    batch = settings.DELIVERY_BATCH
    chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    if not settings.REDIS_URL:
        from . import embedded

        for chunk in chunks:
            embedded.submit(chunk, delay_s=max(0.0, delay))
        return
    global _broker_down_until
    if time.monotonic() < _broker_down_until:
        return  # the broker failed a moment ago: the sweeper enqueues these rows when it is back
    from .tasks import deliver

    try:
        for chunk in chunks:
            deliver.apply_async((chunk,), countdown=max(0.0, delay) or None)
    except Exception as exc:  # noqa: BLE001  (broker down: the sweeper enqueues these rows later)
        # A failed publish takes the broker's connect timeout; the next ones within the pause
        # are not tried, so ingest answers stay fast during an outage.
        _broker_down_until = time.monotonic() + BROKER_PAUSE_S
        log.warning(
            "could not enqueue %d delivery id(s); not trying for %d s, the sweeper will: %s",
            len(ids),
            BROKER_PAUSE_S,
            exc,
        )
