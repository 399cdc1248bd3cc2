"""Alert rules, their alerts and silences. Imported by ``routing_app.models``.

A rule compares a figure (``Metric``: the seed report's five and any recorded metric by name)
over a sliding ``window_s`` with a threshold, per scope (everything, or each channel, provider or
transport). Held for ``for_s`` it fires (pending -> firing); it resolves once it has not held for
``keep_firing_for_s`` (no flapping). A firing alert is notified once, then again only every
``repeat_interval_s``. A silence matching an alert keeps it from being notified, not from being
recorded.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone


class AlertRule(models.Model):
    class Metric(models.TextChoices):
        LATENCY_P95 = "latency_p95_s", "delivery latency p95 (s)"
        LATENCY_P99 = "latency_p99_s", "delivery latency p99 (s)"
        ERROR_RATE = "error_rate", "delivery error rate (0..1)"
        CONNECTION_DROP = "connection_drop_rate", "connection drop rate (0..1)"
        MEMORY = "memory_bytes", "process memory (bytes, per role)"
        QUEUE_DEPTH = "queue_depth", "queue depth (messages)"
        RECORDED = "recorded", "a recorded metric (by name)"

    class Scope(models.TextChoices):
        ALL = "all", "everything together"
        CHANNEL = "channel", "each channel"
        PROVIDER = "provider", "each provider"
        TRANSPORT = "transport", "each transport"
        ROLE = "role", "each process role"

    class Comparator(models.TextChoices):
        GT = ">", "above"
        GE = ">=", "at or above"
        LT = "<", "below"
        LE = "<=", "at or below"

    name = models.SlugField(
        max_length=80, unique=True, help_text="Also the topic: system.alerts.<name>."
    )
    description = models.CharField(max_length=300, blank=True)
    enabled = models.BooleanField(default=True)
    metric = models.CharField(max_length=30, choices=Metric.choices)
    metric_name = models.CharField(
        max_length=120,
        blank=True,
        help_text="For 'a recorded metric': its name, e.g. notify_connections_active "
        "(counters compare their rate per second over the window).",
    )
    scope = models.CharField(max_length=10, choices=Scope.choices, default=Scope.ALL)
    scope_value = models.CharField(
        max_length=200, blank=True, help_text="Only this channel/provider/transport; empty = each."
    )
    comparator = models.CharField(max_length=2, choices=Comparator.choices, default=Comparator.GT)
    threshold = models.FloatField()
    window_s = models.PositiveIntegerField(
        "window (s)", default=60, validators=[MinValueValidator(5)]
    )
    for_s = models.PositiveIntegerField(
        "for (s)", default=60, help_text="How long the condition must hold before it fires."
    )
    keep_firing_for_s = models.PositiveIntegerField(
        "keep firing for (s)",
        default=60,
        help_text="How long it stays firing after the condition stops holding (no flapping).",
    )
    severity = models.CharField(max_length=10, default="warning")
    repeat_interval_s = models.PositiveIntegerField(
        "repeat interval (s)",
        default=3600,
        validators=[MinValueValidator(60)],
        help_text="A firing alert is notified again after this long.",
    )
    route = models.ForeignKey(
        "routing_app.Route",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Also deliver through this route (its channels and recipients), whatever its "
        "topic pattern; routes matching system.alerts.# deliver it anyway.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        from ..models import SEVERITIES
        from ..topics import is_valid_topic
        from .figures import SCOPES

        if self.metric == self.Metric.RECORDED and not self.metric_name.startswith("notify_"):
            raise ValidationError(
                {"metric_name": "name a recorded metric, e.g. notify_connections_active"}
            )
        if self.severity not in SEVERITIES:
            raise ValidationError({"severity": f"one of: {', '.join(SEVERITIES)}"})
        if self.name and not is_valid_topic(f"system.alerts.{self.name}"):
            raise ValidationError({"name": "lowercase letters, digits, '-' and '_' (a topic)"})
        if self.metric in SCOPES and self.scope not in SCOPES[self.metric]:
            raise ValidationError(
                {
                    "scope": f"{self.get_metric_display()} has no figure per {self.scope}; use "
                    + ", ".join(SCOPES[self.metric])
                }
            )


class Alert(models.Model):
    """One rule's condition for one scope, from pending to resolved."""

    class State(models.TextChoices):
        PENDING = "pending"  # holds, not yet for ``for_s``
        FIRING = "firing"
        RESOLVED = "resolved"

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    scope_value = models.CharField(max_length=200, blank=True, help_text="'' = everything")
    state = models.CharField(max_length=10, choices=State.choices, db_index=True)
    value = models.FloatField(null=True, help_text="the figure at the last evaluation")
    pending_since = models.DateTimeField(default=timezone.now)
    fired_at = models.DateTimeField(null=True, blank=True)
    last_held_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    last_notified_at = models.DateTimeField(null=True, blank=True)
    silenced = models.BooleanField(default=False, help_text="a silence held its notification")
    history = models.JSONField(default=list, blank=True, help_text="state changes, oldest first")

    class Meta:
        ordering = ["-pending_since"]
        indexes = [models.Index(fields=["rule", "scope_value", "state"], name="alert_open")]

    def __str__(self) -> str:
        scope = f" [{self.scope_value}]" if self.scope_value else ""
        return f"{self.rule.name}{scope}: {self.state}"


class Silence(models.Model):
    """Keeps matching alerts from being notified between ``starts_at`` and ``ends_at``."""

    rule = models.ForeignKey(
        AlertRule,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="silences",
        help_text="empty = every rule",
    )
    scope_value = models.CharField(max_length=200, blank=True, help_text="empty = every scope")
    starts_at = models.DateTimeField(default=timezone.now)
    ends_at = models.DateTimeField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    comment = models.CharField(max_length=300, help_text="why (shown with the alert)")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-starts_at"]

    def __str__(self) -> str:
        return f"silence of {self.rule or 'every rule'} until {self.ends_at:%Y-%m-%d %H:%M}"

    def clean(self) -> None:
        if self.ends_at and self.starts_at and self.ends_at <= self.starts_at:
            raise ValidationError({"ends_at": "a silence ends after it starts"})

    def matches(self, alert: Alert, at=None) -> bool:
        at = at or timezone.now()
        return (
            self.starts_at <= at < self.ends_at
            and (self.rule_id is None or self.rule_id == alert.rule_id)
            and (not self.scope_value or self.scope_value == alert.scope_value)
        )
