"""Publishing to the realtime edge. The router calls ``publish`` after commit (registered as its
after-commit publisher in ``ChannelsAppConfig.ready``); nothing else does.

``publish`` feeds the per-process hub (``hub.py``): in Redis mode one PUBLISH per topic per call
on ``<REDIS_PREFIX>:hub:<topic>`` (one envelope as a JSON object, several consecutive ones as a JSON
array of them), which every server process with local subscribers of the topic receives once and
fans out locally; in the embedded mode (no Redis) the messages are handed to this process's hub
thread-safely, in one hop.

It may be called from any thread (the router runs in ingest's worker threads) and never from the
event loop's own thread with a blocking Redis call in mind: the Redis calls here are synchronous.
"""

from __future__ import annotations

import json

from django.conf import settings

from routing_app.pubsub import sync_redis

from .hub import JSON_SEPARATORS, hub

# One PUBLISH carries at most about this much: a subscriber connection whose Redis output buffer
# passes client-output-buffer-limit (pubsub: 8 MB for 60 s, 32 MB at once) is dropped by Redis,
# and a hub reads one payload whole before it can flush anything to sockets.
PUBLISH_MAX_BYTES = 256 * 1024


# One instance (stateless, thread-safe): json.dumps with options builds an encoder per call.
_dumps = json.JSONEncoder(separators=JSON_SEPARATORS, ensure_ascii=False).encode


def topic_payloads(messages: list[tuple[str, dict]]) -> list[tuple[str, bytes]]:
    """``(topic, payload)`` per PUBLISH: a topic's envelopes, in their order, in as few payloads as
    ``PUBLISH_MAX_BYTES`` allows. One envelope is sent as a JSON object, several as a JSON array
    (``hub`` reads both). The array is one encoder call: measured 2x cheaper per envelope than
    joining envelopes encoded one by one (the per-call overhead of json's Python wrapper)."""
    by_topic: dict[str, list[dict]] = {}
    for topic, envelope in messages:
        envelopes = by_topic.get(topic)
        if envelopes is None:
            envelopes = by_topic[topic] = []
        envelopes.append(envelope)
    payloads: list[tuple[str, bytes]] = []
    for topic, envelopes in by_topic.items():
        _append_payloads(payloads, topic, envelopes)
    return payloads


def _append_payloads(payloads: list, topic: str, envelopes: list[dict]) -> None:
    data = _dumps(envelopes[0] if len(envelopes) == 1 else envelopes).encode()
    if len(data) <= PUBLISH_MAX_BYTES or len(envelopes) == 1:
        payloads.append((topic, data))
        return
    half = len(envelopes) // 2  # rare (large bodies): halve until each part fits
    _append_payloads(payloads, topic, envelopes[:half])
    _append_payloads(payloads, topic, envelopes[half:])


def publish(messages: list[tuple[str, dict]]) -> None:
    """Send each ``(topic, envelope)`` to the topic's live subscribers in every process, in order
    per topic (one PUBLISH per topic, see ``topic_payloads``).

    Raises redis errors when Redis is unreachable (the router logs them; clients recover the
    message from the stream by seq).
    """
    if not messages:
        return
    if not settings.REDIS_URL:
        hub.publish_local(messages)
        return
    payloads = topic_payloads(messages)
    if len(payloads) == 1:
        topic, data = payloads[0]
        sync_redis().publish(hub.topic_channel(topic), data)
        return
    with sync_redis().pipeline(transaction=False) as pipe:
        for topic, data in payloads:
            pipe.publish(hub.topic_channel(topic), data)
        pipe.execute()
