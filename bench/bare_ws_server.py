"""The limit bench/fanout.py compares us to: a bare `websockets` broadcast server, nothing else.

Subscribers connect to ``/sub`` and get one hello frame; each text message a publisher sends on
``/publish`` is pushed to every subscriber with ``websockets.broadcast`` (one encode per socket
only when permessage-deflate was negotiated, as in our server). No auth, no database, no Redis:
what Python plus the `websockets` library can do on one core. Runs on uvloop like uvicorn does.

    python bench/bare_ws_server.py --port 0     # prints "PORT <n>" once listening

With ``--sse-port P`` it also serves Server-Sent Events on P, the bare limit of our SSE edge:
any GET there is answered ``200 text/event-stream`` (chunked, as uvicorn streams a response),
and each published message is written to every stream as its own chunk (``id: <seq>`` plus the
message as ``data``), one ``transport.write`` per message per stream: no parsing of requests
beyond the head, no auth, no backlog bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from websockets.asyncio.server import ServerConnection, broadcast, serve

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)

HELLO = '{"type":"subscribed","topic":"bench.bare","last_seq":0}'
LISTEN_BACKLOG = 4096  # connection bursts of the idle test


class SseStream(asyncio.Protocol):
    """One SSE response: the head once the request's head arrived, then chunks until closed."""

    def __init__(self, streams: set) -> None:
        self.streams = streams
        self.transport: asyncio.Transport | None = None
        self.head = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self in self.streams:
            return  # nothing more is read from a stream's client
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.transport.write(SSE_HEAD + _chunk(b": subscribed\n\n"))
            self.streams.add(self)

    def connection_lost(self, exc) -> None:
        self.streams.discard(self)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_broadcast(streams: set, message: str | bytes) -> None:
    data = message.encode() if isinstance(message, str) else message
    seq = json.loads(data)["seq"]
    chunk = _chunk(b"id: %d\nevent: notification\ndata: %s\n\n" % (seq, data))
    for stream in streams:
        stream.transport.write(chunk)


async def serve_forever(port: int, sse_port: int | None = None) -> None:
    subscribers: set[ServerConnection] = set()
    streams: set[SseStream] = set()
    if sse_port is not None:
        loop = asyncio.get_running_loop()
        await loop.create_server(
            lambda: SseStream(streams), "127.0.0.1", sse_port, backlog=LISTEN_BACKLOG
        )

    async def handler(ws: ServerConnection) -> None:
        if ws.request.path.startswith("/publish"):
            async for message in ws:
                broadcast(subscribers, message)
                if streams:
                    sse_broadcast(streams, message)
            return
        subscribers.add(ws)
        try:
            await ws.send(HELLO)
            await ws.wait_closed()
        finally:
            subscribers.discard(ws)

    async with serve(handler, "127.0.0.1", port, backlog=LISTEN_BACKLOG) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"PORT {bound}", flush=True)
        await asyncio.Future()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sse-port", type=int, default=None, help="also serve SSE on this port")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve_forever(args.port, args.sse_port))
    except ImportError:
        asyncio.run(serve_forever(args.port, args.sse_port))


if __name__ == "__main__":
    main()
