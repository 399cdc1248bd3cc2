"""What the realtime edge records (``routing_app/metrics/instruments.py`` holds the metrics).

Every site here is O(1) per connection event or per fanout batch, through children bound once:
- a connection: accepted and active on accept, closed once with a bounded reason
  (``ConnectionCount``);
- a topic subscription, per transport and topic namespace, while a connection holds it;
- the hub's fanout (``FanoutRecord``): one count per encoding group of a batch (subscribers x
  messages), the batch's fanout time, and the delivery latency (ingest to the moment the batch
  is handed to that transport's sockets) once per live message per transport, not per socket.
  It is a sample of the latency sockets see: the socket writes of a batch take place within the
  fanout time, which is recorded beside it. Replayed messages are counted as sent; their
  latency (a resume's, hours perhaps) is not observed. The fanout's figures are summed in
  plain numbers and written to the multiprocess files once a second (``Pending``), so a scrape
  may miss the last second of them.

Transports are named as in the metrics (``websocket``, ``phoenix``, ``sse``); the hub's encodings
map to them (``TRANSPORT_OF_ENCODING``).
"""

from __future__ import annotations

import asyncio
import atexit
import math
import time
from bisect import bisect_left

from routing_app.metrics import instruments
from routing_app.metrics.instruments import (
    FANOUT_DURATION,
    connections_accepted,
    connections_active,
    connections_closed,
    messages_sent,
    realtime_delivery,
    subscriptions_active,
    topic_namespace,
)

from .close_codes import CloseCode
from .frames import ErrorCode

ENABLED = instruments.ENABLED

TRANSPORT_OF_ENCODING = {
    "plain": "websocket",
    "phoenix": "phoenix",
    "sse": "sse",
    "sse-unnamed": "sse",  # sse.py, ?unnamed=1
}

# uvicorn's ``websocket.disconnect`` code when the server shuts down (1012, Service Restart).
SERVER_RESTART_CODE = 1012

CLIENT = "client"  # the client closed (or its connection dropped)
NORMAL = "normal"  # the server closed cleanly: shut down, or a close with no code of ours
ERROR = "error"  # the connection's handler failed (a bug: logged by the server)
CLOSE_REASONS = frozenset({CLIENT, NORMAL, ERROR, *(code.name.lower() for code in CloseCode)})
# An SSE stream has no close code: it ends with an error code, named as the socket's equivalent.
SSE_END_REASONS = {ErrorCode.TOO_SLOW: "too_slow", ErrorCode.UNAVAILABLE: "try_later"}


def close_reason(server_code: int | None, disconnect_code: int | None = None) -> str:
    """The ``reason`` label of a closed socket: the name of the code the server closed with
    (``too_slow``...), else ``normal`` when the server was shutting down, else ``client``."""
    if server_code is not None:
        try:
            return CloseCode(server_code).name.lower()
        except ValueError:
            return NORMAL
    if disconnect_code == SERVER_RESTART_CODE:
        return NORMAL
    return CLIENT


class ConnectionCount:
    """One connection's part in the connection metrics: counted when made (accepted), closed
    at most once, however many paths reach ``closed``."""

    __slots__ = ("transport", "open")

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.open = True
        connections_accepted[transport].inc()
        connections_active[transport].inc()

    def closed(self, reason: str) -> None:
        if not self.open:
            return
        self.open = False
        connections_active[self.transport].dec()
        connections_closed(self.transport, reason).inc()


def subscribed(transport: str, topic: str) -> None:
    """A connection now holds a subscription to ``topic`` (pair with ``unsubscribed``)."""
    subscriptions_active(transport, topic_namespace(topic)).inc()


def unsubscribed(transport: str, topic: str) -> None:
    subscriptions_active(transport, topic_namespace(topic)).dec()


def replayed(encoding: str, count: int) -> None:
    """``count`` stored messages handed to one subscriber by a replay."""
    messages_sent[TRANSPORT_OF_ENCODING.get(encoding, encoding)].inc(count)


# The fanout's figures reach the multiprocess files this often (Prometheus scrapes every 15 s or
# so). Between flushes they are plain ints and floats: a prometheus-client observe costs ~3 us
# here (a lock and two mmap writes), which for a topic with one subscriber is as much as the
# delivery itself.
FLUSH_EVERY_S = 1.0


class LocalHistogram:
    """Observations of a histogram child since the last flush, counted per bucket (the child's
    own bounds and rule: a value goes to the first bucket whose bound is at or above it)."""

    __slots__ = ("child", "bounds", "counts", "sum")

    def __init__(self, child) -> None:
        self.child = child
        self.bounds = child._upper_bounds  # ends with +Inf: bisect never runs past the end
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(self.bounds)
        buckets = self.child._buckets
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
        self.child._sum.inc(self.sum)
        self.sum = 0.0


def _check_histogram_internals(child) -> None:
    """LocalHistogram writes a child's bucket and sum values directly; a prometheus-client that
    stores them otherwise must fail at start-up, not record wrong figures."""
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    if not (
        isinstance(buckets, list)
        and isinstance(bounds, list)
        and len(buckets) == len(bounds)
        and bounds[-1] == math.inf
        and hasattr(getattr(child, "_sum", None), "inc")
    ):
        raise RuntimeError("prometheus_client's Histogram internals changed: see edge_metrics.py")


class Pending:
    """This process's fanout figures since the last flush; flushed by a timer on the hub's
    loop, and at exit."""

    def __init__(self) -> None:
        for child in (FANOUT_DURATION, *realtime_delivery.values()):
            _check_histogram_internals(child)
        self.sent = dict.fromkeys(realtime_delivery, 0)
        self.latency = {t: LocalHistogram(child) for t, child in realtime_delivery.items()}
        self.fanout = LocalHistogram(FANOUT_DURATION)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def schedule(self) -> None:
        """Flush within ``FLUSH_EVERY_S`` (call in the hub's loop)."""
        loop = asyncio.get_running_loop()
        if self._timer is None or self._loop is not loop:  # a new loop: the old timer is gone
            self._loop = loop
            self._timer = loop.call_later(FLUSH_EVERY_S, self.flush)

    def flush(self) -> None:
        self._timer = None
        for transport, count in self.sent.items():
            if count:
                self.sent[transport] = 0
                messages_sent[transport].inc(count)
        for histogram in self.latency.values():
            histogram.flush()
        self.fanout.flush()


_pending = Pending() if ENABLED else None
if _pending is not None:
    atexit.register(_pending.flush)


def flush() -> None:
    """Write the fanout's pending figures to this process's multiprocess files now."""
    if _pending is not None:
        _pending.flush()


class FanoutRecord:
    """The figures of one fanout of a batch by the hub (``sequencer.Topic.flush``): create it
    before handing the batch out, call ``handed`` once per encoding group after it, ``done``
    at the end. Only used when ``ENABLED``."""

    __slots__ = ("messages", "started", "any")

    def __init__(self, messages: list) -> None:
        self.messages = messages
        self.started = time.perf_counter()
        self.any = False

    def handed(self, encoding: str, subscribers: int) -> None:
        """The batch was handed to ``subscribers`` sockets of ``encoding``."""
        if not subscribers:
            return
        self.any = True
        transport = TRANSPORT_OF_ENCODING.get(encoding)
        if transport is None:
            return  # an encoding no transport of ours uses (tests)
        messages = self.messages
        pending = _pending
        pending.sent[transport] += subscribers * len(messages)
        latency = pending.latency[transport]
        now = time.time()
        for message in messages:
            at = message.ingested_at()
            if at is not None:
                latency.observe(now - at if now > at else 0.0)

    def done(self) -> None:
        if self.any:
            _pending.fanout.observe(time.perf_counter() - self.started)
            _pending.schedule()
