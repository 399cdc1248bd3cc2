"""VAPID: the server's identity towards push services (RFC 8292).

https://www.rfc-editor.org/rfc/rfc8292

The key pair is P-256; settings hold both halves base64url-encoded without padding: the private
key's raw 32-byte scalar (``WEBPUSH_VAPID_PRIVATE_KEY``) and the public key's 65-byte uncompressed
point (``WEBPUSH_VAPID_PUBLIC_KEY``), which is also what a browser's
``pushManager.subscribe({applicationServerKey})`` takes. Each request to a push service carries
``Authorization: vapid t=<JWT>, k=<public key>``, the JWT (ES256) claiming ``aud`` (the endpoint's
origin), ``exp`` and ``sub`` (``WEBPUSH_VAPID_SUBJECT``).

A JWT is signed once per origin and reused until ``JWT_RENEW_BEFORE_S`` before it expires: one
ECDSA signature per push service every few hours, not one per delivery.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.conf import settings
from py_vapid import Vapid02, VapidException

JWT_LIFETIME_S = 12 * 3600  # RFC 8292 section 2: at most 24 hours
JWT_RENEW_BEFORE_S = 3600  # a reused JWT has at least this long left when it is sent


class NotConfigured(Exception):
    """The VAPID keys are not set, or do not make a pair; the message says what to fix."""


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Bytes of unpadded (or padded) base64url ``text``; ValueError when it is not base64url."""
    if not isinstance(text, str) or not text or any(c in text for c in "+/ \n"):
        raise ValueError("is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ValueError("is not base64url") from None


def public_key_of(private: ec.EllipticCurvePrivateKey) -> str:
    """The applicationServerKey form of ``private``'s public key."""
    point = private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return b64url(point)


def generate_keys() -> tuple[str, str]:
    """A new pair: (private key, public key), each as settings hold it."""
    private = ec.generate_private_key(ec.SECP256R1())
    scalar = private.private_numbers().private_value.to_bytes(32, "big")
    return b64url(scalar), public_key_of(private)


@dataclass(frozen=True)
class Keys:
    signer: Vapid02
    public_key: str
    subject: str


_keys: tuple[tuple[str, str, str], Keys] | None = None
_jwts: dict[str, tuple[float, dict[str, str]]] = {}
_lock = threading.Lock()


def keys() -> Keys:
    """The configured pair, read once per settings value. Raises ``NotConfigured``."""
    global _keys
    config = (
        settings.WEBPUSH_VAPID_PRIVATE_KEY,
        settings.WEBPUSH_VAPID_PUBLIC_KEY,
        settings.WEBPUSH_VAPID_SUBJECT,
    )
    cached = _keys
    if cached is not None and cached[0] == config:
        return cached[1]
    private, public, subject = config
    if not private:
        raise NotConfigured(
            "Web Push is not configured: set WEBPUSH_VAPID_PRIVATE_KEY and "
            "WEBPUSH_VAPID_PUBLIC_KEY (python manage.py push keys prints a pair)"
        )
    try:
        raw = b64url_decode(private)
        if len(raw) != 32:
            raise ValueError("is not 32 bytes")
        signer = Vapid02.from_raw(private.encode())
    except (ValueError, VapidException) as exc:
        raise NotConfigured(
            f"WEBPUSH_VAPID_PRIVATE_KEY {exc}: it must be the base64url private key that "
            "python manage.py push keys prints"
        ) from None
    if public_key_of(signer.private_key) != public.rstrip("="):
        raise NotConfigured(
            "WEBPUSH_VAPID_PUBLIC_KEY is not the public key of WEBPUSH_VAPID_PRIVATE_KEY: set "
            "the two lines of one run of python manage.py push keys"
        )
    result = Keys(signer=signer, public_key=public.rstrip("="), subject=subject)
    with _lock:
        _keys = (config, result)
        _jwts.clear()
    return result


def origin_of(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}"


def authorization(endpoint: str, now_s: float | None = None) -> dict[str, str]:
    """The ``Authorization`` header of a request to ``endpoint`` (see the module docstring).
    Raises ``NotConfigured``."""
    current = keys()
    audience = origin_of(endpoint)
    now = time.time() if now_s is None else now_s
    with _lock:
        kept = _jwts.get(audience)
    if kept is not None and kept[0] - now > JWT_RENEW_BEFORE_S:
        return kept[1]
    expires = int(now) + JWT_LIFETIME_S
    claims = {"aud": audience, "exp": expires, "sub": current.subject}
    try:
        header = current.signer.sign(claims)
    except VapidException as exc:
        raise NotConfigured(
            f"cannot sign for {audience}: {exc} (WEBPUSH_VAPID_SUBJECT is "
            f"{current.subject!r}: use mailto:you@example.com or an https:// URL)"
        ) from None
    with _lock:
        _jwts[audience] = (expires, header)
    return header
