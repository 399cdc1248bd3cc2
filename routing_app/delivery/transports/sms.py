"""SMS through a Twilio-compatible REST gateway, or to the log (``console://``).

Twilio's Messages API: https://www.twilio.com/docs/messaging/api/message-resource#create-a-message-resource
A provider URL is ``https://host/2010-04-01/Accounts/<sid>/Messages.json`` (``http://`` for a
local gateway). One POST per delivery, form fields ``To`` (the recipient, E.164), ``From`` (the
channel option ``from_number``, else the provider option ``from``) and ``Body``; HTTP basic auth
with the account sid from the URL and the provider's secret (none when it names no secret).

The text comes from ``templates/notify/sms/<event>.txt`` (else ``default.txt``), cut to the
channel option ``max_segments`` (default ``settings.SMS_MAX_SEGMENTS``) by ``sms_text.fit_sms``.

``verify_twilio_signature`` checks the ``X-Twilio-Signature`` of a gateway's status callback:
https://www.twilio.com/docs/usage/security#validating-requests
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re

from django.conf import settings

from .. import http, rendering
from ..sms_text import fit_sms
from . import DeliveryError, Receipt, provider_secret

logger = logging.getLogger("routing_app.delivery.sms")

ACCOUNT_PATH_RE = re.compile(r"/Accounts/(?P<sid>[^/]+)/Messages\.json\Z")


def sms_text(delivery) -> tuple[str, int]:
    """The rendered text of ``delivery``, cut to its channel's segment limit, and its segments."""
    context = rendering.template_context(delivery)
    text = rendering.render("sms", delivery.notification.event, ".txt", context, autoescape=False)
    max_segments = (delivery.channel.options or {}).get("max_segments") or settings.SMS_MAX_SEGMENTS
    return fit_sms(text.strip(), max_segments)


def _sender(delivery, provider) -> str:
    sender = (delivery.channel.options or {}).get("from_number") or (provider.options or {}).get(
        "from"
    )
    if not sender:
        raise DeliveryError(
            f"no sender number for channel {delivery.channel.name!r}: set the channel option "
            "from_number or the provider option from",
            permanent=True,
        )
    return sender


def _account_sid(provider) -> str:
    match = ACCOUNT_PATH_RE.search(provider.url.split("?", 1)[0])
    if not match:
        raise DeliveryError(
            f"provider {provider.name!r}: the URL does not end in "
            "/Accounts/<sid>/Messages.json, so it names no account",
            permanent=True,
        )
    return match["sid"]


class SMSTransport:
    def send(self, delivery, provider, *, timeout_s: float) -> Receipt:
        """Send the delivery's text to ``delivery.recipient``: a ``Receipt`` with the gateway's
        message ``sid`` and status on a 2xx; ``DeliveryError`` as ``http.raise_for_answer``
        and ``http.call_errors`` say, or permanent for a provider configured wrongly."""
        text, count = sms_text(delivery)
        if provider.url.startswith("console://"):
            logger.info(
                "SMS to %s (%d segment%s, provider %s):\n%s",
                delivery.recipient,
                count,
                "" if count == 1 else "s",
                provider.name,
                text,
            )
            return Receipt(detail=f"logged, {count} segment(s)")
        form = {"To": delivery.recipient, "From": _sender(delivery, provider), "Body": text}
        sid = _account_sid(provider)
        secret = provider_secret(provider)
        what = f"SMS gateway {provider.name!r}"
        with http.call_errors(what):
            response = http.client().post(
                provider.url,
                data=form,
                auth=(sid, secret) if secret else None,
                timeout=http.timeouts(timeout_s),
            )
        http.raise_for_answer(response, what)
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        message_id = answer.get("sid") if isinstance(answer, dict) else None
        return Receipt(
            provider_message_id=str(message_id or ""),
            http_status=response.status_code,
            detail=f"{count} segment(s)",
        )

    def check_health(self, provider, *, timeout_s: float) -> None:
        """GET the ``health_url`` option when set (2xx = healthy); healthy otherwise."""
        http.check_health_url(provider, timeout_s=timeout_s)


transport = SMSTransport()


def twilio_signature(url: str, params: dict[str, str], auth_token: str) -> str:
    """Twilio's signature of a request: base64 of HMAC-SHA1, keyed with the auth token, over
    the full URL followed by each POST parameter's name and value, sorted by name."""
    data = url + "".join(f"{key}{params[key]}" for key in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def verify_twilio_signature(
    url: str, params: dict[str, str], signature: str, auth_token: str
) -> bool:
    """Whether ``signature`` (the ``X-Twilio-Signature`` header) is Twilio's signature of a
    POST to ``url`` (exactly as the gateway called it, query string included) with form
    ``params``. Compared in constant time. Single-valued parameters only."""
    expected = twilio_signature(url, params, auth_token)
    return hmac.compare_digest(expected.encode(), signature.encode())
