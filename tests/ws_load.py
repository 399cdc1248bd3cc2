"""A fleet of light plain-protocol WebSocket clients in one process, for the overload test.

    python -m tests.ws_load --port P --topic T --token TOKEN --clients 1000 --slow 100

Raw asyncio protocols (RFC 6455 framing by hand, no JSON decoding of notifications: the seq is
read from the compact envelope), so that one process can keep 1,000 sockets reading. Each client
checks its own stream: after ``subscribed`` (last_seq L) it must see L+1, L+2, ... with nothing
missing, repeated or reordered. Slow clients shrink their receive buffer and read one small
chunk a few times a second: far slower than the publisher, so the server must drop them (4429)
rather than buffer for them.

Talks to its parent over stdin/stdout, one line each:
  -> ``READY {"subscribed": n, "failed": n}`` once every client is subscribed (or failed)
  <- ``FINAL <seq>``: the publisher is done; wait until every client has <seq> or was closed
  -> ``RESULT {...}`` per-kind counts and every violation found
  <- ``CLOSE``: drop every connection at once (no close frames, like a crashed proxy)
  -> ``CLOSED``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import struct
import sys
import time

SLOW_READ_EVERY_S = 0.2  # a slow client reads one small chunk this often
SLOW_RCVBUF = 4096  # bytes: its kernel receive buffer, so the backlog builds up on the server
CONNECT_BATCH = 100  # connections opened concurrently
FINISH_TIMEOUT_S = 120.0  # after FINAL, how long clients may take to catch up


class Client(asyncio.Protocol):
    def __init__(self, host: str, path: str, slow: bool) -> None:
        self.host = host
        self.path = path
        self.slow = slow
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.handshaken = False
        self.subscribed = asyncio.get_running_loop().create_future()
        self.last_seq: int | None = None  # last seq seen (from "subscribed", then notifications)
        self.count = 0
        self.violations: list[str] = []
        self.close_code: int | None = None
        self.lost = False
        self.changed = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None

    # --- connection -------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"lost before subscribed: {exc}"))
        self.changed.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.handshaken:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self.subscribed.set_exception(ConnectionError(head.split(b"\r\n")[0].decode()))
                self.transport.close()
                return
            self.handshaken = True
        self._frames()
        if self.slow and self.last_seq is not None and self.timer is None and not self.lost:
            self.transport.pause_reading()
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(SLOW_READ_EVERY_S, self._read_a_little)

    def _read_a_little(self) -> None:
        self.timer = None
        if not self.lost:
            self.transport.resume_reading()  # data_received pauses again after one chunk

    def _frames(self) -> None:
        buf = self.buffer
        while len(buf) >= 2:
            opcode = buf[0] & 0x0F
            length = buf[1] & 0x7F
            offset = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length = struct.unpack_from("!H", buf, 2)[0]
                offset = 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length = struct.unpack_from("!Q", buf, 2)[0]
                offset = 10
            if len(buf) < offset + length:
                return
            payload = bytes(buf[offset : offset + length])
            del buf[: offset + length]
            if opcode == 1:
                self._text(payload)
            elif opcode == 8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._send(8, payload[:2])
                self.transport.close()
                self.changed.set()
                return
            elif opcode == 9:
                self._send(10, payload)

    def _text(self, payload: bytes) -> None:
        if payload.startswith(b'{"type":"notification"'):
            at = payload.index(b'"seq":') + 6
            seq = int(payload[at : payload.index(b",", at)])
            if self.last_seq is None:
                self.violations.append(f"seq {seq} before subscribed")
            elif seq != self.last_seq + 1:
                self.violations.append(f"seq {seq} after {self.last_seq}")
            self.last_seq = seq
            self.count += 1
            self.changed.set()
            return
        message = json.loads(payload)
        if message["type"] == "subscribed":
            self.last_seq = message["last_seq"]
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif message["type"] == "ping":
            self._send(1, b'{"type":"pong"}')

    def _send(self, opcode: int, data: bytes) -> None:
        if self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        header = bytes([0x80 | opcode, 0x80 | len(data)])  # client frames here are < 126 bytes
        self.transport.write(header + mask + masked)

    @property
    def done(self) -> bool:
        return self.lost or self.close_code is not None


async def open_client(host: str, port: int, path: str, slow: bool) -> Client:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if slow:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    _, client = await loop.create_connection(
        lambda: Client(f"{host}:{port}", path, slow), sock=sock
    )
    await client.subscribed
    return client


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=100, help="how many of them read slowly")
    args = parser.parse_args()
    path = f"/ws/{args.topic}/?token={args.token}"
    clients: list[Client] = []
    failed: list[str] = []
    kinds = [index < args.slow for index in range(args.clients)]
    for start in range(0, args.clients, CONNECT_BATCH):
        batch = kinds[start : start + CONNECT_BATCH]
        results = await asyncio.gather(
            *(open_client(args.host, args.port, path, slow) for slow in batch),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                failed.append(repr(result))
            else:
                clients.append(result)
    say("READY", {"subscribed": len(clients), "failed": len(failed), "errors": failed[:5]})
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    final = int((await reader.readline()).split()[1])
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    for client in clients:
        while not client.done and (client.last_seq or 0) < final:
            client.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(client.changed.wait(), remaining)
            except TimeoutError:
                break
    say("RESULT", summarize(clients, final))
    await reader.readline()  # CLOSE
    for client in clients:
        if not client.lost:
            client.transport.abort()
    say("CLOSED", {})


def summarize(clients: list[Client], final: int) -> dict:
    result = {
        "complete": {"fast": 0, "slow": 0},
        "closed": {},
        "incomplete_open": [],
        "violations": [],
    }
    for index, client in enumerate(clients):
        kind = "slow" if client.slow else "fast"
        result["violations"] += [f"client {index}: {v}" for v in client.violations[:3]]
        if client.close_code is not None:
            key = f"{kind}:{client.close_code}"
            result["closed"][key] = result["closed"].get(key, 0) + 1
        elif client.lost:
            result["closed"][f"{kind}:lost"] = result["closed"].get(f"{kind}:lost", 0) + 1
        elif client.last_seq == final:
            result["complete"][kind] += 1
        else:
            result["incomplete_open"].append(f"client {index} ({kind}) at {client.last_seq}")
    return result


def say(word: str, data: dict) -> None:
    sys.stdout.write(f"{word} {json.dumps(data)}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
