"""Ingest: validate, persist with the topic's next seq, and hand to the router after commit.

Contract (DESIGN.md, guarantees): a returned result means the row is committed. Per topic, ``seq``
is 1, 2, 3... with no gap and no duplicate, in commit order: the topic row is locked and its
``last_seq`` advanced inside the same transaction that inserts the notification, so a rolled-back
insert also rolls back its seq. A retried item with the same ``(source, idempotency_key)`` returns
the first answer; racing retries are serialized by a transaction-scoped advisory lock on the key.

A reused key with a different body is refused (``IdempotencyConflict``), unless the caller says the
key alone names the event (``on_conflict=KEEP_FIRST``): webhook sources re-send the same alert or
event with details that changed (annotations, counters), and the first stored one is the answer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
import zlib
from dataclasses import dataclass, field

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from . import router
from .ingest_deadline import (
    CommitInDoubt,
    CommitWindow,
    NotStored,
    claim_commit,
    missed,
    settle,
    store_by_deadline,
)
from .models import SEVERITIES, SOURCES, Notification
from .stream_writes import insert_notifications
from .topics import is_valid_topic

EVENT_MAX_LENGTH = 100
IDEMPOTENCY_KEY_MAX_LENGTH = 200
BATCH_MAX_ITEMS = 1000
REFUSE = "refuse"  # a reused idempotency key with another body raises IdempotencyConflict
KEEP_FIRST = "keep_first"  # ... answers with the first stored notification
# allow_nan=False: Python's json accepts NaN/Infinity, JSON (and Postgres) do not. One instance
# (stateless, thread-safe): json.dumps with options builds a new encoder per call (~1.5 us).
_DATA_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class IngestError(Exception):
    """Bad input. ``errors`` is a list of ``{"loc": [...], "msg": str}`` (JSON paths)."""

    status = 400

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


class IdempotencyConflict(IngestError):
    """The idempotency key was used before with a different body."""

    status = 422


@dataclass
class NotificationIn:
    topic: str
    event: str
    data: dict = field(default_factory=dict)
    severity: str = "info"
    source: str = "api"
    idempotency_key: str | None = None
    recipients: list[str] = field(default_factory=list)
    # Names of routes that also deliver this notification, whatever they match (Python callers
    # only, e.g. an alert rule's route; the HTTP API does not take it).
    also_routes: list[str] = field(default_factory=list)
    # ``data`` as stored (compact JSON), set by validate() so it is encoded once
    data_json: str | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(
        cls,
        topic: str,
        event: str,
        data: dict | None = None,
        severity: str = "info",
        source: str = "api",
        idempotency_key: str | None = None,
        recipients=(),
    ) -> NotificationIn:
        """From the fields a request or a caller gives (no data: an empty object)."""
        return cls(
            topic=topic,
            event=event,
            data=data if data is not None else {},
            severity=severity,
            source=source,
            idempotency_key=idempotency_key,
            recipients=list(recipients or ()),
        )

    def body_hash(self) -> str:
        body = [self.topic, self.event, self.data, self.severity, sorted(self.recipients)]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class IngestResult:
    id: str
    topic: str
    seq: int
    created: bool

    def answer(self) -> dict:
        return {"id": self.id, "topic": self.topic, "seq": self.seq}


def _text_problem(value) -> str | None:
    """Why a string cannot be stored (Postgres refuses NUL; UTF-8 cannot hold lone surrogates)."""
    if not isinstance(value, str):
        return "must be a string"
    if "\x00" in value:
        return "must not contain the NUL character"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "must not contain unpaired surrogates (\\ud800-\\udfff)"
    return None


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _data_problem(item: NotificationIn) -> str | None:
    """Why ``item.data`` cannot be stored, or None after setting ``item.data_json``."""
    if not isinstance(item.data, dict):
        return "must be a JSON object"
    try:
        encoded = _DATA_ENCODER.encode(item.data)
        size = len(encoded.encode())  # UnicodeEncodeError (a ValueError) on lone surrogates
    except (TypeError, ValueError):
        return "must be plain JSON: no NaN or Infinity, no unpaired surrogates"
    if size > settings.MAX_MESSAGE_BYTES:
        return f"is {size} bytes encoded; the limit is {settings.MAX_MESSAGE_BYTES}"
    if "\\u0000" in encoded and _has_nul(item.data):
        return "must not contain the NUL character (\\u0000), which Postgres cannot store"
    item.data_json = encoded
    return None


def validate(item: NotificationIn, loc: tuple = ()) -> list[dict]:
    """Return the errors of one item (empty when valid). Checks what the schema cannot: also
    anything the database would refuse, so bad input is a 400, never a database error."""
    errors = []

    def bad(name: str, msg: str) -> None:
        errors.append({"loc": [*loc, name], "msg": msg})

    if not is_valid_topic(item.topic):
        bad(
            "topic",
            "use lowercase segments of a-z, 0-9, _ or - separated by '.' or ':', "
            "at most 200 characters (e.g. 'alerts.k8s', 'user:42')",
        )
    problem = _text_problem(item.event)
    if problem or not item.event or len(item.event) > EVENT_MAX_LENGTH:
        bad(
            "event",
            problem
            or f"give an event name of 1 to {EVENT_MAX_LENGTH} characters, e.g. 'pod.crash'",
        )
    if item.severity not in SEVERITIES:
        bad("severity", f"must be one of {', '.join(SEVERITIES)}")
    if item.source not in SOURCES:
        bad("source", f"must be one of {', '.join(SOURCES)}")
    problem = _data_problem(item)
    if problem:
        bad("data", problem)
    key = item.idempotency_key
    if key is not None:
        problem = _text_problem(key)
        if problem or not key or len(key) > IDEMPOTENCY_KEY_MAX_LENGTH:
            bad(
                "idempotency_key",
                problem or f"must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} characters",
            )
    if not isinstance(item.also_routes, list) or any(
        not isinstance(name, str) for name in item.also_routes
    ):
        bad("also_routes", "must be a list of route names")
    if not isinstance(item.recipients, list):
        bad("recipients", "must be a list of addresses")
    else:
        for index, address in enumerate(item.recipients):
            problem = _text_problem(address)
            if problem:
                errors.append({"loc": [*loc, "recipients", index], "msg": problem})
    return errors


def check(items: list[NotificationIn]) -> None:
    """Raise IngestError (400) naming every bad field of ``items`` (JSON paths; the item's index
    first when there are several). Valid items get their ``data_json`` set for ``persist``."""
    errors = []
    for index, item in enumerate(items):
        errors += validate(item, (index,) if len(items) > 1 else ())
    if errors:
        raise IngestError(errors)


def persist(
    items: list[NotificationIn],
    *,
    on_conflict: str = REFUSE,
    windows: list[CommitWindow] | None = None,
) -> list[IngestResult]:
    """Store ``items``, already ``check``-ed, in one transaction (see ``ingest``).

    With ``windows`` (the requests' commit windows, ingest_deadline.py) the transaction commits
    only if every window is still open and within its deadline; else it rolls back and NotStored
    (503) is raised. A connection lost during the COMMIT itself raises CommitInDoubt (504): the
    database may have committed before the connection went.
    """
    if windows is None:
        with transaction.atomic():
            return _persist(items, on_conflict)
    claimed = False
    try:
        with transaction.atomic():
            results = _persist(items, on_conflict)
            claim_commit(windows)  # the last step before COMMIT: raising here rolls back
            claimed = True
        return results
    except (OperationalError, InterfaceError) as exc:
        if claimed:
            missed("in_doubt", len(windows))
            raise CommitInDoubt() from exc
        raise
    finally:
        settle(windows)


def ingest(items: list[NotificationIn], *, on_conflict: str = REFUSE) -> list[IngestResult]:
    """Persist ``items`` in one transaction; return one result per item, in order.

    Raises IngestError (400) for invalid items (nothing stored), IdempotencyConflict (422) when a
    key is reused with another body (with ``on_conflict=REFUSE``), and the database's
    OperationalError when it is unreachable.
    """
    check(items)
    return persist(items, on_conflict=on_conflict)


async def aingest(items: list[NotificationIn], *, on_conflict: str = REFUSE) -> list[IngestResult]:
    """``ingest`` for async code, on a database pool thread (see db_threads), by ingest's
    deadline: also raises NotStored (not committed within INGEST_DEADLINE_S, rolled back) and
    CommitInDoubt (the commit was sent and not confirmed by then), both DatabaseErrors."""
    deadline = time.monotonic() + settings.INGEST_DEADLINE_S
    return await store_by_deadline(deadline, functools.partial(_ingest_within, items, on_conflict))


def _ingest_within(
    items: list[NotificationIn], on_conflict: str, window: CommitWindow
) -> list[IngestResult]:
    if window.closed:  # its deadline passed while it waited for a database thread
        raise NotStored()
    check(items)
    return persist(items, on_conflict=on_conflict, windows=[window])


def _persist(items: list[NotificationIn], on_conflict: str) -> list[IngestResult]:
    results: list[IngestResult | None] = [None] * len(items)
    _lock_idempotency_keys(items)
    existing = _existing_by_key(items)
    fresh: list[tuple[int, NotificationIn]] = []
    seen_keys: dict[tuple[str, str], int] = {}
    for index, item in enumerate(items):
        key = (item.source, item.idempotency_key) if item.idempotency_key else None
        if key and key in existing:
            row = existing[key]
            if on_conflict == REFUSE and row.body_hash != item.body_hash():
                raise IdempotencyConflict(
                    [
                        {
                            "loc": [index, "idempotency_key"]
                            if len(items) > 1
                            else ["idempotency_key"],
                            "msg": f"{item.idempotency_key!r} was already used with a different "
                            "body; use a new key for a new notification",
                        }
                    ]
                )
            results[index] = IngestResult(str(row.id), row.topic.name, row.seq, created=False)
        elif key and key in seen_keys:
            results[index] = seen_keys[key]  # repeated within one batch: same answer
        else:
            fresh.append((index, item))
            if key:
                seen_keys[key] = index
    if fresh:
        created = _insert(fresh)
        for (index, _), result in zip(fresh, created, strict=True):
            results[index] = result
    for index, result in enumerate(results):
        if isinstance(result, int):  # the same answer; this one stored nothing new
            results[index] = dataclasses.replace(results[result], created=False)
    return results  # type: ignore[return-value]


def _lock_idempotency_keys(items: list[NotificationIn]) -> None:
    """Serialize concurrent requests carrying the same key until the first one commits."""
    if connection.vendor != "postgresql":
        return  # SQLite: transactions are IMMEDIATE (settings), writers are already serialized
    keys = sorted(
        {
            zlib.crc32(f"{i.source}\0{i.idempotency_key}".encode())
            for i in items
            if i.idempotency_key
        }
    )
    if keys:
        with connection.cursor() as cursor:
            # 42 namespaces these locks; sorted to avoid deadlocks between batches
            cursor.execute(
                "SELECT pg_advisory_xact_lock(42, k) FROM unnest(%s::int[]) AS k ORDER BY k",
                [[k - 2**31 for k in keys]],
            )


def _existing_by_key(items: list[NotificationIn]) -> dict[tuple[str, str], Notification]:
    keyed = [(i.source, i.idempotency_key) for i in items if i.idempotency_key]
    if not keyed:
        return {}
    rows = Notification.objects.select_related("topic").filter(
        source__in={s for s, _ in keyed}, idempotency_key__in={k for _, k in keyed}
    )
    return {(r.source, r.idempotency_key): r for r in rows}


def _insert(fresh: list[tuple[int, NotificationIn]]) -> list[IngestResult]:
    items = [item for _, item in fresh]
    rows, topic_ids = insert_notifications(items, timezone.now())
    recipients = {id(row): item.recipients for row, item in zip(rows, items, strict=True)}
    also = {id(row): item.also_routes for row, item in zip(rows, items, strict=True)}
    router.route(rows, topic_ids, recipients, also)
    return [
        IngestResult(str(row.id), item.topic, row.seq, created=True)
        for row, item in zip(rows, items, strict=True)
    ]
