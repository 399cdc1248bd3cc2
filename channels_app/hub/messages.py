"""What the hub hands to subscribers: a ``Message`` per published notification (decoded once per
process, one frame per encoding), a ``Batch`` of consecutive ones, and the prebuilt WebSocket frame.

Encodings are registered here (``register_encoder``): "plain" is built in; the Phoenix and SSE
edges register theirs at import. A frame is computed on first use and cached on the message, so a
message fanned out to a thousand sockets is encoded once per encoding, not once per socket.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from datetime import datetime
from typing import Any

JSON_SEPARATORS = (",", ":")


class Message:
    """One published notification, decoded once per process; frames cached per encoding."""

    __slots__ = ("topic", "seq", "envelope", "_raw", "_frames", "_ingested_at")

    def __init__(self, topic: str, seq: int, envelope: dict, raw: str | bytes | None = None):
        self.topic = topic
        self.seq = seq
        self.envelope = envelope  # Notification.envelope(); treat as read-only: it is shared
        self._raw = raw  # the compact JSON as published, when it came over the bus
        self._frames: dict[str, str | bytes] = {}
        self._ingested_at: float | None = -1.0  # -1: not read yet

    def ingested_at(self) -> float | None:
        """The epoch time of the envelope's ``ts`` (the notification's creation at ingest),
        parsed once; None without a readable one."""
        at = self._ingested_at
        if at == -1.0:
            try:
                at = datetime.fromisoformat(self.envelope["ts"]).timestamp()
            except (KeyError, TypeError, ValueError):
                at = None
            self._ingested_at = at
        return at

    def encoded(self, encoding: str) -> str | bytes:
        """The frame for ``encoding``, computed on first use and cached for every subscriber."""
        frame = self._frames.get(encoding)
        if frame is None:
            frame = self._frames[encoding] = _encoders[encoding](self)
        return frame

    def ws_frame(self, encoding: str) -> bytes:
        """The complete unmasked, uncompressed WebSocket text frame of ``encoded(encoding)``,
        built once per message (for ConnectionSender.push_text's prebuilt-frame path)."""
        key = "ws-frame:" + encoding
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = websocket_text_frame(self.encoded(encoding))
        return frame

    def __repr__(self) -> str:
        return f"<Message {self.topic}#{self.seq}>"


def websocket_text_frame(text: str | bytes) -> bytes:
    """A final, unmasked text frame (RFC 6455 section 5.2) carrying ``text``."""
    payload = text.encode() if isinstance(text, str) else text
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65536:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


def encode_plain(message: Message) -> str:
    """The plain socket's frame: the envelope as compact JSON (reused verbatim from the bus)."""
    raw = message._raw
    if raw is not None:
        return raw if isinstance(raw, str) else raw.decode()
    return json.dumps(message.envelope, separators=JSON_SEPARATORS, ensure_ascii=False)


_encoders: dict[str, Callable[[Message], str | bytes]] = {"plain": encode_plain}


def register_encoder(encoding: str, fn: Callable[[Message], str | bytes]) -> None:
    """Register how ``encoding`` frames a Message ("plain" is built in); a later call replaces."""
    _encoders[encoding] = fn


class Batch:
    """Consecutive messages of one topic delivered together; per-encoding results cached."""

    __slots__ = ("messages", "_cache")

    def __init__(self, messages: list[Message]):
        self.messages = messages
        self._cache: dict[tuple[str, str], Any] = {}

    def frames(self, encoding: str) -> list:
        """Each message's frame for ``encoding``, in order."""
        key = ("frames", encoding)
        frames = self._cache.get(key)
        if frames is None:
            frames = self._cache[key] = [m.encoded(encoding) for m in self.messages]
        return frames

    def joined(self, encoding: str) -> bytes:
        """The messages' ``encoding`` frames (bytes, such as SSE events) concatenated."""
        key = ("joined", encoding)
        data = self._cache.get(key)
        if data is None:
            data = self._cache[key] = b"".join(self.frames(encoding))
        return data

    def ws_bytes(self, encoding: str) -> bytes:
        """The messages' prebuilt WebSocket frames (``Message.ws_frame``), concatenated."""
        key = ("ws", encoding)
        data = self._cache.get(key)
        if data is None:
            data = self._cache[key] = b"".join(m.ws_frame(encoding) for m in self.messages)
        return data
