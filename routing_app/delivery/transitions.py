"""What happens when a provider's breaker changes state: a log line, the ``BreakerState`` mirror
that admin shows, and a notification on topic ``system.breakers`` through the router, so
operators see it live on their sockets (event ``breaker.opened`` / ``breaker.half_open`` /
``breaker.closed`` / ``breaker.forced_open`` / ``breaker.disabled``)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from django.utils import timezone

from .breaker import Snapshot, State, Transition
from .models import BreakerState

log = logging.getLogger(__name__)

TOPIC = "system.breakers"
EVENTS = {
    State.OPEN: ("breaker.opened", "error"),
    State.HALF_OPEN: ("breaker.half_open", "warning"),
    State.CLOSED: ("breaker.closed", "info"),
    State.FORCED_OPEN: ("breaker.forced_open", "warning"),
    State.DISABLED: ("breaker.disabled", "warning"),
}
TRANSITIONS_KEPT = 20


def _at(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch else None


def mirror(provider, snapshot: Snapshot, transition: Transition | None = None) -> None:
    """Write ``snapshot`` to the provider's ``BreakerState`` row (and ``transition`` first in its
    list of the latest transitions)."""
    row, _ = BreakerState.objects.get_or_create(provider=provider)
    row.state = snapshot.state
    row.failure_rate = snapshot.failure_rate
    row.slow_rate = snapshot.slow_rate
    row.calls = snapshot.calls
    row.failures = snapshot.failures
    row.slow_calls = snapshot.slow_calls
    row.opened_at = _at(snapshot.opened_at)
    row.updated_at = timezone.now()
    if transition is not None:
        entry = {
            "from": str(transition.from_state),
            "to": str(transition.to_state),
            "at": _at(transition.at).isoformat(),
            "reason": transition.reason,
        }
        row.transitions = [entry, *row.transitions][:TRANSITIONS_KEPT]
    row.save()


def on_transition(transition: Transition, provider, channel) -> None:
    """Log, mirror and publish one transition. Never raises: the delivery that caused it goes on
    (a failed publish or mirror is logged; the breaker's own state is already changed)."""
    log.warning(
        "breaker of provider %s (channel %s): %s -> %s: %s",
        provider.name,
        channel.name,
        transition.from_state,
        transition.to_state,
        transition.reason,
    )
    try:
        mirror(provider, transition.snapshot, transition)
    except Exception:  # noqa: BLE001
        log.warning("could not mirror the breaker state of %s", provider.name, exc_info=True)
    event, severity = EVENTS[transition.to_state]
    from ..ingest import NotificationIn, ingest

    snap = transition.snapshot
    try:
        ingest(
            [
                NotificationIn(
                    topic=TOPIC,
                    event=event,
                    source="system",
                    severity=severity,
                    data={
                        "provider": provider.name,
                        "provider_id": provider.pk,
                        "channel": channel.name,
                        "from": str(transition.from_state),
                        "to": str(transition.to_state),
                        "reason": transition.reason,
                        "failure_rate": snap.failure_rate,
                        "slow_rate": snap.slow_rate,
                        "calls": snap.calls,
                    },
                )
            ]
        )
    except Exception:  # noqa: BLE001
        log.warning("could not publish the breaker transition of %s", provider.name, exc_info=True)


def control(provider, action: str) -> Snapshot:
    """An operator's action on ``provider``'s breaker: ``reset`` (closed, window cleared),
    ``open`` (forced open until a reset) or ``disable`` (always permits, records nothing).
    The transition is logged, mirrored and published like any other; returns the new state."""
    from .breaker import BreakerConfig, breakers_from_settings

    breakers = breakers_from_settings()
    operation = {"reset": breakers.reset, "open": breakers.force_open, "disable": breakers.disable}
    if action not in operation:
        raise ValueError(f"unknown breaker action {action!r}: use reset, open or disable")
    transition = operation[action](provider.pk)
    config = BreakerConfig.for_channel(provider.channel)
    if transition is not None:
        on_transition(transition, provider, provider.channel)
    snapshot = breakers.snapshot(provider.pk, config)
    if transition is None:
        mirror(provider, snapshot)
    return snapshot
