"""Every metric notify records. Importing it first prepares this process's directory of
multiprocess files (``files.prepare``), so no value is written to a directory about to be wiped.

Hot paths use children bound once (``ingested["api"].inc()``), never ``.labels(...)`` per
observation: a label lookup hashes the label values and takes a lock each time.

With ``METRICS_ENABLED`` false every name below is ``OFF``, a stand-in with the same interface
that records nothing (no file is written); a site that computes something only to record it
(a timestamp, a duration) checks ``ENABLED`` first and skips the work.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

from . import files

ENABLED: bool = settings.METRICS_ENABLED

files.prepare()

# Latency buckets (seconds) with one at exactly 0.1 s: "p95 above 100 ms" is then the ratio of
# two buckets, with no interpolation across the threshold.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
REALTIME_TRANSPORTS = ("websocket", "phoenix", "sse")
SOURCES = ("k8s", "alertmanager", "workflow", "user", "api", "system")

_NAMESPACE_END = re.compile(r"[.:]")


def topic_namespace(topic: str) -> str:
    """A topic's first segment: ``alerts`` of ``alerts.k8s``, ``user`` of ``user:42``."""
    return _NAMESPACE_END.split(topic, 1)[0]


class BoundCache:
    """Children of a labelled metric, made on first use and kept: for labels known only at run
    time (a topic's namespace, a channel's name), still one lookup in a plain dict after that."""

    def __init__(self, make: Callable) -> None:
        self._make = make
        self._children: dict = {}

    def __call__(self, *key):
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._make(*key)
        return child


class Off:
    """What every metric and child is with ``METRICS_ENABLED`` false: records nothing."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def labels(self, *_values: str, **_labels: str) -> Off:
        return self


OFF = Off()


def _off_cache(*_key: str) -> Off:
    return OFF


OFF_CACHE = _off_cache


if ENABLED:
    CONNECTIONS_ACTIVE = Gauge(
        "notify_connections_active",
        "Open realtime connections.",
        ["transport"],
        multiprocess_mode="livesum",
    )
    CONNECTIONS_ACCEPTED = Counter(
        "notify_connections_accepted_total", "Realtime connections accepted.", ["transport"]
    )
    CONNECTIONS_CLOSED = Counter(
        "notify_connections_closed_total",
        "Realtime connections closed, by reason: the server's close code's name (too_slow, "
        "try_later, ...), 'client' when the client closed, 'normal' when the server shut down.",
        ["transport", "reason"],
    )
    SUBSCRIPTIONS_ACTIVE = Gauge(
        "notify_subscriptions_active",
        "Topic subscriptions of open connections.",
        ["transport", "topic_namespace"],
        multiprocess_mode="livesum",
    )
    REALTIME_BUS_DISCONNECTED = Gauge(
        "notify_realtime_bus_disconnected",
        "1 while a server process of this host cannot reach Redis for its pub/sub connection "
        "(the realtime bus; its clients are closed with 1013 after REALTIME_BUS_OUTAGE_S), 0 "
        "while every process that needs it holds it.",
        multiprocess_mode="livemax",
    )
    PRESENCE_USERS = Gauge(
        "notify_presence_users",
        "Presence entries (a user on a topic) held by this host's connections.",
        ["topic_namespace"],
        multiprocess_mode="livesum",
    )
    INGESTED = Counter(
        "notify_notifications_ingested_total", "Notifications stored (committed).", ["source"]
    )
    INGEST_DURATION = Histogram(
        "notify_ingest_duration_seconds",
        "Time of an ingest request, from its first byte read to its answer.",
        buckets=LATENCY_BUCKETS,
    )
    MESSAGES_SENT = Counter(
        "notify_messages_sent_total", "Notifications handed to realtime clients.", ["transport"]
    )
    FANOUT_DURATION = Histogram(
        "notify_fanout_duration_seconds",
        "Time to hand one published batch to every local subscriber of its topic.",
        buckets=LATENCY_BUCKETS,
    )
    DELIVERY_DURATION = Histogram(
        "notify_delivery_duration_seconds",
        "From ingest to the client (realtime: handed to a transport's sockets, once per live "
        "message per transport and process) or to the provider's acceptance (email, SMS, "
        "webhook).",
        ["channel"],
        buckets=LATENCY_BUCKETS,
    )
    DELIVERY_ATTEMPTS = Counter(
        "notify_delivery_attempts_total",
        "Provider calls (and refusals to call) of outbound deliveries.",
        ["channel", "provider", "outcome"],
    )

    INGEST_DEADLINE_MISSED = Counter(
        "notify_ingest_deadline_missed_total",
        "Ingest requests not committed within INGEST_DEADLINE_S, by outcome: not_stored (503, "
        "rolled back), in_doubt (504, the commit was sent and not confirmed).",
        ["outcome"],
    )
    LIMITER_FALLBACK = Gauge(
        "notify_limiter_fallback",
        "Processes counting API keys' ingest rates on their own (each its share of a key's "
        "rate) because the rate limiter's Redis does not answer.",
        multiprocess_mode="livesum",
    )
    LIMITER_FALLBACK_REQUESTS = Counter(
        "notify_limiter_fallback_requests_total",
        "Ingest requests counted by a process's own share of their key's rate (Redis away).",
    )

    ingested = {source: INGESTED.labels(source=source) for source in SOURCES}
    ingest_deadline_missed = {
        outcome: INGEST_DEADLINE_MISSED.labels(outcome=outcome)
        for outcome in ("not_stored", "in_doubt")
    }
    connections_active = {t: CONNECTIONS_ACTIVE.labels(transport=t) for t in REALTIME_TRANSPORTS}
    connections_accepted = {
        t: CONNECTIONS_ACCEPTED.labels(transport=t) for t in REALTIME_TRANSPORTS
    }
    messages_sent = {t: MESSAGES_SENT.labels(transport=t) for t in REALTIME_TRANSPORTS}
    realtime_delivery = {t: DELIVERY_DURATION.labels(channel=t) for t in REALTIME_TRANSPORTS}

    subscriptions_active = BoundCache(
        lambda transport, namespace: SUBSCRIPTIONS_ACTIVE.labels(
            transport=transport, topic_namespace=namespace
        )
    )
    presence_users = BoundCache(lambda namespace: PRESENCE_USERS.labels(topic_namespace=namespace))
    connections_closed = BoundCache(
        lambda transport, reason: CONNECTIONS_CLOSED.labels(transport=transport, reason=reason)
    )
    delivery_duration = BoundCache(lambda channel: DELIVERY_DURATION.labels(channel=channel))
    delivery_attempts = BoundCache(
        lambda channel, provider, outcome: DELIVERY_ATTEMPTS.labels(
            channel=channel, provider=provider, outcome=outcome
        )
    )
else:
    CONNECTIONS_ACTIVE = CONNECTIONS_ACCEPTED = CONNECTIONS_CLOSED = OFF
    SUBSCRIPTIONS_ACTIVE = PRESENCE_USERS = INGESTED = INGEST_DURATION = OFF
    REALTIME_BUS_DISCONNECTED = OFF
    MESSAGES_SENT = FANOUT_DURATION = DELIVERY_DURATION = DELIVERY_ATTEMPTS = OFF
    LIMITER_FALLBACK = LIMITER_FALLBACK_REQUESTS = INGEST_DEADLINE_MISSED = OFF
    ingest_deadline_missed = dict.fromkeys(("not_stored", "in_doubt"), OFF)
    ingested = dict.fromkeys(SOURCES, OFF)
    connections_active = dict.fromkeys(REALTIME_TRANSPORTS, OFF)
    connections_accepted = dict.fromkeys(REALTIME_TRANSPORTS, OFF)
    messages_sent = dict.fromkeys(REALTIME_TRANSPORTS, OFF)
    realtime_delivery = dict.fromkeys(REALTIME_TRANSPORTS, OFF)
    subscriptions_active = presence_users = connections_closed = OFF_CACHE
    delivery_duration = delivery_attempts = OFF_CACHE
