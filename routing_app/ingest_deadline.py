"""Ingest's deadline: a post is committed within ``settings.INGEST_DEADLINE_S`` of its arrival, or
answered without waiting longer, and what it is told is true.

Why: a database that stops answering (a paused or overloaded Postgres, a cut network) leaves a
database thread in ``Cursor.execute`` on a live connection with nothing to time it out
(``connect_timeout`` covers only new connections; TCP keepalives do not fire against a stopped but
live peer). Without a deadline of its own, every post waits as long as the database does.

Each request has a ``CommitWindow``. The waiting side (the event loop) and the database thread
decide its fate under one lock, so exactly one of them wins:

- the deadline passes before the transaction asked to commit: the window is closed (``expire``),
  the request answers 503 ``NotStored`` with ``Retry-After``, and the database thread, whenever it
  comes back, finds the window closed (``claim_commit``) and rolls the transaction back. Nothing of
  a 503 is ever committed, however late the database answers;
- the transaction asked to commit first (``claim_commit`` marked it committing, then COMMIT was
  sent): if its answer is not in by the deadline, the outcome is unknown (the database may have
  committed and not yet replied) and the request answers 504 ``CommitInDoubt``, which says so: a
  retry with the same ``idempotency_key`` answers with the stored notification if there is one;
- ``claim_commit`` itself refuses once the deadline has passed, even if the waiting side has not
  woken up yet: a group whose deadline passed rolls back, it does not commit.

In a group commit (group_commit.py) the transaction holds several requests; it commits only if
every one of their windows is still open, so one request's deadline rolls the whole group back
(the others answer 503 at once: their notifications were not stored either).

Every miss counts in ``notify_ingest_deadline_missed_total`` (by outcome); the first miss after
``MISS_QUIET_S`` without one logs a warning, so an outage says so once, not once per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest
from ninja.errors import HttpError

from . import db_threads
from .metrics.instruments import ingest_deadline_missed

T = TypeVar("T")
log = logging.getLogger(__name__)

MISS_QUIET_S = 60.0  # a miss after this long without one is a new outage: it is logged

UNAVAILABLE_RETRY_AFTER_S = 5  # what 503 answers tell clients to wait
OPEN, COMMITTING, CLOSED, DONE = "open", "committing", "closed", "done"
_ATTRIBUTE = "_notify_ingest_deadline"
_lock = threading.Lock()  # every window's state changes under it (a few per request)
# time.monotonic() of the latest miss. Read and written without a lock (by the loop and by
# database threads): an accepted race, at worst two warnings when an outage starts.
_last_miss = -math.inf


def missed(outcome: str, requests: int = 1) -> None:
    """Count ``requests`` that missed their deadline (``not_stored`` or ``in_doubt``); warn on
    the first miss of an outage (see the module docstring)."""
    global _last_miss
    ingest_deadline_missed[outcome].inc(requests)
    now = time.monotonic()
    quiet_s, _last_miss = now - _last_miss, now
    if quiet_s > MISS_QUIET_S:
        log.warning(
            "ingest: the database did not commit a post within INGEST_DEADLINE_S (%s s); such "
            "posts answer 503 (504 when their commit was sent but not confirmed), and are "
            "counted in notify_ingest_deadline_missed_total, logged again only after %.0f s "
            "without one",
            settings.INGEST_DEADLINE_S,
            MISS_QUIET_S,
        )


class NotStored(HttpError, DatabaseError):
    """503: the deadline passed before the commit; nothing was or will be stored. Also a
    DatabaseError, as callers of ``aingest`` already expect when the database fails."""

    def __init__(self) -> None:
        super().__init__(
            503,
            f"the database did not answer within {settings.INGEST_DEADLINE_S} s; "
            "nothing was stored, retry later",
        )
        self.retry_after_s = UNAVAILABLE_RETRY_AFTER_S


class CommitInDoubt(HttpError, DatabaseError):
    """504: the commit was sent but not confirmed by the deadline; it may have been stored."""

    def __init__(self) -> None:
        super().__init__(
            504,
            f"the database did not confirm the commit within {settings.INGEST_DEADLINE_S} s, so "
            "the notification may have been stored: retry with the same idempotency_key, which "
            "answers with the stored notification if there is one",
        )
        self.retry_after_s = UNAVAILABLE_RETRY_AFTER_S


def deadline_of(request: HttpRequest) -> float:
    """The request's deadline on ``time.monotonic()``: INGEST_DEADLINE_S after the first call for
    this request (authentication makes it, before any database work)."""
    deadline = getattr(request, _ATTRIBUTE, None)
    if deadline is None:
        deadline = time.monotonic() + settings.INGEST_DEADLINE_S
        setattr(request, _ATTRIBUTE, deadline)
    return deadline


def remaining_s(deadline: float) -> float:
    """Seconds left until ``deadline`` (0 once passed)."""
    return max(0.0, deadline - time.monotonic())


class CommitWindow:
    """Whether one request's notifications may still be committed (see the module docstring)."""

    __slots__ = ("deadline", "state")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.state = OPEN

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    def expire(self) -> str:
        """The waiting side's deadline passed: close the window if the commit was not claimed.
        Returns the state it leaves: CLOSED (answer 503), COMMITTING (504) or DONE (the result is
        on its way: wait for it). Counts the miss, unless the database side already did."""
        with _lock:
            closing = self.state == OPEN
            if closing:
                self.state = CLOSED
            state = self.state
        if closing:
            missed("not_stored")
        elif state == COMMITTING:
            missed("in_doubt")
        return state


def claim_commit(windows: list[CommitWindow]) -> None:
    """On the database thread, as the last step inside the transaction: mark every window
    committing, or raise NotStored (the caller's ``atomic`` then rolls back) if one is closed or
    past its deadline; that one and every other still open are then closed."""
    now = time.monotonic()
    with _lock:
        if all(w.state == OPEN and now < w.deadline for w in windows):
            for window in windows:
                window.state = COMMITTING
            return
        closed_here = 0
        for window in windows:
            if window.state == OPEN:
                window.state = CLOSED
                closed_here += 1
    if closed_here:  # those closed by their waiting side were counted there
        missed("not_stored", closed_here)
    raise NotStored()


def settle(windows: list[CommitWindow]) -> None:
    """After the commit (or its failure) answered: the outcome is known, no longer in doubt."""
    with _lock:
        for window in windows:
            if window.state == COMMITTING:
                window.state = DONE


async def answer_by_deadline(window: CommitWindow, outcome: asyncio.Future[T]) -> T:
    """Await ``outcome`` (the result of storing the request ``window`` guards) until the window's
    deadline; then raise NotStored if the window could be closed (``outcome`` is cancelled: its
    transaction will roll back), CommitInDoubt if its commit is unconfirmed, else await it."""
    try:
        return await asyncio.wait_for(asyncio.shield(outcome), remaining_s(window.deadline))
    except TimeoutError:
        pass
    state = window.expire()
    if state == CLOSED:
        outcome.cancel()
        raise NotStored()
    if state == COMMITTING:
        raise CommitInDoubt()
    return await outcome  # settled: the outcome is being handed over


async def store_by_deadline(deadline: float, store: Callable[[CommitWindow], T]) -> T:
    """Run ``store(window)`` on a database thread (it passes ``window`` to ``ingest.persist``) and
    answer by ``deadline`` as ``answer_by_deadline`` does."""
    window = CommitWindow(deadline)
    return await answer_by_deadline(window, asyncio.ensure_future(db_threads.run(store, window)))
