"""Delivery receipts: what a provider says after it accepted a delivery.

- SMS: Twilio-style status callbacks (``POST /api/v1/providers/<id>/receipts``, form fields
  ``MessageSid`` and ``MessageStatus``, signed with ``X-Twilio-Signature`` with the provider's
  secret: https://www.twilio.com/docs/usage/webhooks/webhooks-security);
- email: django-anymail's tracking webhooks (``/anymail/<esp>/tracking/``), through its
  ``tracking`` signal.

``delivered`` marks the delivery delivered. ``undelivered`` / ``failed`` / ``bounced`` /
``rejected`` mark it dead (the provider will not try again) and fail it over to its channel's
backup channel, if any.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from anymail.signals import tracking
from django.db import transaction
from django.dispatch import receiver
from django.utils import timezone

from ..models import Delivery, Provider
from . import service
from .transports import DeliveryError, provider_secret

log = logging.getLogger(__name__)
Status = Delivery.Status
DELIVERED = {"delivered"}
FAILED = {"undelivered", "failed", "bounced", "rejected"}


@dataclass(frozen=True)
class Answer:
    status: int
    detail: str = ""


def apply(provider_id: int | None, message_id: str, status: str, detail: str = "") -> bool:
    """Apply one receipt to the delivery the provider knows as ``message_id``; False when there is
    none (an unknown or foreign message id)."""
    rows = Delivery.objects.filter(provider_message_id=message_id)
    if provider_id is not None:
        rows = rows.filter(provider_id=provider_id)
    with transaction.atomic():
        row = rows.select_for_update().select_related("channel").first()
        if row is None:
            return False
        if status in DELIVERED and row.status in (Status.SENT, Status.SENDING):
            rows.filter(pk=row.pk).update(status=Status.DELIVERED, updated_at=timezone.now())
        elif status in FAILED and row.status in (Status.SENT, Status.DELIVERED):
            error = f"receipt: {status}{f' ({detail})' if detail else ''}"
            rows.filter(pk=row.pk).update(
                status=Status.DEAD, last_error=error, updated_at=timezone.now()
            )
            service.fail_over(row, reason=error)
    return True


def twilio_status(provider_id: int, url: str, params: dict[str, str], signature: str) -> Answer:
    """Check and apply a Twilio status callback for provider ``provider_id``."""
    from .transports.sms import verify_twilio_signature

    provider = Provider.objects.filter(pk=provider_id, channel__kind="sms").first()
    if provider is None:
        return Answer(404, f"no SMS provider {provider_id}")
    try:
        secret = provider_secret(provider)
    except DeliveryError as exc:
        log.warning("receipt for provider %s refused: %s", provider, exc)
        return Answer(403, "this provider has no secret to check the signature with")
    if not secret or not verify_twilio_signature(url, params, signature, secret):
        return Answer(403, "the X-Twilio-Signature header does not match this request")
    sid, status = params.get("MessageSid", ""), params.get("MessageStatus", "")
    if not sid or not status:
        return Answer(400, "send the form fields MessageSid and MessageStatus")
    detail = params.get("ErrorCode", "")
    if not apply(provider.pk, sid, status.lower(), detail):
        return Answer(404, f"no delivery with message id {sid} on this provider")
    return Answer(204)


@receiver(tracking, dispatch_uid="notify-anymail-tracking")
def _on_anymail_tracking(sender, event, esp_name, **kwargs) -> None:
    """Connected when routing_app is ready (apps.py imports this module)."""
    status = {"delivered": "delivered", "bounced": "bounced", "rejected": "rejected"}.get(
        event.event_type
    )
    if status and event.message_id:
        apply(None, event.message_id, status, event.description or "")
