"""The limit bench/fanout.py compares us to: a bare `websockets` broadcast server, nothing else.

Subscribers connect to ``/sub`` and get one hello frame; each text message a publisher sends on
``/publish`` is pushed to every subscriber with ``websockets.broadcast`` (one encode per socket
only when permessage-deflate was negotiated, as in our server). No auth, no database, no Redis:
what Python plus the `websockets` library can do on one core. Runs on uvloop like uvicorn does.

    python bench/bare_ws_server.py --port 0     # prints "PORT <n>" once listening
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, broadcast, serve

HELLO = '{"type":"subscribed","topic":"bench.bare","last_seq":0}'
LISTEN_BACKLOG = 4096  # connection bursts of the idle test


async def serve_forever(port: int) -> None:
    subscribers: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        if ws.request.path.startswith("/publish"):
            async for message in ws:
                broadcast(subscribers, message)
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
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve_forever(args.port))
    except ImportError:
        asyncio.run(serve_forever(args.port))


if __name__ == "__main__":
    main()
