"""Signed, expiring client tokens for sockets and SSE.

A token is Django's ``signing.dumps`` of ``{"u": user_id, "e": expires_at_epoch}`` with a salt of
our own, so a session cookie or any other signed value cannot be replayed as a token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings
from django.core import signing

SALT = "notify.client-token.v1"


class TokenError(Exception):
    """The token is forged, malformed or expired; the message says which."""


@dataclass(frozen=True)
class Token:
    token: str
    user_id: int
    expires_at: int  # epoch seconds


def mint(user_id: int, ttl_s: int | None = None) -> Token:
    """Return a token for ``user_id`` valid for ``ttl_s`` (default ``TOKEN_TTL_S``).

    Raises ValueError when ``ttl_s`` is not between 1 s and ``TOKEN_MAX_TTL_S``.
    """
    ttl = settings.TOKEN_TTL_S if ttl_s is None else ttl_s
    if not 1 <= ttl <= settings.TOKEN_MAX_TTL_S:
        raise ValueError(f"ttl must be between 1 and {settings.TOKEN_MAX_TTL_S} seconds")
    expires_at = int(time.time()) + ttl
    value = signing.dumps({"u": user_id, "e": expires_at}, salt=SALT, compress=False)
    return Token(value, user_id, expires_at)


def verify(value: str) -> int:
    """Return the user id the token carries. Raises TokenError."""
    try:
        payload = signing.loads(value, salt=SALT)
    except signing.BadSignature:
        raise TokenError("token signature is invalid: request a new token") from None
    if not isinstance(payload, dict) or "u" not in payload or "e" not in payload:
        raise TokenError("token is malformed: request a new token")
    if payload["e"] < time.time():
        raise TokenError("token has expired: request a new token")
    return int(payload["u"])
