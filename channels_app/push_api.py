"""HTTP endpoints of Web Push for browsers: the VAPID public key, subscribing and unsubscribing
a browser (a Router the project's API, notify_project/api.py, mounts at ``/api/v1/``).

A thin edge over routing_app/push/subscriptions.py. Who: the logged-in session user (POST and
DELETE pass Django's CSRF check, as for ``/tokens``), or ``Authorization: Bearer <client token>``
(``POST /api/v1/tokens``; what static/notify/push.js sends). An API key is refused: a
subscription belongs to a person's browser, not to a backend.

- ``GET /push/key``: ``{"public_key"}``, the applicationServerKey (base64url), 503 when the
  server has no VAPID keys;
- ``POST /push/subscriptions``: the body of ``PushSubscription.toJSON()``; 201 new, 200 the
  endpoint was known (its keys and user are updated); 400 names each bad field;
- ``DELETE /push/subscriptions?endpoint=...`` (or the body ``{"endpoint"}``): 204, or 404 when
  the user has no subscription at that endpoint.
"""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse
from ninja import Field, Query, Router, Schema
from ninja.decorators import decorate_view
from ninja.errors import AuthenticationError, AuthorizationError, HttpError
from pydantic import BaseModel, ConfigDict

from routing_app import db_threads
from routing_app.api import error_response, json_body, json_response, storable_text
from routing_app.push import subscriptions, vapid
from routing_app.push.models import ENDPOINT_MAX_LENGTH

from .api import errors
from .tokens import TokenError, verify

router = Router(tags=["push"])

# A subscription is an endpoint URL and two short keys: well under a kilobyte.
SUBSCRIPTION_BODY_MAX_BYTES = 4096
KEY_MAX_LENGTH = 200  # base64url of 65 bytes is 87 characters; longer is refused with a reason
API_KEY_PREFIX = "nk_"  # routing_app.models.ApiKey's raw form


def _active_user(user_id: int):
    from django.contrib.auth import get_user_model

    return get_user_model()._default_manager.filter(pk=user_id, is_active=True).first()


class _BrowserUser:
    """django-ninja auth: a client token in ``Authorization: Bearer``, else the session user
    (with the CSRF check on unsafe methods). Returns the user; raises 401 (no, forged or expired
    credentials, an API key) or 403 (CSRF)."""

    async def __call__(self, request):
        from ninja.utils import check_csrf

        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value:
                raise AuthenticationError(
                    401, "send 'Authorization: Bearer <client token>' (POST /api/v1/tokens)"
                )
            if value.startswith(API_KEY_PREFIX):
                raise AuthenticationError(
                    401,
                    "an API key cannot subscribe a browser: send a client token for the user "
                    "(POST /api/v1/tokens) or use their session",
                )
            try:
                user_id = verify(value)
            except TokenError as exc:
                raise AuthenticationError(401, str(exc)) from None
            user = await db_threads.run(_active_user, user_id)
            if user is None:
                raise AuthenticationError(401, "the token's user is not active: log in again")
            return user
        user = await request.auser()
        if not (user.is_authenticated and user.is_active):
            raise AuthenticationError(
                401,
                "log in, or send a client token as 'Authorization: Bearer' (POST /api/v1/tokens)",
            )
        if request.method not in ("GET", "HEAD") and check_csrf(request) is not None:
            raise AuthorizationError(
                403, "CSRF check failed: send the csrftoken cookie's value in 'X-CSRFToken'"
            )
        return user


browser_user = _BrowserUser()


class KeyOut(Schema):
    public_key: str = Field(
        description="the VAPID public key, base64url: pushManager.subscribe's applicationServerKey"
    )


@router.get("/push/key", auth=browser_user, response={200: KeyOut, **errors(401, 503)})
async def push_key(request):
    """The server's VAPID public key, for ``pushManager.subscribe({userVisibleOnly: true,
    applicationServerKey})``. 503 when Web Push is not configured here."""
    try:
        keys = vapid.keys()
    except vapid.NotConfigured as exc:
        raise HttpError(503, str(exc)) from None
    return {"public_key": keys.public_key}


class SubscriptionKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    p256dh: storable_text(1, KEY_MAX_LENGTH) = Field(  # type: ignore[valid-type]
        description="base64url, the browser's P-256 public key (65 bytes)"
    )
    auth: storable_text(1, KEY_MAX_LENGTH) = Field(  # type: ignore[valid-type]
        description="base64url, the browser's auth secret (16 bytes)"
    )


class SubscriptionBody(BaseModel):
    """What ``PushSubscription.toJSON()`` gives."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    endpoint: storable_text(1, ENDPOINT_MAX_LENGTH) = Field(  # type: ignore[valid-type]
        description="the push service's https:// URL for this browser"
    )
    expiration_time: float | None = Field(
        None, alias="expirationTime", description="ignored (browsers send null)"
    )
    keys: SubscriptionKeys


class SubscriptionOut(Schema):
    endpoint: str
    created: bool = Field(description="false when the endpoint was known (keys, user updated)")


def _field_errors(exc: subscriptions.InvalidSubscription) -> list[dict]:
    return [{"loc": field.split("."), "msg": message} for field, message in exc.errors]


@router.post(
    "/push/subscriptions",
    auth=browser_user,
    response={200: SubscriptionOut, 201: SubscriptionOut, **errors(400, 401, 403, 413, 415)},
)
@decorate_view(json_body(SUBSCRIPTION_BODY_MAX_BYTES))
async def subscribe(request, body: SubscriptionBody):
    """Store this browser's subscription for the user: 201 when new, 200 when the endpoint was
    known (a re-subscribe: its keys, and its user if another one logged in, are updated).
    400 names each bad field: the endpoint must be https://, the keys base64url of 65 (a P-256
    point) and 16 bytes."""
    user_agent = request.headers.get("user-agent", "")
    try:
        done = await db_threads.run(
            subscriptions.subscribe,
            request.auth,
            body.endpoint,
            body.keys.p256dh,
            body.keys.auth,
            user_agent,
        )
    except subscriptions.InvalidSubscription as exc:
        return error_response(
            request, 400, "the subscription is not valid; see errors", _field_errors(exc)
        )
    answer = {"endpoint": body.endpoint, "created": done.created}
    return json_response(request, answer, 201 if done.created else 200)


def _endpoint_from_body(request: HttpRequest) -> str | None:
    if not request.body:
        return None
    try:
        data = json.loads(request.body)
    except ValueError:
        raise HttpError(400, 'the body is not valid JSON: send {"endpoint": ...}') from None
    endpoint = data.get("endpoint") if isinstance(data, dict) else None
    if not isinstance(endpoint, str):
        raise HttpError(400, 'the body has no endpoint: send {"endpoint": ...} or ?endpoint=')
    return endpoint


@router.delete(
    "/push/subscriptions",
    auth=browser_user,
    response={204: None, **errors(400, 401, 403, 404)},
)
async def unsubscribe(
    request,
    endpoint: str | None = Query(
        None, max_length=ENDPOINT_MAX_LENGTH, description="the subscription's endpoint"
    ),
):
    """Remove the user's subscription at ``endpoint`` (the query parameter, or ``{"endpoint"}``
    as the body): 204, or 404 when they have none there. Another user's subscription is never
    removed."""
    if endpoint is None:
        endpoint = _endpoint_from_body(request)
    if not endpoint:
        raise HttpError(400, "say which subscription: ?endpoint=<its endpoint URL>")
    if "\x00" in endpoint:
        raise HttpError(400, "the endpoint must not contain the NUL character")
    removed = await db_threads.run(subscriptions.unsubscribe, request.auth, endpoint)
    if not removed:
        raise HttpError(404, "you have no push subscription at this endpoint")
    return HttpResponse(status=204)
