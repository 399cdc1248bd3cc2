"""Redis PUBLISH from synchronous code: the process's one publishing client, and the ``pubsub``
channel kind, which PUBLISHes each routed notification for other services.

The realtime edge's Redis bus publishes through the same client (``sync_redis``) from threads
other than its event loop; both run in ingest's worker threads after commit, so every call here is
synchronous and has short timeouts.
"""

from __future__ import annotations

import json
import threading

from django.conf import settings

_client = None
_client_lock = threading.Lock()

# One instance (stateless, thread-safe): json.dumps with options builds an encoder per call.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


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


def publish_pubsub(messages: list[tuple[str, dict]]) -> None:
    """The ``pubsub`` channel kind: PUBLISH each ``(topic, envelope)`` as compact JSON on Redis
    channel ``notify:<topic>`` (the fixed, documented name other services SUBSCRIBE to; not
    under ``REDIS_PREFIX``), in one pipeline. Nothing without ``REDIS_URL``. Raises redis errors
    when Redis is unreachable."""
    if not settings.REDIS_URL or not messages:
        return
    with sync_redis().pipeline(transaction=False) as pipe:
        for topic, envelope in messages:
            pipe.publish(f"notify:{topic}", _dumps(envelope).encode())
        pipe.execute()
