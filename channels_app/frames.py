"""Every frame the realtime edge sends to clients: one builder per frame type, and its shape.

The plain WebSocket (``ws_plain.py``) sends these objects as JSON text frames; SSE (``sse.py``)
sends them as the ``data`` line of its events; the Phoenix socket (``phoenix.py``) puts the same
payloads in its ``[join_ref, ref, topic, event, payload]`` arrays where the shapes are shared
(notification, reset, topic events). Close codes are ``close_codes.CloseCode``. The prose
contract is docs/realtime-contract.md; tests/test_frames.py holds each shape below as a schema
and checks the builders and what every edge really sends against it.

Shapes are written as JSON objects of key: JSON type; ``key?`` is present only when set.
``ref`` is whatever the client put in its frame's ``ref``, echoed so it can match the answer.

notification (plain, SSE data, Phoenix ``notification`` payload)::

    {"type": "notification", "topic": str, "seq": int, "id": str (a UUID), "event": str,
     "data": object, "severity": str, "source": str, "ts": str (ISO 8601, with offset)}

  Built by ``routing_app.models.Notification.envelope()`` once per notification; replay reads
  the same object back (``routing_app.stream_reads.read_after``). No builder here on purpose:
  the hub forwards the envelope's JSON text as it came from Redis, encoded once per message per
  process and shared by every socket, so delivery never rebuilds or re-encodes it.

Phoenix-only payloads (``event``: payload)::

    phx_reply:       {"status": "ok" | "error", "response": object}   (phoenix_reply)
                     an error's response is {"reason": str}            (reason)
    current_state:   {"topic": str, "last_seq": int, "oldest_seq": int | null,
                      "notifications": [notification, ...]}  (handlers.current_state; also the
                      reply to and the broadcast of reverse_flow:* request_update)
    presence_state:  {key: {"metas": [meta, ...]}}  (presence.py: a meta has phx_ref: str,
                      online_at: int, user_id: int | null, username: str | null, via?: str)
    presence_diff:   {"joins": presence_state, "leaves": presence_state}
    phx_close:       {}   the join ended (left, or replaced by a second join of the topic)
    phx_error:       {}   the channel failed (the client rejoins); on topic "phoenix":
                     {"reason": str} for a frame that is not a V2 frame at all
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` frame (plain socket) or ``stream-error`` event (SSE)."""

    BAD_JSON = "bad_json"  # the text frame is not JSON
    BAD_FRAME = "bad_frame"  # JSON, but not a frame (no string "type", bad resume since)
    BINARY_UNSUPPORTED = "binary_unsupported"  # a binary frame: the protocol is JSON text
    UNKNOWN_TYPE = "unknown_type"  # a frame type the server does not take
    RATE_LIMITED = "rate_limited"  # the client sent frames faster than it may
    FORBIDDEN = "forbidden"  # the topic's rules do not allow this (e.g. publish)
    INVALID = "invalid"  # a publish that ingest refused; the message names the field
    UNAVAILABLE = "unavailable"  # the database, Redis or presence is unreachable: try again
    TOO_SLOW = "too_slow"  # SSE: the reader fell too far behind; the stream ends


def _with_ref(frame: dict, ref) -> dict:
    if ref is not None:
        frame["ref"] = ref
    return frame


def subscribed(topic: str, last_seq: int) -> dict:
    """``{"type": "subscribed", "topic": str, "last_seq": int}``: sent once the subscription is
    live and any replay was sent (plain socket after connect and after each resume; SSE once)."""
    return {"type": "subscribed", "topic": topic, "last_seq": last_seq}


def reset_payload(topic: str, since: int | None, oldest_seq: int | None, last_seq: int) -> dict:
    """``{"topic": str, "since": int | null, "oldest_seq": int | null, "last_seq": int}``: the
    Phoenix ``reset`` payload. ``since`` could not be resumed (retention deleted what followed
    it, or it is ahead of the stream): nothing was replayed and live goes on after
    ``last_seq``; the client reloads its state."""
    return {"topic": topic, "since": since, "oldest_seq": oldest_seq, "last_seq": last_seq}


def reset(topic: str, since: int | None, oldest_seq: int | None, last_seq: int) -> dict:
    """``{"type": "reset", **reset_payload}``: the plain socket's frame and SSE's ``reset`` data
    (SSE sends it with ``id: <last_seq>`` so EventSource resumes from there)."""
    return {"type": "reset", **reset_payload(topic, since, oldest_seq, last_seq)}


def event(topic: str, event_name: str, payload: dict) -> dict:
    """``{"type": "event", "topic": str, "event": str, "payload": object}``: an ephemeral topic
    event (``hub.broadcast_event``: no seq, not stored), e.g. ``reverse_flow_update``. Phoenix
    sends ``payload`` itself as the payload of event ``event_name``."""
    return {"type": "event", "topic": topic, "event": event_name, "payload": payload}


def error(code: ErrorCode, message: str, ref=None) -> dict:
    """``{"type": "error", "code": str (an ErrorCode), "message": str, "ref"?}``. On the plain
    socket the socket stays open; as SSE's ``stream-error`` data the stream ends after it."""
    return _with_ref({"type": "error", "code": code, "message": message}, ref)


def ack(seq: int, notification_id: str, ref=None) -> dict:
    """``{"type": "ack", "seq": int, "id": str, "ref"?}``: a client's ``publish`` was stored as
    notification ``notification_id`` with ``seq`` (it also arrives as a notification)."""
    return _with_ref({"type": "ack", "seq": seq, "id": notification_id}, ref)


def presence(topic: str, users: list[dict], ref=None) -> dict:
    """``{"type": "presence", "topic": str, "users": [user, ...], "ref"?}``, a user being
    ``{"key": str, "user_id": int | null, "username": str, "connections": int, "online_at": int}``
    (``presence.users``): the answer to a plain socket's ``presence`` request."""
    return _with_ref({"type": "presence", "topic": topic, "users": users}, ref)


def ping() -> dict:
    """``{"type": "ping"}``: the plain socket's heartbeat; the client answers pong."""
    return {"type": "ping"}


def pong() -> dict:
    """``{"type": "pong"}``: the answer to a client's ping."""
    return {"type": "pong"}


def phoenix_reply(status: str, response: dict) -> dict:
    """``{"status": "ok" | "error", "response": object}``: a Phoenix ``phx_reply`` payload."""
    return {"status": status, "response": response}


def reason(text: str) -> dict:
    """``{"reason": str}``: why a Phoenix request failed (an error reply's response, or the
    payload of ``phx_error`` on topic ``phoenix``)."""
    return {"reason": text}
