"""The plain JSON WebSocket at ``/ws/<topic>/``: a raw ASGI app on the per-process hub.

Protocol (docs/realtime-contract.md; RFC 6455 for close codes):
- connect ``/ws/<topic>/?token=<token>&since=<seq>`` (token optional with a session cookie);
- server -> client (shapes in ``frames.py``): ``subscribed`` (once live and replayed),
  ``notification``, ``reset``, ``ping``/``pong``, ``ack``, ``presence``, ``event``, ``error``
  (the socket stays open);
- client -> server: ``ping``, ``pong``, ``publish``, ``resume``, ``presence``;
- every client frame is bounded by ``frame_limits`` (size, nesting depth, finite numbers, no lone
  surrogates, frames per second), as on the Phoenix socket;
- close codes (``close_codes.CloseCode``): 1009 frame over 64 KB, 1011 a frame the server could
  not send, 4400 bad topic or since, 4401 missing/forged/expired token, 4403 topic not allowed,
  4408 silent for two heartbeat intervals, 4429 too slow to read, 1013 realtime bus or database
  unavailable (retry later).

A raw ASGI app, not a Channels consumer: Channels' ``dispatch`` awaits a trip to the shared sync
thread before every handler (``aclose_old_connections``), per message per socket, and the
consumer class costs more per connection (measured here: a raw ASGI app delivered the most
messages per second of the shapes tried, a consumer the fewest). No ORM
on the per-message path: authentication, authorization and replay happen at connect/resume only,
presence (a logged-in user, meta ``via: "websocket"``) at connect and disconnect only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from django.conf import settings
from django.db import DatabaseError

from routing_app.topics import is_valid_topic

from . import client_publish, edge_metrics, frame_limits, frames, socket_auth
from .authz import READ, adecide
from .close_codes import CloseCode
from .frames import ErrorCode
from .hub import JSON_SEPARATORS, Batch, HubUnavailable, Message, SubscribeResult, Unsubscribed, hub
from .presence import ConnectionPresence
from .sender import ConnectionSender, limit_kernel_buffer
from .tokens import TokenError

log = logging.getLogger(__name__)

TRANSPORT = "websocket"  # in the metrics


def _dumps(obj: dict) -> str:
    return json.dumps(obj, separators=JSON_SEPARATORS, ensure_ascii=False)


class PlainSocket:
    """One connected client: a hub Subscriber writing through a ConnectionSender."""

    encoding = "plain"
    __slots__ = (
        "topic",
        "principal",
        "sender",
        "last_seen",
        "heartbeat",
        "budget",
        "presence",
        "subscribed",
        "__weakref__",
    )

    def __init__(self, topic: str, principal, send):
        self.topic = topic
        self.principal = principal
        self.sender = ConnectionSender(
            send, settings.SOCKET_SEND_QUEUE, self.overflow, CloseCode.INTERNAL_ERROR
        )
        self.last_seen = time.monotonic()
        self.heartbeat = None
        self.budget = frame_limits.FrameBudget()
        self.presence = ConnectionPresence(topic, principal, "websocket")
        self.subscribed = False  # counted in the subscriptions gauge (once, resumes included)

    # --- hub Subscriber ---------------------------------------------------------------------

    def deliver(self, frame: str, message: Message) -> None:
        self.sender.push_text(frame, message.ws_frame("plain"))

    def deliver_batch(self, batch: Batch) -> None:
        self.sender.push_texts(batch.frames("plain"), batch.ws_bytes("plain"))

    def deliver_event(self, topic: str, event: str, payload: dict) -> None:
        self.send_json(frames.event(topic, event, payload))

    def overflow(self) -> None:
        hub.detach(self.topic, self)
        self.sender.close(CloseCode.TOO_SLOW, "too slow: send buffer full")

    def unavailable(self) -> None:
        hub.detach(self.topic, self)
        self.sender.close(CloseCode.TRY_LATER, "this server lost the realtime bus; reconnect")

    async def drained(self) -> None:
        await self.sender.drained()

    # --- writing ---------------------------------------------------------------------------

    def send_json(self, obj: dict) -> None:
        self.sender.push({"type": "websocket.send", "text": _dumps(obj)})

    def error(self, code: ErrorCode, message: str, ref=None) -> None:
        self.send_json(frames.error(code, message, ref))

    def close(self, code: CloseCode, reason: str = "") -> None:
        hub.detach(self.topic, self)
        self.sender.close(code, reason)

    # --- heartbeat -------------------------------------------------------------------------

    def start_heartbeat(self, loop) -> None:
        self.heartbeat = loop.call_later(settings.HEARTBEAT_INTERVAL_S, self._beat, loop)

    def _beat(self, loop) -> None:
        self.heartbeat = None
        if self.sender.closed:
            return
        idle = time.monotonic() - self.last_seen
        if idle >= settings.HEARTBEAT_TIMEOUT_S:
            self.close(
                CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout: nothing received from the client"
            )
            return
        self.send_json(frames.ping())
        delay = min(settings.HEARTBEAT_INTERVAL_S, settings.HEARTBEAT_TIMEOUT_S - idle)
        self.heartbeat = loop.call_later(delay, self._beat, loop)

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            self.heartbeat = None
        self.sender.dispose()


def _parse_since(raw) -> int | None:
    """A seq a client gives: a non-negative int (or its decimal string). ValueError otherwise."""
    if isinstance(raw, bool):
        raise ValueError
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and raw.isdigit():
        value = int(raw)
    else:
        raise ValueError
    if value < 0:
        raise ValueError
    return value


async def _subscribe(sock: PlainSocket, since: int | None) -> bool:
    """Join the hub (replaying after ``since``) and tell the client; False when it is closed."""
    try:
        result: SubscribeResult = await hub.subscribe(sock.topic, sock, since)
    except HubUnavailable as exc:
        sock.close(CloseCode.TRY_LATER, str(exc))
        return False
    except DatabaseError:
        log.warning("socket replay failed: database unavailable", exc_info=True)
        sock.close(CloseCode.TRY_LATER, "history is unavailable; reconnect later")
        return False
    except Unsubscribed:
        return False
    if result.reset:
        sock.send_json(frames.reset(sock.topic, since, result.oldest_seq, result.last_seq))
    sock.send_json(frames.subscribed(sock.topic, result.last_seq))
    if not sock.subscribed:
        sock.subscribed = True
        edge_metrics.subscribed(TRANSPORT, sock.topic)
    return True


async def plain_socket_app(scope, receive, send) -> None:
    """ASGI app for ``/ws/<topic>/`` (``scope["url_route"]["kwargs"]["topic"]``)."""
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    connection = edge_metrics.ConnectionCount(TRANSPORT)
    reason = edge_metrics.ERROR
    try:
        reason = await _serve(scope, receive, send)
    except asyncio.CancelledError:
        reason = edge_metrics.NORMAL  # the server is shutting down
        raise
    finally:
        connection.closed(reason)


async def _serve(scope, receive, send) -> str:
    """An accepted socket, until it is closed; returns why it closed (``edge_metrics``)."""
    limit_kernel_buffer(send)
    topic = scope.get("url_route", {}).get("kwargs", {}).get("topic", "")
    code, reason, principal, since = await _admit(scope, topic)
    if code:
        await send({"type": "websocket.close", "code": code, "reason": reason})
        await _wait_disconnect(receive)
        return edge_metrics.close_reason(code)
    sock = PlainSocket(topic, principal, send)
    sock.sender.enable_prebuilt_frames()
    loop = asyncio.get_running_loop()
    disconnect_code = None
    try:
        if await _subscribe(sock, since):
            sock.start_heartbeat(loop)
            # Present once live (a logged-in user only). Not before `subscribed`: nothing may
            # come between the replay and it. Before the first client frame is read, so the
            # socket's own `presence` request lists it.
            await sock.presence.track()
        while True:
            event = await receive()
            kind = event["type"]
            if kind == "websocket.receive":
                sock.last_seen = time.monotonic()
                if not sock.sender.closed:
                    await _on_frame(sock, event)
            elif kind == "websocket.disconnect":
                disconnect_code = event.get("code")
                break
    finally:
        if sock.subscribed:
            edge_metrics.unsubscribed(TRANSPORT, topic)  # first: the awaits below may be cancelled
        await sock.presence.untrack()
        await hub.unsubscribe(topic, sock)
        sock.stop()
    return edge_metrics.close_reason(sock.sender.close_code, disconnect_code)


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def _admit(scope, topic: str):
    """Check the connection: (close code or 0, reason, principal, since)."""
    if not is_valid_topic(topic):
        return CloseCode.BAD_REQUEST, "bad topic name", None, None
    params = socket_auth.query_params(scope)
    since = None
    if params.get("since", "") != "":
        try:
            since = _parse_since(params["since"])
        except ValueError:
            return CloseCode.BAD_REQUEST, "since must be a non-negative integer", None, None
    try:
        principal = await socket_auth.principal_for_scope(scope)
    except TokenError as exc:
        return CloseCode.UNAUTHENTICATED, str(exc)[:120], None, None
    except DatabaseError:
        log.warning("socket authentication failed: database unavailable", exc_info=True)
        return CloseCode.TRY_LATER, "cannot check credentials now; reconnect later", None, None
    decision = await adecide(principal, topic, READ)
    if not decision.allowed:
        if not principal.is_authenticated:
            return CloseCode.UNAUTHENTICATED, "log in or pass ?token=", None, None
        return CloseCode.FORBIDDEN, decision.reason[:120], None, None
    return 0, "", principal, since


async def _on_frame(sock: PlainSocket, event: dict) -> None:
    text = event.get("text")
    # The server's own limit (uvicorn --ws-max-size) is a little higher; this is the exact one.
    if frame_limits.too_big(text, event.get("bytes")):
        sock.close(CloseCode.TOO_BIG, "frame over 64 KB")
        return
    if text is None:
        sock.error(ErrorCode.BINARY_UNSUPPORTED, "send JSON as text frames")
        return
    if not sock.budget.take():
        sock.error(ErrorCode.RATE_LIMITED, frame_limits.RATE_LIMITED_MESSAGE)
        return
    try:
        frame = frame_limits.loads(text)
    except frame_limits.NotJSON as exc:
        sock.error(ErrorCode.BAD_JSON, str(exc))
        return
    except frame_limits.FrameRejected as exc:
        sock.error(ErrorCode.BAD_FRAME, str(exc))
        return
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        sock.error(ErrorCode.BAD_FRAME, 'a frame is a JSON object with a string "type"')
        return
    kind = frame["type"]
    ref = frame.get("ref")
    if kind == "ping":
        sock.send_json(frames.pong())
    elif kind == "pong":
        pass
    elif kind == "publish":
        await _publish(sock, frame, ref)
    elif kind == "resume":
        try:
            since = _parse_since(frame.get("since"))
        except ValueError:
            sock.error(ErrorCode.BAD_FRAME, "resume needs since: a non-negative integer", ref)
            return
        await _subscribe(sock, since)
    elif kind == "presence":
        await _presence(sock, ref)
    else:
        sock.error(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown frame type {kind[:40]!r}: use ping, pong, publish, resume or presence",
            ref,
        )


async def _publish(sock: PlainSocket, frame: dict, ref) -> None:
    try:
        result = await client_publish.publish(
            sock.principal,
            sock.topic,
            frame.get("event"),
            frame.get("data", {}),
            frame.get("severity", "info"),
        )
    except client_publish.PublishRefused as exc:
        sock.error(exc.code, str(exc), ref)
        return
    sock.send_json(frames.ack(result.seq, result.id, ref))


async def _presence(sock: PlainSocket, ref) -> None:
    try:
        from . import presence
    except ImportError:
        sock.error(ErrorCode.UNAVAILABLE, "presence is not available on this server", ref)
        return
    try:
        users = presence.users(await presence.get_presence().list(sock.topic))
    except presence.PresenceUnavailable as exc:
        sock.error(ErrorCode.UNAVAILABLE, str(exc), ref)
        return
    sock.send_json(frames.presence(sock.topic, users, ref))
