"""django-anymail's tracking webhooks (email delivery receipts, routing_app/delivery/receipts.py),
mounted at ``/anymail/<esp>/tracking/`` behind HTTP basic auth with ``ANYMAIL_WEBHOOK_SECRET``.

django-anymail itself checks basic auth only when a secret is configured: without one it accepts
anyone's events (a forged "bounced" or "delivered" for any message) with a warning, and some ESPs'
views fail with a 500 before any check when their package or signing key is missing. So the
credentials are checked here, before anymail's view is built, and with no secret every request is
refused. Inbound webhooks are not mounted: nothing here handles inbound mail.

Securing webhooks: https://anymail.dev/en/stable/tips/securing_webhooks/
"""

from __future__ import annotations

from collections.abc import Callable

from anymail import urls as anymail_urls
from anymail.utils import get_request_basic_auth
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import URLPattern
from django.utils.crypto import constant_time_compare
from django.views.decorators.csrf import csrf_exempt

app_name = "anymail"  # the names anymail gives its URLs (anymail:postmark_tracking_webhook)


def with_webhook_secret(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """``view`` answering only requests whose basic auth is ``ANYMAIL_WEBHOOK_SECRET``: 403 when
    no secret is configured, 401 (with a challenge) for missing or wrong credentials."""

    @csrf_exempt
    def guarded(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        secret = settings.ANYMAIL_WEBHOOK_SECRET
        if not secret:
            detail = "email receipts are off: set ANYMAIL_WEBHOOK_SECRET to user:password"
            return JsonResponse({"detail": detail, "errors": []}, status=403)
        if not constant_time_compare(get_request_basic_auth(request) or "", secret):
            detail = "send the webhook's basic auth credentials (ANYMAIL_WEBHOOK_SECRET)"
            response = JsonResponse({"detail": detail, "errors": []}, status=401)
            response["WWW-Authenticate"] = 'Basic realm="email receipts"'
            return response
        return view(request, *args, **kwargs)

    return guarded


def _tracking(pattern: URLPattern) -> bool:
    return bool(pattern.name) and pattern.name.endswith("_tracking_webhook")


urlpatterns = [
    URLPattern(pattern.pattern, with_webhook_secret(pattern.callback), name=pattern.name)
    for pattern in anymail_urls.urlpatterns
    if _tracking(pattern)
]
