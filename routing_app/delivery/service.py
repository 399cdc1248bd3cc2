"""Deliver outbound rows: ``deliver(ids)`` is the one entry point (the Celery task and the
embedded loop call it). For each row it claims, one *try* (tries.py):

1. pick a provider: the balancer chooses among the channel's enabled, healthy providers whose
   breaker permits a call, minus those this try already used;
2. limit: the channel's and the provider's rate; over it the row is rescheduled for when the
   window has room (a ``rate-limited`` attempt row, not a counted try);
3. breaker permit, an ``Attempt`` row written (``started``) before the call goes out, the
   transport called within the channel's call timeout, the outcome recorded on the attempt and
   told to the breaker;
4. sent -> done; permanent -> dead; transient -> the next provider at once (failover within the
   try). When every provider failed, the try counts: retried after an exponential backoff with
   full jitter (or the provider's Retry-After, if longer), dead after ``max_attempts`` tries.

A row goes to the channel's backup channel (failover.py) when it is dead, or when no provider
of its channel may be called at all. Rows claimed by a worker that then dies stay ``sending``:
the sweeper (sweeper.py) puts them back.

A batch runs its rows' first calls together: the choices on this thread (each provider's breaker
read once for the batch, each rate window asked once with the batch's share), the attempt rows in
one INSERT, the calls on a thread pool (they wait on the network), the breakers told in one count
per provider, the results in one UPDATE each for the attempts and the sent rows (one commit).
Rows that need another provider (or whose call failed for good) go on one by one. What a batch
of 50 costs (bench/delivery_cpu.py): 12 SQL statements (claim 1, rows 1, channels 2, attempt
counts 1, attempts INSERT 3, results 4) and 3 Redis round trips, whatever the batch's size.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import close_old_connections, connections, router, transaction
from django.db.models import Count, Q
from django.utils import timezone

from ..models import Channel, Delivery
from . import dispatch, outcomes
from .breaker import BreakerConfig, Reads, breakers_from_settings
from .failover import fail_over
from .models import Attempt
from .row_updates import update_each
from .transports import transport_for
from .tries import ATTEMPT_RESULT_FIELDS, ChannelPlan, Try, TryResult, call_waits, record_batch

log = logging.getLogger(__name__)
Status = Delivery.Status
__all__ = ["claim", "deliver", "fail_over", "replay", "send_test", "TryResult"]


def deliver(ids: list[int]) -> list[TryResult]:
    """Try each of the deliveries ``ids`` that is due, once; return what each claimed one came to.

    Safe to call twice with the same ids at once (a redelivered task): a row is claimed by one
    caller only, the other skips it. A try that stops on an error (a bug, the database gone)
    leaves its row ``sending`` for the sweeper; its result says ``sending``.
    """
    rows = claim(ids)
    if not rows:
        return []
    plans = _plans(rows)
    numbers = _attempt_rows(rows)
    reads: Reads = {}  # the batch's first choices read each provider's breaker once
    tries = [Try(row, plans[row.channel_id], numbers.get(row.pk, 0), reads=reads) for row in rows]
    firsts = []
    for t, picked in _first_picks(tries, plans, reads):
        if t.result is not None:
            continue
        call = _guarded(t, t.next_call, picked)
        if call is not None:
            firsts.append((t, call))
    for t in tries:
        t.reads = None  # from here on, every look at a breaker reads it anew
    if firsts:
        _first_calls(firsts)
    rest = [t for t in tries if t.result is None]
    _each(rest, lambda t: _guarded(t, t.run))
    return [t.result or TryResult(Status.SENDING) for t in tries]


def _first_picks(tries: list[Try], plans: dict, reads: Reads) -> list[tuple[Try, tuple | None]]:
    """Each try's first provider and the limiter's wait for it, the limiter asked for the whole
    batch at once (``tries.call_waits``); None for a try with no provider to call (its
    ``next_call`` then ends it). Only while every breaker of the batch lets calls through
    without writing (closed or disabled): otherwise (a half-open breaker hands out a few trials)
    each try picks after the previous one acquired, and gets None here."""
    breakers = breakers_from_settings()
    providers = [p for plan in plans.values() for p in plan.providers]
    if not all(breakers.passes_all(p.pk, reads=reads) for p in providers):
        return [(t, None) for t in tries]
    picks = [(t, _guarded(t, t.pick)) for t in tries]
    picks = [(t, provider) for t, provider in picks if t.result is None]
    chosen = [(t, provider) for t, provider in picks if provider is not None]
    waits = dict(zip((id(t) for t, _ in chosen), call_waits(chosen), strict=True))
    return [(t, (provider, waits[id(t)]) if provider else None) for t, provider in picks]


def _first_calls(firsts: list) -> None:
    """The first call of each try, together: attempts saved in one INSERT before any call goes
    out, calls in parallel, outcomes in one UPDATE each for the attempts and the sent rows."""
    Attempt.objects.bulk_create([call.attempt for _, call in firsts])
    _each(firsts, lambda pair: pair[0].send(pair[1]), database=False)
    try:
        record_batch(firsts)
    except Exception:
        # A bug in the counting must not cost the batch its outcomes: they are written below,
        # uncounted by the breakers, as when the breaker store is down.
        log.exception("the breakers could not count a batch of %d calls", len(firsts))
    sent = []
    for t, call in firsts:
        _guarded(t, t.settle, call, recorded=True)
        if t.result is not None and t.result.status == Status.SENT:
            sent.append((t.row, call))
    with transaction.atomic():  # one commit for both
        update_each(Attempt, [call.attempt for _, call in firsts], ATTEMPT_RESULT_FIELDS)
        if sent:
            outcomes.finish_sent(sent)


def _guarded(t: Try, step, *args, **kwargs):
    try:
        return step(*args, **kwargs)
    except Exception:
        # A bug or the database gone mid-try: the row stays ``sending`` and the sweeper puts it
        # back; say which row, once.
        log.exception("delivery %s: the try stopped with an error", t.row.pk)
        t.result = TryResult(Status.SENDING, t.calls)
        return None


def _each(items: list, run, *, database: bool = True) -> None:
    """``run`` each item: on this thread when there is one (in the caller's transaction, if
    any), else on the pool; pool threads that touch the database first drop connections a
    database restart broke."""
    if len(items) == 1:
        run(items[0])
        return
    if not items:
        return

    def in_thread(item):
        if database:
            close_old_connections()
        return run(item)

    list(_pool().map(in_thread, items))


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
    loaded: each channel once for the batch, its providers too). A row is due when pending or
    failed and its ``next_attempt_at`` has come; rows locked by another claimer are skipped, not
    waited for."""
    now = timezone.now()
    connection = connections[router.db_for_write(Delivery)]
    if connection.vendor == "postgresql":
        claimed = _claim_in_one_statement(connection, ids, now)
    else:
        with transaction.atomic():
            claimed = list(
                Delivery.objects.select_for_update(skip_locked=True)
                .filter(pk__in=ids, status__in=Delivery.DUE_STATUSES)
                .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
                .values_list("pk", flat=True)
            )
            Delivery.objects.filter(pk__in=claimed).update(status=Status.SENDING, updated_at=now)
    if not claimed:
        return []
    rows = list(Delivery.objects.filter(pk__in=claimed).select_related("notification__topic"))
    # The batch's few channels in one query rather than joined into every row: a channel row is
    # wide (its breaker and retry settings), and 50 copies of it per batch showed in the worker's
    # profile (bench/delivery_cpu.py --py-spy).
    channels = Channel.objects.prefetch_related("providers").in_bulk(
        {row.channel_id for row in rows}
    )
    for row in rows:
        row.channel = channels[row.channel_id]
    _prepare(rows)
    return rows


def _prepare(rows: list[Delivery]) -> None:
    """Let each kind whose transport has a ``prepare`` hook load what its calls will need
    (transports/__init__.py), on this thread, once per batch and kind."""
    by_kind: dict[str, list[Delivery]] = {}
    for row in rows:
        by_kind.setdefault(row.channel.kind, []).append(row)
    for kind, kind_rows in by_kind.items():
        prepare = getattr(transport_for(kind), "prepare", None)
        if prepare is not None:
            prepare(kind_rows)


def _claim_in_one_statement(connection, ids: list[int], now) -> list[int]:
    """The claim as one ``UPDATE ... RETURNING`` over a ``FOR UPDATE SKIP LOCKED`` selection
    (atomic by itself: one round trip instead of a transaction of four, and the ORM's
    compilation of both queries saved); returns the ids claimed."""
    table = connection.ops.quote_name(Delivery._meta.db_table)
    sql = (
        f"WITH due AS (SELECT id FROM {table} WHERE id = ANY(%s) AND status = ANY(%s)"  # noqa: S608
        " AND (next_attempt_at IS NULL OR next_attempt_at <= %s) FOR UPDATE SKIP LOCKED)"
        f" UPDATE {table} AS d SET status = %s, updated_at = %s FROM due WHERE d.id = due.id"
        " RETURNING d.id"
    )
    with connection.cursor() as cursor:
        cursor.execute(
            sql, [list(ids), [str(s) for s in Delivery.DUE_STATUSES], now, str(Status.SENDING), now]
        )
        return [pk for (pk,) in cursor.fetchall()]


def _plans(rows: list[Delivery]) -> dict[int, ChannelPlan]:
    plans = {}
    for row in rows:
        channel = row.channel
        if channel.pk not in plans:
            plans[channel.pk] = ChannelPlan(
                channel=channel,
                providers=[p for p in channel.providers.all() if p.enabled],
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


# --- replay and test sends -------------------------------------------------------------------

TEST_TOPIC = "system.channel-tests"


def send_test(channel: Channel, user) -> Delivery:
    """A test notification (topic ``system.channel-tests``) delivered over ``channel`` to
    ``user`` (their address of the channel's kind, their newest push subscription; a webhook
    channel's own providers), through the same path as any delivery. ValueError says why when
    it cannot be sent."""
    from ..ingest import NotificationIn, ingest
    from ..router import OUTBOUND_KINDS, user_address

    if channel.kind not in OUTBOUND_KINDS:
        raise ValueError(f"{channel.name} is a realtime channel: open a socket to test it")
    recipient = "*" if channel.kind == Channel.Kind.WEBHOOK else user_address(user, channel.kind)
    if not recipient:
        if channel.kind == Channel.Kind.PUSH:
            raise ValueError(
                "you have no push subscription: open a page that subscribes this browser "
                "(static/notify/push.js, subscribePush)"
            )
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
