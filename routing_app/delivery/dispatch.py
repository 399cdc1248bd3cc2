"""Hand delivery ids to whatever runs them: the Celery worker with ``REDIS_URL``, else the
embedded loop in this process (embedded.py). Both end in ``service.deliver``.

Always after commit (``schedule_on_commit``): a worker must find the rows it is given. A failed
enqueue (the broker down) is logged and left to the sweeper, which finds every due row in the
database: the row, not the broker, is the truth.
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

log = logging.getLogger(__name__)


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
    from .tasks import deliver

    try:
        for chunk in chunks:
            deliver.apply_async((chunk,), countdown=max(0.0, delay) or None)
    except Exception as exc:  # noqa: BLE001  (broker down: the sweeper enqueues these rows later)
        log.warning("could not enqueue %d delivery id(s), the sweeper will: %s", len(ids), exc)
