"""The alert rules' evaluation: each enabled rule's figure per scope over its window, and the
state machine of its alerts (Prometheus' alerting semantics).

Per ``(rule, scope_value)`` at most one open alert (pending or firing):

- the condition holds and no alert is open: a ``pending`` alert (``pending_since``); it goes
  ``firing`` (``fired_at``) at the first evaluation where it has held for ``for_s`` (at once
  when ``for_s`` is 0), and is notified then;
- a pending alert whose condition stops holding is ``resolved`` without a notification (it never
  fired; its history says so);
- a firing alert stays firing while the condition holds and until it has not held for
  ``keep_firing_for_s`` (``last_held_at``), then it is ``resolved`` and notified so; held again
  within that time, it simply goes on firing (no flapping);
- while firing it is notified again whenever ``repeat_interval_s`` has passed since its last
  notification.

A figure is computed from the first and last merged snapshot of the rule's window; with fewer
than two there, the rule decides nothing this time (its alerts stay as they are). A scope
that has no figure (nothing observed) does not hold. A silence matching the alert when it
would be notified holds the notification back: the state still changes, ``silenced`` is set and
the history names the silence; a firing alert never notified is notified at the first
evaluation after its silence ends, and an alert whose firing nobody heard of resolves quietly.

One evaluator at a time: a short Redis lock (in memory without Redis, where one process runs
everything); an evaluation that finds it taken does nothing. Each alert's change and its
notification commit together, the open alert's row locked (``select_for_update``). Accepted
race: an evaluation that outlasts its lock (``LOCK_TTL_S``) may overlap the next one; both then
serialize on each open alert's row, and the notifications' idempotency keys keep a notice from
being sent twice, but two could each open a pending alert for a scope that had none (the next
evaluations advance both; nothing is lost).
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import transaction
from django.db.models import Max

from ..metrics import snapshot
from ..metrics.figures import Merged, merge
from . import notices
from .figures import UnsupportedScope, scoped
from .models import Alert, AlertRule

log = logging.getLogger(__name__)
State = Alert.State
OPEN = (State.PENDING, State.FIRING)
COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
# An evaluation takes well under a second; a crashed evaluator's lock frees itself this soon.
LOCK_TTL_S = 30
_memory_lock = threading.Lock()


@dataclass(frozen=True)
class Change:
    """One alert's state change (or reminder) made by an evaluation."""

    rule: str
    scope: str
    from_state: str | None
    to_state: str
    value: float | None
    notified: bool
    silenced_by: str | None = None


def evaluate(now: float | None = None) -> list[Change]:
    """Evaluate every enabled rule at ``now`` (epoch seconds; default: the clock) over the
    merged snapshot history; return the changes, in rule order. Returns [] when another
    evaluator holds the lock or Redis is unreachable (logged). A rule that fails is logged and
    skipped; the others are evaluated."""
    now = time.time() if now is None else now
    with _evaluator_lock() as held:
        if not held:
            return []
        longest = AlertRule.objects.filter(enabled=True).aggregate(s=Max("window_s"))["s"]
        if longest is None:
            return []  # no rule enabled
        try:
            # Merging is per snapshot: only as much history as the longest window needs.
            merged = merge(snapshot.history(longest + 2 * settings.METRICS_SNAPSHOT_S))
        except Exception as exc:  # noqa: BLE001  (Redis away: nothing to compare this time)
            log.warning("alert rules not evaluated: snapshots unavailable: %s", exc)
            return []
        return evaluate_merged(merged, now)


def evaluate_merged(merged: list[Merged], now: float) -> list[Change]:
    """``evaluate`` over ``merged`` (oldest first), without the lock."""
    changes: list[Change] = []
    for rule in AlertRule.objects.filter(enabled=True).select_related("route"):
        try:
            changes += evaluate_rule(rule, merged, now)
        except UnsupportedScope as exc:
            log.warning("alert rule %s skipped: %s", rule.name, exc)
        except Exception:  # noqa: BLE001  (one bad rule must not stop the others)
            log.exception("alert rule %s failed", rule.name)
    return changes


def in_window(merged: list[Merged], window_s: float, now: float) -> list[Merged]:
    """The merged snapshots of the last ``window_s`` before ``now``. A merged snapshot's time is
    its interval's (snapshot times rounded to ``METRICS_SNAPSHOT_S``), so half an interval of
    slack on each side."""
    slack = settings.METRICS_SNAPSHOT_S / 2
    return [m for m in merged if now - window_s - slack <= m.at <= now + slack]


def evaluate_rule(rule: AlertRule, merged: list[Merged], now: float) -> list[Change]:
    """Evaluate one rule at ``now``; return its alerts' changes."""
    window = in_window(merged, rule.window_s, now)
    if len(window) < 2:
        return []  # no decision
    figures = scoped(rule, window[0], window[-1])
    open_alerts = {a.scope_value: a for a in Alert.objects.filter(rule=rule, state__in=OPEN)}
    changes = []
    for scope in sorted(set(figures) | set(open_alerts)):
        value = figures.get(scope)
        holds = value is not None and COMPARE[rule.comparator](value, rule.threshold)
        with transaction.atomic():
            changes += _step(rule, scope, value, holds, now)
    return changes


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _step(rule: AlertRule, scope: str, value: float | None, holds: bool, now: float) -> list:
    alert = (
        Alert.objects.select_for_update()
        .filter(rule=rule, scope_value=scope, state__in=OPEN)
        .order_by("pk")
        .first()
    )
    at = _at(now)
    if alert is None:
        if not holds:
            return []
        alert = Alert(rule=rule, scope_value=scope, state=State.PENDING, pending_since=at)
        alert.value, alert.last_held_at = value, at
        alert.history = [_entry(at, None, State.PENDING, value)]
        alert.save()
        changes = [Change(rule.name, scope, None, State.PENDING, value, False)]
        return changes + _advance(alert, holds, value, now)
    alert.rule = rule
    alert.value = value
    if holds:
        alert.last_held_at = at
    changes = _advance(alert, holds, value, now)
    alert.save()
    return changes


def _advance(alert: Alert, holds: bool, value: float | None, now: float) -> list[Change]:
    rule, at = alert.rule, _at(now)
    if alert.state == State.PENDING:
        if holds and (at - alert.pending_since).total_seconds() >= rule.for_s:
            alert.fired_at = at
            return [_change(alert, State.FIRING, value, at, notices.FIRING)]
        if not holds:
            return [_resolve_quietly(alert, value, at, "never fired")]
        return []
    # firing
    quiet_s = (at - (alert.last_held_at or alert.fired_at or at)).total_seconds()
    if not holds and quiet_s >= rule.keep_firing_for_s:
        if alert.last_notified_at is None:  # nobody heard it fire: nothing to take back
            return [_resolve_quietly(alert, value, at, "never notified")]
        alert.resolved_at = at
        return [_change(alert, State.RESOLVED, value, at, notices.RESOLVED)]
    due = alert.last_notified_at is None or (
        (at - alert.last_notified_at).total_seconds() >= rule.repeat_interval_s
    )
    if due:
        return _remind(alert, value, at)
    return []


def _entry(at: datetime, from_state, to_state, value) -> dict:
    return {"at": at.isoformat(), "from": from_state, "to": to_state, "value": value}


def _move(alert: Alert, to_state: str, value, at: datetime) -> dict:
    entry = _entry(at, alert.state, to_state, value)
    alert.history = [*alert.history, entry]
    alert.state = to_state
    return entry


def _notify(alert: Alert, event: str, at: datetime, *, repeat: bool = False) -> str | None:
    """Send ``event`` unless a silence holds it; return the silence's description, or None."""
    silence = notices.silence_for(alert, at)
    if silence is not None:
        alert.silenced = True
        return str(silence)
    previous = alert.last_notified_at
    occasion = f"repeat-{previous.timestamp():.0f}" if repeat and previous else event
    alert.last_notified_at = at
    notices.send(alert, event, occasion=occasion, repeat=repeat)
    return None


def _change(alert: Alert, to_state: str, value, at: datetime, event: str) -> Change:
    from_state = alert.state
    entry = _move(alert, to_state, value, at)
    silenced_by = _notify(alert, event, at)
    if silenced_by:
        entry["note"] = f"silenced by {silenced_by}"
    alert.save()
    notified = silenced_by is None
    return Change(
        alert.rule.name, alert.scope_value, from_state, to_state, value, notified, silenced_by
    )


def _resolve_quietly(alert: Alert, value, at: datetime, note: str) -> Change:
    from_state = alert.state
    alert.resolved_at = at
    _move(alert, State.RESOLVED, value, at)["note"] = note
    alert.save()
    return Change(alert.rule.name, alert.scope_value, from_state, State.RESOLVED, value, False)


def _remind(alert: Alert, value, at: datetime) -> list[Change]:
    """A firing alert due for a notice: its first (held back by a silence until now) or a
    reminder."""
    repeat = alert.last_notified_at is not None
    silenced_by = _notify(alert, notices.FIRING, at, repeat=repeat)
    if silenced_by:
        alert.save()
        return []  # still held back: not a change
    entry = _entry(at, State.FIRING, State.FIRING, value)
    entry["note"] = "notified again" if repeat else "notified after its silence"
    alert.history = [*alert.history, entry]
    alert.save()
    return [
        Change(alert.rule.name, alert.scope_value, State.FIRING, State.FIRING, value, True, None)
    ]


@contextmanager
def _evaluator_lock() -> Iterator[bool]:
    """True inside when this process may evaluate now (it holds the lock until the end)."""
    if not settings.REDIS_URL:
        if not _memory_lock.acquire(blocking=False):
            yield False
            return
        try:
            yield True
        finally:
            _memory_lock.release()
        return
    import redis

    from ..pubsub import sync_redis

    lock = sync_redis().lock(
        f"{settings.REDIS_PREFIX}:alerts:evaluator", timeout=LOCK_TTL_S, blocking=False
    )
    try:
        held = lock.acquire()
    except redis.RedisError as exc:
        log.warning("alert rules not evaluated: Redis unavailable: %s", exc)
        held = False
    else:
        if not held:
            log.info("alert rules: another evaluator is running; skipped")
    try:
        yield held
    finally:
        if held:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("an alert evaluation outlasted its %d s lock", LOCK_TTL_S)
            except redis.RedisError as exc:
                log.warning("alert evaluator lock not released (it expires): %s", exc)
