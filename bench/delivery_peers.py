"""The far ends of the delivery benchmark (bench/delivery.py), each a process of its own.

- ``smtp``: an SMTP server (aiosmtpd on uvloop) that accepts every message and records, per
  message, the value of its ``X-Notify-Delivery`` header and the time it arrived;
- ``http``: a webhook receiver: a minimal HTTP/1.1 keep-alive responder on ``asyncio.start_server``
  (uvloop) that answers 200 to every POST and records its ``webhook-id`` header and the time;
- ``hung``: accepts connections, reads what comes, never answers (an SMTP server that never
  greets, an HTTP server that never replies).

Why processes: a peer in a thread of the load generator would share its interpreter lock, so the
generator's own work would slow the peer, and in the bare phase the bare sender and its peer would
slow each other. As processes, the same peers (not pinned: the scheduler places them, as it places
the worker) serve the bare sender and notify alike.

A peer is driven through a ``multiprocessing`` pipe by ``Peer``: ``count()``, ``received(start)``
(the (key, epoch s) records from index ``start``) and ``sample()`` (the first message received,
whole: the bare sender sends the same bytes).

The bare senders are here too (``bare_smtp_asyncio``, ``bare_smtp_threads``, ``bare_http_httpx``,
``bare_http_httpx_threads``, ``bare_http_raw``): run in a process of their own, they send ``n``
copies of a sample as fast as they can over kept connections and return their CPU seconds.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import smtplib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvloop

SMTP_KEY = b"\nx-notify-delivery: "
HTTP_KEY = b"\r\nwebhook-id: "
STARTUP_TIMEOUT_S = 20
CALL_TIMEOUT_S = 30  # a control call the peer does not answer in this time is a failure
BARE_TIMEOUT_S = 180  # one bare sender's run; they take seconds


def _key(raw: bytes, marker: bytes) -> str:
    """The value of the header ``marker`` names, found case-insensitively (a lowercased copy of
    the head only: bodies are not scanned)."""
    head_end = raw.find(b"\r\n\r\n")
    head = raw[: head_end if head_end >= 0 else len(raw)]
    at = head.lower().find(marker)
    if at < 0:
        return ""
    start = at + len(marker)
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].decode(errors="replace").strip()


class Records:
    """What a peer received: ``(key, epoch s)`` in order, and the first message whole."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float]] = []
        self.sample: bytes = b""

    def add(self, key: str, raw: bytes) -> None:
        self.items.append((key, time.time()))
        if not self.sample:
            self.sample = raw


def _serve_control(conn, records: Records) -> None:
    # Runs on a thread beside the peer's loop: list appends and slices are atomic under the GIL.
    while True:
        try:
            command, arg = conn.recv()
        except EOFError:
            os._exit(0)  # the bench is gone: so is this peer
        if command == "count":
            conn.send(len(records.items))
        elif command == "received":
            conn.send(records.items[arg:])
        elif command == "sample":
            conn.send(records.sample)
        elif command == "stop":
            conn.send(None)
            os._exit(0)


class _SMTPHandler:
    def __init__(self, records: Records) -> None:
        self.records = records

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        raw = envelope.original_content or envelope.content
        self.records.add(_key(b"\n" + raw, SMTP_KEY), raw)
        return "250 OK queued"


def _run_smtp(port: int, records: Records) -> None:
    from aiosmtpd.controller import Controller

    controller = Controller(
        _SMTPHandler(records),
        hostname="127.0.0.1",
        port=port,
        loop=uvloop.new_event_loop(),
        decode_data=False,
        data_size_limit=1024 * 1024,
    )
    controller.start()
    threading.Event().wait()  # until the process ends


async def _http_connection(reader, writer, records: Records) -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            length = 0
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                length = int(lower[at + 17 : lower.find(b"\r\n", at + 2)])
            body = await reader.readexactly(length) if length else b""
            records.add(_key(head, HTTP_KEY), head + body)
            writer.write(answer)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _hung_connection(reader, writer) -> None:
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


def _run_asyncio(port: int, handler) -> None:
    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def _peer_main(kind: str, port: int, conn) -> None:
    records = Records()
    threading.Thread(target=_serve_control, args=(conn, records), daemon=True).start()
    if kind == "smtp":
        _run_smtp(port, records)
    elif kind == "http":
        _run_asyncio(port, lambda r, w: _http_connection(r, w, records))
    else:
        _run_asyncio(port, _hung_connection)


class Peer:
    """One peer process (``kind`` smtp, http or hung) listening on 127.0.0.1:``port``."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind, self.port = kind, port
        context = multiprocessing.get_context("spawn")  # no state of the bench's Django
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_peer_main, args=(kind, port, child), daemon=True)
        self.process.start()
        _wait_listening(port, self.process)

    def _call(self, command: str, arg=None):
        self._conn.send((command, arg))
        if not self._conn.poll(CALL_TIMEOUT_S):
            raise RuntimeError(f"the {self.kind} peer did not answer {command!r}")
        return self._conn.recv()

    def count(self) -> int:
        return self._call("count")

    def received(self, start: int = 0) -> list[tuple[str, float]]:
        return self._call("received", start)

    def sample(self) -> bytes:
        return self._call("sample")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._call("stop")
            except (OSError, RuntimeError, EOFError):
                self.process.kill()
        self.process.join(5)


def _wait_listening(port: int, process) -> None:
    import socket

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError(f"a peer on port {port} exited with {process.exitcode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)  # polling a port: there is no event for "listening"
    raise RuntimeError(f"nothing listens on port {port} after {STARTUP_TIMEOUT_S} s")


# --- the bare senders ------------------------------------------------------------------------


def with_key(raw: bytes, marker: bytes, key: str) -> bytes:
    """``raw`` with the value of its header ``marker`` replaced by ``key``."""
    lower = raw.lower()
    at = lower.find(marker.lstrip(b"\r\n"))
    end = raw.find(b"\r\n", at)
    start = at + len(marker.lstrip(b"\r\n"))
    return raw[:start] + key.encode() + raw[end:]


def smtp_payload(message: bytes) -> bytes:
    """The DATA payload of ``message``: CRLF lines, dot-stuffed, ending in CRLF.CRLF."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed).rstrip(b"\r\n") + b"\r\n.\r\n"


async def _smtp_reply(reader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the SMTP server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


async def _bare_smtp(port: int, message: bytes, n: int, connections: int) -> None:
    counter = iter(range(n))

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _smtp_reply(reader)
        writer.write(b"EHLO bare.bench\r\n")
        await _smtp_reply(reader)
        for i in counter:
            for command in (b"MAIL FROM:<bare@bench.test>\r\n", b"RCPT TO:<to@bench.test>\r\n"):
                writer.write(command)
                if await _smtp_reply(reader) != 250:
                    raise RuntimeError("the SMTP server refused a bare message")
            writer.write(b"DATA\r\n")
            await _smtp_reply(reader)
            writer.write(smtp_payload(with_key(message, SMTP_KEY, f"bare-{i}")))
            await _smtp_reply(reader)
        writer.write(b"QUIT\r\n")
        await _smtp_reply(reader)
        writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))


def bare_smtp_asyncio(port: int, message: bytes, n: int, connections: int) -> float:
    """Send ``n`` copies of ``message`` over ``connections`` kept SMTP connections, each one
    conversation at a time (MAIL, RCPT, DATA, no pipelining: what smtplib does), from one
    asyncio loop. Returns this process's CPU seconds."""
    started = time.process_time()
    uvloop.run(_bare_smtp(port, message, n, connections))
    return time.process_time() - started


def bare_smtp_threads(port: int, message: bytes, n: int, threads: int) -> float:
    """The same with ``smtplib`` (what Django's SMTP backend uses) in ``threads`` threads, one
    kept connection each. Returns this process's CPU seconds."""
    counter = iter(range(n))
    lock = threading.Lock()

    def one_connection() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                raw = with_key(message, SMTP_KEY, f"bare-{i}")
                smtp.sendmail("bare@bench.test", ["to@bench.test"], raw)

    started = time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(one_connection) for _ in range(threads)]:
            future.result()
    return time.process_time() - started


def _split_http(sample: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = sample.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        if name.lower() not in ("host", "content-length", "connection"):
            headers[name.strip().lower()] = value.strip()
    return headers, body


async def _bare_httpx(url: str, sample: bytes, n: int, connections: int) -> None:
    import httpx

    headers, body = _split_http(sample)
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one_task() -> None:
            for i in counter:
                answer = await client.post(
                    url, content=body, headers={**headers, "webhook-id": f"bare-{i}"}
                )
                answer.raise_for_status()

        await asyncio.gather(*(one_task() for _ in range(connections)))


def bare_http_httpx(url: str, sample: bytes, n: int, connections: int) -> float:
    """POST the body of the HTTP request ``sample`` ``n`` times with its headers, from
    ``connections`` concurrent tasks of one ``httpx.AsyncClient`` (keep-alive). Returns this
    process's CPU seconds."""
    started = time.process_time()
    uvloop.run(_bare_httpx(url, sample, n, connections))
    return time.process_time() - started


def bare_http_httpx_threads(url: str, sample: bytes, n: int, threads: int) -> float:
    """The same with one ``httpx.Client`` shared by ``threads`` threads: what notify's webhook
    transport does (routing_app/delivery/http.py). Returns this process's CPU seconds."""
    import httpx

    headers, body = _split_http(sample)
    counter = iter(range(n))
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)

    def one_thread(client) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            answer = client.post(url, content=body, headers={**headers, "webhook-id": f"bare-{i}"})
            answer.raise_for_status()

    started = time.process_time()
    with httpx.Client(limits=limits, timeout=30) as client, ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(one_thread, client) for _ in range(threads)]:
            future.result()
    return time.process_time() - started


async def _bare_raw(port: int, sample: bytes, n: int, connections: int) -> None:
    headers, body = _split_http(sample)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != "webhook-id")
    prefix = f"POST /hook HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{head}".encode()
    tail = f"content-length: {len(body)}\r\n\r\n".encode() + body
    counter = iter(range(n))

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in counter:
            writer.write(prefix + f"webhook-id: bare-{i}\r\n".encode() + tail)
            answer = await reader.readuntil(b"\r\n\r\n")
            if answer[9:12] != b"200":
                raise RuntimeError(f"the receiver answered {answer[:12]!r}")
            # The receiver's answers have no body (content-length: 0).
        writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))


def bare_http_raw(port: int, sample: bytes, n: int, connections: int) -> float:
    """The same with a minimal HTTP/1.1 client on asyncio streams (no HTTP library). Returns
    this process's CPU seconds."""
    started = time.process_time()
    uvloop.run(_bare_raw(port, sample, n, connections))
    return time.process_time() - started


def run_in_process(function, *args) -> float:
    """Run ``function(*args)`` in a fresh process (spawned: its own interpreter lock, like the
    worker's) and return what it returns; ``multiprocessing.TimeoutError`` after
    ``BARE_TIMEOUT_S``."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply_async(function, args).get(BARE_TIMEOUT_S)
