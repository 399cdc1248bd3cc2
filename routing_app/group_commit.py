"""Group commit: concurrent ingest requests of one process share one transaction.

Why: a transaction's fixed cost (a thread hop, BEGIN, locking the topics, COMMIT, the key's rate
counter and the realtime publish, each a round trip) was most of a single post's CPU: 3.2 ms per
post against 0.17 ms per notification in batches of 100 (bench/ingest.py, this 2-core machine).

How: a request checks its items and its key's rights itself (400/403 at once), then awaits
``submit``. A flusher task takes everything queued (up to ``GROUP_MAX_ITEMS`` notifications),
stores it on a database thread as one ``persist`` call, and hands each request its own results.
While groups are being stored (at most ``FLUSHERS`` at once per event loop: measured, two did
better than one or three), new requests queue; the next group takes them all. Under load groups
grow by themselves; an idle server adds no wait (no timer).

What each request sees is what it would see alone:
- 202 only after the group's transaction committed; its own ids and seqs (per topic gap-free
  and in commit order, as ever; within a group they follow the queue order);
- the database unreachable: every request of the group gets the error (503), nothing stored;
- its key over its rate: 429 for its own requests, counted per key per group (``apikeys.take``),
  the first requests of a key in the group fit first;
- a problem of its own that stops a transaction (an idempotency key reused with another body,
  422) would abort the group: then the group is stored again one request at a time, so only
  that request fails;
- its deadline (ingest_deadline.py): not committed by then, it answers 503 (nothing stored: the
  group's transaction, if it is still running, rolls back) or, when the commit was already sent
  and not yet confirmed, 504. A request whose deadline passed while it was queued is dropped from
  the queue and never reaches the database.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

from . import apikeys, db_threads
from .apikeys import KeyInfo, RateLimited
from .ingest import REFUSE, IngestError, IngestResult, NotificationIn, persist
from .ingest_deadline import CommitWindow, NotStored, answer_by_deadline

FLUSHERS = 2  # groups stored at once: one waits on the database while the next is prepared
GROUP_MAX_ITEMS = 2000  # notifications per transaction; a group holds at least one request


@dataclass(eq=False)  # compared by identity: leaving the queue is a cheap lookup
class _Request:
    key: KeyInfo
    items: list[NotificationIn]
    future: asyncio.Future
    window: CommitWindow
    outcome: list[IngestResult] | BaseException | None = field(default=None)


class _Queue:
    def __init__(self) -> None:
        self.pending: list[_Request] = []
        self.flushers = 0

    async def flush_all(self) -> None:
        try:
            while self.pending:
                group = self._take_group()
                try:
                    await db_threads.run(_store_group, group)
                except BaseException as exc:  # noqa: BLE001  (each request re-raises it)
                    for request in group:
                        if request.outcome is None:
                            request.outcome = exc
                for request in group:
                    if request.future.done():  # the client went away
                        continue
                    if isinstance(request.outcome, BaseException):
                        request.future.set_exception(request.outcome)
                    else:
                        request.future.set_result(request.outcome)
        finally:
            self.flushers -= 1

    def _take_group(self) -> list[_Request]:
        group, count = [], 0
        while self.pending and (not group or count + len(self.pending[0].items) <= GROUP_MAX_ITEMS):
            request = self.pending.pop(0)
            group.append(request)
            count += len(request.items)
        return group


_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = weakref.WeakKeyDictionary()


async def submit(key: KeyInfo, items: list[NotificationIn], deadline: float) -> list[IngestResult]:
    """Store ``items`` (already ``ingest.check``-ed and authorized for ``key``) in the next group;
    return their results once committed. Raises what storing them alone would raise, NotStored
    (503) if not committed by ``deadline`` (``time.monotonic()``) and CommitInDoubt (504) if the
    commit was sent but not confirmed by then."""
    loop = asyncio.get_running_loop()
    queue = _queues.get(loop)
    if queue is None:
        queue = _queues[loop] = _Queue()
    request = _Request(key, items, loop.create_future(), CommitWindow(deadline))
    queue.pending.append(request)
    if queue.flushers < FLUSHERS:
        queue.flushers += 1
        loop.create_task(queue.flush_all())
    try:
        return await answer_by_deadline(request.window, request.future)
    except NotStored:
        # The flusher skips a cancelled future; a group holding the request rolls back.
        if request in queue.pending:  # never taken: it leaves the queue now
            queue.pending.remove(request)
        raise


def _store_group(group: list[_Request]) -> None:
    """On a database thread: rate-limit, then store the admitted requests; sets each outcome."""
    per_key: dict[str, list[_Request]] = {}
    for request in group:
        if request.window.closed:  # its deadline passed while queued: already answered
            request.outcome = NotStored()
            continue
        per_key.setdefault(request.key.prefix, []).append(request)
    for requests in per_key.values():
        key = requests[0].key
        fits, retry_after_s = apikeys.take(key, len(requests))
        for request in requests[fits:]:
            request.outcome = RateLimited(retry_after_s, key.rate)
        if fits:
            apikeys.touch(key)
    admitted = [request for request in group if request.outcome is None]  # queue order
    if not admitted:
        return
    try:
        results = persist(
            [item for r in admitted for item in r.items],
            on_conflict=REFUSE,
            windows=[r.window for r in admitted],
        )
    except IngestError:
        for request in admitted:  # find whose it is: each alone
            try:
                request.outcome = persist(
                    request.items, on_conflict=REFUSE, windows=[request.window]
                )
            except (IngestError, NotStored) as exc:
                request.outcome = exc
        return
    start = 0
    for request in admitted:
        request.outcome = results[start : start + len(request.items)]
        start += len(request.items)
