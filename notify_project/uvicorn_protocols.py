"""uvicorn's HTTP and WebSocket protocols with the request limits uvicorn itself lacks.

``manage.py serve`` runs uvicorn with ``--http`` naming the class below (``uvicorn_argv`` in
routing_app/management/commands/serve.py). Each request gets a clear answer in a bounded time:

- a request line over ``MAX_REQUEST_LINE_BYTES``: 414 (HTTP and WebSocket upgrades alike);
- a request head (line and headers) over ``MAX_REQUEST_HEAD_BYTES`` or with more than
  ``MAX_HEADER_COUNT`` headers: 431;
- a request head not complete ``settings.REQUEST_HEAD_TIMEOUT_S`` after its first byte (or after
  the connection opened): 408, then close (slowloris);
- a request body not complete ``settings.REQUEST_BODY_TIMEOUT_S`` after its head: 408 if no
  response has started, else a close.

uvicorn's httptools protocol (the one it picks when httptools is installed) buffers a head of any
size and holds a connection that never finishes its head for ever. It hands a WebSocket upgrade to
the websockets (sans-I/O) protocol, which refuses a request line or header line over 8 KiB and
more than 128 headers by preparing a 414 or 431 that uvicorn never writes: the client waited for
ever. ``WebSocketsProtocol`` writes that answer. What a reverse proxy must add in front of these
limits (per-client connection counts, TLS) is in docs/deployment.md.

HTTP/1.1 message syntax: https://www.rfc-editor.org/rfc/rfc9112 ; the status codes 408, 414 and
431: https://www.rfc-editor.org/rfc/rfc9110#section-15.5 and https://www.rfc-editor.org/rfc/rfc6585
"""

from __future__ import annotations

import asyncio
import functools
import logging

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets import http11 as websockets_http11

# websockets refuses a longer request line on an upgrade (414); plain HTTP gets the same limit so
# that both answer alike.
MAX_REQUEST_LINE_BYTES = websockets_http11.MAX_LINE_LENGTH
# nginx's default large_client_header_buffers (4 x 8 KiB): what a proxy in front lets through.
MAX_REQUEST_HEAD_BYTES = 32 * 1024
MAX_HEADER_COUNT = 100  # Python's http.client refuses more; websockets allows 128


@functools.cache
def deadlines() -> tuple[int, int]:
    """settings.REQUEST_HEAD_TIMEOUT_S and REQUEST_BODY_TIMEOUT_S, read at the first connection
    (uvicorn imports this module before the application has set Django up)."""
    from django.conf import settings

    return settings.REQUEST_HEAD_TIMEOUT_S, settings.REQUEST_BODY_TIMEOUT_S


logger = logging.getLogger(__name__)


class RequestRefused(Exception):  # noqa: N818  (a refusal, not a failure of ours)
    """Raised inside a parser callback to stop parsing a request that breaks a limit."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded request heads and deadlines (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout_s, self._body_timeout_s = deadlines()
        # Upgrades go to the subclass below of the websockets protocol settings.UVICORN_WS_ARGS
        # names; another WebSocket implementation is left as configured.
        if self.ws_protocol_class is WebSocketsSansIOProtocol:
            self.ws_protocol_class = WebSocketsProtocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._header_count = 0
        self._reading_head = True
        self._deadline: asyncio.TimerHandle | None = None
        # A connection that never sends a byte is held no longer than a trickling one.
        self._arm(self._head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # --- the deadline of the current phase ---

    def _arm(self, delay_s: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self._reading_head and not self.transport.is_closing():
            self._refuse(408, f"request head not received within {self._head_timeout_s} s")

    def _body_timed_out(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the application is not reading yet: not the client's delay
            self._arm(self._body_timeout_s, self._body_timed_out)
            return
        reason = f"request body not received within {self._body_timeout_s} s"
        cycle.disconnected = True  # the application's receive() now says http.disconnect
        cycle.message_event.set()
        if cycle.response_started:
            logger.warning("closing a connection: %s", reason)
            self.transport.close()
        else:
            self._refuse(408, reason)

    # --- parsing ---

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        while data and not self.transport.is_closing():
            if self.transport.get_protocol() is not self:  # upgraded to a WebSocket meanwhile
                self.transport.get_protocol().data_received(data)
                return
            if self._reading_head:
                # Feed no more than the head may still take: the rest may be a body.
                room = MAX_REQUEST_HEAD_BYTES - self._head_bytes
                chunk, data = data[: room + 1], data[room + 1 :]
                self._head_bytes += len(chunk)
            else:
                chunk, data = data, b""
            if not self._feed(chunk):
                return
            if self._reading_head and self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                self._refuse(431, f"request head over {MAX_REQUEST_HEAD_BYTES} bytes")
                return

    def _feed(self, chunk: bytes) -> bool:
        """Feed ``chunk`` to the parser; False once the connection is answered or handed over."""
        try:
            self.parser.feed_data(chunk)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, RequestRefused):
                self._refuse(exc.__context__.status, exc.__context__.reason)
                return False
            raise
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return False
        except httptools.HttpParserUpgrade:
            self._disarm()
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._header_count = 0
        self._arm(self._head_timeout_s, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_REQUEST_LINE_BYTES:
            raise RequestRefused(414, f"request line over {MAX_REQUEST_LINE_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADER_COUNT:
            raise RequestRefused(431, f"more than {MAX_HEADER_COUNT} request headers")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        if self.parser.should_upgrade() and self._should_upgrade():
            self._disarm()  # the WebSocket protocol takes over
        else:
            self._arm(self._body_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        # what follows on this connection is the next request's head, limited from its first byte
        self._reading_head = True
        self._head_bytes = 0
        super().on_message_complete()

    # --- answers ---

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` with ``reason`` as a plain-text body, then close."""
        self._disarm()
        self._reading_head = False
        body = f"{reason}\n".encode("ascii")
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))
        self.transport.close()


class _ReceiveQueue:
    """What uvicorn's WebSocket protocol asks of its receive queue (``put_nowait``, ``get``,
    ``empty``, ``qsize``), unbounded as uvicorn's is, without ``asyncio.Queue``'s four deques and
    Event: an idle connection's queue was about 3 KB of its 24 (tracemalloc, 2,000 sockets)."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: list = []
        self._waiters: list[asyncio.Future] | None = None

    def put_nowait(self, item) -> None:
        self._items.append(item)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self):
        while not self._items:
            await _wait_on(self)
        return self._items.pop(0)


class _Flag:
    """``asyncio.Event``'s ``is_set``/``set``/``clear``/``wait`` for uvicorn's ``writable``,
    holding waiters only while someone waits (an Event allocates a deque for each socket)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        while not self._value:
            await _wait_on(self)
        return True


async def _wait_on(owner: _ReceiveQueue | _Flag) -> None:
    """Wait until ``owner`` wakes its waiters (each waiter then checks its condition again)."""
    waiter = asyncio.get_running_loop().create_future()
    if owner._waiters is None:
        owner._waiters = []
    owner._waiters.append(waiter)
    try:
        await waiter
    finally:
        if owner._waiters is not None and waiter in owner._waiters:
            owner._waiters.remove(waiter)


class WebSocketsProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol that writes the answer websockets prepares for an
    upgrade request it refuses (414, 431, or a bare close for a malformed one), that counts an
    application's HTTP answer to an upgrade (``websocket.http.response``) as its end, and that
    holds less per open connection: a lighter receive queue and ``writable`` flag, and, once the
    handshake is answered, neither the parsed request's headers nor the handshake response (the
    application has them in its scope; uvicorn keeps both for the connection's life otherwise).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _ReceiveQueue()
        self.writable = _Flag()
        self.writable.set()

    async def send(self, message) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            request, self.request, self.response = self.request, None, None
            # websockets' parser generator still refers to the request object: free its headers
            request.headers.clear()
        elif message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            # uvicorn forgets that an HTTP answer completes the handshake, then logs an error and
            # writes a 500 after it: an ERROR line per refused connection under a flood
            self.handshake_complete = True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.handshake_exc is not None and not self.handshake_initiated:
            self.handshake_initiated = self.handshake_complete = self.close_sent = True
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
