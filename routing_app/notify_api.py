"""``notify()`` / ``anotify()``: create a notification from Python code inside this project.

    from routing_app import notify
    notify("user:42", "invoice.paid", {"invoice": 1017})

The module is not called ``notify.py``: importing a submodule sets the package attribute of the
same name, which would then shadow the function for ``from routing_app import notify``.
"""

from __future__ import annotations

from .ingest import IngestResult, NotificationIn, aingest, ingest


def notify(
    topic: str,
    event: str,
    data: dict | None = None,
    *,
    severity: str = "info",
    source: str = "user",
    idempotency_key: str | None = None,
    recipients: list[str] | None = None,
) -> IngestResult:
    """Store one notification and route it; return its id and topic seq.

    Raises ``IngestError`` (``.errors`` names each bad field) for bad input and
    ``IdempotencyConflict`` when the key was used with another body. Called inside
    ``transaction.atomic()``, the notification commits (and reaches clients) with that
    transaction, and disappears with it on rollback; until then the topic's row stays locked, so
    other writers of the topic wait: keep such transactions short.
    """
    item = NotificationIn.of(topic, event, data, severity, source, idempotency_key, recipients)
    return ingest([item])[0]


async def anotify(
    topic: str,
    event: str,
    data: dict | None = None,
    *,
    severity: str = "info",
    source: str = "user",
    idempotency_key: str | None = None,
    recipients: list[str] | None = None,
) -> IngestResult:
    """``notify`` for async code (runs the transaction on a database thread)."""
    item = NotificationIn.of(topic, event, data, severity, source, idempotency_key, recipients)
    return (await aingest([item]))[0]
