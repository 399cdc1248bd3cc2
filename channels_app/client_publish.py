"""A user's publish on a topic: the plain socket's ``publish`` frame and, while a client has fallen
back to Server-Sent Events, ``POST /api/v1/topics/{topic}/publish`` (channels_app/api.py).

One rule for both doors: the topic's PUBLISH right (authz.py), then ingest as source ``user``, so
the notification is stored, routed and fanned out like any other, and the caller gets its seq and
id (the socket's ``ack`` frame, the HTTP answer's body: ``frames.ack``).
"""

from __future__ import annotations

import logging

from django.db import DatabaseError

from routing_app.ingest import IngestError, IngestResult, NotificationIn, aingest

from .authz import PUBLISH, Principal, adecide
from .frames import ErrorCode

log = logging.getLogger(__name__)


class PublishRefused(Exception):
    """The publish was not stored. ``code`` is the error frame's ``ErrorCode`` (forbidden,
    invalid, unavailable), the message says why; ``errors`` holds ingest's field errors
    (``[{"loc", "msg"}]``) for an invalid one."""

    def __init__(self, code: ErrorCode, message: str, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.errors = errors or []


async def publish(principal: Principal, topic: str, event, data, severity) -> IngestResult:
    """Store ``event`` with ``data`` and ``severity`` on ``topic`` as ``principal``'s publish.

    Returns ingest's result (committed: ``seq`` and ``id``). Raises PublishRefused: forbidden
    when the topic's rules do not let this user publish, invalid when ingest refuses the values
    (the message names the field), unavailable when the database does not answer.
    """
    decision = await adecide(principal, topic, PUBLISH)
    if not decision.allowed:
        raise PublishRefused(ErrorCode.FORBIDDEN, decision.reason)
    if not isinstance(event, str) or not isinstance(severity, str):
        raise PublishRefused(
            ErrorCode.INVALID, "publish needs event (a string) and data (an object)"
        )
    item = NotificationIn(topic=topic, event=event, data=data, severity=severity, source="user")
    try:
        [result] = await aingest([item])
    except IngestError as exc:
        raise PublishRefused(ErrorCode.INVALID, str(exc), exc.errors) from None
    except DatabaseError:
        log.warning("a user's publish failed: database unavailable", exc_info=True)
        raise PublishRefused(
            ErrorCode.UNAVAILABLE, "could not store the notification; try again"
        ) from None
    return result
