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
  latency (a resume's, hours perhaps) is not observed.

Transports are named as in the metrics (``websocket``, ``phoenix``, ``sse``); the hub's encodings
map to them (``TRANSPORT_OF_ENCODING``).
"""

from __future__ import annotations

import time

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

TRANSPORT_OF_ENCODING = {"plain": "websocket", "phoenix": "phoenix", "sse": "sse"}

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
        messages_sent[transport].inc(subscribers * len(messages))
        latency = realtime_delivery[transport]
        now = time.time()
        for message in messages:
            at = message.ingested_at()
            if at is not None:
                latency.observe(max(0.0, now - at))

    def done(self) -> None:
        if self.any:
            FANOUT_DURATION.observe(time.perf_counter() - self.started)
