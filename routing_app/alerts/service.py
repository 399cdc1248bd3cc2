"""The alerts as the operator dashboard and admin read them, and silences as operators make
them. Thin over the models; every function is safe to call on any request.

- ``firing()``, ``pending()``: the open alerts (rule joined), newest first;
- ``recent_resolved(limit)``: the latest alerts that fired and resolved;
- ``active_silences(at)``: silences in force now;
- ``silence(rule, scope, until, user, comment)``: make one; ``end_silence(silence)``: end it now;
- ``counts()``: per rule, its pending, firing and recently resolved alerts (``notify_alerts``);
- ``overview(limit)``: all of the above in one dict, for the alerts page.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from .models import Alert, AlertRule, Silence

State = Alert.State
RESOLVED_RECENT = timedelta(hours=1)  # "recently resolved" in counts() and notify_alerts


def firing() -> QuerySet[Alert]:
    return Alert.objects.filter(state=State.FIRING).select_related("rule").order_by("-fired_at")


def pending() -> QuerySet[Alert]:
    return (
        Alert.objects.filter(state=State.PENDING).select_related("rule").order_by("-pending_since")
    )


def recent_resolved(limit: int = 20) -> list[Alert]:
    """The ``limit`` latest resolved alerts that had fired (a pending one that stopped holding
    never fired and is not listed), newest first."""
    query = Alert.objects.filter(state=State.RESOLVED, fired_at__isnull=False)
    return list(query.select_related("rule").order_by("-resolved_at")[:limit])


def active_silences(at: datetime | None = None) -> QuerySet[Silence]:
    at = at or timezone.now()
    return (
        Silence.objects.filter(starts_at__lte=at, ends_at__gt=at)
        .select_related("rule", "created_by")
        .order_by("ends_at")
    )


def silence(
    rule: AlertRule | str | None,
    scope: str,
    until: datetime,
    user,
    comment: str,
    starts_at: datetime | None = None,
) -> Silence:
    """Silence ``rule`` (a rule, its name, or None for every rule) for ``scope`` ('' = every
    scope) from ``starts_at`` (default now) until ``until``. Raises AlertRule.DoesNotExist for an
    unknown name and ValidationError when ``until`` is not after the start or there is no
    comment."""
    if isinstance(rule, str):
        rule = AlertRule.objects.get(name=rule)
    row = Silence(
        rule=rule,
        scope_value=scope or "",
        starts_at=starts_at or timezone.now(),
        ends_at=until,
        created_by=user if user is not None and user.is_authenticated else None,
        comment=comment,
    )
    row.full_clean(exclude=["created_by"])  # None: made by the system, not a person
    row.save()
    return row


def end_silence(row: Silence, at: datetime | None = None) -> Silence:
    """End ``row`` now (or at ``at``): alerts it held back are notified at the next evaluation."""
    at = at or timezone.now()
    if row.ends_at > at:
        row.ends_at = max(at, row.starts_at + timedelta(microseconds=1))
        row.save(update_fields=["ends_at"])
    return row


def counts(at: datetime | None = None) -> dict[str, dict[str, int]]:
    """``{rule name: {"pending": n, "firing": n, "resolved": n}}`` for every rule, ``resolved``
    counting the alerts that fired and were resolved in the last hour (as ``recent_resolved``,
    not the pending ones that stopped holding)."""
    since = (at or timezone.now()) - RESOLVED_RECENT
    rows = AlertRule.objects.annotate(
        n_pending=Count("alerts", filter=Q(alerts__state=State.PENDING)),
        n_firing=Count("alerts", filter=Q(alerts__state=State.FIRING)),
        n_resolved=Count(
            "alerts",
            filter=Q(
                alerts__state=State.RESOLVED,
                alerts__resolved_at__gte=since,
                alerts__fired_at__isnull=False,
            ),
        ),
    ).values_list("name", "n_pending", "n_firing", "n_resolved")
    return {
        name: {"pending": p, "firing": f, "resolved": r} for name, p, f, r in rows.order_by("name")
    }


def overview(limit: int = 20) -> dict:
    """``{"firing": [Alert], "pending": [Alert], "resolved": [Alert], "silences": [Silence],
    "counts": counts()}``: the alerts page's data (``resolved``: the ``limit`` latest)."""
    return {
        "firing": list(firing()),
        "pending": list(pending()),
        "resolved": recent_resolved(limit),
        "silences": list(active_silences()),
        "counts": counts(),
    }
