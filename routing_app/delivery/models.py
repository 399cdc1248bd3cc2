"""Deliveries, their attempts, and the mirror of each provider's circuit breaker.

Imported by ``routing_app.models`` (Django's home of the app's models), so these are
``routing_app`` models like the rest.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class Delivery(models.Model):
    """One notification to one recipient over one channel (email/SMS/webhook).

    The row, not the broker, is the truth: a task only carries ids, claims the row with a
    conditional update and records every provider call as an ``Attempt``.
    """

    class Status(models.TextChoices):
        PENDING = "pending"  # waiting for its first try (or its task)
        SENDING = "sending"  # claimed by a worker, a provider call in flight
        SENT = "sent"  # a provider accepted it
        DELIVERED = "delivered"  # a receipt said it arrived
        FAILED = "failed"  # a transient failure; the next try is at next_attempt_at
        DEAD = "dead"  # permanent failure or tries exhausted; waits for a replay

    DUE_STATUSES = (Status.PENDING, Status.FAILED)
    FINAL_STATUSES = (Status.SENT, Status.DELIVERED, Status.DEAD)

    notification = models.ForeignKey(
        "routing_app.Notification", on_delete=models.CASCADE, related_name="deliveries"
    )
    channel = models.ForeignKey(
        "routing_app.Channel", on_delete=models.CASCADE, related_name="deliveries"
    )
    recipient = models.CharField(max_length=500)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    status = models.CharField(
        max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    attempts = models.PositiveIntegerField(
        default=0, help_text="Tries so far; each try may call several providers (failover)."
    )
    provider = models.ForeignKey(
        "routing_app.Provider", null=True, blank=True, on_delete=models.SET_NULL
    )
    provider_message_id = models.CharField(max_length=200, blank=True, db_index=True)
    failover_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="failovers"
    )
    last_error = models.TextField(blank=True)
    latency_ms = models.PositiveIntegerField(
        null=True, blank=True, help_text="From ingest to the provider accepting it."
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["notification", "channel", "recipient"],
                name="delivery_notification_channel_recipient",
            )
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="delivery_due")]

    def __str__(self) -> str:
        return f"{self.notification_id} -> {self.channel.name}:{self.recipient} [{self.status}]"


class Attempt(models.Model):
    """One call (or one refusal to call) of one provider for one delivery.

    Written before the call goes out (outcome ``started``), completed after it: a worker that
    dies mid-call leaves a ``started`` row that the sweeper closes as ``timeout``.
    """

    class Outcome(models.TextChoices):
        STARTED = "started"
        SENT = "sent"
        TRANSIENT = "transient"
        PERMANENT = "permanent"
        TIMEOUT = "timeout"
        BREAKER_OPEN = "breaker-open"
        RATE_LIMITED = "rate-limited"

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_rows")
    number = models.PositiveIntegerField(help_text="1, 2, ... per delivery, one per call.")
    provider = models.ForeignKey(
        "routing_app.Provider", null=True, blank=True, on_delete=models.SET_NULL
    )
    started_at = models.DateTimeField(default=timezone.now)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=12, choices=Outcome.choices, default=Outcome.STARTED)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="attempt_delivery_number")
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of delivery {self.delivery_id}: {self.outcome}"


class BreakerState(models.Model):
    """The mirror of one provider's circuit breaker (the live state is in Redis, or in memory
    in the embedded mode): what admin shows, refreshed on every transition and by the health
    check."""

    class State(models.TextChoices):
        CLOSED = "closed"
        OPEN = "open"
        HALF_OPEN = "half_open", "half-open"
        FORCED_OPEN = "forced_open", "forced open"
        DISABLED = "disabled"

    provider = models.OneToOneField(
        "routing_app.Provider", on_delete=models.CASCADE, related_name="breaker"
    )
    state = models.CharField(max_length=12, choices=State.choices, default=State.CLOSED)
    failure_rate = models.FloatField(default=0.0, help_text="% of calls in the window")
    slow_rate = models.FloatField(default=0.0, help_text="% of calls in the window")
    calls = models.PositiveIntegerField(default=0, help_text="calls in the window")
    failures = models.PositiveIntegerField(default=0)
    slow_calls = models.PositiveIntegerField(default=0)
    opened_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)
    transitions = models.JSONField(
        default=list, blank=True, help_text="The latest transitions, newest first."
    )

    class Meta:
        verbose_name = "circuit breaker"

    def __str__(self) -> str:
        return f"breaker of {self.provider}: {self.state}"
