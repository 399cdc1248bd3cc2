"""Publishing to the realtime edge. The router calls these after commit; nothing else does.

First version: one channel-layer group per topic. The realtime issue replaces the inside with the
per-process hub (DESIGN.md, flow step 5); the signature stays.
"""

from __future__ import annotations

import json

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer


def group_name(topic: str) -> str:
    # Channel-layer group names allow [a-zA-Z0-9_.-]; ':' is not allowed.
    return "topic." + topic.replace(":", "..")


def publish(messages: list[tuple[str, dict]]) -> None:
    """Send each (topic, envelope) to the topic's subscribers, in order."""
    layer = get_channel_layer()
    if layer is None:
        return

    async def send_all() -> None:
        for topic, envelope in messages:
            await layer.group_send(
                group_name(topic), {"type": "notify.message", "envelope": envelope}
            )

    async_to_sync(send_all)()


def publish_pubsub(messages: list[tuple[str, dict]]) -> None:
    """The ``pubsub`` channel kind: PUBLISH the envelope on Redis channel ``notify:<topic>``."""
    from django.conf import settings

    if not settings.REDIS_URL:
        return
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    with client.pipeline(transaction=False) as pipe:
        for topic, envelope in messages:
            pipe.publish(f"notify:{topic}", json.dumps(envelope, separators=(",", ":")))
        pipe.execute()
