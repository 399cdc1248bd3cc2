"""What a client may send on a socket, checked the same way by the plain and the Phoenix socket.

- Size: a frame over ``settings.MAX_MESSAGE_BYTES`` (64 KB) closes the socket with 1009.
- Parsing (``loads``): JSON text nested at most ``MAX_FRAME_DEPTH`` arrays/objects deep, and no
  lone UTF-16 surrogate (``"\\ud800"``) in any string: such text cannot be encoded as UTF-8, so a
  reply that echoed it (a ``ref``, a Phoenix topic) could never be sent. Both are refused with a
  message the edge puts in its error frame or reply; the socket stays open.
- Rate (``FrameBudget``): a token bucket of ``CLIENT_FRAMES_PER_S`` per socket; a frame over the
  budget is answered with a ``rate_limited`` error instead of being handled.

The checks cost nothing on the normal path: the depth walk only runs when the text holds more
brackets than the limit, the surrogate check only when the text has a ``\\u`` escape or non-ASCII
characters, and ``json.loads``' own RecursionError is caught rather than prevented.
"""

from __future__ import annotations

import json
import math
import time

from django.conf import settings

# Client frames per second a socket may send (the bucket refills at this rate and holds twice as
# much): a flood gets error frames, not a stalled server.
CLIENT_FRAMES_PER_S = 50
# Arrays and objects inside one another in one client frame. A protocol frame needs 3 (Phoenix:
# the frame, its payload, one level of data); 64 leaves a publish's data room and stays far
# below the interpreter's recursion limit for everything that walks the value later (json.dumps,
# the database driver).
MAX_FRAME_DEPTH = 64


class FrameRejected(ValueError):
    """The frame cannot be handled; the message says why and how to fix it."""


class NotJSON(FrameRejected):
    """The text frame is not JSON at all."""


def too_big(text: str | None, data: bytes | None) -> bool:
    """Is the frame over ``settings.MAX_MESSAGE_BYTES``? A text is encoded to be measured only
    when it is long enough to be over (at most 4 bytes per character)."""
    limit = settings.MAX_MESSAGE_BYTES
    if text is not None:
        return len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit
    return len(data or b"") > limit


def loads(text: str):
    """The JSON value of a client's text frame. Raises NotJSON, or FrameRejected for a value
    nested deeper than ``MAX_FRAME_DEPTH``, a number that is not finite (``NaN``, ``1e999``:
    nothing downstream could store or echo it as JSON) or a string holding a lone surrogate."""
    try:
        value = _decoder.decode(text)
    except RecursionError:
        raise _too_deep() from None
    except FrameRejected:
        raise
    except json.JSONDecodeError:
        raise NotJSON("frame is not JSON") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise FrameRejected(f"frame cannot be read: {exc}") from None
    if len(text) > 2 * MAX_FRAME_DEPTH and text.count("[") + text.count("{") > MAX_FRAME_DEPTH:
        _check_depth(value)
    if not text.isascii() or "\\u" in text:
        _check_encodable(text, value)
    return value


def _refuse_constant(name: str):
    raise FrameRejected(f"{name} is not JSON: numbers must be finite")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):
        raise FrameRejected(f"number {literal[:40]} is out of range: numbers must be finite")
    return number


# One decoder for every frame: json.loads with hooks would build a new one per call.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _too_deep() -> FrameRejected:
    return FrameRejected(f"frame is nested deeper than {MAX_FRAME_DEPTH} arrays/objects")


def _check_depth(value) -> None:
    """Walk ``value`` without recursion; raise FrameRejected past ``MAX_FRAME_DEPTH``."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_FRAME_DEPTH:
            raise _too_deep()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))


def _check_encodable(text: str, value) -> None:
    try:
        text.encode()  # raw surrogates (only an in-process caller can hand us those)
        if "\\u" in text:  # escaped ones, e.g. "\ud800": visible only once decoded
            json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise FrameRejected(
            "frame holds a lone UTF-16 surrogate (\\ud800-\\udfff) that is not valid Unicode: "
            "send surrogates only as pairs"
        ) from None


def sendable(text) -> bool:
    """Can ``text`` be echoed in a reply (a string encodable as UTF-8)?"""
    if not isinstance(text, str):
        return False
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class FrameBudget:
    """One socket's token bucket: ``take()`` says whether the next frame may be handled."""

    __slots__ = ("tokens", "at", "burst")
    clock = staticmethod(time.monotonic)

    def __init__(self, burst: float = 2.0 * CLIENT_FRAMES_PER_S) -> None:
        self.burst = burst
        self.tokens = burst
        self.at = self.clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * CLIENT_FRAMES_PER_S)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


RATE_LIMITED_MESSAGE = f"at most {CLIENT_FRAMES_PER_S} frames per second: slow down"
