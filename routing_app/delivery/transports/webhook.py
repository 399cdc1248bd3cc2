"""Webhooks: one signed JSON POST per delivery, per the Standard Webhooks specification.

https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md

The body is ``{"delivery_id": <id>, "notification": <envelope>}`` (compact JSON, UTF-8). Headers:
``webhook-id`` (the delivery's id: the same on every retry, so a receiver can drop duplicates),
``webhook-timestamp`` (Unix seconds), ``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` with the
provider's ``whsec_...`` secret; left out when the provider names no secret), plus the channel
option ``headers``, which cannot replace the ones above. Receivers verify with
``standardwebhooks.Webhook(secret).verify(body, headers)``.
"""

from __future__ import annotations

import binascii
import json
import time
from datetime import UTC, datetime

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from .. import http
from . import DeliveryError, Receipt, provider_secret


def body(delivery) -> str:
    """The JSON text POSTed for ``delivery`` (compact; non-ASCII characters as they are)."""
    payload = {"delivery_id": delivery.pk, "notification": delivery.notification.envelope()}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def signed_headers(delivery, provider, payload: str, now_s: int | None = None) -> dict[str, str]:
    """The headers of one POST: the channel's extra ones, then ours (see the module docstring).
    Raises a permanent ``DeliveryError`` when the secret is not a ``whsec_`` base64 value."""
    msg_id = str(delivery.pk)
    timestamp = int(time.time()) if now_s is None else now_s
    extra = (delivery.channel.options or {}).get("headers") or {}
    headers = {str(name).lower(): str(value) for name, value in extra.items()}
    headers.update(
        {
            "content-type": "application/json",
            "user-agent": http.USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
    )
    secret = provider_secret(provider)
    if not secret:
        headers.pop("webhook-signature", None)
        return headers
    try:
        signer = Webhook(secret)
    except (binascii.Error, ValueError, EmptyWebhookSecretError) as exc:
        raise DeliveryError(
            f"the secret in {provider.credentials_env} (provider {provider.name!r}) is not a "
            "Standard Webhooks secret: use whsec_ followed by base64",
            permanent=True,
        ) from exc
    when = datetime.fromtimestamp(timestamp, UTC)
    headers["webhook-signature"] = signer.sign(msg_id, when, payload)
    return headers


class WebhookTransport:
    def send(self, delivery, provider, *, timeout_s: float) -> Receipt:
        """POST the delivery to ``provider.url``; a ``Receipt`` with the status on a 2xx,
        ``DeliveryError`` as ``http.raise_for_answer`` and ``http.call_errors`` say."""
        payload = body(delivery)
        headers = signed_headers(delivery, provider, payload)
        what = f"webhook {provider.name!r}"
        with http.call_errors(what):
            response = http.client().post(
                provider.url,
                content=payload.encode(),
                headers=headers,
                timeout=http.timeouts(timeout_s),
            )
        http.raise_for_answer(response, what)
        return Receipt(http_status=response.status_code)

    def check_health(self, provider, *, timeout_s: float) -> None:
        """GET the ``health_url`` option when set; never POSTs to the webhook itself."""
        http.check_health_url(provider, timeout_s=timeout_s)


transport = WebhookTransport()
