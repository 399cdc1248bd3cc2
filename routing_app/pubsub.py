"""The ``pubsub`` channel kind: notifications PUBLISHed on Redis for other services.

Routes choose it like any outbound channel; the router calls ``publish_pubsub`` after commit.
The Redis channel is ``notify:<topic>``: a fixed, documented name other services SUBSCRIBE to,
not under ``REDIS_PREFIX``.
"""

from __future__ import annotations

import json

from django.conf import settings

from .redis_publisher import sync_redis

# One instance (stateless, thread-safe): json.dumps with options builds an encoder per call.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def publish_pubsub(messages: list[tuple[str, dict]]) -> None:
    """PUBLISH each ``(topic, envelope)`` as compact JSON on ``notify:<topic>``, in one pipeline.
    A no-op without Redis (the embedded mode). Raises redis errors (the router logs them)."""
    if not settings.REDIS_URL or not messages:
        return
    with sync_redis().pipeline(transaction=False) as pipe:
        for topic, envelope in messages:
            pipe.publish(f"notify:{topic}", _dumps(envelope).encode())
        pipe.execute()
