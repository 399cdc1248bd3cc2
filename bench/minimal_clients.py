"""Cheap load-generator clients for bench/fanout.py: WebSocket, SSE and HTTP POST on raw asyncio.

Why not the `websockets` client: the bare server, measured on a 2-core machine, saturated a load
generator built on it at ~83 % of a core, so the generator, not the server, would set the figure.
These clients parse frame headers and look only for the ``"seq"`` of each message (a regex on the
bytes, no JSON decode); compressed messages are inflated because a context-takeover stream cannot
be skipped. Every message's seq is checked: in order, none missing, none twice.

Protocols: WebSocket RFC 6455 https://www.rfc-editor.org/rfc/rfc6455 , permessage-deflate
RFC 7692 https://www.rfc-editor.org/rfc/rfc7692 , SSE https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
import zlib
from collections.abc import Callable

SEQ_RE = re.compile(rb'"seq"\s*:\s*(\d+)')
DEFLATE_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.2: removed by the sender, appended back here
HEADER_LIMIT_BYTES = 64 * 1024


class SeqStats:
    """Per-connection delivery bookkeeping shared by the WebSocket and SSE clients.

    ``target``: the seq whose arrival completes this connection (``on_target`` is then called once);
    ``record``: when a list, every (seq, monotonic receive time) is appended (latency runs).
    """

    __slots__ = (
        "last_seq",
        "received",
        "dups",
        "gaps",
        "t_first",
        "t_last",
        "target",
        "on_target",
        "record",
        "other",
    )

    def __init__(self) -> None:
        self.last_seq = -1  # unknown until the first message: live subscriptions start anywhere
        self.received = 0
        self.dups = 0
        self.gaps = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.target = 0
        self.on_target: Callable[[], None] | None = None
        self.record: list | None = None
        self.other = 0  # frames without a seq (subscribed, pings, events)

    def expect(self, after_seq: int, target: int, on_target: Callable[[], None]) -> None:
        """Start counting: the next message must be ``after_seq + 1``; done at ``target``."""
        self.last_seq = after_seq
        self.received = self.dups = self.gaps = 0
        self.t_first = self.t_last = 0.0
        self.target = target
        self.on_target = on_target

    def seen(self, seq: int, now: float) -> None:
        last = self.last_seq
        if seq == last + 1 or last < 0:
            self.last_seq = seq
        elif seq <= last:
            self.dups += 1
            return
        else:
            self.gaps += seq - last - 1
            self.last_seq = seq
        self.received += 1
        if not self.t_first:
            self.t_first = now
        self.t_last = now
        if self.record is not None:
            self.record.append((seq, now))
        if seq == self.target and self.on_target is not None:
            callback, self.on_target = self.on_target, None
            callback()


class WsClient(asyncio.Protocol):
    """One client WebSocket. ``opened`` resolves with the HTTP status of the handshake (101 = ok);
    ``ready`` resolves on the first text message (our ``subscribed`` frame, the bare server's
    hello); ``closed`` resolves with the close code (1006 when the TCP connection just dropped).
    Application pings ``{"type":"ping"}`` are answered with ``{"type":"pong"}`` and control pings
    with pongs, so a long idle hold is not closed for silence."""

    __slots__ = (
        "request",
        "transport",
        "buf",
        "handshake_done",
        "inflater",
        "reset_inflater",
        "frag",
        "frag_compressed",
        "stats",
        "opened",
        "ready",
        "closed",
        "close_code",
        "deflate_negotiated",
    )

    def __init__(self, host: str, path: str, origin: str | None, deflate: bool) -> None:
        loop = asyncio.get_running_loop()
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if origin:
            lines.append(f"Origin: {origin}")
        if deflate:
            # What browsers offer; the server then keeps one compression context per socket.
            lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.handshake_done = False
        self.inflater = None
        self.reset_inflater = False
        self.frag: list[bytes] = []
        self.frag_compressed = False
        self.stats = SeqStats()
        self.opened: asyncio.Future[int] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int] = loop.create_future()
        self.close_code: int | None = None
        self.deflate_negotiated = False

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        if self.close_code is None:
            self.close_code = 1006
        if not self.opened.done():
            self.opened.set_result(0)
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.handshake_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                if len(buf) > HEADER_LIMIT_BYTES:
                    self.transport.close()
                return
            self._handshake(buf[:end].decode("latin-1"))
            buf = buf[end + 4 :]
            if not self.handshake_done:
                return
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > n:
                break
            payload = buf[pos + head : end]
            pos = end
            opcode = b0 & 0x0F
            if opcode >= 8:
                self._control(opcode, payload)
                continue
            if opcode:  # first frame of a message; RSV1 marks it compressed (RFC 7692)
                self.frag_compressed = bool(b0 & 0x40)
            if not b0 & 0x80:
                self.frag.append(payload)
                continue
            if self.frag:
                self.frag.append(payload)
                payload = b"".join(self.frag)
                self.frag = []
            if self.frag_compressed:
                if self.reset_inflater:
                    self.inflater = zlib.decompressobj(-15)
                payload = self.inflater.decompress(payload + DEFLATE_TAIL)
            self._message(payload)
        self.buf = buf[pos:] if pos < n else b""

    # --- internals ----------------------------------------------------------------------------

    def _handshake(self, head: str) -> None:
        status_line, _, headers = head.partition("\r\n")
        parts = status_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status != 101:
            self.opened.set_result(status)
            self.transport.close()
            return
        for line in headers.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value:
                bits = 15
                match = re.search(r"server_max_window_bits=(\d+)", value)
                if match:
                    bits = int(match.group(1))
                self.inflater = zlib.decompressobj(-bits)
                self.reset_inflater = "server_no_context_takeover" in value
                self.deflate_negotiated = True
        self.handshake_done = True
        self.opened.set_result(101)

    def _message(self, payload: bytes) -> None:
        match = SEQ_RE.search(payload)
        if match is not None:
            self.stats.seen(int(match.group(1)), time.monotonic())
            return
        self.stats.other += 1
        if len(payload) < 64 and b'"ping"' in payload:
            self.send_text(b'{"type":"pong"}')
        if not self.ready.done():
            self.ready.set_result(None)

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:  # ping -> pong with the same payload
            self._send_frame(0xA, payload)
        elif opcode == 0x8:  # close: remember the code, answer, let the server drop TCP
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._send_frame(0x8, payload[:2])
            if not self.closed.done():
                self.closed.set_result(self.close_code)

    def _send_frame(self, opcode: int, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        n = len(data)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        if n:
            key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
            data = (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")
        self.transport.write(head + mask + data)

    def send_text(self, data: bytes) -> None:
        """Send one uncompressed text message (client frames are masked, RFC 6455 5.3)."""
        self._send_frame(0x1, data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class SseClient(asyncio.Protocol):
    """One SSE stream (GET with ``Accept: text/event-stream``). ``opened`` resolves with the HTTP
    status; each complete event's seq (read from its ``data`` JSON) goes to ``stats``."""

    __slots__ = ("request", "transport", "buf", "head_done", "chunked", "chunk_left", "skip")
    __slots__ += ("body", "stats", "opened", "closed", "status")

    def __init__(self, host: str, path: str, last_event_id: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream"]
        if last_event_id is not None:
            lines.append(f"Last-Event-ID: {last_event_id}")
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.head_done = False
        self.chunked = False
        self.chunk_left = 0
        self.skip = 0
        self.body = b""
        self.stats = SeqStats()
        self.opened: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.status = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_result(0)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].decode("latin-1").lower()
            parts = head.split(" ", 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.chunked = "transfer-encoding: chunked" in head
            self.head_done = True
            self.opened.set_result(self.status)
            buf = buf[end + 4 :]
        if not self.chunked:
            self.buf = b""
            self._body(buf)
            return
        pos, n, out = 0, len(buf), []
        while pos < n:
            if self.skip:  # the CRLF closing a chunk, possibly cut by the read boundary
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
                continue
            if self.chunk_left:
                take = min(self.chunk_left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if not self.chunk_left:
                    self.skip = 2
                continue
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(buf[pos:line_end].split(b";")[0] or b"0", 16)
            if size == 0:  # last chunk: the server ended the stream
                self.transport.close()
                pos = n
                break
            pos = line_end + 2
            self.chunk_left = size
        self.buf = buf[pos:] if pos < n else b""
        if out:
            self._body(b"".join(out))

    def _body(self, data: bytes) -> None:
        body = self.body + data if self.body else data
        end = body.rfind(b"\n\n")
        if end < 0:
            self.body = body
            return
        now = time.monotonic()
        seen = self.stats.seen
        for match in SEQ_RE.finditer(body, 0, end):
            seen(int(match.group(1)), now)
        self.body = body[end + 2 :]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HttpPoster:
    """A keep-alive HTTP/1.1 connection that POSTs JSON. ``post`` returns (status, body bytes,
    monotonic time just before the request was written). Reconnects when the server closed an
    idle connection (uvicorn does after 5 s)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes, float]:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{self.extra}\r\n"
        ).encode() + body
        for attempt in (1, 2):
            if self.writer is None or self.writer.is_closing():
                await self._connect()
            sent = time.monotonic()
            self.writer.write(request)
            try:
                status, payload = await self._response()
                return status, payload, sent
            except (ConnectionError, asyncio.IncompleteReadError):
                self.writer.close()
                self.writer = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size + 2))
            payload = b"".join(p[:-2] for p in parts)
        else:
            payload = await self.reader.readexactly(length or 0)
        if close:
            self.writer.close()
            self.writer = None
        return status, payload

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def open_ws(
    host: str,
    port: int,
    path: str,
    *,
    origin: str | None,
    deflate: bool,
    local_ip: str | None = None,
) -> WsClient:
    """Connect and finish the handshake; raises ConnectionError when the upgrade is refused."""
    loop = asyncio.get_running_loop()
    local = (local_ip, 0) if local_ip else None
    _, client = await loop.create_connection(
        lambda: WsClient(f"{host}:{port}", path, origin, deflate), host, port, local_addr=local
    )
    status = await client.opened
    if status != 101:
        raise ConnectionError(f"WebSocket upgrade for {path} answered HTTP {status}")
    return client


async def open_sse(host: str, port: int, path: str) -> SseClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: SseClient(f"{host}:{port}", path), host, port)
    status = await client.opened
    if status != 200:
        raise ConnectionError(f"SSE GET {path} answered HTTP {status}")
    return client
