"""Following a topic's durable stream from a process of its own (``manage.py notify tail``): the
notifications stored after a seq, then each new one once it is committed, in seq order, each once.

The stream in the database is the truth and the only thing read: every notification printed is a
row read by seq (``stream_reads.history_page``), after the last seq already yielded, so a
notification published while the catch-up runs cannot come twice or out of order. The live signal
only says when to read again:

- With ``REDIS_URL``: a SUBSCRIBE to the topic's realtime channel, on which every process
  publishes each committed notification (its name comes from the realtime edge, which registers it
  at start-up: ``register_wakeup_channel``). A read still runs every ``SIGNALLED_POLL_S``, so a
  wake-up lost while Redis is down delays a notification, never loses it.
- Embedded mode: the in-memory bus of the server is not visible from another process, so the
  stream is read every ``POLL_INTERVAL_S`` (one indexed query by topic and seq).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, connection

from .stream_reads import READ_PAGE_MAX, history_page, topic_last_seq

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.25  # embedded mode: the latency of a tail, at one small query per interval
SIGNALLED_POLL_S = 2.0  # with Redis wake-ups, only a safety net (and below redis-py's 2 s timeout)
RETRY_S = (0.5, 10.0)  # first and longest wait after the database or Redis failed

_wakeup_channel: Callable[[str], bytes] | None = None


def register_wakeup_channel(channel_of: Callable[[str], bytes]) -> None:
    """Make ``channel_of(topic)`` the Redis channel on which each committed notification of
    ``topic`` is published (the realtime edge registers its own from ``AppConfig.ready``)."""
    global _wakeup_channel
    _wakeup_channel = channel_of


class FollowError(ValueError):
    """The follow cannot start as asked (the message says why and what to ask instead)."""


@dataclass(frozen=True)
class Following:
    """The follow has started: everything after ``after_seq`` comes, nothing at or before it."""

    topic: str
    after_seq: int


@dataclass(frozen=True)
class Trimmed:
    """Seqs ``first``..``last`` of the topic are no longer stored (retention deleted them)."""

    first: int
    last: int


def follow(topic: str, after_seq: int | None) -> Iterator[dict | Following | Trimmed]:
    """Yield ``topic``'s stored notifications (``Notification.envelope()``) with seq >
    ``after_seq`` (None: from the topic's last seq now, i.e. only new ones), then each new one as
    it is committed, forever, in seq order, each once. ``Following`` comes first, once listening;
    a jump over seqs that retention deleted is yielded as ``Trimmed`` first. A database or Redis
    outage is logged once and waited out.

    Raises FollowError when ``after_seq`` is past the topic's last seq.
    """
    wakeups = _Wakeups(_wakeup_channel(topic)) if settings.REDIS_URL and _wakeup_channel else None
    try:
        if wakeups is not None:
            wakeups.connect()  # before the first read: nothing committed after it goes unheard
        last_seq = _retrying(topic_last_seq, topic)
        if after_seq is None:
            after_seq = last_seq
        elif after_seq > last_seq:
            raise FollowError(
                f"seq {after_seq} is past the last seq of topic {topic!r}, {last_seq}: follow from "
                f"{last_seq} or less (0 for everything stored)"
            )
        cursor = after_seq
        yield Following(topic, cursor)
        while True:
            page = _retrying(history_page, topic, cursor, READ_PAGE_MAX).notifications
            for envelope in page:
                if envelope["seq"] > cursor + 1:
                    yield Trimmed(cursor + 1, envelope["seq"] - 1)
                cursor = envelope["seq"]
                yield envelope
            if len(page) < READ_PAGE_MAX:  # caught up: wait for the next commit
                if wakeups is None:
                    time.sleep(POLL_INTERVAL_S)
                else:
                    wakeups.wait(SIGNALLED_POLL_S)
    finally:
        if wakeups is not None:
            wakeups.close()


def _retrying(read, *args):
    """``read(*args)``, again after a wait while the database fails (one warning per outage)."""
    delay = RETRY_S[0]
    while True:
        try:
            return read(*args)
        except DatabaseError as exc:
            if delay == RETRY_S[0]:
                log.warning("cannot read the stream (%s); retrying", exc)
            connection.close()  # a broken connection is replaced on the next query
            time.sleep(delay)
            delay = min(delay * 2, RETRY_S[1])


class _Wakeups:
    """One Redis pub/sub subscription whose messages only wake the reader. Without Redis it waits
    the whole interval (the read that follows then is the poll) and reconnects later."""

    def __init__(self, channel: bytes) -> None:
        self._channel = channel
        self._pubsub = None
        self._retry_at = 0.0  # monotonic time of the next connect attempt after a failure

    def connect(self) -> None:
        import redis

        from .pubsub import sync_redis

        try:
            pubsub = sync_redis().pubsub()
            pubsub.subscribe(self._channel)
            # The subscribe reply: from here on every publish on the channel wakes us.
            pubsub.get_message(timeout=SIGNALLED_POLL_S)
        except redis.RedisError as exc:
            log.warning("no live signal from Redis (%s); reading the stream meanwhile", exc)
            self._retry_at = time.monotonic() + RETRY_S[1]
            return
        self._pubsub = pubsub

    def wait(self, timeout_s: float) -> None:
        """Return on the next message (and drop any others queued), or after ``timeout_s``."""
        import redis

        if self._pubsub is None:
            time.sleep(timeout_s)
            if time.monotonic() >= self._retry_at:
                self.connect()
            return
        try:
            if self._pubsub.get_message(timeout=timeout_s) is not None:
                while self._pubsub.get_message(timeout=0) is not None:
                    pass
        except redis.RedisError as exc:
            log.warning("lost the live signal from Redis (%s); reading the stream meanwhile", exc)
            self.close()
            self._retry_at = time.monotonic() + RETRY_S[1]

    def close(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            pubsub.close()
