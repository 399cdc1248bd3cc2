"""What operators hear of an alert: notifications on topic ``system.alerts.<rule>`` through the
router (source ``system``), so they reach the sockets of whoever may read ``system.#`` (staff,
by the default topic rules), any route matching the topic, and the rule's own route.

Events (the ``data`` of each; ``Notification.envelope`` wraps it):

- ``alert.firing`` (severity: the rule's): ``{"rule", "scope", "value", "threshold",
  "comparator", "description", "since", "repeat"}``; ``since`` is when the alert started to
  fire (ISO 8601), ``repeat`` is false the first time, true for a reminder after
  ``repeat_interval_s``;
- ``alert.resolved`` (severity ``info``): the same keys, ``resolved_at`` added, no ``repeat``.

Each is ingested in the transaction that changes the alert (both commit or neither), with an
idempotency key naming the alert and the occasion: a second evaluator racing on the same alert
gets the first one's notification back instead of sending another.
"""

from __future__ import annotations

from datetime import datetime

from ..ingest import KEEP_FIRST, NotificationIn, ingest
from .models import Alert, AlertRule, Silence

FIRING = "alert.firing"
RESOLVED = "alert.resolved"


def topic_of(rule: AlertRule) -> str:
    return f"system.alerts.{rule.name}"


def silence_for(alert: Alert, at: datetime) -> Silence | None:
    """The first silence matching ``alert`` at ``at``, or None."""
    candidates = Silence.objects.filter(starts_at__lte=at, ends_at__gt=at).select_related("rule")
    return next((s for s in candidates if s.matches(alert, at)), None)


def _data(alert: Alert) -> dict:
    rule = alert.rule
    return {
        "rule": rule.name,
        "scope": alert.scope_value,
        "value": alert.value,
        "threshold": rule.threshold,
        "comparator": rule.comparator,
        "description": rule.description,
        "since": alert.fired_at.isoformat() if alert.fired_at else None,
    }


def send(alert: Alert, event: str, *, occasion: str, repeat: bool = False) -> None:
    """Ingest the ``event`` notification of ``alert`` (inside the caller's transaction: it is
    published and delivered once that commits); ``occasion`` tells this notice of the alert from
    its others (its idempotency key). Raises what ingest raises."""
    rule = alert.rule
    data = _data(alert)
    if event == FIRING:
        data["repeat"] = repeat
        severity = rule.severity
    else:
        data["resolved_at"] = alert.resolved_at.isoformat() if alert.resolved_at else None
        severity = "info"
    ingest(
        [
            NotificationIn(
                topic=topic_of(rule),
                event=event,
                source="system",
                severity=severity,
                data=data,
                idempotency_key=f"alert-{alert.pk}-{occasion}",
                also_routes=[rule.route.name] if rule.route_id else [],
            )
        ],
        on_conflict=KEEP_FIRST,
    )
