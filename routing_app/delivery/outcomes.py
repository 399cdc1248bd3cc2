"""How a try ends for its row: sent (in bulk for a batch), rescheduled, dead (and failed over),
or waiting because no provider may be called. Every write here keeps ``updated_at`` current
(the sweeper reads it)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from django.utils import timezone

from ..metrics.instruments import delivery_duration
from ..models import Delivery, Provider
from . import dispatch
from .breaker import BreakerUnavailable, State
from .failover import fail_over
from .models import Attempt
from .row_updates import update_each

log = logging.getLogger(__name__)
Status = Delivery.Status
Outcome = Attempt.Outcome
ERROR_TEXT_MAX = 2000
NO_PROVIDER_RECHECK_S = 10.0  # all providers unhealthy: look again after the next health check
SENT_FIELDS = ["attempts", "provider", "provider_message_id", "latency_ms"]  # per row


def update(row: Delivery, **fields) -> None:
    Delivery.objects.filter(pk=row.pk).update(updated_at=timezone.now(), **fields)


def finish_sent(done: list) -> None:
    """Mark each ``(row, call)`` sent by ``call.provider``, in one statement."""
    now = timezone.now()
    rows = []
    for row, call in done:
        latency_s = (now - row.notification.created_at).total_seconds()
        delivery_duration(row.channel.name).observe(latency_s)
        row.status = Status.SENT
        row.attempts += 1
        row.provider = call.provider
        row.provider_message_id = call.receipt.provider_message_id[:200]
        row.sent_at = row.updated_at = now
        row.latency_ms = max(0, round(latency_s * 1000))
        row.next_attempt_at = None
        row.last_error = ""
        rows.append(row)
    update_each(
        Delivery,
        rows,
        SENT_FIELDS,
        {
            "status": Status.SENT,
            "sent_at": now,
            "updated_at": now,
            "next_attempt_at": None,
            "last_error": "",
        },
    )


def reschedule(row: Delivery, status: str, delay_s: float, *, error: str | None = None) -> None:
    """Due again in ``delay_s``, as ``status``; a counted try (``error`` given) also stores its
    tries and the error. Scheduled after commit (a wait too long for a countdown is the
    sweeper's)."""
    row.status = status
    row.next_attempt_at = timezone.now() + timedelta(seconds=delay_s)
    fields = {"status": status, "next_attempt_at": row.next_attempt_at}
    if error is not None:
        fields["attempts"] = row.attempts
        fields["last_error"] = row.last_error = error[:ERROR_TEXT_MAX]
    update(row, **fields)
    dispatch.schedule_on_commit([row.pk], at=row.next_attempt_at)


def finish_dead(row: Delivery, error: str) -> None:
    row.status = Status.DEAD
    update(row, status=Status.DEAD, attempts=row.attempts, last_error=error[:ERROR_TEXT_MAX])
    log.warning("delivery %s is dead: %s", row.pk, error)
    fail_over(row)


def disable(provider: Provider, reason: str) -> None:
    Provider.objects.filter(pk=provider.pk).update(enabled=False, disabled_reason=reason[:300])
    provider.enabled = False
    log.warning("provider %s disabled: %s", provider, reason)


def no_provider(attempt_try):
    """No provider of the channel may be called (none enabled, all unhealthy or open): one
    ``breaker-open`` attempt row per provider whose breaker refused, so the row's history says
    why nothing was called; then the backup channel, or a wait (not a counted try) until a
    breaker half-opens or health returns."""
    from .tries import TryResult, count

    row, plan = attempt_try.row, attempt_try.plan
    refused = [p for p in plan.providers if p.healthy and not attempt_try.callable(p)]
    Attempt.objects.bulk_create(
        Attempt(
            delivery=row,
            number=attempt_try.number + i,
            provider=p,
            outcome=Outcome.BREAKER_OPEN,
        )
        for i, p in enumerate(refused, start=1)
    )
    attempt_try.number += len(refused)
    for p in refused:
        count(plan, p, Outcome.BREAKER_OPEN)
    reason = _why_none(attempt_try)
    if fail_over(row, reason=reason):
        row.status = Status.DEAD
        update(row, status=Status.DEAD, last_error=f"{reason}; failed over")
        return TryResult(Status.DEAD)
    reschedule(row, Status.FAILED, _recheck_s(attempt_try))
    update(row, last_error=reason)
    return TryResult(Status.FAILED)


def _why_none(attempt_try) -> str:
    plan = attempt_try.plan
    if not plan.providers:
        return f"channel {plan.channel.name} has no enabled provider"
    parts = []
    for p in plan.providers:
        if not p.healthy:
            parts.append(f"{p.name} unhealthy ({p.health_error or 'health check failed'})")
        else:
            parts.append(f"{p.name} breaker {_state_of(attempt_try, p)}")
    return "no provider may be called: " + ", ".join(parts)


def _state_of(attempt_try, provider) -> str:
    try:
        return str(attempt_try.breakers.snapshot(provider.pk, attempt_try.plan.config).state)
    except BreakerUnavailable:
        return "unknown"


def _recheck_s(attempt_try) -> float:
    now = time.time()
    soonest = NO_PROVIDER_RECHECK_S
    for p in attempt_try.plan.providers:
        try:
            snap = attempt_try.breakers.snapshot(p.pk, attempt_try.plan.config)
        except BreakerUnavailable:
            continue
        if snap.state == State.OPEN and snap.open_until:
            soonest = min(soonest, max(0.05, snap.open_until - now))
    return soonest
