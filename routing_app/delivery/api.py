"""HTTP endpoints of outbound delivery, mounted at ``/api/v1/`` by notify_project/api.py:

- ``GET /deliveries?status=&channel=&notification=``: deliveries, newest first, paged by
  ``before`` (a delivery id);
- ``GET /notifications/{id}``: one notification with its deliveries and their attempts;
- ``POST /deliveries/{id}/retry``: replay a dead delivery (202), 409 when it is not dead;
- ``POST /providers/{id}/receipts``: an SMS gateway's status callback (Twilio's form fields,
  signed with ``X-Twilio-Signature``), no API key: the signature is the proof.

Reading and retrying need an API key with the ``deliveries`` scope; a key limited to some topics
sees the deliveries of those topics only.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from django.http import HttpRequest, HttpResponse
from ninja import Query, Router, Schema
from ninja.errors import HttpError

from .. import apikeys, db_threads
from ..api import ERRORS, Envelope, error_response, json_response
from ..apikeys import ApiKeyAuth, KeyInfo
from ..models import Delivery, Notification
from . import receipts, service

router = Router(tags=["deliveries"])
deliveries_key = ApiKeyAuth(scope="deliveries")
PAGE_MAX = 500
NOTIFICATION_QUERY = Query(None, description="a notification's id")
StatusName = Literal["pending", "sending", "sent", "delivered", "failed", "dead"]


class AttemptOut(Schema):
    number: int
    provider: str | None
    started_at: datetime
    duration_ms: int | None
    outcome: str
    http_status: int | None
    error: str


class DeliveryOut(Schema):
    id: int
    notification: str
    channel: str
    recipient: str
    status: StatusName
    attempts: int
    provider: str | None
    last_error: str
    latency_ms: int | None
    created_at: datetime
    next_attempt_at: datetime | None
    sent_at: datetime | None
    failover_from: int | None


class DeliveryDetail(DeliveryOut):
    attempt_log: list[AttemptOut]


class DeliveryPage(Schema):
    deliveries: list[DeliveryOut]
    next_before: int | None


class NotificationDetail(Schema):
    notification: Envelope
    deliveries: list[DeliveryDetail]


class Replayed(Schema):
    id: int
    status: StatusName


def _delivery_out(d: Delivery) -> dict:
    return {
        "id": d.pk,
        "notification": str(d.notification_id),
        "channel": d.channel.name,
        "recipient": d.recipient,
        "status": d.status,
        "attempts": d.attempts,
        "provider": d.provider.name if d.provider else None,
        "last_error": d.last_error,
        "latency_ms": d.latency_ms,
        "created_at": d.created_at,
        "next_attempt_at": d.next_attempt_at,
        "sent_at": d.sent_at,
        "failover_from": d.failover_from_id,
    }


def _attempt_out(a) -> dict:
    return {
        "number": a.number,
        "provider": a.provider.name if a.provider else None,
        "started_at": a.started_at,
        "duration_ms": a.duration_ms,
        "outcome": a.outcome,
        "http_status": a.http_status,
        "error": a.error,
    }


def _visible(key: KeyInfo, queryset):
    """The deliveries of ``queryset`` whose notification's topic ``key`` may read."""
    if not key.topic_patterns:
        return queryset
    topics = {
        name
        for name in queryset.values_list("notification__topic__name", flat=True).distinct()
        if key.allows_topic(name)
    }
    return queryset.filter(notification__topic__name__in=topics)


def _list(key, status, channel, notification, before, limit) -> dict:
    apikeys.check_rate(key)
    rows = Delivery.objects.select_related("channel", "provider").order_by("-pk")
    if status:
        rows = rows.filter(status=status)
    if channel:
        rows = rows.filter(channel__name=channel)
    if notification:
        rows = rows.filter(notification_id=notification)
    if before:
        rows = rows.filter(pk__lt=before)
    page = list(_visible(key, rows)[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    return {
        "deliveries": [_delivery_out(d) for d in page],
        "next_before": page[-1].pk if more else None,
    }


@router.get(
    "/deliveries",
    response={200: DeliveryPage, **ERRORS},
    auth=deliveries_key,
    summary="List deliveries, newest first",
)
async def list_deliveries(
    request: HttpRequest,
    status: StatusName | None = None,
    channel: str | None = Query(None, description="a channel's name"),
    notification: uuid.UUID | None = NOTIFICATION_QUERY,
    before: int | None = Query(None, ge=1, description="pass next_before to read on"),
    limit: int = Query(100, ge=1, le=PAGE_MAX),
):
    page = await db_threads.run(_list, request.auth, status, channel, notification, before, limit)
    return json_response(request, page, 200)


def _detail(key: KeyInfo, notification_id: uuid.UUID) -> dict | None:
    apikeys.check_rate(key)
    n = Notification.objects.select_related("topic").filter(pk=notification_id).first()
    if n is None or not key.allows_topic(n.topic.name):
        return None
    rows = (
        n.deliveries.select_related("channel", "provider")
        .prefetch_related("attempt_rows__provider")
        .order_by("pk")
    )
    deliveries = [
        {**_delivery_out(d), "attempt_log": [_attempt_out(a) for a in d.attempt_rows.all()]}
        for d in rows
    ]
    return {"notification": n.envelope(n.topic.name), "deliveries": deliveries}


@router.get(
    "/notifications/{notification_id}",
    response={200: NotificationDetail, 404: ERRORS[400], **ERRORS},
    auth=deliveries_key,
    summary="One notification with its deliveries and their attempts",
)
async def notification_detail(request: HttpRequest, notification_id: uuid.UUID):
    detail = await db_threads.run(_detail, request.auth, notification_id)
    if detail is None:
        return error_response(request, 404, f"no notification {notification_id} you may read")
    return json_response(request, detail, 200)


def _retry(key: KeyInfo, delivery_id: int) -> tuple[int, str]:
    apikeys.check_rate(key)
    row = Delivery.objects.select_related("notification__topic").filter(pk=delivery_id).first()
    if row is None or not key.allows_topic(row.notification.topic.name):
        raise HttpError(404, f"no delivery {delivery_id} you may retry")
    if row.status != Delivery.Status.DEAD:
        raise HttpError(409, f"delivery {delivery_id} is {row.status}; only a dead one is retried")
    service.replay(Delivery.objects.filter(pk=row.pk))
    return row.pk, Delivery.Status.PENDING


@router.post(
    "/deliveries/{delivery_id}/retry",
    response={202: Replayed, 404: ERRORS[400], 409: ERRORS[400], **ERRORS},
    auth=deliveries_key,
    summary="Replay a dead delivery",
)
async def retry_delivery(request: HttpRequest, delivery_id: int):
    """The delivery goes back to ``pending`` with its tries reset and is sent again; its earlier
    attempts stay in its history."""
    pk, status = await db_threads.run(_retry, request.auth, delivery_id)
    return json_response(request, {"id": pk, "status": status}, 202)


@router.post(
    "/providers/{provider_id}/receipts",
    response={204: None, 403: ERRORS[400], 404: ERRORS[400], 400: ERRORS[400]},
    auth=None,
    summary="Delivery receipt from an SMS gateway (Twilio status callback)",
)
async def provider_receipt(request: HttpRequest, provider_id: int):
    """Form fields ``MessageSid`` and ``MessageStatus`` (delivered, undelivered, failed, ...),
    signed with ``X-Twilio-Signature`` over this URL with the provider's secret."""
    answer = await db_threads.run(
        receipts.twilio_status,
        provider_id,
        request.build_absolute_uri(),
        {k: v for k, v in request.POST.items()},
        request.headers.get("X-Twilio-Signature", ""),
    )
    if answer.status != 204:
        return error_response(request, answer.status, answer.detail)
    return HttpResponse(status=204)
