"""Server-Sent Events at ``/events/<topic>/``: a topic's notifications as an event stream.

Protocol: https://html.spec.whatwg.org/multipage/server-sent-events.html (``EventSource``).

What a client receives (``data`` is always one line of compact JSON, built by ``frames.py``,
whose docstrings give each shape in full)::

    : open                                   first bytes: the stream is accepted (a comment)
    event: reset                             only when the resume point is older than retention
    id: <last_seq>                           (or ahead of the stream): nothing was replayed,
    data: {"type":"reset","topic","since","oldest_seq","last_seq"}   the stream goes on from there
    event: <notification event>              one per notification, in seq order, each seq once;
    id: <seq>                                data is exactly what the plain WebSocket sends
    data: {"type":"notification","topic","seq","id","event","data","severity","source","ts"}
    event: subscribed                        once, after the replay: from here on it is live
    data: {"type":"subscribed","topic","last_seq"}
    event: <ephemeral event>                 e.g. reverse_flow_update (no id: not resumable)
    data: {"type":"event","topic","event","payload"}
    : keep-alive                             every SSE_KEEPALIVE_S, so proxies keep the stream
    event: stream-error                      then the server ends the stream; EventSource
    retry: <ms>                              reconnects with Last-Event-ID and loses nothing
    data: {"type":"error","code":"too_slow"|"unavailable","message"}

``?unnamed=1``: notifications and ephemeral events come as ``event: message`` (unnamed) with the
same ids and data, for a client that cannot register a listener per event name (EventSource
delivers a named event only to a listener for that name); ``subscribed``, ``reset`` and
``stream-error`` keep their names.

Resume: ``Last-Event-ID`` (header, sent by EventSource on its own reconnects) or the
``lastEventId`` query parameter (a new EventSource cannot set headers) carries the last seq the
client has; the stream replays what the topic stored after it, then continues live with no gap and
no duplicate at the seam (the hub handles the seam). django-eventstream's ``<channel>:<id>`` form
is accepted too. No id: live only.

Refusals are plain HTTP answers with a JSON body ``{"detail": ...}`` and no stream: 400 bad topic
name, Last-Event-ID or ``unnamed``, or a Host not in ``ALLOWED_HOSTS``; 401 forged/expired token
(or anonymous on a topic that needs a login); 403 topic not allowed or page origin not allowed;
405 method. EventSource treats a non-200 answer as
final (no reconnect loop). Transient trouble after acceptance (Redis or the database unreachable)
is a ``stream-error`` with ``retry``, so EventSource tries again by itself.

Authentication and authorization are the sockets': ``socket_auth.principal_for_scope`` (``?token=``
or the session cookie) and ``authz`` READ. CORS is django-cors-headers' own logic and settings
(``CORS_ALLOWED_ORIGINS`` = NOTIFY_ALLOWED_ORIGINS, credentials allowed), applied to these
responses too; pages of other origins are refused outright (``socket_auth.origin_allowed``).
A logged-in reader is present on the topic while its stream is open (``presence.py``: same key
and meta as a Phoenix join, ``via: "sse"``), tracked once live and untracked when it ends.

Why notify keeps its own endpoint beside django-eventstream: its view holds one OS thread per
open stream (Django's ASGI handler), its Redis listener never restarts after an outage, and its
storage deletes on every append. Only its SSE framing and ``send_event()`` are used: docs/sse.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
from io import BytesIO
from urllib.parse import parse_qs, quote

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpResponse, JsonResponse
from django.urls.resolvers import RoutePattern
from django_eventstream.channelmanager import ChannelManagerBase
from django_eventstream.event import Event
from django_eventstream.storage import EventDoesNotExist, StorageBase
from django_eventstream.utils import parse_last_event_id, sse_encode_event

from routing_app import stream_reads
from routing_app.allowed_hosts import host_allowed, refuse
from routing_app.topics import is_valid_topic

from . import edge_metrics, frames
from .authz import READ, Principal, adecide, decide
from .frames import ErrorCode
from .hub import Batch, HubUnavailable, Message, Unsubscribed, hub
from .presence import ConnectionPresence
from .sender import ConnectionSender, limit_kernel_buffer
from .socket_auth import header, origin_allowed, principal_for_scope
from .tokens import TokenError

log = logging.getLogger(__name__)

ENCODING = "sse"
# ?unnamed=1: every notification and topic event as an unnamed ("message") event, for a client
# that cannot know the event names in advance (EventSource delivers a named event only to a
# listener registered for that name): the JS client's fallback from WebSocket.
UNNAMED_ENCODING = "sse-unnamed"
UNNAMED = "message"
TRANSPORT = "sse"  # in the metrics
UNAVAILABLE_RETRY_MS = 5000  # EventSource waits this long before reconnecting after trouble
OPEN_CHUNK = b": open\n\n"
KEEPALIVE_CHUNK = b": keep-alive\n\n"
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]


def encode_sse(message: Message) -> bytes:
    """One notification as an SSE event; cached on the Message for every SSE stream."""
    return sse_encode_event(
        message.envelope["event"], message.encoded("plain"), event_id=message.seq
    ).encode()


def encode_sse_unnamed(message: Message) -> bytes:
    """The same event under the name ``message``; cached as ``encode_sse``'s is."""
    return sse_encode_event(UNNAMED, message.encoded("plain"), event_id=message.seq).encode()


hub.register_encoder(ENCODING, encode_sse)
hub.register_encoder(UNNAMED_ENCODING, encode_sse_unnamed)


def _json(data: dict) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _event(name: str, data: dict, event_id: int | None = None, retry_ms: int | None = None):
    text = sse_encode_event(name, _json(data), event_id=event_id)
    if retry_ms is not None:
        text = f"retry: {retry_ms}\n" + text
    return text.encode()


def _body(chunk: bytes) -> dict:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


# --- request parsing ------------------------------------------------------------------------


class BadRequest(ValueError):
    pass


def last_event_id(scope: dict, topic: str) -> int | None:
    """The seq to resume after: ``Last-Event-ID`` header, else the last non-empty ``lastEventId``
    query value (django-eventstream's rule). ``N`` or django-eventstream's ``<channel>:<N>``.
    Raises BadRequest."""
    raw = header(scope, b"last-event-id")
    if not raw:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        raw = next((v for v in reversed(query.get("lastEventId", [])) if v), None)
    if not raw:
        return None
    raw = raw.strip()
    try:
        if ":" in raw:
            raw = parse_last_event_id(raw).get(quote(topic, safe=""), "")
        since = int(raw)
    except ValueError:
        raise BadRequest(
            f"Last-Event-ID {raw!r} is not a seq of topic {topic!r}: send the id of the last "
            "event received, or none to start live"
        ) from None
    if since < 0:
        raise BadRequest("Last-Event-ID must not be negative")
    return since


def unnamed_events(scope: dict) -> bool:
    """The ``unnamed`` query parameter: ``1``/``true`` sends every notification and topic event
    as an unnamed ``message`` event; absent, ``0`` or ``false`` names each by its ``event``.
    Raises BadRequest for any other value."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("unnamed", [])
    value = values[-1].strip().lower() if values else ""
    if value in ("", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise BadRequest(f"unnamed must be 1, true, 0 or false, not {value[:40]!r}")


def needs_reset(since: int, last_seq: int, oldest_seq: int | None) -> bool:
    """``since`` cannot be resumed: retention deleted seqs after it, or it is ahead of the stream.
    (The hub's rule in ``Hub._join``; decided here first so ``reset`` precedes any event.)"""
    gone = oldest_seq - 1 if oldest_seq is not None else last_seq
    return since > last_seq or since < gone


# --- CORS: django-cors-headers' logic on a raw ASGI scope -------------------------------------


def cors_headers(scope: dict, response: HttpResponse | None = None) -> list[tuple[bytes, bytes]]:
    """The CORS headers django-cors-headers' middleware would add (preflight answer included when
    ``response`` is None and the request is a preflight), as ASGI header pairs."""
    from corsheaders.middleware import CorsMiddleware
    from django.core.handlers.asgi import ASGIRequest

    request = ASGIRequest(scope, BytesIO())
    middleware = CorsMiddleware(lambda _request: HttpResponse() if response is None else response)
    answer = middleware(request)
    return [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in answer.items()
        if name.lower().startswith("access-control-") or name.lower() == "vary"
    ]


async def respond(send, scope: dict, status: int, detail: str, extra: dict | None = None) -> None:
    """A plain (non-stream) JSON answer with CORS headers."""
    body = _json({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for name, value in (extra or {}).items():
        headers.append((name.encode(), value.encode()))
    headers += cors_headers(scope, HttpResponse())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# --- one open stream --------------------------------------------------------------------------


class EventStream:
    """A hub subscriber writing one topic to one SSE response (see ``sender.ConnectionSender``:
    immediate writes, bounded backlog, then ``overflow``)."""

    __slots__ = (
        "topic",
        "encoding",
        "sender",
        "finished",
        "presence",
        "subscribed",
        "_keepalive",
    )

    def __init__(self, topic: str, send, principal: Principal, unnamed: bool = False) -> None:
        self.topic = topic
        self.encoding = UNNAMED_ENCODING if unnamed else ENCODING
        self.presence = ConnectionPresence(topic, principal, "sse")
        self.sender = ConnectionSender(send, settings.SOCKET_SEND_QUEUE, self.overflow)
        self.finished = asyncio.get_running_loop().create_future()
        self.subscribed = False  # counted in the subscriptions gauge
        self._keepalive: asyncio.TimerHandle | None = None

    def deliver(self, frame: bytes, message: Message) -> None:
        self.sender.push(_body(frame))

    def deliver_batch(self, batch: Batch) -> None:
        """A burst of the topic's messages as one body chunk: one send (one write, one chunk
        header) per stream instead of one per message; the events inside are unchanged. Behind
        a send that is waiting, one chunk per message, so that the backlog bound
        (``SOCKET_SEND_QUEUE`` chunks) still counts messages for a reader that fell behind."""
        if self.sender.backlog:
            for frame in batch.frames(self.encoding):
                self.sender.push(_body(frame))
        else:
            self.sender.push(_body(batch.joined(self.encoding)))

    def deliver_event(self, topic: str, event: str, payload: dict) -> None:
        name = UNNAMED if self.encoding == UNNAMED_ENCODING else event
        self.sender.push(_body(_event(name, frames.event(topic, event, payload))))

    def push(self, chunk: bytes) -> None:
        self.sender.push(_body(chunk))

    async def drained(self) -> None:
        """The hub awaits this after each replayed message: a long replay waits for the reader."""
        await self.sender.drained()

    def overflow(self) -> None:
        """The reader fell ``SOCKET_SEND_QUEUE`` chunks behind: end the stream; the client
        reconnects with Last-Event-ID and reads the rest from the durable stream."""
        hub.detach(self.topic, self)
        self.end(
            ErrorCode.TOO_SLOW,
            "the stream fell too far behind and was closed; reconnect with Last-Event-ID",
        )

    def unavailable(self) -> None:
        """This process lost the realtime bus: end the stream; the client reconnects (perhaps
        to another process) with Last-Event-ID."""
        hub.detach(self.topic, self)
        self.end(
            ErrorCode.UNAVAILABLE,
            "this server lost the realtime bus; reconnect with Last-Event-ID",
            retry_ms=UNAVAILABLE_RETRY_MS,
        )

    def end(self, code: ErrorCode, message: str, retry_ms: int | None = None) -> None:
        """Send a last ``stream-error`` and end the response (also past a full backlog)."""
        if self.finished.done():
            return
        data = frames.error(code, message)
        self.sender.push_final(_body(_event("stream-error", data, retry_ms=retry_ms)))
        self.sender.push_final({"type": "http.response.body", "body": b"", "more_body": False})
        self.finished.set_result(code)

    def start_keepalive(self, interval_s: float) -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            if self.sender.closed:
                return
            self.push(KEEPALIVE_CHUNK)
            self._keepalive = loop.call_later(interval_s, tick)

        self._keepalive = loop.call_later(interval_s, tick)

    def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def sse_app(scope: dict, receive, send) -> None:
    """ASGI app for ``/events/<topic>/`` (``scope["url_route"]["kwargs"]["topic"]``)."""
    topic = scope["url_route"]["kwargs"]["topic"]
    method = scope["method"]
    if method == "OPTIONS":
        await _preflight(scope, send)
        return
    if method != "GET":
        await respond(send, scope, 405, "use GET to open an event stream", {"allow": "GET"})
        return
    if not is_valid_topic(topic):
        await respond(send, scope, 400, f"{topic!r} is not a valid topic name")
        return
    if not origin_allowed(scope):
        await respond(send, scope, 403, "pages of this origin may not open event streams here")
        return
    try:
        since = last_event_id(scope, topic)
        unnamed = unnamed_events(scope)
        principal = await principal_for_scope(scope)
        decision = await adecide(principal, topic, READ)
    except BadRequest as exc:
        await respond(send, scope, 400, str(exc))
        return
    except TokenError as exc:
        await respond(send, scope, 401, str(exc))
        return
    except DatabaseError as exc:  # users or rules unreadable: a transient trouble, not a refusal
        log.warning("SSE on topic %s: cannot authorize (%s)", topic, exc)
        await _unavailable(scope, send, "the user database is unreachable; retrying")
        return
    if not decision.allowed:
        if principal.is_authenticated:
            await respond(send, scope, 403, decision.reason)
        else:
            await respond(
                send, scope, 401, f"{decision.reason}: log in, or pass a token as ?token="
            )
        return
    await _stream(scope, receive, send, topic, since, principal, unnamed)


async def _unavailable(scope: dict, send, message: str) -> None:
    """A stream that only says ``stream-error`` "unavailable" with ``retry``: a 200, so that
    EventSource tries again by itself (it gives up for good on any other status)."""
    data = frames.error(ErrorCode.UNAVAILABLE, message)
    headers = STREAM_HEADERS + cors_headers(scope, HttpResponse())
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    body = OPEN_CHUNK + _event("stream-error", data, retry_ms=UNAVAILABLE_RETRY_MS)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _preflight(scope: dict, send) -> None:
    headers = cors_headers(scope)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"0"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _stream(
    scope: dict,
    receive,
    send,
    topic: str,
    since: int | None,
    principal: Principal,
    unnamed: bool = False,
) -> None:
    # As for sockets: a reader that stops is dropped after ~SOCKET_SEND_QUEUE events, not after
    # the kernel has buffered megabytes for it.
    limit_kernel_buffer(send)
    events = EventStream(topic, send, principal, unnamed)
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": STREAM_HEADERS + cors_headers(scope, HttpResponse()),
    }
    events.sender.push(start)
    events.push(OPEN_CHUNK)
    connection = edge_metrics.ConnectionCount(TRANSPORT)
    disconnected = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        subscribe = asyncio.ensure_future(_subscribe(events, topic, since))
        await asyncio.wait((subscribe, disconnected), return_when=asyncio.FIRST_COMPLETED)
        if not subscribe.done():  # the client left during the replay
            subscribe.cancel()
            await asyncio.wait((subscribe,))
            if not subscribe.cancelled():
                subscribe.exception()  # retrieved: it no longer matters, the client is gone
        elif subscribe.exception() is None:
            events.start_keepalive(settings.SSE_KEEPALIVE_S)
            await asyncio.wait((events.finished, disconnected), return_when=asyncio.FIRST_COMPLETED)
        else:
            _report_unavailable(events, topic, subscribe.exception())
        if events.finished.done():
            await events.sender.flushed()  # the last event reaches the reader (or is aborted)
    except asyncio.CancelledError:
        connection.closed(edge_metrics.NORMAL)  # the server is shutting down
        raise
    finally:
        connection.closed(_end_reason(events))
        if events.subscribed:
            edge_metrics.unsubscribed(TRANSPORT, topic)  # first: the awaits below may be cancelled
        disconnected.cancel()
        events.stop()
        await events.presence.untrack()  # also when the client left while the track ran
        await hub.unsubscribe(topic, events)
        events.sender.dispose()


async def _subscribe(events: EventStream, topic: str, since: int | None) -> None:
    if since is not None:
        last_seq, oldest_seq = await stream_reads.topic_state(topic)
        if needs_reset(since, last_seq, oldest_seq):
            data = frames.reset(topic, since, oldest_seq, last_seq)
            events.push(_event("reset", data, event_id=last_seq))
            since = last_seq
    result = await hub.subscribe(topic, events, since)
    events.subscribed = True
    edge_metrics.subscribed(TRANSPORT, topic)
    if result.reset:  # retention ran between our check and the hub's: say so, late
        data = frames.reset(topic, since, result.oldest_seq, result.last_seq)
        events.push(_event("reset", data, event_id=result.last_seq))
    events.push(_event("subscribed", frames.subscribed(topic, result.last_seq)))
    # Present once live (a logged-in reader only). After `subscribed`: nothing may come between
    # the replay and it. A client leaving meanwhile cancels this task; _stream's finally still
    # undoes the track (ConnectionPresence).
    await events.presence.track()


def _end_reason(events: EventStream) -> str:
    """Why a stream ended, for the metrics: the server's ``stream-error`` code (as the socket's
    close code's name), else the client left."""
    if events.finished.done():
        return edge_metrics.SSE_END_REASONS.get(events.finished.result(), edge_metrics.NORMAL)
    return edge_metrics.CLIENT


def _report_unavailable(events: EventStream, topic: str, exc: BaseException) -> None:
    if isinstance(exc, Unsubscribed):
        return  # the stream was closed (too slow) during its replay; end() already ran
    if isinstance(exc, HubUnavailable):
        message = str(exc)
    else:
        log.warning("SSE on topic %s: cannot subscribe (%s: %s)", topic, type(exc).__name__, exc)
        message = "the notification store is unreachable"
    events.end(ErrorCode.UNAVAILABLE, f"{message}; retrying", retry_ms=UNAVAILABLE_RETRY_MS)


# --- routing ----------------------------------------------------------------------------------

SSE_PATH = "events/<str:topic>/"  # channels_app/urls.py names the same path "events"


def with_sse(http_app):
    """ASGI ``http`` app: ``/events/<topic>/`` to ``sse_app``, everything else to ``http_app``
    (Django). Routed here, before Django's handler: inside it every open stream would hold an OS
    thread (docs/sse.md, pitfall (a))."""
    pattern = RoutePattern(SSE_PATH, is_endpoint=True)

    async def app(scope: dict, receive, send) -> None:
        if scope["path"].startswith("/events/"):
            match = pattern.match(scope["path"][1:])
            if match is not None:
                if not host_allowed(scope):  # Django's middleware, which this path skips, would
                    return await refuse(scope, receive, send)
                scope = dict(scope, url_route={"args": match[1], "kwargs": match[2]})
                return await sse_app(scope, receive, send)
        return await http_app(scope, receive, send)

    return app


def events_outside_asgi(request, topic: str) -> JsonResponse:
    """Django's view for the same path: only reached when the server does not run
    ``notify_project.asgi.application`` (WSGI, the test client). Streams need that app."""
    return JsonResponse(
        {"detail": "event streams are served by the ASGI application (notify_project.asgi)"},
        status=501,
    )


# --- django-eventstream compatibility: send_event() into the durable stream --------------------


class TopicChannelManager(ChannelManagerBase):
    """``EVENTSTREAM_CHANNELMANAGER_CLASS``: a django-eventstream channel is our topic; our topic
    rules decide who reads it. Every topic is reliable (stored, resumable)."""

    def get_channels_for_request(self, request, view_kwargs):
        if "topic" in view_kwargs:
            return {view_kwargs["topic"]}
        return set(request.GET.getlist("channel"))

    def can_read_channel(self, user, channel):
        return decide(Principal.from_user(user), channel, READ).allowed

    def is_channel_reliable(self, channel):
        return True


class NotificationStorage(StorageBase):
    """``EVENTSTREAM_STORAGE_CLASS``: django-eventstream's storage interface over our durable
    stream. ``send_event`` appends through ingest (one seq, routed, published after commit);
    nothing is deleted here (retention is the periodic task's job). Sync: call from sync code."""

    SOURCE = "system"  # send_event callers are this project's own code

    def append_event(self, channel: str, event_type: str, data) -> Event:
        from routing_app import notify

        payload = json.loads(data) if isinstance(data, str | bytes) else data
        if not isinstance(payload, dict):
            raise ValueError("send_event data must be a JSON object for a notify topic")
        result = notify(channel, event_type, payload, source=self.SOURCE)
        return Event(channel, event_type, data, id=result.seq)

    def get_events(self, channel: str, last_id: int, limit: int = 100) -> list[Event]:
        """Events after ``last_id``; ``data`` is the envelope JSON (what our stream sends).
        Raises EventDoesNotExist when ``last_id`` is no longer (or not yet) in the stream."""
        from asgiref.sync import async_to_sync

        last_seq, oldest_seq = async_to_sync(stream_reads.topic_state)(channel)
        if needs_reset(last_id, last_seq, oldest_seq):
            raise EventDoesNotExist(f"seq {last_id} of {channel!r} is not kept", last_seq)
        rows = async_to_sync(stream_reads.read_after)(channel, last_id, limit)
        return [Event(channel, row["event"], _json(row), id=row["seq"]) for row in rows]

    def get_current_id(self, channel: str) -> int:
        return stream_reads.topic_last_seq(channel)
