"""Web Push: one encrypted POST per delivery to the browser's push service.

https://www.rfc-editor.org/rfc/rfc8030 (Web Push), rfc8291 (message encryption, ``aes128gcm``
of rfc8188), rfc8292 (VAPID).

A push channel's recipient is a subscription's endpoint (a routed user gets one delivery per
subscription, routing_app/router.py); its provider's URL is ``webpush://``: the server's VAPID
identity (settings ``WEBPUSH_VAPID_*``), one breaker and rate limit for every push service.
pywebpush encrypts the payload to the subscription's keys; the request goes out through the
transports' pooled httpx client (``http.client()``), with the channel's call timeout like any
other provider call.

Headers: ``Authorization: vapid t=<JWT>, k=<public key>`` (routing_app/push/vapid.py),
``Content-Encoding: aes128gcm``, ``TTL`` (the channel option ``ttl``, else
``settings.WEBPUSH_TTL_S``) and ``Urgency`` from the notification's severity (``URGENCY``).

The payload is JSON ``{"title", "body", "url", "topic", "seq", "id", "event", "severity"}``:
title and body from ``templates/notify/push/<event>.title.txt`` and ``.body.txt`` (else
``default.*``; see ``rendering``), ``url`` the notification's ``data.url`` when it is an
http(s) URL or a path, else the channel option ``url``, else ``/``. The body is cut so that the
encrypted message fits the 4096 bytes every push service accepts.

Answers: 2xx sent; 404/410 the subscription is gone: permanent, and ``settled`` deletes it; 429
(with ``Retry-After``), 408 and 5xx transient; other 4xx permanent (``http.raise_for_answer``).
"""

from __future__ import annotations

import json
import logging

from django.conf import settings
from django.utils import timezone
from pywebpush import WebPusher, WebPushException

from ...push import vapid
from ...push.models import PushSubscription
from .. import http, rendering
from . import DeliveryError, Receipt

logger = logging.getLogger("routing_app.delivery.push")

# RFC 8030 section 5.3: high, normal, low, very-low. What a phone does with each: high wakes it
# at once, low and very-low may wait for it to be awake (on power, on Wi-Fi).
URGENCY = {
    "critical": "high",
    "error": "high",
    "warning": "normal",
    "info": "low",
    "debug": "very-low",
}
# RFC 8291 section 4: push services accept 4096 bytes of body at least; aes128gcm adds a
# 86-byte header (salt, record size, the sender's 65-byte key), a 16-byte tag and 1 padding
# delimiter byte.
PAYLOAD_MAX_BYTES = 4096 - 86 - 16 - 1
TITLE_MAX_CHARS = 120  # a longer rendered title is cut (notification banners show ~50)
ERROR_TEXT_MAX = 300  # PushSubscription.last_error


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: max_chars - 1] + "…" if max_chars > 0 else ""


def _click_url(delivery) -> str:
    url = (delivery.notification.data or {}).get("url")
    # A path of the app, or an absolute web URL; "//host" (another site) and other schemes
    # (javascript:) are not followed.
    if isinstance(url, str) and (
        url.startswith(("https://", "http://")) or (url.startswith("/") and url[1:2] != "/")
    ):
        return url
    return (delivery.channel.options or {}).get("url") or "/"


def _encoded(message: dict) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def payload(delivery) -> bytes:
    """The JSON the service worker receives (see the module docstring), UTF-8, at most
    ``PAYLOAD_MAX_BYTES``. Raises a permanent ``DeliveryError`` for a broken template."""
    n = delivery.notification
    context = rendering.template_context(delivery)
    title = rendering.render("push", n.event, ".title.txt", context, autoescape=False)
    body = rendering.render("push", n.event, ".body.txt", context, autoescape=False).strip()
    message = {
        "title": _cut(" ".join(title.split()), TITLE_MAX_CHARS),
        "body": body,
        "url": _click_url(delivery),
        "topic": context["topic"],
        "seq": n.seq,
        "id": str(n.id),
        "event": n.event,
        "severity": n.severity,
    }
    encoded = _encoded(message)
    if len(encoded) > PAYLOAD_MAX_BYTES:
        # The longest cut of the body that fits, by bisection over its length in characters
        # (JSON escapes and UTF-8 make bytes per character vary).
        full, low, high = message["body"], 0, len(message["body"]) - 1
        while low < high:
            middle = (low + high + 1) // 2
            message["body"] = _cut(full, middle)
            if len(_encoded(message)) <= PAYLOAD_MAX_BYTES:
                low = middle
            else:
                high = middle - 1
        message["body"] = _cut(full, low)
        encoded = _encoded(message)
    if len(encoded) > PAYLOAD_MAX_BYTES:
        raise DeliveryError(
            f"the push message of notification {n.id} is over {PAYLOAD_MAX_BYTES} bytes even "
            "without its body: shorten the title template or the url",
            permanent=True,
        )
    return encoded


def ttl_s(delivery) -> int:
    ttl = (delivery.channel.options or {}).get("ttl")
    return settings.WEBPUSH_TTL_S if ttl is None else max(0, int(ttl))


def request_of(delivery, subscription: PushSubscription) -> tuple[bytes, dict[str, str]]:
    """The encrypted body and the headers of the POST to ``subscription.endpoint``. Raises a
    permanent ``DeliveryError`` when VAPID is not configured or the keys are unusable."""
    try:
        auth = vapid.authorization(subscription.endpoint)
    except vapid.NotConfigured as exc:
        raise DeliveryError(str(exc), permanent=True) from None
    try:
        encrypted = WebPusher(subscription.info()).encode(payload(delivery), "aes128gcm")
    except (WebPushException, ValueError) as exc:
        raise DeliveryError(
            f"the keys of push subscription {subscription.pk} cannot encrypt: {exc}",
            permanent=True,
        ) from None
    headers = {
        **auth,
        "content-encoding": "aes128gcm",
        "content-type": "application/octet-stream",
        "ttl": str(ttl_s(delivery)),
        "urgency": URGENCY.get(delivery.notification.severity, "normal"),
    }
    return encrypted["body"], headers


class PushTransport:
    def prepare(self, deliveries) -> None:
        """Attach each delivery's subscription (``delivery.push_subscription``), in one query:
        None when it was removed since routing, or now belongs to another user (someone else
        logged in on that browser and subscribed it: their browser must not show this user's
        notifications)."""
        endpoints = {d.recipient for d in deliveries}
        found = PushSubscription.objects.in_bulk(endpoints, field_name="endpoint")
        for d in deliveries:
            subscription = found.get(d.recipient)
            if subscription is not None and d.user_id not in (None, subscription.user_id):
                subscription = None
            d.push_subscription = subscription

    def send(self, delivery, provider, *, timeout_s: float) -> Receipt:
        """POST the encrypted payload to the subscription's endpoint; a ``Receipt`` with the
        status and the push service's message URL (``Location``) on a 2xx; ``DeliveryError`` as
        the module docstring says."""
        subscription = getattr(delivery, "push_subscription", None)
        if subscription is None:
            raise DeliveryError(
                "the push subscription was removed (the browser unsubscribed, or its push "
                "service said it is gone) or now belongs to another user",
                permanent=True,
            )
        body, headers = request_of(delivery, subscription)
        what = f"push service {vapid.origin_of(subscription.endpoint)}"
        with http.call_errors(what):
            response = http.client().post(
                subscription.endpoint,
                content=body,
                headers=headers,
                timeout=http.timeouts(timeout_s),
            )
        if response.status_code in (404, 410):
            raise DeliveryError(
                f"{what} answered {response.status_code}: the subscription is gone; removed",
                permanent=True,
                http_status=response.status_code,
                recipient_gone=True,
            )
        http.raise_for_answer(response, what)
        return Receipt(
            provider_message_id=response.headers.get("location", ""),
            http_status=response.status_code,
        )

    def settled(self, delivery, error: DeliveryError | None) -> None:
        """Keep the outcome on the subscription: the time of a success, the last error, or
        delete it when it is gone."""
        subscription = getattr(delivery, "push_subscription", None)
        if subscription is None:  # nothing was sent: none of this user's to keep it on
            return
        rows = PushSubscription.objects.filter(pk=subscription.pk)
        if error is None:
            rows.update(last_success_at=timezone.now(), last_error="")
        elif error.recipient_gone:
            rows.delete()
            logger.info("a push subscription of user %s was removed: %s", delivery.user_id, error)
        else:
            rows.update(last_error=str(error)[:ERROR_TEXT_MAX])

    def check_health(self, provider, *, timeout_s: float) -> None:
        """Healthy when the VAPID keys are configured and make a pair; no push service is
        called (each subscription has its own)."""
        try:
            vapid.keys()
        except vapid.NotConfigured as exc:
            raise DeliveryError(str(exc), permanent=True) from None


transport = PushTransport()
