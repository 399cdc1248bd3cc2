"""The Phoenix Channels protocol (V2 JSON serializer) at ``/socket/websocket?vsn=2.0.0``, so the
official ``phoenix`` npm client (``Socket``, ``Channel``, ``Presence``) works unchanged.

Protocol: https://hexdocs.pm/phoenix/writing_a_channels_client.html; the reference is phoenix's
``lib/phoenix/socket/serializers/v2_json_serializer.ex`` and ``assets/js/phoenix/*.js``.

Every frame is ``[join_ref, ref, topic, event, payload]``. Client -> server:

- ``phx_join`` on a topic (payload may carry ``{"since": N}``), authorized with ``authz`` READ; the
  reply is ``phx_reply`` ``{"status": "ok", "response": {}}`` or ``{"status": "error",
  "response": {"reason": ...}}``. After an ok the channel gets ``current_state`` (stream_reads),
  the notifications after ``since`` (or after the state's last seq: no gap between the two), then
  ``presence_state``; live notifications follow as ``notification`` with the envelope as payload,
  and ``presence_diff`` when someone joins or leaves. A second join of a topic already joined on
  this socket replaces the first (``phx_close`` for the old join_ref), as phoenix does.
- ``phx_leave``: reply ok, then ``phx_close``.
- ``heartbeat`` on topic ``phoenix``: reply ok. The socket is closed (4408, HEARTBEAT_TIMEOUT)
  after ``HEARTBEAT_TIMEOUT_S`` without any frame; the client heartbeats every 30 s.
- ``request_update``: runs the handler registered for the topic's family (handlers.py), replies ok
  with its response and broadcasts its event (``reverse_flow_update``) to every joined client on
  every process.
- Every frame is bounded by ``frame_limits`` as on the plain socket: over 64 KB closes with 1009;
  nested too deep, a non-finite number or a lone surrogate is refused (nothing of it echoed); over
  the frame rate, the frame gets an error reply ``rate_limited: ...`` instead of being handled. A
  frame the server cannot send closes the socket with 1011.
- Anything else: an error reply, never a silent drop. A frame that is not a V2 frame at all gets
  ``phx_error`` on topic ``phoenix`` (no channel has that topic, so clients only log it). A handler
  that fails sends ``phx_error`` for its channel, which makes the client rejoin.

Payload shapes are in ``frames.py``; notification, reset and topic-event payloads are the plain
protocol's. Close codes are ``close_codes.CloseCode``.

Server-initiated frames that every socket shares (notifications, broadcasts, diffs) carry a null
join_ref: the client's ``Channel.isMember`` accepts them on any join of the topic, so one frame,
encoded once per process by the hub's ``phoenix`` encoder, fits every socket.

Authentication: the ``token`` socket param (sent as a query parameter by the JS client), the
``authToken`` socket option (sent as the ``base64url.bearer.phx.<base64>`` subprotocol, in which
case the server answers with the ``phoenix`` subprotocol as the client requires), or the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from django.conf import settings
from django.db import DatabaseError

from routing_app import stream_reads
from routing_app.topics import is_valid_topic

from . import edge_metrics, frame_limits, frames, handlers
from .authz import READ, Principal, adecide
from .close_codes import CloseCode
from .hub import HubUnavailable, Message, Unsubscribed, hub
from .presence import PresenceUnavailable, Tracked, get_presence, presence_key
from .sender import ConnectionSender
from .socket_auth import principal_for_scope, query_params
from .tokens import TokenError

log = logging.getLogger(__name__)

SUBPROTOCOL = "phoenix"
SOCKET_TOPIC = "phoenix"  # the socket's own topic: heartbeats
MAX_TOPICS_PER_SOCKET = 100  # joins beyond this are refused: one socket is one client
TRANSPORT = "phoenix"  # in the metrics


def encode(join_ref: str | None, ref: str | None, topic: str, event: str, payload) -> str:
    frame = [join_ref, ref, topic, event, payload]
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


_last_event: tuple[object, str, str, str] | None = None  # (payload, topic, event, frame)


def encode_broadcast(topic: str, event: str, payload) -> str:
    """A frame every joined socket shares (null join_ref). The hub and presence hand the same
    payload object to each local subscriber in turn, so the last frame is reused for them."""
    global _last_event
    last = _last_event
    if last is not None and last[0] is payload and last[1] == topic and last[2] == event:
        return last[3]
    frame = encode(None, None, topic, event, payload)
    _last_event = (payload, topic, event, frame)
    return frame


def encode_notification(message: Message) -> str:
    """The hub's ``phoenix`` encoding: one frame per message per process, for every socket."""
    return encode(None, None, message.topic, "notification", message.envelope)


hub.register_encoder("phoenix", encode_notification)


class ChannelJoin:
    """One topic joined on one socket: the hub's subscriber for it (encoding ``phoenix``)."""

    encoding = "phoenix"

    def __init__(self, connection: PhoenixConnection, topic: str, join_ref: str | None) -> None:
        self.connection = connection
        self.topic = topic
        self.join_ref = join_ref
        self.subscribed = False
        self.presence: Tracked | None = None
        self.watching = False
        # Diffs that arrive before presence_state was pushed wait here, so the client gets the
        # state first (phoenix's Presence would buffer them too, but only once it knows the join).
        self.early_diffs: list[str] | None = []

    # -- the hub's Subscriber protocol ----------------------------------------------------

    def deliver(self, frame, message: Message) -> None:
        self.connection.write(frame)

    def deliver_event(self, topic: str, event: str, payload: dict) -> None:
        self.connection.write(encode_broadcast(topic, event, payload))

    def overflow(self) -> None:
        self.connection.too_slow()

    def unavailable(self) -> None:
        self.connection.try_later()

    async def drained(self) -> None:
        """Replay waits here between pages instead of overflowing the send queue."""
        await self.connection.sender.drained()

    # -- presence -------------------------------------------------------------------------

    def on_presence_diff(self, topic: str, change: dict) -> None:
        frame = encode_broadcast(topic, "presence_diff", change)
        if self.early_diffs is not None:
            self.early_diffs.append(frame)
        else:
            self.connection.write(frame)

    def presence_synced(self) -> None:
        early, self.early_diffs = self.early_diffs or [], None
        for frame in early:
            self.connection.write(frame)


class FrameError(frame_limits.FrameRejected):
    """The frame is not a Phoenix V2 frame; the message says why."""


class PhoenixConnection:
    """One Phoenix socket: many topics multiplexed, processed one frame at a time."""

    def __init__(self, scope, receive, send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.sender = ConnectionSender(
            send, settings.SOCKET_SEND_QUEUE, self.too_slow, CloseCode.INTERNAL_ERROR
        )
        self.channels: dict[str, ChannelJoin] = {}
        self.principal = Principal.anonymous()
        self.socket_id = secrets.token_urlsafe(8)
        self.last_seen = time.monotonic()
        # The plain socket's frame rate; the bucket also holds a rejoin of every topic at once.
        self.budget = frame_limits.FrameBudget(
            2.0 * frame_limits.CLIENT_FRAMES_PER_S + MAX_TOPICS_PER_SOCKET
        )
        self._timer: asyncio.TimerHandle | None = None

    # -- connection lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        message = await self.receive()
        if message["type"] != "websocket.connect":
            return
        accepted = await self.handshake()
        if not accepted:
            return
        connection = edge_metrics.ConnectionCount(TRANSPORT)
        reason = edge_metrics.ERROR
        self._arm_heartbeat_timer(settings.HEARTBEAT_TIMEOUT_S)
        try:
            while True:
                message = await self.receive()
                if message["type"] == "websocket.disconnect":
                    reason = edge_metrics.close_reason(self.sender.close_code, message.get("code"))
                    break
                if message["type"] == "websocket.receive":
                    self.last_seen = time.monotonic()
                    await self.on_frame(message.get("text"), message.get("bytes"))
        except asyncio.CancelledError:
            reason = edge_metrics.NORMAL  # the server is shutting down
            raise
        finally:
            connection.closed(reason)
            if self._timer is not None:
                self._timer.cancel()
            for topic in list(self.channels):
                await self.drop_channel(topic)
            self.sender.dispose()

    async def handshake(self) -> bool:
        vsn = query_params(self.scope).get("vsn", "")
        if not vsn.startswith("2."):
            # 1.x is the older map-based serializer, which we do not speak
            await self.send({"type": "websocket.close", "code": CloseCode.BAD_REQUEST})
            return False
        offered = self.scope.get("subprotocols") or []
        try:
            self.principal = await self.authenticate()
        except PermissionError as exc:
            log.info("phoenix socket refused: %s", exc)
            await self.send({"type": "websocket.close", "code": CloseCode.UNAUTHENTICATED})
            return False
        except DatabaseError as exc:  # cannot load the user: the client reconnects later
            log.warning("phoenix socket refused, database unavailable: %s", exc)
            await self.send({"type": "websocket.close", "code": CloseCode.TRY_LATER})
            return False
        accept = {"type": "websocket.accept"}
        if SUBPROTOCOL in offered:
            accept["subprotocol"] = SUBPROTOCOL  # required by clients that offered it
        await self.send(accept)
        return True

    async def authenticate(self) -> Principal:
        """Token (``token`` param or authToken subprotocol), else the session user, else anonymous.
        Raises PermissionError for a token that is forged, malformed or expired."""
        try:
            return await principal_for_scope(self.scope)
        except TokenError as exc:
            raise PermissionError(str(exc)) from None

    def _arm_heartbeat_timer(self, delay_s: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._check_heartbeat)

    def _check_heartbeat(self) -> None:
        silent_s = time.monotonic() - self.last_seen
        if silent_s >= settings.HEARTBEAT_TIMEOUT_S:
            self.sender.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        else:
            self._arm_heartbeat_timer(settings.HEARTBEAT_TIMEOUT_S - silent_s)

    # -- frames ---------------------------------------------------------------------------

    def write(self, text: str) -> None:
        self.sender.push({"type": "websocket.send", "text": text})

    def too_slow(self) -> None:
        """The send queue is full: close (the client reconnects, rejoins with since, catches up)."""
        self.sender.close(CloseCode.TOO_SLOW, "too slow: send buffer full")

    def try_later(self) -> None:
        """This process lost the realtime bus: close (the client reconnects, perhaps to another
        process, and rejoins with since)."""
        self.sender.close(CloseCode.TRY_LATER, "this server lost the realtime bus; reconnect")

    def reply(self, join_ref, ref, topic: str, status: str, response: dict) -> None:
        self.write(
            encode(join_ref, ref, topic, "phx_reply", frames.phoenix_reply(status, response))
        )

    def push(self, join_ref, topic: str, event: str, payload: dict) -> None:
        self.write(encode(join_ref, None, topic, event, payload))

    async def on_frame(self, text: str | None, data: bytes | None) -> None:
        if frame_limits.too_big(text, data):
            self.sender.close(CloseCode.TOO_BIG, f"frame over {settings.MAX_MESSAGE_BYTES} bytes")
            return
        value = problem = None
        try:
            if text is None:
                raise FrameError("binary frames are not supported; send V2 JSON text frames")
            value = frame_limits.loads(text)
            join_ref, ref, topic, event, payload = parse_frame(value)
        except frame_limits.FrameRejected as exc:
            problem = f"malformed: {exc}"
        # Counted after parsing, so that the refusal can answer the frame's own ref.
        if not self.budget.take():
            problem = f"rate_limited: {frame_limits.RATE_LIMITED_MESSAGE}"
        if problem is not None:
            self.refuse_frame(value, problem)
            return
        try:
            await self.dispatch(join_ref, ref, topic, event, payload)
        except DatabaseError as exc:  # an outage, not a bug: the channel stays, the client retries
            log.warning("phoenix: %s on %s: database unavailable: %s", event, topic, exc)
            reason = "temporarily unavailable: try again"
            self.reply(join_ref, ref, topic, "error", frames.reason(reason))
        except Exception:  # a channel crash: tell the client (it rejoins), keep the socket
            log.exception("phoenix: %s on %s failed", event, topic)
            joined = self.channels.get(topic)
            if joined is not None:
                await self.drop_channel(topic)
                self.write(encode(joined.join_ref, joined.join_ref, topic, "phx_error", {}))
            else:
                self.reply(join_ref, ref, topic, "error", frames.reason("internal error"))

    def refuse_frame(self, frame, reason: str) -> None:
        """Answer a frame that is not handled (malformed, or over the rate): a reply when it has
        a ref and topic, else a ``phx_error`` on the socket topic. The socket stays open. Only
        text that passed ``frame_limits.loads`` is echoed, so every answer can be sent."""
        if (
            isinstance(frame, list)
            and len(frame) >= 3
            and isinstance(frame[1], str)
            and isinstance(frame[2], str)
        ):
            join_ref = frame[0] if isinstance(frame[0], str) else None
            self.reply(join_ref, frame[1], frame[2], "error", frames.reason(reason))
        else:
            self.push(None, SOCKET_TOPIC, "phx_error", frames.reason(reason))

    async def dispatch(self, join_ref, ref, topic: str, event: str, payload) -> None:
        if topic == SOCKET_TOPIC:
            if event == "heartbeat":
                self.reply(None, ref, topic, "ok", {})
            else:
                self.reply(join_ref, ref, topic, "error", frames.reason(f"unknown event {event!r}"))
            return
        if event == "phx_join":
            await self.join(join_ref, ref, topic, payload)
            return
        joined = self.channels.get(topic)
        if event == "phx_leave":
            await self.leave(join_ref, ref, topic)
        elif joined is None:
            self.reply(join_ref, ref, topic, "error", frames.reason("unmatched topic"))
        elif event == "request_update":
            await self.request_update(joined, ref, payload)
        else:
            self.reply(join_ref, ref, topic, "error", frames.reason(f"unknown event {event!r}"))

    # -- channel events -------------------------------------------------------------------

    async def join(self, join_ref, ref, topic: str, payload) -> None:
        def refuse(reason: str) -> None:
            self.reply(join_ref, ref, topic, "error", frames.reason(reason))

        if not is_valid_topic(topic):
            return refuse(
                "invalid topic: use lowercase segments of a-z, 0-9, _ or - separated by "
                "'.' or ':' (e.g. 'alerts.k8s', 'user:42')"
            )
        params = payload if isinstance(payload, dict) else {}
        since = params.get("since")
        if since is not None and (type(since) is not int or since < 0):
            return refuse("since must be a non-negative integer (the last seq you saw)")
        decision = await adecide(self.principal, topic, READ)
        if not decision.allowed:
            return refuse(decision.reason)
        previous = self.channels.get(topic)
        if previous is not None:
            # phoenix closes a duplicate join's old channel; its client ignores the old join_ref
            await self.drop_channel(topic)
            self.write(encode(previous.join_ref, previous.join_ref, topic, "phx_close", {}))
        elif len(self.channels) >= MAX_TOPICS_PER_SOCKET:
            return refuse(f"one socket may join at most {MAX_TOPICS_PER_SOCKET} topics")

        state = await stream_reads.current_state(topic)
        joined = ChannelJoin(self, topic, join_ref)
        self.channels[topic] = joined
        self.reply(join_ref, ref, topic, "ok", {})
        self.push(join_ref, topic, "current_state", state)
        # Replay after `since` (or after the state's last seq), then live: no gap, no duplicate.
        after = state["last_seq"] if since is None else since
        try:
            result = await hub.subscribe(topic, joined, since=after)
        except (HubUnavailable, Unsubscribed, DatabaseError) as exc:
            # Already replied ok: fail the channel as phoenix does, and the client rejoins.
            log.warning("phoenix: join of %s failed after ok: %s", topic, exc)
            if self.channels.get(topic) is joined:
                del self.channels[topic]
            self.write(encode(join_ref, join_ref, topic, "phx_error", {}))
            return
        joined.subscribed = True
        edge_metrics.subscribed(TRANSPORT, topic)
        if result.reset:
            reset = frames.reset_payload(topic, since, result.oldest_seq, result.last_seq)
            self.push(join_ref, topic, "reset", reset)
        await self.track_presence(joined)

    async def track_presence(self, joined: ChannelJoin) -> None:
        """Track this join, then push ``presence_state``. Presence is advisory: without it (Redis
        down) the channel works and gets an empty state."""
        presence = get_presence()
        meta = {"user_id": self.principal.user_id, "username": self.principal.username}
        state: dict = {}
        try:
            # Watch, then track, then list: a diff racing the list is applied twice at worst,
            # which phoenix's Presence.syncDiff tolerates (refs are unique).
            await presence.watch(joined.topic, joined.on_presence_diff)
            joined.watching = True
            joined.presence = await presence.track(
                joined.topic, presence_key(self.principal.user_id, self.socket_id), meta
            )
            state = await presence.list(joined.topic)
        except (PresenceUnavailable, HubUnavailable) as exc:
            log.warning("presence unavailable for %s: %s", joined.topic, exc)
        if self.channels.get(joined.topic) is joined:
            self.push(joined.join_ref, joined.topic, "presence_state", state)
            joined.presence_synced()

    async def leave(self, join_ref, ref, topic: str) -> None:
        joined = self.channels.get(topic)
        await self.drop_channel(topic)
        self.reply(join_ref, ref, topic, "ok", {})
        close_ref = joined.join_ref if joined is not None else join_ref
        self.write(encode(close_ref, close_ref, topic, "phx_close", {}))

    async def drop_channel(self, topic: str) -> None:
        """Forget a joined topic: unsubscribe, untrack, unwatch. Safe to call twice."""
        joined = self.channels.pop(topic, None)
        if joined is None:
            return
        if joined.subscribed:
            edge_metrics.unsubscribed(TRANSPORT, topic)  # first: what follows may be cancelled
        presence = get_presence()
        if joined.watching:
            presence.unwatch(topic, joined.on_presence_diff)
        if joined.presence is not None:
            await presence.untrack(joined.presence)
        if joined.subscribed:
            await hub.unsubscribe(topic, joined)

    async def request_update(self, joined: ChannelJoin, ref, payload) -> None:
        request = handlers.UpdateRequest(
            joined.topic, payload if isinstance(payload, dict) else {}, self.principal
        )
        try:
            registration = handlers.registration_for(joined.topic)
        except handlers.NoHandler as exc:
            self.reply(joined.join_ref, ref, joined.topic, "error", frames.reason(str(exc)))
            return
        response = await registration.handler(request)
        self.reply(joined.join_ref, ref, joined.topic, "ok", response)
        if registration.broadcast:
            hub.broadcast_event(joined.topic, registration.broadcast, response)


def parse_frame(frame) -> tuple:
    """Return ``(join_ref, ref, topic, event, payload)`` of a decoded frame. Raises FrameError."""
    if not isinstance(frame, list) or len(frame) != 5:
        raise FrameError("expected [join_ref, ref, topic, event, payload]")
    join_ref, ref, topic, event, payload = frame
    if join_ref is not None and not isinstance(join_ref, str):
        raise FrameError("join_ref must be a string or null")
    if ref is not None and not isinstance(ref, str):
        raise FrameError("ref must be a string or null")
    if not isinstance(topic, str) or not topic:
        raise FrameError("topic must be a non-empty string")
    if not isinstance(event, str) or not event:
        raise FrameError("event must be a non-empty string")
    return join_ref, ref, topic, event, payload


async def phoenix_app(scope, receive, send) -> None:
    """The ASGI application of one Phoenix socket (raw ASGI: no consumer dispatch per frame)."""
    await PhoenixConnection(scope, receive, send).run()
