"""The Host header check of Django's ``HttpRequest.get_host``, for the ASGI paths served without
Django's middleware: the ingest endpoints (``asgi_api.py``) and the SSE streams
(``channels_app/sse.py``). Without it those paths answer under any name a client sends, which is
what DNS rebinding and Host-header poisoning need.

The rules are Django's: ``settings.ALLOWED_HOSTS`` (with DEBUG and an empty list: localhost
only), ``X-Forwarded-Host`` only with ``USE_X_FORWARDED_HOST``, a request without Host judged by
the server's own name. A refused request gets 400 with a JSON ``{"detail"}``, as the API's errors.
"""

from __future__ import annotations

import json
import logging

from django.conf import settings
from django.http.request import split_domain_port, validate_host

log = logging.getLogger("django.security.DisallowedHost")  # where Django logs the same refusal

DEBUG_HOSTS = [".localhost", "127.0.0.1", "[::1]"]  # Django's own default for DEBUG


def request_host(scope: dict) -> str:
    """The host a request names: X-Forwarded-Host (if trusted), else Host, else the server's."""
    headers = dict(scope.get("headers") or ())
    if settings.USE_X_FORWARDED_HOST and b"x-forwarded-host" in headers:
        return headers[b"x-forwarded-host"].decode("latin-1").split(",")[-1].strip()
    if b"host" in headers:
        return headers[b"host"].decode("latin-1")
    server = scope.get("server") or ("", None)
    return server[0] if server[1] in (None, 80, 443) else f"{server[0]}:{server[1]}"


def host_allowed(scope: dict) -> bool:
    """Does the request's host match ``settings.ALLOWED_HOSTS`` (as Django's get_host decides)?"""
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = DEBUG_HOSTS
    domain, _port = split_domain_port(request_host(scope))
    return bool(domain) and validate_host(domain, allowed)


async def refuse(scope: dict, receive, send) -> None:
    """Answer 400: the host is not one this server serves."""
    host = request_host(scope)
    log.warning("Invalid HTTP_HOST header: %r (not in ALLOWED_HOSTS)", host[:200])
    body = json.dumps(
        {
            "detail": f"host {host[:200]!r} is not served here: use one of the server's names "
            "(the operator lists them in ALLOWED_HOSTS)"
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
