"""The sweeper: the database, not the broker, says what is left to send.

Run every few seconds (Celery beat, or the embedded loop), it

- puts back rows stuck in ``sending`` past what a try can take (the worker died mid-try): their
  open attempt rows are closed as ``timeout``, the try counts, and the row becomes ``failed`` and
  due at once, or ``dead`` (then its backup channel) when that was its last try;
- enqueues due rows (``pending`` or ``failed``, ``next_attempt_at`` come or unset) untouched for
  a grace period: their task may never have reached the broker (it was down at commit), been
  lost with it, or never been sent (a wait longer than a countdown may be). A row enqueued twice
  is harmless (the claim takes it once); a swept row is touched, so a backlog in the broker is
  not swept again before the next grace period: at most one extra message per row and period.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from ..models import Channel, Delivery
from . import dispatch, outcomes
from .models import Attempt

log = logging.getLogger(__name__)
Status = Delivery.Status


@dataclass(frozen=True)
class Sweep:
    reset: int  # rows put back from ``sending``
    enqueued: int  # due rows handed to workers


def sending_deadline_s(channel: Channel, providers: int) -> float:
    """How long a try of ``channel`` can take: a call timeout per provider (failover within the
    try calls each once), plus the margin for the database writes around the calls."""
    return channel.breaker_call_timeout_ms / 1000 * max(1, providers) + settings.SWEEP_MARGIN_S


def sweep(limit: int | None = None) -> Sweep:
    """One sweep (see the module docstring); ``limit`` bounds the rows enqueued."""
    now = timezone.now()
    reset = 0
    channels = Channel.objects.filter(kind__in=Channel.OUTBOUND_KINDS).annotate(
        provider_count=Count("providers")
    )
    for channel in channels:
        cutoff = now - timedelta(seconds=sending_deadline_s(channel, channel.provider_count))
        reset += _reset_stuck(channel, cutoff, now)
    grace = now - timedelta(seconds=settings.SWEEP_PENDING_GRACE_S)
    due = (
        Delivery.objects.filter(status__in=Delivery.DUE_STATUSES, updated_at__lt=grace)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .order_by("next_attempt_at", "pk")
        .values_list("pk", flat=True)
    )
    ids = list(due[: limit or settings.SWEEP_BATCH])
    if ids:
        Delivery.objects.filter(pk__in=ids, status__in=Delivery.DUE_STATUSES).update(updated_at=now)
        dispatch.schedule(ids)
    if reset or ids:
        log.info("sweeper: %d row(s) put back from sending, %d enqueued", reset, len(ids))
    return Sweep(reset=reset, enqueued=len(ids))


def _reset_stuck(channel: Channel, cutoff, now) -> int:
    """Rows left ``sending`` by a worker that died mid-try: the try counts (a row whose call kills
    its worker every time must still end), so a row out of tries is dead, the others due again."""
    with transaction.atomic():
        stuck = list(
            Delivery.objects.select_for_update(skip_locked=True).filter(
                channel=channel, status=Status.SENDING, updated_at__lt=cutoff
            )
        )
        if not stuck:
            return 0
        ids = [row.pk for row in stuck]
        Attempt.objects.filter(delivery_id__in=ids, outcome=Attempt.Outcome.STARTED).update(
            outcome=Attempt.Outcome.TIMEOUT, error="no result: the worker stopped mid-call"
        )
        again = []
        for row in stuck:
            row.attempts += 1
            if row.attempts >= channel.max_attempts:
                outcomes.finish_dead(row, f"{row.attempts} tries; the last one's worker stopped")
            else:
                again.append(row.pk)
        Delivery.objects.filter(pk__in=again).update(
            status=Status.FAILED,
            attempts=F("attempts") + 1,
            next_attempt_at=now,
            last_error="the worker stopped mid-try; tried again",
            updated_at=now,
        )
    log.warning("sweeper: %d delivery row(s) of %s were stuck in sending", len(stuck), channel)
    if again:
        dispatch.schedule(again)
    return len(stuck)
