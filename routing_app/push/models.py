"""One browser's Web Push subscription (https://www.w3.org/TR/push-api/#pushsubscription-interface)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

# A delivery's recipient is the endpoint: the same limit as Delivery.recipient.
ENDPOINT_MAX_LENGTH = 500


class PushSubscription(models.Model):
    """Where one browser of ``user`` receives pushes: the push service's ``endpoint`` URL and the
    browser's keys the payload is encrypted to (RFC 8291). A push channel's routed user gets
    one delivery per subscription. Removed when the push service answers 404/410 (gone)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="push_subscriptions"
    )
    endpoint = models.CharField(max_length=ENDPOINT_MAX_LENGTH, unique=True)
    p256dh = models.CharField(
        "p256dh key", max_length=100, help_text="base64url, the browser's P-256 public key"
    )
    auth = models.CharField("auth secret", max_length=40, help_text="base64url, 16 bytes")
    user_agent = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_success_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.CharField(max_length=300, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"push subscription of {self.user} at {self.endpoint[:60]}"

    def info(self) -> dict:
        """The subscription as pywebpush (and ``PushSubscription.toJSON()``) spells it."""
        return {"endpoint": self.endpoint, "keys": {"p256dh": self.p256dh, "auth": self.auth}}
