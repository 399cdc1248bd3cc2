"""Writing to one connection without letting it slow anyone else down.

``ConnectionSender.push(event)`` hands an ASGI send event to the server *immediately*: it starts the
server's ``send()`` coroutine by hand, and with uvicorn's WebSocket protocols that coroutine
finishes at once (it writes the frame to the transport) unless the transport's write buffer is full.
Only a send that would wait is handed to one drainer task, and later events queue behind it in a
bounded backlog; past ``limit`` queued events the connection is over budget and ``on_overflow`` is
called (the edge closes it with a "too slow" code). So the hub's fanout loop never awaits a socket,
and creates no task per delivery (measured on a 2-core machine: a task per socket per message
halved fanout throughput).

Works for any ASGI send (``websocket.send`` frames, SSE ``http.response.body`` chunks).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.exceptions import InvalidState

log = logging.getLogger(__name__)

# After a close frame is queued, the peer gets this long to take it (it first reads what the
# kernel and the transport already hold, up to ~200 KB); then the transport is aborted. A reader
# that stopped reading would otherwise hold those buffers until TCP gives up. As uvicorn's own
# close timeout (10 s).
CLOSE_GRACE_S = 10.0

# Kernel send buffer per connection (Linux doubles it). Left alone, loopback and LAN autotuning
# grow it to 4 MB, so a reader could fall 4 MB behind (per socket, in kernel memory) before the
# bounded queue here even sees it. 64 KiB still carries a notification stream at full speed; a
# reader that stops is then dropped after ~SOCKET_SEND_QUEUE frames + ~200 KB, not ~4 MB.
KERNEL_SEND_BUFFER_BYTES = 64 * 1024

Send = Callable[[dict], Awaitable[None]]


def _transport(send: Send):
    """The transport under an ASGI ``send``, when the server exposes it (uvicorn's protocol
    objects do: ``send`` is a bound method of the protocol, which holds ``transport``)."""
    return getattr(getattr(send, "__self__", None), "transport", None)


def limit_kernel_buffer(send: Send, nbytes: int = KERNEL_SEND_BUFFER_BYTES) -> bool:
    """Cap the connection's kernel send buffer (SO_SNDBUF); returns whether it could."""
    transport = _transport(send)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
    except OSError as exc:  # not a TCP socket (a test harness, a Unix socket proxy)
        log.debug("could not set SO_SNDBUF: %r", exc)
        return False
    return True


async def _resume(coro, waiting: Any) -> None:
    """Finish a coroutine that was started by hand (``coro.send(None)``) and suspended on
    ``waiting`` (the future it awaits, or None for a bare yield)."""
    try:
        while True:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait((waiting,))
            waiting = coro.send(None)
    except StopIteration:
        return
    except BaseException:
        coro.close()
        raise


def abort_transport(send: Send) -> bool:
    """Abort the connection under an ASGI ``send`` if the server exposes its transport.

    ASGI has no "abort" event, and a graceful close waits for the write buffer to drain, which a
    peer that stopped reading never lets happen. Returns whether an abort was possible.
    """
    abort = getattr(_transport(send), "abort", None)
    if abort is None:
        return False
    abort()
    return True


def uvicorn_websocket(send: Send):
    """uvicorn's sans-I/O WebSocket protocol object under ``send``, or None for other servers.

    Used only for the fast path below; every attribute it relies on is checked here, so a future
    uvicorn that changes them falls back to plain ASGI sends instead of breaking.
    """
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:  # another server, or a uvicorn without that protocol
        return None
    proto = getattr(send, "__self__", None)
    # A subclass counts (manage.py serve runs notify_project.uvicorn_protocols'): matching the
    # class by name turned this path off for it, and every frame went through ASGI sends.
    if not isinstance(proto, WebSocketsSansIOProtocol):
        return None
    for name in ("transport", "writable", "conn", "close_sent", "disconnected"):
        if not hasattr(proto, name):
            return None
    return proto


class ConnectionSender:
    """Ordered, non-blocking, bounded writes to one ASGI connection. Use from its event loop."""

    __slots__ = (
        "_send",
        "_backlog",
        "_task",
        "_limit",
        "_on_overflow",
        "_drained",
        "_abort_timer",
        "closed",
        "close_sent",
        "close_code",
        "_raw",
        "_prebuilt",
        "_failure_close_code",
    )

    def __init__(
        self,
        send: Send,
        limit: int,
        on_overflow: Callable[[], None],
        failure_close_code: int | None = None,
    ):
        self._send = send
        self._backlog: deque[dict] | None = None  # None = nothing waiting: the fast path
        self._task: asyncio.Task | None = None
        self._limit = limit
        self._on_overflow = on_overflow
        self._drained: asyncio.Event | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self.closed = False  # no more frames accepted (closing, overflowed or send failed)
        self.close_sent = False
        self.close_code: int | None = None  # the code of the server's close, once queued
        self._raw = None  # uvicorn's protocol, when writes may go straight to its transport
        self._prebuilt = False  # and the connection is uncompressed: prebuilt frames fit it
        # A WebSocket's close code after a send that raised (None: an HTTP response, not closed)
        self._failure_close_code = failure_close_code

    def enable_prebuilt_frames(self) -> bool:
        """Let ``push_text``/``push_texts`` write straight to the transport (call after accept).

        Only on uvicorn's sans-I/O protocol, doing what its ``send`` does for ``websocket.send``
        (same checks: handshake done, not closing, transport writable) without the coroutine:
        - without permessage-deflate, a server-to-client frame is not masked, so a message's
          frame bytes are the same for every socket: the hub builds them once per message and a
          delivery is one ``transport.write`` (no per-socket framing);
        - with it, each socket has its own deflate context: frames go through websockets'
          protocol object per socket, but a batch still leaves in one write.
        Returns whether the direct path is on (else push_text falls back to ASGI sends).
        """
        proto = uvicorn_websocket(self._send)
        if proto is None or not proto.handshake_complete:
            return False
        self._raw = proto
        self._prebuilt = not proto.conn.extensions
        return True

    @property
    def backlog(self) -> int:
        """Events waiting behind a send that could not complete at once."""
        return 0 if self._backlog is None else len(self._backlog)

    def push(self, event: dict) -> bool:
        """Send ``event`` now, or queue it behind a waiting send. Never blocks, never raises.

        Returns False when the event was not taken: the connection is closed or closing, or the
        backlog is full (then ``on_overflow`` has been called once).
        """
        if self.closed:
            return False
        backlog = self._backlog
        if backlog is not None:
            if len(backlog) >= self._limit:
                self._overflow()
                return False
            backlog.append(event)
            return True
        coro = self._send(event)
        try:
            waiting = coro.send(None)
        except StopIteration:
            return True
        except Exception as exc:  # noqa: BLE001  (the peer is gone, or the frame was unsendable)
            self._send_failed(exc)
            return False
        self._backlog = deque()
        self._task = asyncio.get_running_loop().create_task(self._drain(coro, waiting))
        return True

    def _direct(self):
        """uvicorn's protocol when a write may go straight to its transport now, else None."""
        raw = self._raw
        if (
            raw is None
            or self._backlog is not None
            or self.closed
            or not raw.writable.is_set()
            or raw.close_sent
            or raw.disconnected
            or raw.transport.is_closing()
        ):
            return None
        return raw

    def push_text(self, text: str, frame: bytes | None = None) -> bool:
        """``push`` of a text message; ``frame`` is its prebuilt uncompressed WebSocket frame
        (``hub.Message.ws_frame``). Same order and queueing rules as ``push``."""
        raw = self._direct()
        if raw is not None:
            if frame is not None and self._prebuilt:
                raw.transport.write(frame)
                return True
            return self._write_texts(raw, (text,))
        return self.push({"type": "websocket.send", "text": text})

    def push_texts(self, texts: list[str], frames: bytes | None = None) -> bool:
        """``push_text`` for several messages (``frames``: their prebuilt frames concatenated);
        on the direct path they leave in one ``transport.write``."""
        raw = self._direct()
        if raw is not None:
            if frames is not None and self._prebuilt:
                raw.transport.write(frames)
                return True
            return self._write_texts(raw, texts)
        taken = True
        for text in texts:
            taken = self.push({"type": "websocket.send", "text": text}) and taken
        return taken

    def _write_texts(self, raw, texts) -> bool:
        conn = raw.conn
        try:
            payloads = [text.encode() for text in texts]
        except UnicodeEncodeError as exc:
            self._send_failed(exc)
            return False
        try:
            for payload in payloads:
                conn.send_text(payload)
        except InvalidState:  # the closing handshake started under us: the peer is leaving
            self.closed = True
            return False
        raw.transport.write(b"".join(conn.data_to_send()))
        return True

    async def _drain(self, coro, waiting) -> None:
        failure = None
        try:
            await _resume(coro, waiting)
            while self._backlog:
                await self._send(self._backlog.popleft())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  (the peer went away while we waited)
            failure = exc
        finally:
            self._backlog = None
            self._task = None
            if self._drained is not None:
                self._drained.set()
        if failure is not None:
            self._send_failed(failure)

    def _send_failed(self, exc: Exception) -> None:
        """A send raised: take no more frames, and close a WebSocket (``failure_close_code``)
        so its client hears it and reconnects instead of waiting on a socket that stays open but
        deaf. A gone peer is routine (nothing left to close); any other error means a frame the
        server could not send, which is a bug worth a warning."""
        self.closed = True
        if isinstance(exc, OSError | InvalidState):  # uvicorn's ClientDisconnected is an OSError
            log.debug("send failed, connection treated as closed: %r", exc)
            return
        log.warning("a frame could not be sent (%r): closing the connection", exc)
        if self._failure_close_code is not None:
            self.close(self._failure_close_code, "the server could not send a frame")

    async def drained(self) -> None:
        """Wait until nothing is queued (returns at once on the fast path or once closed)."""
        while self._backlog is not None and not self.closed:
            if self._drained is None or self._drained.is_set():
                self._drained = asyncio.Event()
            await self._drained.wait()

    async def flushed(self) -> None:
        """Wait until the drainer has handed every queued event to the server, final ones (from
        ``push_final``) included: ``drained`` returns as soon as ``closed`` is set. Bounded by the
        abort timer. For ending an HTTP response (SSE) before the app returns."""
        if self._task is not None:
            await asyncio.wait((self._task,))

    def _overflow(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._backlog is not None:
            self._backlog.clear()  # the peer is dropped anyway: free its frames now
        self._on_overflow()

    def close(self, code: int, reason: str = "") -> None:
        """Queue a ``websocket.close`` after what is already queued (dropped on overflow), and
        abort the transport if the peer has not taken it within ``CLOSE_GRACE_S``."""
        if self.close_sent:
            return
        self.close_sent = True
        self.close_code = code
        self.closed = True
        event = {"type": "websocket.close", "code": code, "reason": reason}
        self.push_final(event)

    def push_final(self, event: dict) -> None:
        """Send a last event (a close, the end of a response) even though ``closed`` is set."""
        loop = asyncio.get_running_loop()
        if self._backlog is not None:
            self._backlog.append(event)
        else:
            coro = self._send(event)
            try:
                waiting = coro.send(None)
            except StopIteration:
                waiting = False
            except Exception as exc:  # noqa: BLE001
                log.debug("final send failed: %r", exc)
                waiting = False
            if waiting is not False:
                self._backlog = deque()
                self._task = loop.create_task(self._drain(coro, waiting))
        if self._task is not None and self._abort_timer is None:
            self._abort_timer = loop.call_later(CLOSE_GRACE_S, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if self._task is not None and abort_transport(self._send):
            log.info("aborted a connection that did not take its close frame")

    def dispose(self) -> None:
        """The connection is over: stop the drainer and timers (call from the app's finally)."""
        self.closed = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._backlog = None
