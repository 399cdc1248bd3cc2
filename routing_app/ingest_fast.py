"""The fast path of ``POST /api/v1/notifications``: a well-formed single post, straight from ASGI.

Why: with the lean handler of asgi_api.py, a single post still spent about four fifths of its
request CPU outside the view (the Django request and response objects, the middleware chain,
django-ninja's operation: its parameter models, auth and checks) and a fifth in storing it.

What: ``serve`` reads the request itself and takes the request everyone sends: a bearer token,
``Content-Type: application/json`` without ``Origin`` (CORS is the middleware's), a body within
the limit that is a JSON object of known fields with exactly the types the endpoint's model
declares. It runs the endpoint's own steps on it (``apikeys.authenticate_raw`` and the scope,
``api._authorize``, ``ingest.check``, ``group_commit.submit``) and answers 202 with the same body
and headers, or, when a step refuses (401, 403, 400, 429, 422, 503, 504), the answer the API's
exception handlers give. Any other request goes to the endpoint unchanged, with the body already
read. tests/test_ingest_fast.py compares the answers of both paths, case by case.
"""

from __future__ import annotations

import functools
import json
import re
import time
from io import BytesIO

from django.conf import settings

from . import group_commit
from .api import RECIPIENT_MAX_LENGTH, RENDERER, SINGLE_BODY_MAX_BYTES, _authorize, ingest_key
from .apikeys import authenticate_raw
from .ingest import NotificationIn, check
from .metrics.instruments import INGEST_DURATION
from .models import SEVERITIES, SOURCES

PATH = "/api/v1/notifications"
FIELDS = frozenset(
    ("topic", "event", "data", "severity", "source", "idempotency_key", "recipients")
)
_CONTENT_TYPE = f"{RENDERER.media_type}; charset={RENDERER.charset}".encode()
_ENABLED = True  # tests compare both paths by turning this one off


def takes(scope: dict) -> bool:
    return _ENABLED and scope["method"] == "POST" and scope["path"] == PATH


async def serve(handler, scope: dict, receive, send) -> None:
    """Answer the post in ``scope``, or hand it to ``handler`` (asgi_api's IngestASGIHandler)."""
    started = time.perf_counter()
    body, complete = await _read(receive)
    if body is None:  # the client went away
        return
    token = _bearer_json_request(scope, len(body)) if complete else None
    item = _item(body) if token is not None else None
    if item is None:
        return await handler(scope, _replay(body, complete, receive), send)
    deadline = time.monotonic() + settings.INGEST_DEADLINE_S
    try:
        key = ingest_key.scoped(await authenticate_raw(token, deadline))
        _authorize(key, [item])
        check([item])
        [result] = await group_commit.submit(key, [item], deadline)
    except Exception as exc:  # noqa: BLE001  (answered by the API's exception handlers)
        await _refused(handler, scope, body, exc, send)
    else:
        await _accepted(send, result)
    finally:
        INGEST_DURATION.observe(time.perf_counter() - started)


async def _refused(handler, scope: dict, body: bytes, exc: Exception, send) -> None:
    """The endpoint's answer to ``exc`` (its exception handlers, its middleware's headers)."""
    from notify_project.api import api

    request, _ = handler.create_request(scope, BytesIO(body))
    response = api.on_exception(request, exc)
    for name, value in _middleware_headers():
        response.headers.setdefault(name.decode(), value.decode())
    await handler.send_response(response, send)


async def _read(receive) -> tuple[bytes | None, bool]:
    """The body, up to just over the limit; (None, _) when the client disconnected; ``complete``
    False when more is left to read (the endpoint then answers 413)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body"):
            return b"".join(chunks), True
        if size > SINGLE_BODY_MAX_BYTES:
            return b"".join(chunks), False


def _replay(body: bytes, complete: bool, receive):
    """``receive`` giving back what was read first, then the rest of the request."""
    replayed = False

    async def again() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return again


def _bearer_json_request(scope: dict, length: int) -> str | None:
    """The bearer token of a plain same-origin JSON request within the limit, else None."""
    token = None
    content_type = declared = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, raw = value.decode("latin-1").partition(" ")
            token = raw.strip() if scheme.lower() == "bearer" else None
        elif name == b"content-type":
            content_type = value.split(b";", 1)[0].strip().lower()
        elif name == b"content-length":
            declared = value
        elif name == b"origin":
            return None  # CORS: the endpoint's middleware answers it
    if content_type != b"application/json" or length > SINGLE_BODY_MAX_BYTES:
        return None
    if declared is not None and (not declared.isdigit() or int(declared) > SINGLE_BODY_MAX_BYTES):
        return None
    return token or None


def _item(body: bytes) -> NotificationIn | None:
    """The notification of a body the endpoint's model accepts as it is (a JSON object of
    known fields with exactly the types it declares), or None."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if type(payload) is not dict or not payload.keys() <= FIELDS:
        return None
    topic, event = payload.get("topic"), payload.get("event")
    data = payload.get("data")
    severity, source = payload.get("severity", "info"), payload.get("source", "api")
    key, recipients = payload.get("idempotency_key"), payload.get("recipients", [])
    if (
        type(topic) is not str
        or type(event) is not str
        or (data is not None and type(data) is not dict)
        or type(severity) is not str
        or severity not in SEVERITIES
        or type(source) is not str
        or source not in SOURCES
        or (key is not None and type(key) is not str)
        or type(recipients) is not list
        or any(type(r) is not str or len(r) > RECIPIENT_MAX_LENGTH for r in recipients)
    ):
        return None
    return NotificationIn.of(topic, event, data, severity, source, key, recipients)


@functools.cache
def _cors_enabled() -> bool:
    from corsheaders.conf import conf

    return re.match(conf.CORS_URLS_REGEX, PATH) is not None


def _middleware_headers() -> list[tuple[bytes, bytes]]:
    """What the endpoint's middleware (asgi_api.INGEST_MIDDLEWARE) adds to an answer without
    Origin: corsheaders' Vary on a CORS-enabled path, and the two security headers."""
    headers = [(b"vary", b"origin")] if _cors_enabled() else []
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"x-content-type-options", b"nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        headers.append((b"referrer-policy", settings.SECURE_REFERRER_POLICY.encode()))
    return headers


async def _accepted(send, result) -> None:
    """The endpoint's 202: the same body, and the headers its middleware adds."""
    content = RENDERER.render(None, result.answer(), response_status=202).encode(RENDERER.charset)
    headers = [(b"content-type", _CONTENT_TYPE), *_middleware_headers()]
    if not result.created:
        headers.append((b"idempotent-replayed", b"true"))
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": content})
