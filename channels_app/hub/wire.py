"""The hub's payload format on the bus, in both directions.

Channels (Redis): ``<REDIS_PREFIX>:hub:<topic>`` carries a topic's notifications and ephemeral
events; ``<REDIS_PREFIX>:hubx:<name>`` carries ``hub.send`` payloads. On a topic channel a payload
is one envelope (a JSON object) or a batch's consecutive envelopes of the topic (a JSON array of
them); every other payload is one JSON object. The in-memory bus carries the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from .messages import JSON_SEPARATORS

# One PUBLISH carries at most about this much: a subscriber connection whose Redis output buffer
# passes client-output-buffer-limit (pubsub: 8 MB for 60 s, 32 MB at once) is dropped by Redis,
# and a hub reads one payload whole before it can flush anything to sockets.
PUBLISH_MAX_BYTES = 256 * 1024

# One instance (stateless, thread-safe): json.dumps with options builds an encoder per call.
compact_json = json.JSONEncoder(separators=JSON_SEPARATORS, ensure_ascii=False).encode

# json's C scanner: decodes one value at an index and says where it ended, so each envelope of a
# multi-message payload keeps its own text (sent verbatim to plain sockets, never re-encoded).
_scan_once = json.JSONDecoder().scan_once


def topic_channel(prefix: str, topic: str) -> bytes:
    """The bus channel of ``topic``'s notifications and events."""
    return f"{prefix}:hub:{topic}".encode()


def listen_channel(prefix: str, name: str) -> bytes:
    """The bus channel of ``hub.send(name, ...)``."""
    return f"{prefix}:hubx:{name}".encode()


def encode_body(body: dict) -> bytes:
    """One JSON object as a payload (an ephemeral event, a ``hub.send`` payload)."""
    return compact_json(body).encode()


def topic_payloads(messages: list[tuple[str, dict]]) -> list[tuple[str, bytes]]:
    """``(topic, payload)`` per PUBLISH: a topic's envelopes, in their order, in as few payloads as
    ``PUBLISH_MAX_BYTES`` allows. One envelope is sent as a JSON object, several as a JSON array
    (``decode_topic_payload`` reads both). The array is one encoder call: measured 2x cheaper per
    envelope than joining envelopes encoded one by one (the per-call overhead of json's Python
    wrapper)."""
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
    data = compact_json(envelopes[0] if len(envelopes) == 1 else envelopes).encode()
    if len(data) <= PUBLISH_MAX_BYTES or len(envelopes) == 1:
        payloads.append((topic, data))
        return
    half = len(envelopes) // 2  # rare (large bodies): halve until each part fits
    _append_payloads(payloads, topic, envelopes[:half])
    _append_payloads(payloads, topic, envelopes[half:])


def decode_topic_payload(data: bytes) -> list[tuple[Any, str | bytes | None]]:
    """The values of one topic payload, in order, each with its own JSON text where it can be cut
    verbatim (an object: ``data`` itself; a compact array: each value's slice) and None otherwise
    (an array laid out another way). Raises ValueError or TypeError when ``data`` is not JSON."""
    if data[:1] == b"[":
        return split_array(data.decode())
    decoded = json.loads(data)
    if isinstance(decoded, list):  # an array laid out otherwise (whitespace first)
        return [(item, None) for item in decoded]
    return [(decoded, data)]


def split_array(text: str) -> list[tuple[Any, str | None]]:
    """The values of the JSON array ``text``, each with its own JSON text. Compact arrays (what
    ``topic_payloads`` sends) are cut by the C scanner; anything else is parsed whole (then the
    values carry no text and are encoded again where needed). Raises ValueError if not an array."""
    try:
        return _split_compact(text)
    except (StopIteration, IndexError, ValueError):
        whole = json.loads(text)
        if not isinstance(whole, list):
            raise ValueError("not a JSON array") from None
        return [(value, None) for value in whole]


def _split_compact(text: str) -> list[tuple[Any, str]]:
    """``split_array`` for a compact array; raises ValueError (or the scanner's StopIteration,
    IndexError) for any other layout."""
    items: list[tuple[Any, str]] = []
    index, end = 1, len(text)
    if text[index] != "]":
        while True:
            value, stop = _scan_once(text, index)
            items.append((value, text[index:stop]))
            if text[stop] == "]":
                index = stop + 1
                break
            if text[stop] != ",":
                raise ValueError("not compact")
            index = stop + 1
    else:
        index += 1
    if index != end:
        raise ValueError("not compact")
    return items
