"""The process's synchronous Redis client for publishing after commit.

Shared by the ``pubsub`` channel kind (``routing_app.pubsub``) and the realtime edge, which
registers its publisher with the router and PUBLISHes through this client: one connection pool
per process, whichever thread publishes (the router runs in ingest's worker threads).
"""

from __future__ import annotations

import threading

from django.conf import settings

_client = None
_client_lock = threading.Lock()


def sync_redis():
    """The process's synchronous Redis client (thread-safe connection pool), made on first use."""
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
