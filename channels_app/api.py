"""HTTP endpoints of the realtime edge (tokens, presence, publishing with a client token, hub
counts): a Router that the project's API (notify_project/api.py) mounts at ``/api/v1/``."""

import logging
from datetime import UTC, datetime
from typing import Any, Literal

from django.conf import settings
from ninja import Field, Path, Router, Schema
from ninja.decorators import decorate_view
from ninja.security import HttpBearer
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from routing_app.api import (
    SINGLE_BODY_MAX_BYTES,
    TOPIC_SCHEMA,
    ErrorOut,
    json_body,
    json_response,
    storable_text,
)
from routing_app.ingest import EVENT_MAX_LENGTH
from routing_app.ingest_deadline import UNAVAILABLE_RETRY_AFTER_S
from routing_app.models import SEVERITIES
from routing_app.sources import JsonInt

from .frame_limits import CLIENT_FRAMES_PER_S

router = Router(tags=["realtime"])
log = logging.getLogger(__name__)

# django.contrib.auth's username: at most 150 characters.
USERNAME_MAX_LENGTH = 150
# A token request is a user name and a lifetime: a few hundred bytes.
TOKEN_BODY_MAX_BYTES = 4096


def errors(*statuses: int) -> dict[int, type]:
    """The error answers an operation documents, each the API's ``{"detail", "errors"}``."""
    return dict.fromkeys(statuses, ErrorOut)


# --- presence (GET /api/v1/topics/{topic}/presence) ------------------------------------------


class _SessionUser:
    """django-ninja auth: the logged-in session user, or None (so the next auth is tried)."""

    async def __call__(self, request):
        user = await request.auser()
        return user if user.is_authenticated and user.is_active else None


def _presence_auth() -> list:
    from routing_app.apikeys import ApiKeyAuth

    # Session first: ApiKeyAuth answers 401 itself when no key is sent, ending the chain.
    # A key needs the "tokens" scope: such a key may act as any user, so it may see who is here.
    return [_SessionUser(), ApiKeyAuth(scope="tokens")]


class PresenceUser(Schema):
    key: str
    user_id: int | None
    username: str
    connections: int
    online_at: float | None


class PresenceOut(Schema):
    topic: str
    presences: dict[str, dict[str, list[dict[str, Any]]]] = Field(
        description='phoenix Presence state: {key: {"metas": [meta, ...]}}'
    )
    users: list[PresenceUser]


@router.get(
    "/topics/{topic}/presence",
    auth=_presence_auth(),
    response={200: PresenceOut, **errors(400, 401, 403, 429, 503)},
)
async def topic_presence(
    request,
    topic: str = Path(pattern=TOPIC_SCHEMA["pattern"], max_length=TOPIC_SCHEMA["maxLength"]),
):
    """Who is on ``topic`` now, on every server process: ``{"topic", "presences": {key: {"metas":
    [...]}}, "users": [{"key", "user_id", "username", "connections", "online_at"}]}``.
    A user needs the right to read the topic; an API key needs the ``tokens`` scope and the topic
    in its patterns."""
    from ninja.errors import HttpError

    from routing_app.topics import is_valid_topic

    from .authz import READ, adecide, aprincipal
    from .presence import PresenceUnavailable, get_presence, users

    if not is_valid_topic(topic):
        raise HttpError(400, f"topic {topic!r} is not a valid topic name")
    if hasattr(request.auth, "allows_topic"):  # an API key
        if not request.auth.allows_topic(topic):
            raise HttpError(403, f"this API key may not see topic {topic!r}")
    else:
        decision = await adecide(await aprincipal(request.auth), topic, READ)
        if not decision.allowed:
            raise HttpError(403, decision.reason)
    try:
        state = await get_presence().list(topic)
    except PresenceUnavailable as exc:
        raise HttpError(503, f"presence is unavailable: {exc}") from None
    return {"topic": topic, "presences": state, "users": users(state)}


# --- client tokens (POST /api/v1/tokens) -------------------------------------------------------


class TokenBody(Schema):
    model_config = {"extra": "forbid"}

    user: storable_text(1, USERNAME_MAX_LENGTH) = Field(  # type: ignore[valid-type]
        examples=["sam"], description="the username the token is for"
    )
    # JSON's false is not 0 seconds. The range is checked in create_token (its message).
    ttl: JsonInt | None = Field(
        None,
        description="lifetime in seconds (default TOKEN_TTL_S, at most TOKEN_MAX_TTL_S)",
        json_schema_extra={"minimum": 1, "maximum": settings.TOKEN_MAX_TTL_S},
    )


class TokenOut(Schema):
    token: str
    expires_at: datetime = Field(description="ISO 8601, UTC")


class _TokenRequester:
    """django-ninja auth for minting tokens: an API key with the ``tokens`` scope (may mint for any
    user), else the logged-in session user (only for themself).

    The session path is a browser POST riding on a cookie, so it must pass Django's CSRF check
    (``X-CSRFToken`` header, and an ``Origin`` in CSRF_TRUSTED_ORIGINS when cross-origin); an API
    key is sent explicitly in a header, which a forging page cannot do, so it needs none.
    Returns a ``KeyInfo`` or a user; raises 401 (no or bad credentials) or 403 (CSRF, scope).
    """

    async def __call__(self, request):
        from ninja.errors import AuthenticationError, AuthorizationError
        from ninja.utils import check_csrf

        from routing_app.apikeys import ApiKeyAuth

        if "authorization" in request.headers:
            return await ApiKeyAuth(scope="tokens")(request)
        user = await request.auser()
        if not (user.is_authenticated and user.is_active):
            raise AuthenticationError(
                401, "log in, or send an API key with the 'tokens' scope as 'Authorization: Bearer'"
            )
        if check_csrf(request) is not None:
            raise AuthorizationError(
                403, "CSRF check failed: send the csrftoken cookie's value in 'X-CSRFToken'"
            )
        return user


class CsrfOut(Schema):
    csrf_token: str


@router.get("/csrf", auth=None, response=CsrfOut)
def csrf_token(request):
    """``{"csrf_token"}`` (and the ``csrftoken`` cookie) for a browser app on another origin, which
    cannot read this origin's cookie but must echo it in ``X-CSRFToken`` on session POSTs. Only
    the origins allowed by CORS can read the answer."""
    from django.middleware.csrf import get_token

    return {"csrf_token": get_token(request)}


def _active_user(username: str):
    from django.contrib.auth import get_user_model

    model = get_user_model()
    return model._default_manager.filter(**{model.USERNAME_FIELD: username}, is_active=True).first()


def _limit(group: str, who: str, rate: str, message: str | None = None) -> None:
    """django-ratelimit's fixed window ``group`` per requester ``who`` (API key or user) at
    ``rate``. Sync (cache calls): run it on a database thread.

    Raises RateLimited (429 with Retry-After, saying ``message`` when given) when over it,
    LimiterUnavailable (503) when the cache does not answer and the limiter fails closed."""
    from django.conf import settings
    from django_ratelimit.core import get_usage

    from routing_app.apikeys import LimiterUnavailable, RateLimited

    try:
        usage = get_usage(
            None, group=group, key=lambda _group, _request: who, rate=rate, increment=True
        )
    except Exception as exc:  # noqa: BLE001  (the cache backend's own error types vary)
        log.warning(
            "%s rate limiter unavailable (fail open: %s)", group, settings.RATELIMIT_FAIL_OPEN
        )
        if settings.RATELIMIT_FAIL_OPEN:
            return
        raise LimiterUnavailable() from exc
    if usage is None or not usage["should_limit"]:
        return
    if usage["time_left"] < 0:  # django-ratelimit's answer when its cache failed (fail closed)
        raise LimiterUnavailable()
    limited = RateLimited(max(1, usage["time_left"]), rate)
    if message:
        limited.message = message
    raise limited


def _limit_token_minting(who: str) -> None:
    """At most TOKEN_RATE tokens per requester (``_limit``)."""
    _limit("notify.tokens", who, settings.TOKEN_RATE)


@router.post(
    "/tokens",
    auth=_TokenRequester(),
    response={200: TokenOut, **errors(400, 401, 403, 404, 413, 415, 429, 503)},
)
@decorate_view(json_body(TOKEN_BODY_MAX_BYTES))
async def create_token(request, body: TokenBody):
    """A signed client token for sockets and SSE (``?token=``): ``{"token", "expires_at"}``.

    A session user may ask only for themself (403 otherwise); an API key with the ``tokens`` scope
    for any active user. 400 ttl out of range, 404 no such active user.
    """
    from django.conf import settings
    from ninja.errors import HttpError

    from routing_app import db_threads

    from .tokens import mint

    who = (
        f"key:{request.auth.prefix}"
        if hasattr(request.auth, "scopes")
        else f"user:{request.auth.pk}"
    )
    await db_threads.run(_limit_token_minting, who)
    if body.ttl is not None and not 1 <= body.ttl <= settings.TOKEN_MAX_TTL_S:
        raise HttpError(400, f"ttl must be between 1 and {settings.TOKEN_MAX_TTL_S} seconds")
    if hasattr(request.auth, "scopes"):  # an API key
        user = await db_threads.run(_active_user, body.user)
        if user is None:
            raise HttpError(404, f"no active user {body.user!r}")
    else:
        user = request.auth
        if user.get_username() != body.user:
            raise HttpError(403, "a session may ask for a token only for its own user")
    token = mint(user.pk, body.ttl)
    return {"token": token.token, "expires_at": datetime.fromtimestamp(token.expires_at, UTC)}


# --- publishing with a client token (POST /api/v1/topics/{topic}/publish) ----------------------

# As a socket may send: CLIENT_FRAMES_PER_S frames per second (frame_limits.FrameBudget).
PUBLISH_RATE = f"{CLIENT_FRAMES_PER_S}/s"


class _ClientToken(HttpBearer):
    """django-ninja auth: ``Authorization: Bearer <client token>`` (``tokens.mint``, as for
    sockets and SSE); ``request.auth`` becomes the user's ``Principal``. 401, saying why, for a
    missing, forged or expired token or a user that is gone or inactive."""

    async def __call__(self, request):  # type: ignore[override]
        from ninja.errors import AuthenticationError

        scheme, _, raw = request.headers.get(self.header, "").partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            raise AuthenticationError(
                401, "send a client token (POST /api/v1/tokens) as 'Authorization: Bearer <token>'"
            )
        return await self.authenticate(request, raw.strip())

    async def authenticate(self, request, token: str):  # type: ignore[override]
        from ninja.errors import AuthenticationError

        from .socket_auth import principal_for_user_id
        from .tokens import TokenError, verify

        try:
            principal = await principal_for_user_id(verify(token))
        except TokenError as exc:
            raise AuthenticationError(401, str(exc)) from None
        if principal is None:
            raise AuthenticationError(401, "the token's user no longer exists or is inactive")
        return principal


class PublishBody(BaseModel):
    """What a socket's ``publish`` frame carries, without its ``type``."""

    model_config = ConfigDict(extra="forbid")

    event: storable_text(1, EVENT_MAX_LENGTH) = Field(  # type: ignore[valid-type]
        examples=["deploy.start"]
    )
    data: dict[str, Any] = Field(
        default_factory=dict, description="a JSON object, at most 64 KB encoded"
    )
    severity: Literal[tuple(SEVERITIES)] = "info"  # type: ignore[valid-type]
    ref: StrictStr | StrictInt | None = Field(
        None, description="echoed in the answer, as a socket's ref is in its ack"
    )


class AckOut(Schema):
    type: Literal["ack"]
    seq: int
    id: str
    ref: str | int | None = Field(None, description="the request's ref, when it sent one")


@router.post(
    "/topics/{topic}/publish",
    auth=_ClientToken(),
    response={202: AckOut, **errors(400, 401, 403, 413, 415, 429, 503)},
    summary="Publish on a topic as a user (what a socket's publish does)",
)
@decorate_view(json_body(SINGLE_BODY_MAX_BYTES))
async def publish_on_topic(
    request,
    body: PublishBody,
    topic: str = Path(pattern=TOPIC_SCHEMA["pattern"], max_length=TOPIC_SCHEMA["maxLength"]),
):
    """Store a user's notification on ``topic``, exactly as a plain socket's ``publish`` frame:
    the topic's rules must give the token's user the publish right (403), ingest validates it
    (400, ``loc`` names the field), and the answer is the socket's ``ack``: ``{"type": "ack",
    "seq", "id", "ref"?}``, once committed. For clients that cannot hold a WebSocket (the JS
    client's SSE fallback). At most ``CLIENT_FRAMES_PER_S`` per second per user (429)."""
    from ninja.errors import HttpError

    from routing_app import db_threads
    from routing_app.ingest import IngestError
    from routing_app.topics import is_valid_topic

    from . import frames
    from .client_publish import PublishRefused, publish

    if not is_valid_topic(topic):
        raise HttpError(400, f"topic {topic!r} is not a valid topic name")
    principal = request.auth
    await db_threads.run(
        _limit,
        "notify.publish",
        f"user:{principal.user_id}",
        PUBLISH_RATE,
        f"at most {PUBLISH_RATE} publishes per user: slow down",
    )
    try:
        result = await publish(principal, topic, body.event, body.data, body.severity)
    except PublishRefused as exc:
        if exc.code == frames.ErrorCode.FORBIDDEN:
            raise HttpError(403, str(exc)) from None
        if exc.code == frames.ErrorCode.INVALID:
            raise IngestError(exc.errors or [{"loc": [], "msg": str(exc)}]) from None
        error = HttpError(503, str(exc))
        error.retry_after_s = UNAVAILABLE_RETRY_AFTER_S
        raise error from None
    return json_response(request, frames.ack(result.seq, result.id, body.ref), 202)


# --- hub counts (GET /api/v1/realtime/hub) ------------------------------------------------------


class _StaffSession:
    """django-ninja auth: a logged-in staff user, or None (so the next auth is tried)."""

    async def __call__(self, request):
        user = await request.auser()
        return user if user.is_authenticated and user.is_active and user.is_staff else None


def _hub_auth() -> list:
    from routing_app.apikeys import ApiKeyAuth

    return [_StaffSession(), ApiKeyAuth(scope="tokens")]


class HubOut(Schema):
    topics: int
    subscribers: int
    listeners: int
    redis_channels: int
    redis_connected: bool
    reconnects: int
    pending: int


@router.get("/realtime/hub", auth=_hub_auth(), response={200: HubOut, **errors(401, 403)})
async def realtime_hub(request):
    """The answering server process's fanout hub, as counts (no topic names): ``topics``,
    ``subscribers``, ``listeners`` (the process's own named channels), ``redis_channels`` it
    holds, ``redis_connected``, ``reconnects``, ``pending``.
    For operators and tests checking that nothing stays subscribed after clients leave.
    Staff session, or an API key with the ``tokens`` scope."""
    from .hub import hub

    return hub.stats()
