"""Subscribing and unsubscribing browsers: what the API (channels_app/push_api.py) calls.

A browser's ``PushSubscription.toJSON()`` is ``{"endpoint", "expirationTime", "keys": {"p256dh",
"auth"}}`` (https://www.w3.org/TR/push-api/#dom-pushsubscription-tojson). The keys are the ones
RFC 8291 encrypts to: ``p256dh`` a P-256 public key as a 65-byte uncompressed point, ``auth`` a
16-byte secret, both base64url.

Endpoints must be ``https://`` URLs of a public host: the server POSTs to whatever a logged-in
user registers, so an endpoint naming a private, link-local or loopback address (or
``localhost``) is refused, lest it become a way to make the server call its own network. Host
names are not resolved here (a name pointing at a private address is for egress rules to stop);
the transports' HTTP client follows no redirect.
Plain ``http://`` to a loopback address is allowed only with ``WEBPUSH_LOOPBACK_HTTP`` (on with
``DEBUG``): a local push-service stand-in.

A user keeps at most ``MAX_SUBSCRIPTIONS_PER_USER``; subscribing past it drops the oldest.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.db import transaction

from .models import ENDPOINT_MAX_LENGTH, PushSubscription
from .vapid import b64url_decode

P256DH_BYTES = 65  # an uncompressed P-256 point: 0x04, x, y
AUTH_BYTES = 16  # RFC 8291 section 3.2
USER_AGENT_MAX_CHARS = 300
MAX_SUBSCRIPTIONS_PER_USER = 20  # browsers and devices of one person; more is a leak


class InvalidSubscription(ValueError):
    """What a browser sent is not a usable subscription: ``errors`` are ``(field, message)``."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors))
        self.errors = errors


@dataclass(frozen=True)
class Subscribed:
    subscription: PushSubscription
    created: bool


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be a push endpoint (see the module docstring), or None."""
    if len(endpoint) > ENDPOINT_MAX_LENGTH:
        return f"is longer than {ENDPOINT_MAX_LENGTH} characters"
    parts = urlsplit(endpoint)
    try:
        host = parts.hostname or ""
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        return "is not a URL (its port is not a number)"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https:// URL, the push service's endpoint from pushManager.subscribe()"
    if parts.username or parts.password:
        return "must not carry a user name or password"
    if parts.scheme == "http":
        if settings.WEBPUSH_LOOPBACK_HTTP and _is_loopback(host):
            return None
        return (
            "must be an https:// URL (http:// only to a loopback address, with "
            "WEBPUSH_LOOPBACK_HTTP)"
        )
    if host == "localhost" or host.endswith(".localhost"):
        return "must name a public host, not localhost"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not address.is_global:
        return f"must name a public host, not the non-public address {host}"
    return None


def _key_problem(value: str, length: int) -> str | None:
    try:
        raw = b64url_decode(value)
    except ValueError:
        return "must be base64url (A-Z a-z 0-9 - _), as PushSubscription.toJSON() gives it"
    if len(raw) != length:
        return f"must decode to {length} bytes, not {len(raw)}"
    if length == P256DH_BYTES:
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except ValueError:
            return "is not a point on the P-256 curve"
    return None


def validate(endpoint: str, p256dh: str, auth: str) -> None:
    """Raise ``InvalidSubscription`` naming each bad field (``endpoint``, ``keys.p256dh``,
    ``keys.auth``) and why."""
    errors = []
    for field, problem in (
        ("endpoint", endpoint_problem(endpoint)),
        ("keys.p256dh", _key_problem(p256dh, P256DH_BYTES)),
        ("keys.auth", _key_problem(auth, AUTH_BYTES)),
    ):
        if problem:
            errors.append((field, problem))
    if errors:
        raise InvalidSubscription(errors)


def subscribe(user, endpoint: str, p256dh: str, auth: str, user_agent: str = "") -> Subscribed:
    """Store the subscription for ``user``; the same endpoint again (a browser re-subscribing,
    or another user logging in on that browser) updates its keys and user. Raises
    ``InvalidSubscription``."""
    validate(endpoint, p256dh, auth)
    with transaction.atomic():
        row, created = PushSubscription.objects.update_or_create(
            endpoint=endpoint,
            defaults={
                "user": user,
                "p256dh": p256dh.rstrip("="),
                "auth": auth.rstrip("="),
                "user_agent": user_agent[:USER_AGENT_MAX_CHARS],
                "last_error": "",
            },
        )
        kept = PushSubscription.objects.filter(user=user).order_by("-created_at", "-pk")
        stale = list(kept.values_list("pk", flat=True)[MAX_SUBSCRIPTIONS_PER_USER:])
        if stale:
            PushSubscription.objects.filter(pk__in=stale).delete()
    return Subscribed(row, created)


def unsubscribe(user, endpoint: str) -> bool:
    """Remove ``user``'s subscription at ``endpoint``; False when they have none there."""
    deleted, _ = PushSubscription.objects.filter(user=user, endpoint=endpoint).delete()
    return deleted > 0
