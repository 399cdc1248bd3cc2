"""Who is on the other end of a socket or SSE stream, and may their browser page connect at all.

Used at connect time by every realtime edge (plain socket, Phoenix socket, SSE): never per message.

Credentials, in this order:
1. a client token (``tokens.mint``) in the query string ``?token=`` (the plain socket, SSE, and the
   Phoenix client's ``params: {token}``), or in the Phoenix ``authToken`` subprotocol
   (``base64url.bearer.phx.<base64url(token)>``, phoenix.js ``socket.js``);
2. the user an ``AuthMiddlewareStack`` put in ``scope["user"]``;
3. the Django session cookie, read here directly, so sockets need no ``AuthMiddlewareStack``
   (which would cost every connection a hop to Django's one shared sync thread).

A token that is present but forged or expired is refused (TokenError) even when a session exists:
a client that sends a bad token has a bug it must hear about.
"""

from __future__ import annotations

import base64
import binascii
import time
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlparse

from django.conf import settings
from django.contrib.auth import get_user_model

from routing_app import db_threads

from .authz import Principal
from .tokens import TokenError, verify

PHOENIX_TOKEN_PREFIX = "base64url.bearer.phx."  # noqa: S105  (a prefix, not a secret)
# A user's rights (is_staff, groups, active) are loaded once per user per this many seconds and
# shared by all their connections: 10,000 sockets reconnecting after a restart must not mean
# 10,000 user queries. Accepted staleness: a deactivated user can still connect for this long.
PRINCIPAL_CACHE_S = 5.0
_principals: dict[int, tuple[float, Principal | None]] = {}
_PRINCIPAL_CACHE_MAX = 50_000  # entries; cleared wholesale past this (bounded memory)


def query_params(scope: dict) -> dict[str, str]:
    """The query string of an ASGI scope as a dict (the last value of a repeated key wins)."""
    raw = scope.get("query_string", b"")
    if not raw:
        return {}
    parsed = parse_qs(raw.decode("latin-1"), keep_blank_values=True)
    return {key: values[-1] for key, values in parsed.items()}


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def token_from_scope(scope: dict) -> str | None:
    """The client token the connection carries, if any (query ``token`` or Phoenix subprotocol)."""
    token = query_params(scope).get("token")
    if token:
        return token
    for proto in scope.get("subprotocols", ()):
        if proto.startswith(PHOENIX_TOKEN_PREFIX):
            return _phoenix_auth_token(proto[len(PHOENIX_TOKEN_PREFIX) :])
    return None


def _phoenix_auth_token(encoded: str) -> str:
    """The token in an ``authToken`` subprotocol: base64 without padding, in the URL-safe
    alphabet or the standard one (phoenix.js uses ``btoa``). Raises TokenError for anything
    else: a client that sends a token must hear that it is wrong, not be let in anonymously."""
    try:
        token = base64.b64decode(
            encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True
        ).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        token = ""
    if not token:
        raise TokenError(
            "authToken subprotocol is not a token in base64: send "
            f"'{PHOENIX_TOKEN_PREFIX}' followed by base64url(token)"
        )
    return token


def forget_principals() -> None:
    """Drop cached principals (tests; after editing a user's rights to apply them at once)."""
    _principals.clear()


def _load_principal(user_id: int) -> Principal | None:
    user = get_user_model().objects.filter(pk=user_id).first()
    if user is None or not user.is_active:
        return None
    return Principal.from_user(user)


def _session_principal(session_key: str) -> Principal:
    """The session's user, checked like django.contrib.auth.get_user (session hash included)."""
    from importlib import import_module

    from django.contrib.auth import get_user
    from django.http import HttpRequest

    engine = import_module(settings.SESSION_ENGINE)
    request = HttpRequest()
    request.session = engine.SessionStore(session_key)
    return Principal.from_user(get_user(request))


async def principal_for_user_id(user_id: int) -> Principal | None:
    """The Principal of an active user (cached ``PRINCIPAL_CACHE_S``), None if gone or inactive."""
    now = time.monotonic()
    cached = _principals.get(user_id)
    if cached is not None and now - cached[0] < PRINCIPAL_CACHE_S:
        return cached[1]
    principal = await db_threads.run(_load_principal, user_id)
    if len(_principals) >= _PRINCIPAL_CACHE_MAX:
        _principals.clear()
    _principals[user_id] = (now, principal)
    return principal


async def principal_for_scope(scope: dict) -> Principal:
    """Who the connection is: token, else ``scope["user"]``, else session cookie, else anonymous.

    Raises TokenError when a token is present but forged, malformed or expired, or names a user
    that no longer exists or is inactive.
    """
    token = token_from_scope(scope)
    if token:
        user_id = verify(token)
        principal = await principal_for_user_id(user_id)
        if principal is None:
            raise TokenError("the token's user no longer exists or is inactive")
        return principal
    user = scope.get("user")
    if user is not None and getattr(user, "is_authenticated", False):
        return await db_threads.run(Principal.from_user, user)
    session_key = _cookie(scope, settings.SESSION_COOKIE_NAME)
    if session_key:
        return await db_threads.run(_session_principal, session_key)
    return Principal.anonymous()


def _cookie(scope: dict, name: str) -> str | None:
    raw = header(scope, b"cookie")
    if not raw:
        return None
    jar = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel else None


def origin_allowed(scope: dict) -> bool:
    """May a browser page at this Origin open a socket/stream here?

    Allowed: no Origin header (not a browser, so no victim's cookies to ride on), an origin in
    ``NOTIFY_ALLOWED_ORIGINS`` (the Nuxt app; scheme, host and port compared), or the request's
    own origin: the same host:port as its Host header *and* the same security, an ``https``
    page for a ``wss``/``https`` connection and an ``http`` page for ``ws``/``http``, as
    Django's CSRF origin check (``CsrfViewMiddleware._origin_verified``) decides. Behind a proxy
    that ends TLS, the connection counts as secure when uvicorn was told so (``--proxy-headers``
    sets the scope's scheme) or by ``settings.SECURE_PROXY_SSL_HEADER``, as for Django's
    ``request.is_secure()``. This is the cross-site WebSocket hijacking guard; CORS does not
    apply to WebSockets.
    """
    origin = header(scope, b"origin")
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    if origin in {o.lower().rstrip("/") for o in settings.NOTIFY_ALLOWED_ORIGINS}:
        return True
    host = header(scope, b"host")
    if not host:
        return False
    parsed = urlparse(origin)
    expected_scheme = "https" if connection_is_secure(scope) else "http"
    return parsed.scheme == expected_scheme and parsed.netloc == host.strip().lower()


def connection_is_secure(scope: dict) -> bool:
    """Did the client connect over TLS (``wss``/``https``), as Django's ``is_secure`` decides?"""
    if scope.get("scheme") in ("wss", "https"):
        return True
    proxy_header = settings.SECURE_PROXY_SSL_HEADER
    if proxy_header:
        name, secure_value = proxy_header  # e.g. ("HTTP_X_FORWARDED_PROTO", "https")
        meta_name = name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1")
        value = header(scope, meta_name)
        if value is not None and value.split(",", 1)[0].strip() == secure_value:
            return True
    return False
