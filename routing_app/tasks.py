"""Celery tasks of the router. Thin: each calls one service function."""

from __future__ import annotations

import logging

from celery import shared_task

from .alerts.tasks import evaluate  # registered with the app here
from .delivery.tasks import check_health, deliver, sweep  # registered with the app here
from .models import Topic
from .stream_writes import trim_retention

log = logging.getLogger(__name__)
__all__ = ["check_health", "deliver", "evaluate", "sweep", "trim_retention_all"]


@shared_task(name="routing_app.tasks.trim_retention_all", ignore_result=True)
def trim_retention_all() -> int:
    """Trim every topic to its retention (newest N, newer than T); return rows deleted.

    Scheduled by Celery beat (``CELERY_BEAT_SCHEDULE``). Safe to run twice at once: a second
    run finds nothing left to delete.
    """
    deleted = 0
    topics = Topic.objects.exclude(retention_count=0, retention_days=0).order_by("name")
    for topic in topics.iterator():
        deleted += trim_retention(topic)
    if deleted:
        log.info("retention trimmed %d notification(s)", deleted)
    return deleted
