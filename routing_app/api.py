"""The router's HTTP endpoints (ingest, sources, topic history): a ninja Router that
notify_project/api.py mounts at ``/api/v1/`` beside the realtime edge's.

Ingest answers ``202 {id, topic, seq}`` only after the transaction committed. A retry with the same
``idempotency_key`` (and the same body) gets the first answer again, also ``202``, with the header
``Idempotent-Replayed: true``; the same key with another body gets 422.

Every error answer is ``{"detail": str, "errors": [{"loc": [...], "msg": str}]}``; ``loc`` is the
JSON path of the bad field in the request body (``["query", name]`` for query parameters;
``error_response`` builds it, here and in notify_project/api.py's error handlers):
400 bad input, 401 no/invalid/revoked key, 403 key lacks the scope, source or topic, 413 body too
large, 415 not JSON, 422 idempotency key reused with another body, 429 over the key's rate
(``Retry-After``), 503 database unreachable or not answering within ``INGEST_DEADLINE_S``: nothing
stored (``Retry-After``), 504 the commit was sent but not confirmed by the deadline: it may be
stored, a retry with the same ``idempotency_key`` tells (``Retry-After``). While the rate
limiter's Redis is away, each process counts its share of the key's rate (apikeys.py).

Order of checks: body size and content type, then the key (401/403), then the body's shape (400),
then the key's rights on what it posts (403), then, on a database thread, the rate (429) and the
transaction. Posts to ``/notifications`` and ``/notifications/batch`` of concurrent requests share
transactions (group_commit.py); each still gets its own answer. The ingest paths are served by a
lean handler without Django's sync middleware (asgi_api.py).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from ninja import Field, Path, Query, Router, Schema
from ninja.decorators import decorate_view
from ninja.errors import AuthorizationError
from ninja.renderers import JSONRenderer
from pydantic import AfterValidator, BaseModel, ConfigDict

from . import apikeys, db_threads, group_commit, sources, stream_reads
from .apikeys import ApiKeyAuth, KeyInfo
from .ingest import (
    BATCH_MAX_ITEMS,
    EVENT_MAX_LENGTH,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    KEEP_FIRST,
    REFUSE,
    IngestError,
    IngestResult,
    NotificationIn,
    check,
    persist,
)
from .ingest_deadline import CommitWindow, NotStored, deadline_of, store_by_deadline
from .models import SEVERITIES, SOURCES
from .topics import TOPIC_MAX_LENGTH, TOPIC_SCHEMA_PATTERN, is_valid_topic

# One notification's body: its data may be up to MAX_MESSAGE_BYTES, the envelope is small.
SINGLE_BODY_MAX_BYTES = settings.MAX_MESSAGE_BYTES
# Batches and multi-alert webhooks; below Django's DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB), which
# would otherwise refuse first, with a 400.
BATCH_BODY_MAX_BYTES = 2 * 1024 * 1024
HISTORY_MAX_LIMIT = 1000
RECIPIENT_MAX_LENGTH = 500  # a delivery's recipient column

# The project's API renders with this one too (notify_project/api.py passes it to NinjaAPI), so
# an answer built here, past ninja's response validation, is rendered as ninja renders the others.
RENDERER = JSONRenderer()

router = Router(tags=["ingest"])
ingest_key = ApiKeyAuth(scope="ingest")
any_key = ApiKeyAuth()


# --- schemas ----------------------------------------------------------------------------------

# What the schema states of a topic name (ingest's validation and topics.TOPIC_RE enforce it, with
# messages of their own).
TOPIC_SCHEMA = {"pattern": TOPIC_SCHEMA_PATTERN, "maxLength": TOPIC_MAX_LENGTH}
# Text the database can store: no NUL (Postgres refuses it in text; unpaired surrogates, which
# UTF-8 cannot encode, cannot be stated in a pattern but are refused too).
STORABLE_TEXT_PATTERN = "^[^\\u0000]*$"


def text_schema(min_length: int | None = None, max_length: int | None = None) -> dict:
    """The JSON Schema of a text field the database stores (``min_length``..``max_length``)."""
    schema: dict[str, Any] = {"pattern": STORABLE_TEXT_PATTERN}
    if min_length is not None:
        schema["minLength"] = min_length
    if max_length is not None:
        schema["maxLength"] = max_length
    return schema


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError(
            "must not contain the NUL character (\\u0000), which Postgres cannot store"
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must not contain unpaired surrogates (\\ud800-\\udfff)") from None
    return value


def storable_text(min_length: int = 0, max_length: int | None = None, **field: Any) -> Any:
    """A request field of text the database can store: refused with 400 and a message saying
    why when it holds NUL or an unpaired surrogate or has not ``min_length``..``max_length``
    characters (stated in the schema too)."""
    return Annotated[
        str,
        Field(
            min_length=min_length,
            max_length=max_length,
            json_schema_extra={"pattern": STORABLE_TEXT_PATTERN},
            **field,
        ),
        AfterValidator(_storable),  # after the length: a 50 MB name is not scanned
    ]


# Request bodies are plain pydantic models: ninja.Schema's per-object validator (for Django
# attribute access, not needed on input) cost half the CPU of a 100-item batch (measured).
class NotificationBody(BaseModel):
    """One notification to store and route."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not dropped

    topic: str = Field(
        examples=["alerts.k8s"],
        description="lowercase segments, '.' or ':'",
        json_schema_extra=TOPIC_SCHEMA,
    )
    event: str = Field(
        examples=["pod.crashloop"], json_schema_extra=text_schema(1, EVENT_MAX_LENGTH)
    )
    data: dict[str, Any] | None = Field(None, description="a JSON object, at most 64 KB encoded")
    severity: Literal[tuple(SEVERITIES)] = "info"  # type: ignore[valid-type]
    source: Literal[tuple(SOURCES)] = "api"  # type: ignore[valid-type]
    idempotency_key: str | None = Field(
        None,
        description="retries with it store once",
        json_schema_extra=text_schema(1, IDEMPOTENCY_KEY_MAX_LENGTH),
    )
    recipients: list[storable_text(0, RECIPIENT_MAX_LENGTH)] = Field(  # type: ignore[valid-type]
        default_factory=list, description="extra addresses: email, +E.164, URL"
    )

    def to_item(self) -> NotificationIn:
        return NotificationIn.of(
            self.topic,
            self.event,
            self.data,
            self.severity,
            self.source,
            self.idempotency_key,
            self.recipients,
        )


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    notifications: list[NotificationBody] = Field(min_length=1, max_length=BATCH_MAX_ITEMS)


class Accepted(Schema):
    id: str
    topic: str
    seq: int


class AcceptedItem(Accepted):
    replayed: bool = Field(description="true when an earlier request stored it (same key)")


class AcceptedList(Schema):
    results: list[AcceptedItem]


class ErrorItem(Schema):
    loc: list[str | int]
    msg: str


class ErrorOut(Schema):
    detail: str
    errors: list[ErrorItem] = []


class Envelope(Schema):
    type: Literal["notification"]
    topic: str
    seq: int
    id: str
    event: str
    data: dict[str, Any]
    severity: str
    source: str
    ts: str


class History(Schema):
    topic: str
    last_seq: int = Field(description="the topic's newest seq (0: nothing stored yet)")
    notifications: list[Envelope]
    next_after: int = Field(description="pass as ?after= to read on")


ERRORS: dict[int, type] = {code: ErrorOut for code in (400, 401, 403, 413, 415, 422, 429, 503)}
INGEST_ERRORS: dict[int, type] = {**ERRORS, 504: ErrorOut}  # 504: a commit in doubt
# What an operation that takes no body answers when it fails (no 413, 415, 422).
READ_ERRORS: dict[int, type] = {code: ErrorOut for code in (400, 401, 403, 429, 503)}
TOPIC_PATH = Path(
    description="a topic name",
    pattern=TOPIC_SCHEMA["pattern"],
    max_length=TOPIC_SCHEMA["maxLength"],
)


# --- OpenAPI links: where an answer's values are used next ----------------------------------------


def link(operation_id: str, description: str, **parameters: str) -> dict:
    """An OpenAPI link to ``operation_id`` filling its ``parameters`` with runtime expressions
    (``$response.body#/topic``)."""
    return {"operationId": operation_id, "parameters": parameters, "description": description}


def links(status: int, **named: dict) -> dict:
    """``openapi_extra`` giving the ``status`` answer of an operation its ``named`` links."""
    return {"responses": {status: {"links": named}}}


def _accepted_links(pointer: str) -> dict:
    """The links of an ingest answer whose first notification is at JSON ``pointer``."""
    return {
        "history": link(
            HISTORY_OPERATION,
            "read the topic the notification was stored on",
            topic=f"$response.body#{pointer}/topic",
        ),
        "later": link(
            HISTORY_OPERATION,
            "what the topic stored after this notification",
            topic=f"$response.body#{pointer}/topic",
            after=f"$response.body#{pointer}/seq",
        ),
        "deliveries": link(
            NOTIFICATION_DETAIL_OPERATION,
            "the notification with its deliveries",
            notification_id=f"$response.body#{pointer}/id",
        ),
    }


# django-ninja's operation ids: <module path>_<function name>
HISTORY_OPERATION = "routing_app_api_topic_history"
NOTIFICATION_DETAIL_OPERATION = "routing_app_delivery_api_notification_detail"


# --- answers ----------------------------------------------------------------------------------


def json_response(request: HttpRequest, data: Any, status: int) -> HttpResponse:
    """``data`` as a JSON answer with ``status``, rendered as the API renders (``RENDERER``)."""
    content = RENDERER.render(request, data, response_status=status)
    content_type = f"{RENDERER.media_type}; charset={RENDERER.charset}"
    return HttpResponse(content, status=status, content_type=content_type)


def error_response(
    request: HttpRequest,
    status: int,
    detail: str,
    errors: list[dict] | None = None,
    retry_after_s: int | None = None,
) -> HttpResponse:
    """The API's error answer: ``{"detail", "errors"}`` with ``status`` (and ``Retry-After``)."""
    response = json_response(request, {"detail": detail, "errors": errors or []}, status)
    if retry_after_s is not None:
        response["Retry-After"] = str(retry_after_s)
    return response


def json_body(max_bytes: int):
    """Operation decorator: 415 unless the body is JSON, 413 if over ``max_bytes``.

    Runs before authentication and parsing, so an oversized or non-JSON body costs nothing more.
    """

    def decorate(run):
        @functools.wraps(run)
        async def checked(request: HttpRequest, *args, **kwargs):
            content_type = (request.content_type or "").lower()
            if content_type != "application/json" and not content_type.endswith("+json"):
                return error_response(
                    request, 415, "send the body as JSON with 'Content-Type: application/json'"
                )
            too_big = error_response(
                request, 413, f"the body is larger than the limit of {max_bytes} bytes"
            )
            try:
                declared = int(request.headers.get("Content-Length") or 0)
                if declared > max_bytes or len(request.body) > max_bytes:
                    return too_big
            except RequestDataTooBig:
                return too_big
            except ValueError:
                return error_response(request, 400, "the Content-Length header is not a number")
            return await run(request, *args, **kwargs)

        return checked

    return decorate


# --- the work on a database thread --------------------------------------------------------------


def _authorize(key: KeyInfo, items: list[NotificationIn]) -> None:
    """403 unless the key may post every item's source and topic (invalid topics are left to
    ingest's validation, which answers 400 with the field)."""
    for item in items:
        if not key.allows_source(item.source):
            raise AuthorizationError(403, f"this API key may not post source '{item.source}'")
        if is_valid_topic(item.topic) and not key.allows_topic(item.topic):
            raise AuthorizationError(403, f"this API key may not post to topic '{item.topic}'")


def _ingest_as(
    key: KeyInfo, items: list[NotificationIn], on_conflict: str, window: CommitWindow
) -> list[IngestResult]:
    if window.closed:  # its deadline passed while it waited for a database thread
        raise NotStored()
    apikeys.check_rate(key)
    apikeys.touch(key)
    return persist(items, on_conflict=on_conflict, windows=[window])


def _locate(exc: IngestError, loc_prefix: list | None) -> IngestError:
    """Point a batch's error paths into its list (ingest omits the index for one item)."""
    if loc_prefix is not None:
        for error in exc.errors:
            loc = error["loc"]
            error["loc"] = loc_prefix + (loc if isinstance(loc[0], int) else [0, *loc])
    return exc


async def _store(
    request: HttpRequest,
    items: list[NotificationIn],
    on_conflict: str,
    loc_prefix: list | None = None,
) -> list[IngestResult]:
    """Authorize, check and store ``items`` for the request's key by the request's deadline
    (ingest_deadline.py): API posts (``REFUSE``) join the group commit (group_commit.py); source
    posts, which keep the first of a reused key, go alone."""
    key, deadline = request.auth, deadline_of(request)
    _authorize(key, items)
    try:
        check(items)
        if on_conflict == REFUSE:
            return await group_commit.submit(key, items, deadline)
        store = functools.partial(_ingest_as, key, items, on_conflict)
        return await store_by_deadline(deadline, store)
    except IngestError as exc:
        raise _locate(exc, loc_prefix) from None


def _accepted_list(request: HttpRequest, results: list[IngestResult]) -> HttpResponse:
    body = {"results": [{**r.answer(), "replayed": not r.created} for r in results]}
    return json_response(request, body, 202)


# --- endpoints --------------------------------------------------------------------------------


@router.post(
    "/notifications",
    response={202: Accepted, **INGEST_ERRORS},
    auth=ingest_key,
    openapi_extra=links(202, **_accepted_links("")),
    summary="Post one notification",
)
@decorate_view(json_body(SINGLE_BODY_MAX_BYTES))
async def post_notification(request: HttpRequest, payload: NotificationBody):
    """Store one notification; 202 with its topic seq once committed."""
    [result] = await _store(request, [payload.to_item()], REFUSE)
    response = json_response(request, result.answer(), 202)
    if not result.created:
        response["Idempotent-Replayed"] = "true"
    return response


@router.post(
    "/notifications/batch",
    response={202: AcceptedList, **INGEST_ERRORS},
    auth=ingest_key,
    openapi_extra=links(202, **_accepted_links("/results/0")),
    summary="Post up to 1000 notifications in one transaction",
)
@decorate_view(json_body(BATCH_BODY_MAX_BYTES))
async def post_batch(request: HttpRequest, payload: BatchBody):
    """All or nothing: one bad item (400, ``loc`` names it) stores none. ``results`` answers
    each item in order; ``replayed`` marks items an earlier request stored (same key)."""
    items = [n.to_item() for n in payload.notifications]
    return _accepted_list(request, await _store(request, items, REFUSE, ["notifications"]))


@router.post(
    "/sources/alertmanager",
    response={202: AcceptedList, **INGEST_ERRORS},
    auth=ingest_key,
    openapi_extra=links(202, **_accepted_links("/results/0")),
    summary="Alertmanager webhook (v4)",
    tags=["sources"],
)
@decorate_view(json_body(BATCH_BODY_MAX_BYTES))
async def post_alertmanager(request: HttpRequest, payload: sources.AlertmanagerWebhook):
    """Point an Alertmanager ``webhook_config`` here (with ``http_config.authorization``
    credentials = the API key). One notification per alert on ``alerts.<alertname>``."""
    items = sources.alertmanager_notifications(payload)
    return _accepted_list(request, await _store(request, items, KEEP_FIRST))


@router.post(
    "/sources/kubernetes",
    response={202: AcceptedList, **INGEST_ERRORS},
    auth=ingest_key,
    openapi_extra=links(202, **_accepted_links("/results/0")),
    summary="Kubernetes Event (core/v1, or kubernetes-event-exporter webhook)",
    tags=["sources"],
)
@decorate_view(json_body(SINGLE_BODY_MAX_BYTES))
async def post_kubernetes(request: HttpRequest, payload: sources.KubernetesEvent):
    """One notification on ``k8s.<namespace>.<kind>``."""
    items = sources.kubernetes_notifications(payload)
    return _accepted_list(request, await _store(request, items, KEEP_FIRST))


@router.post(
    "/sources/workflow",
    response={202: AcceptedList, **INGEST_ERRORS},
    auth=ingest_key,
    openapi_extra=links(202, **_accepted_links("/results/0")),
    summary="Workflow step started/succeeded/failed/compensated",
    tags=["sources"],
)
@decorate_view(json_body(SINGLE_BODY_MAX_BYTES))
async def post_workflow(request: HttpRequest, payload: sources.WorkflowStep):
    """One notification on ``workflow.<workflow>``."""
    items = sources.workflow_notifications(payload)
    return _accepted_list(request, await _store(request, items, KEEP_FIRST))


def _history(key: KeyInfo, topic: str, after: int, limit: int) -> stream_reads.HistoryPage:
    apikeys.check_rate(key)
    apikeys.touch(key)
    return stream_reads.history_page(topic, after, limit)


@router.get(
    "/topics/{topic}/notifications",
    response={200: History, **READ_ERRORS},
    auth=any_key,
    summary="Read a topic's stored notifications after a seq",
)
async def topic_history(
    request: HttpRequest,
    topic: str = TOPIC_PATH,
    after: int = Query(0, ge=0, description="return notifications with seq > after"),
    limit: int = Query(100, ge=1, le=HISTORY_MAX_LIMIT),
):
    """Oldest first. Retention may have trimmed the oldest: compare the first seq with
    ``after + 1`` to see a gap."""
    if not is_valid_topic(topic):
        raise IngestError([{"loc": ["path", "topic"], "msg": "not a valid topic name"}])
    key: KeyInfo = request.auth
    if not key.allows_topic(topic):
        raise AuthorizationError(403, f"this API key may not read topic '{topic}'")
    page = await db_threads.run(_history, key, topic, after, limit)
    history = {
        "topic": topic,
        "last_seq": page.last_seq,
        "notifications": page.notifications,
        "next_after": page.next_after,
    }
    return json_response(request, history, 200)
