"""Deliver outbound rows: claim, guard, call, record, retry, fail over.

``deliver(ids)`` is the one entry point (the Celery task and the embedded loop call it). For each
row it claims, one *try*:

1. pick a provider: the balancer chooses among the channel's enabled, healthy providers whose
   breaker permits a call, minus those this try already used;
2. limit: the channel's and the provider's rate; over it the row is rescheduled for when the
   window has room (an ``rate-limited`` attempt row, not a counted try);
3. breaker permit, an ``Attempt`` row written (``started``), the transport called within the
   channel's call timeout, the outcome recorded on the attempt, the breaker told;
4. sent -> done; permanent -> dead; transient -> the next provider at once (failover within the
   try). When every provider failed, the try counts: retried after an exponential backoff with
   full jitter (or the provider's Retry-After, if longer), dead after ``max_attempts`` tries.

A row goes to the channel's backup channel (a new delivery with ``failover_from``) when it is dead,
or when no provider of its channel may be called at all. Rows claimed by a worker that then dies
stay ``sending``: the sweeper (sweeper.py) puts them back.

Rows of one batch are sent concurrently on a small thread pool (the calls wait on the network);
each thread does its own database writes.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import Count, Q
from django.utils import timezone

from ..metrics.instruments import delivery_attempts, delivery_duration
from ..models import Channel, Delivery, Provider
from . import dispatch
from .balancer import balancer
from .breaker import BreakerConfig, BreakerUnavailable, Permit, State, breakers_from_settings
from .limiter import limiter
from .models import Attempt
from .transitions import on_transition
from .transports import DeliveryError, transport_for

log = logging.getLogger(__name__)
Outcome = Attempt.Outcome
Status = Delivery.Status

NO_PROVIDER_RECHECK_S = 10.0  # all providers unhealthy: look again after the next health check
ERROR_TEXT_MAX = 2000


@dataclass
class TryResult:
    """What one try of one delivery came to (for callers that count, like the bench)."""

    status: str
    calls: int = 0


@dataclass
class ChannelPlan:
    """A channel with its providers and breaker settings, loaded once per batch."""

    channel: Channel
    providers: list[Provider]
    config: BreakerConfig
    timeout_s: float
    _lock: threading.Lock = field(default_factory=threading.Lock)


def deliver(ids: list[int]) -> list[TryResult]:
    """Try each of the deliveries ``ids`` that is due, once; return what each claimed one came to.

    Safe to call twice with the same ids at once (a redelivered task): a row is claimed by one
    caller only, the other skips it.
    """
    rows = claim(ids)
    if not rows:
        return []
    plans = _plans({row.channel_id for row in rows})
    if len(rows) == 1:  # on the calling thread (and in its transaction, if any)
        return [_guarded_try(rows[0], plans[rows[0].channel_id])]
    numbers = _attempt_rows(rows)
    return list(
        _pool().map(
            lambda row: _try_in_thread(row, plans[row.channel_id], numbers.get(row.pk, 0)), rows
        )
    )


def _attempt_rows(rows: list[Delivery]) -> dict[int, int]:
    """Attempt rows so far per claimed delivery, in one query for the batch (a query per row was
    a tenth of the worker's CPU per email or webhook in bench/delivery.py's profile). Claimed, so
    no other worker adds attempts to them meanwhile; if the sweeper hands one to another worker
    anyway (stuck past its deadline), the unique (delivery, number) constraint stops one of the
    two tries at its first attempt row."""
    counts = (
        Attempt.objects.filter(delivery_id__in=[row.pk for row in rows])
        .values("delivery")
        .annotate(n=Count("pk"))
        .values_list("delivery", "n")
    )
    return dict(counts)


def claim(ids: list[int]) -> list[Delivery]:
    """Mark the due rows among ``ids`` ``sending`` and return them (notification, topic and channel
    loaded). A row is due when pending or failed and its ``next_attempt_at`` has come; rows locked
    by another claimer are skipped, not waited for."""
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            Delivery.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(pk__in=ids, status__in=Delivery.DUE_STATUSES)
            .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
            .select_related("notification__topic", "channel")
        )
        if rows:
            Delivery.objects.filter(pk__in=[r.pk for r in rows]).update(
                status=Status.SENDING, updated_at=now
            )
    for row in rows:
        row.status = Status.SENDING
    return rows


def _plans(channel_ids: set[int]) -> dict[int, ChannelPlan]:
    plans = {}
    for channel in Channel.objects.filter(pk__in=channel_ids).prefetch_related("providers"):
        providers = [p for p in channel.providers.all() if p.enabled]
        plans[channel.pk] = ChannelPlan(
            channel=channel,
            providers=providers,
            config=BreakerConfig.for_channel(channel),
            timeout_s=channel.breaker_call_timeout_ms / 1000,
        )
    return plans


_executor: ThreadPoolExecutor | None = None
_executor_pid = 0


def _pool() -> ThreadPoolExecutor:
    global _executor, _executor_pid
    if _executor is None or _executor_pid != os.getpid():  # a forked worker gets its own
        _executor = ThreadPoolExecutor(
            max_workers=settings.DELIVERY_THREADS, thread_name_prefix="delivery"
        )
        _executor_pid = os.getpid()
    return _executor


def _try_in_thread(row: Delivery, plan: ChannelPlan, attempt_rows: int) -> TryResult:
    close_old_connections()  # a pool thread may hold a connection a database restart broke
    return _guarded_try(row, plan, attempt_rows)


def _guarded_try(row: Delivery, plan: ChannelPlan, attempt_rows: int | None = None) -> TryResult:
    try:
        return try_once(row, plan, attempt_rows)
    except Exception:
        # A bug or the database gone mid-try: the row stays ``sending`` and the sweeper puts it
        # back; say which row, once.
        log.exception("delivery %s: the try stopped with an error", row.pk)
        return TryResult(status=Status.SENDING)


def try_once(row: Delivery, plan: ChannelPlan, attempt_rows: int | None = None) -> TryResult:
    """One try of a claimed row (see the module docstring). ``attempt_rows``: how many attempt
    rows it has, when the caller counted them already (None: counted here)."""
    breakers = breakers_from_settings()
    tried: set[int] = set()
    errors: list[str] = []
    retry_after = 0.0
    calls = 0
    number = Attempt.objects.filter(delivery=row).count() if attempt_rows is None else attempt_rows
    while True:
        provider = balancer.pick(
            p for p in plan.providers if p.pk not in tried and _callable(breakers, p, plan)
        )
        if provider is None:
            break
        tried.add(provider.pk)
        try:
            wait = limiter().call_wait_s(plan.channel, provider)
        except Exception as exc:  # noqa: BLE001  (degrade: a limiter outage must not stop sends)
            log.warning("rate limiter unavailable, sending without it: %s", exc)
            wait = 0.0
        if wait:
            number += 1
            _count(plan, provider, Outcome.RATE_LIMITED)
            Attempt.objects.create(
                delivery=row,
                number=number,
                provider=provider,
                outcome=Outcome.RATE_LIMITED,
                error=f"over the rate limit; next try in {wait:.2f} s",
            )
            _reschedule(row, Status.PENDING, wait, counted=False, error="")
            return TryResult(status=Status.PENDING, calls=calls)
        permit = _acquire(breakers, provider, plan)
        if permit is None:
            number += 1
            _count(plan, provider, Outcome.BREAKER_OPEN)
            Attempt.objects.create(
                delivery=row, number=number, provider=provider, outcome=Outcome.BREAKER_OPEN
            )
            continue
        number += 1
        calls += 1
        outcome, error = _call(row, provider, plan, permit, number)
        if outcome is None:
            return TryResult(status=row.status, calls=calls)
        if error.permanent:
            if error.disable_provider:
                _disable(provider, str(error))
            row.attempts += 1
            _finish_dead(row, f"{provider.name}: {error}")
            return TryResult(status=Status.DEAD, calls=calls)
        errors.append(f"{provider.name}: {error}")
        retry_after = max(retry_after, error.retry_after_s or 0.0)
    if calls == 0:
        return _no_provider(row, plan, breakers, number)
    row.attempts += 1
    text = "; ".join(errors)
    if row.attempts >= plan.channel.max_attempts:
        _finish_dead(row, f"{row.attempts} tries failed; last: {text}")
        return TryResult(status=Status.DEAD, calls=calls)
    delay = max(retry_after, backoff_s(row.attempts, plan.channel))
    _reschedule(row, Status.FAILED, delay, counted=True, error=text)
    return TryResult(status=Status.FAILED, calls=calls)


def _callable(breakers, provider: Provider, plan: ChannelPlan) -> bool:
    if not provider.healthy:
        return False
    try:
        return breakers.permits(provider.pk, plan.config)
    except BreakerUnavailable as exc:
        log.warning("breaker state unavailable, calling %s anyway: %s", provider.name, exc)
        return True


def _acquire(breakers, provider: Provider, plan: ChannelPlan) -> Permit | bool | None:
    """A permit, None when refused, or True when the breaker's store is down (call anyway)."""
    try:
        permit, transition = breakers.acquire(provider.pk, plan.config)
    except BreakerUnavailable as exc:
        log.warning("breaker state unavailable, calling %s anyway: %s", provider.name, exc)
        return True
    if transition:
        on_transition(transition, provider, plan.channel)
    return permit


def _call(row, provider, plan, permit, number) -> tuple[str | None, DeliveryError | None]:
    """Call ``provider``; record the attempt before and after. Returns (None, None) when sent
    (the row is finished), else the outcome and the error."""
    attempt = Attempt.objects.create(delivery=row, number=number, provider=provider)
    started = time.monotonic()
    try:
        receipt = transport_for(plan.channel.kind).send(row, provider, timeout_s=plan.timeout_s)
    except DeliveryError as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001  (a transport bug is this provider's failure)
        log.exception("transport %s raised for delivery %s", plan.channel.kind, row.pk)
        error = DeliveryError(f"unexpected {type(exc).__name__}: {exc}")
    else:
        error = None
    duration_ms = (time.monotonic() - started) * 1000
    _record_breaker(permit, provider, plan, success=error is None, duration_ms=duration_ms)
    if error is None:
        _count(plan, provider, Outcome.SENT)
        attempt.outcome = Outcome.SENT
        attempt.http_status = receipt.http_status
        attempt.duration_ms = round(duration_ms)
        attempt.save(update_fields=["outcome", "http_status", "duration_ms"])
        _finish_sent(row, provider, receipt.provider_message_id)
        return None, None
    if error.permanent:
        attempt.outcome = Outcome.PERMANENT
    elif error.timeout:
        attempt.outcome = Outcome.TIMEOUT
    else:
        attempt.outcome = Outcome.TRANSIENT
    _count(plan, provider, attempt.outcome)
    attempt.http_status = error.http_status
    attempt.duration_ms = round(duration_ms)
    attempt.error = str(error)[:ERROR_TEXT_MAX]
    attempt.save(update_fields=["outcome", "http_status", "duration_ms", "error"])
    return attempt.outcome, error


def _count(plan: ChannelPlan, provider: Provider, outcome: str) -> None:
    delivery_attempts(plan.channel.name, provider.name, outcome).inc()


def _record_breaker(permit, provider, plan, *, success: bool, duration_ms: float) -> None:
    if not isinstance(permit, Permit):
        return  # called without the breaker (its store was down)
    try:
        transition = breakers_from_settings().record(
            permit, plan.config, success=success, duration_ms=duration_ms
        )
    except BreakerUnavailable as exc:
        log.warning("breaker state unavailable, %s's result not counted: %s", provider.name, exc)
        return
    if transition:
        on_transition(transition, provider, plan.channel)


def backoff_s(tries: int, channel: Channel) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(tries-1))]
    (AWS's "full jitter": retries of many rows spread out instead of arriving together)."""
    ceiling = min(channel.retry_backoff_max_s, channel.retry_backoff_s * 2 ** (tries - 1))
    return random.uniform(0, ceiling)  # noqa: S311  (jitter, not a secret)


def _reschedule(row: Delivery, status: str, delay_s: float, *, counted: bool, error: str) -> None:
    row.status = status
    row.next_attempt_at = timezone.now() + timedelta(seconds=delay_s)
    fields = {"status": status, "next_attempt_at": row.next_attempt_at}
    if counted:
        fields["attempts"] = row.attempts
        fields["last_error"] = row.last_error = error[:ERROR_TEXT_MAX]
    _update(row, **fields)
    dispatch.schedule_on_commit([row.pk], at=row.next_attempt_at)


def _finish_sent(row: Delivery, provider: Provider, message_id: str) -> None:
    now = timezone.now()
    row.status = Status.SENT
    row.attempts += 1
    latency = (now - row.notification.created_at).total_seconds() * 1000
    delivery_duration(row.channel.name).observe(latency / 1000)
    _update(
        row,
        status=Status.SENT,
        attempts=row.attempts,
        provider=provider,
        provider_message_id=message_id[:200],
        sent_at=now,
        latency_ms=max(0, round(latency)),
        next_attempt_at=None,
        last_error="",
    )


def _finish_dead(row: Delivery, error: str) -> None:
    row.status = Status.DEAD
    _update(row, status=Status.DEAD, attempts=row.attempts, last_error=error[:ERROR_TEXT_MAX])
    log.warning("delivery %s is dead: %s", row.pk, error)
    fail_over(row)


def _no_provider(row: Delivery, plan: ChannelPlan, breakers, number: int) -> TryResult:
    """No provider of the channel may be called (none enabled, all unhealthy or open): one
    ``breaker-open`` attempt row per provider whose breaker refused, so the row's history says
    why nothing was called."""
    refused = [p for p in plan.providers if p.healthy and not _callable(breakers, p, plan)]
    Attempt.objects.bulk_create(
        Attempt(delivery=row, number=number + i, provider=p, outcome=Outcome.BREAKER_OPEN)
        for i, p in enumerate(refused, start=1)
    )
    for p in refused:
        _count(plan, p, Outcome.BREAKER_OPEN)
    reason = _why_none(plan, breakers)
    if fail_over(row, reason=reason):
        row.status = Status.DEAD
        _update(row, status=Status.DEAD, last_error=f"{reason}; failed over")
        return TryResult(status=Status.DEAD)
    # Nowhere to go: wait (not a counted try) until a breaker half-opens or health returns.
    _reschedule(row, Status.FAILED, _recheck_s(plan, breakers), counted=False, error="")
    _update(row, last_error=reason)
    return TryResult(status=Status.FAILED)


def _why_none(plan: ChannelPlan, breakers) -> str:
    if not plan.providers:
        return f"channel {plan.channel.name} has no enabled provider"
    parts = []
    for p in plan.providers:
        if not p.healthy:
            parts.append(f"{p.name} unhealthy ({p.health_error or 'health check failed'})")
        else:
            parts.append(f"{p.name} breaker {_state_of(breakers, p, plan)}")
    return "no provider may be called: " + ", ".join(parts)


def _state_of(breakers, provider, plan) -> str:
    try:
        return str(breakers.snapshot(provider.pk, plan.config).state)
    except BreakerUnavailable:
        return "unknown"


def _recheck_s(plan: ChannelPlan, breakers) -> float:
    now = time.time()
    soonest = NO_PROVIDER_RECHECK_S
    for p in plan.providers:
        try:
            snap = breakers.snapshot(p.pk, plan.config)
        except BreakerUnavailable:
            continue
        if snap.state == State.OPEN and snap.open_until:
            soonest = min(soonest, max(0.05, snap.open_until - now))
    return soonest


def _update(row: Delivery, **fields) -> None:
    Delivery.objects.filter(pk=row.pk).update(updated_at=timezone.now(), **fields)


def _disable(provider: Provider, reason: str) -> None:
    Provider.objects.filter(pk=provider.pk).update(enabled=False, disabled_reason=reason[:300])
    provider.enabled = False
    log.warning("provider %s disabled: %s", provider, reason)


# --- failover to backup channels -------------------------------------------------------------


def fail_over(row: Delivery, *, reason: str = "") -> Delivery | None:
    """Create the delivery of ``row``'s notification on the first backup channel (following the
    chain, never in a cycle) that can reach the recipient, and schedule it. Returns it, or None
    when no backup channel can reach the recipient."""
    channel = row.channel
    seen = {channel.pk}
    backup = _backup_of(channel)
    while backup is not None and backup.pk not in seen:
        seen.add(backup.pk)
        recipient = _recipient_on(backup, row, channel)
        if backup.enabled and recipient:
            created, new = _create_failover(row, backup, recipient)
            if new:
                log.warning(
                    "delivery %s fails over from %s to %s%s",
                    row.pk,
                    channel.name,
                    backup.name,
                    f" ({reason})" if reason else "",
                )
                dispatch.schedule_on_commit([created.pk])
            return created
        backup = _backup_of(backup)
    return None


def _backup_of(channel: Channel) -> Channel | None:
    if channel.backup_id is None:
        return None
    return Channel.objects.filter(pk=channel.backup_id).first()


def _recipient_on(backup: Channel, row: Delivery, original: Channel) -> str:
    """Where the recipient of ``row`` is reached on ``backup``: the same address on a channel of
    the same kind, the webhook's own URLs (``*``), else the user's address of that kind."""
    if backup.kind == original.kind:
        return row.recipient
    if backup.kind == Channel.Kind.WEBHOOK:
        return "*"
    if row.user_id is None:
        return ""
    from ..router import user_address  # the router owns where users are reached

    return user_address(row.user, backup.kind) or ""


def _create_failover(row: Delivery, backup: Channel, recipient: str) -> tuple[Delivery, bool]:
    return Delivery.objects.get_or_create(
        notification_id=row.notification_id,
        channel=backup,
        recipient=recipient,
        defaults={"user_id": row.user_id, "failover_from": row},
    )


# --- replay and test sends -------------------------------------------------------------------

TEST_TOPIC = "system.channel-tests"


def send_test(channel: Channel, user) -> Delivery:
    """A test notification (topic ``system.channel-tests``) delivered over ``channel`` to
    ``user`` (their address of the channel's kind; a webhook channel's own providers), through
    the same path as any delivery. ValueError says why when it cannot be sent."""
    from ..ingest import NotificationIn, ingest
    from ..router import OUTBOUND_KINDS, user_address

    if channel.kind not in OUTBOUND_KINDS:
        raise ValueError(f"{channel.name} is a realtime channel: open a socket to test it")
    recipient = "*" if channel.kind == Channel.Kind.WEBHOOK else user_address(user, channel.kind)
    if not recipient:
        raise ValueError(
            f"you have no {'email address' if channel.kind == 'email' else 'phone number'}: "
            "add one to your user's contact"
        )
    with transaction.atomic():
        [result] = ingest(
            [
                NotificationIn(
                    topic=TEST_TOPIC,
                    event="channel.test",
                    source="system",
                    data={"channel": channel.name, "by": user.get_username()},
                )
            ]
        )
        row, _ = Delivery.objects.get_or_create(
            notification_id=result.id,
            channel=channel,
            recipient=recipient,
            defaults={"user": user if channel.kind != Channel.Kind.WEBHOOK else None},
        )
        dispatch.schedule_on_commit([row.pk])
    return row


def replay(queryset) -> int:
    """Put the dead deliveries of ``queryset`` back to ``pending`` with their tries reset, and
    schedule them after commit; return how many. Their attempt rows stay (history)."""
    with transaction.atomic():
        ids = list(queryset.filter(status=Status.DEAD).values_list("pk", flat=True))
        Delivery.objects.filter(pk__in=ids).update(
            status=Status.PENDING,
            attempts=0,
            next_attempt_at=None,
            last_error="",
            updated_at=timezone.now(),
        )
        dispatch.schedule_on_commit(ids)
    return len(ids)
