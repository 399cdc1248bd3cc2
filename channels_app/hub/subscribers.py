"""The hub's contract with the edges: what an edge registers (``Subscriber``), what subscribing
answers (``SubscribeResult``) and the two errors it raises."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from .messages import Message

SUBSCRIBE_TIMEOUT_S = (
    5.0  # waiting for the bus (Redis) to confirm a SUBSCRIBE (HubUnavailable after)
)


class HubUnavailable(Exception):
    """The hub cannot subscribe now (Redis unreachable): the edge asks the client to retry."""


class Unsubscribed(Exception):
    """``subscribe`` gave up because the subscriber was unsubscribed meanwhile (it closed)."""


class Subscriber(Protocol):
    """What an edge registers with the hub (a plain socket, a Phoenix channel join, an SSE stream).

    Optional: ``async def drained(self)`` -- if present, replay awaits it after each message, so
    a long replay waits for the peer instead of overflowing the send queue.
    Optional: ``def deliver_batch(self, batch: Batch)`` -- several consecutive messages at once
    (else ``deliver`` is called for each).
    Optional: ``def unavailable(self)`` -- this process lost the bus (Redis) for longer than
    ``settings.REALTIME_BUS_OUTAGE_S``: detach and close with 1013 (SSE: end the stream with
    ``unavailable``) so the client resumes on another process (else it stays and is back-filled
    once the bus is back).
    """

    encoding: str

    def deliver(self, frame: Any, message: Message) -> None:
        """Called in the loop; must not block; queue (bounded) or ``overflow`` when behind."""

    def deliver_event(self, topic: str, event: str, payload: dict) -> None:
        """An ephemeral topic event (not persisted, no seq)."""

    def overflow(self) -> None:
        """Fell too far behind: close with a "too slow" code."""


@dataclass(frozen=True)
class SubscribeResult:
    last_seq: int  # the subscriber has everything up to here; live continues at last_seq + 1
    reset: bool  # ``since`` was older than retention (or ahead of the stream): nothing replayed
    oldest_seq: int | None  # the oldest stored seq (None when nothing is stored or not asked)


async def wait_live(future: asyncio.Future) -> None:
    """Wait for ``future`` (a subscription being confirmed) without cancelling it.
    Raises HubUnavailable after ``SUBSCRIBE_TIMEOUT_S``."""
    try:
        await asyncio.wait_for(asyncio.shield(future), SUBSCRIBE_TIMEOUT_S)
    except TimeoutError:
        raise HubUnavailable("the realtime bus (Redis) is not reachable") from None
