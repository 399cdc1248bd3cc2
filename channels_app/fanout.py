"""Publishing to the realtime edge. The router calls these after commit; nothing else does.

``publish`` feeds the per-process hub (``hub.py``): in Redis mode one PUBLISH per notification on
``<REDIS_PREFIX>:hub:<topic>``, which every server process with local subscribers of the topic
receives once and fans out locally; in the embedded mode (no Redis) the message is handed to this
process's hub thread-safely. ``publish_pubsub`` is the ``pubsub`` channel kind for other services.

Both may be called from any thread (the router runs in ingest's worker threads) and never from the
event loop's own thread with a blocking Redis call in mind: the Redis calls here are synchronous.
"""

from __future__ import annotations

import json
import threading

from django.conf import settings

from .hub import JSON_SEPARATORS, hub

_client = None
_client_lock = threading.Lock()


def sync_redis():
    """The process's synchronous Redis client for publishing (thread-safe connection pool)."""
    global _client
    if _client is None:
        import redis

        with _client_lock:
            if _client is None:
                # Short timeouts: a publish happens after commit, and a client recovers a lost
                # one from the stream; an ingest request must not hang on a dead Redis.
                _client = redis.Redis.from_url(
                    settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2
                )
    return _client


def _encode(envelope: dict) -> bytes:
    return json.dumps(envelope, separators=JSON_SEPARATORS, ensure_ascii=False).encode()


def publish(messages: list[tuple[str, dict]]) -> None:
    """Send each ``(topic, envelope)`` to the topic's live subscribers in every process, in order.

    Raises redis errors when Redis is unreachable (the router logs them; clients recover the
    message from the stream by seq).
    """
    if not messages:
        return
    if not settings.REDIS_URL:
        hub.publish_local(messages)
        return
    if len(messages) == 1:
        topic, envelope = messages[0]
        sync_redis().publish(hub.topic_channel(topic), _encode(envelope))
        return
    with sync_redis().pipeline(transaction=False) as pipe:
        for topic, envelope in messages:
            pipe.publish(hub.topic_channel(topic), _encode(envelope))
        pipe.execute()


def publish_pubsub(messages: list[tuple[str, dict]]) -> None:
    """The ``pubsub`` channel kind: PUBLISH the envelope on Redis channel ``notify:<topic>``
    (the fixed, documented name other services SUBSCRIBE to; not under ``REDIS_PREFIX``)."""
    if not settings.REDIS_URL or not messages:
        return
    with sync_redis().pipeline(transaction=False) as pipe:
        for topic, envelope in messages:
            pipe.publish(f"notify:{topic}", _encode(envelope))
        pipe.execute()
