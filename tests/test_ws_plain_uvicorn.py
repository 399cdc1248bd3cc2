"""The plain WebSocket end to end: a real uvicorn process run as ``manage.py serve`` runs it
(tests/servers.py), real `websockets` clients. Redis mode when REDIS_URL is set (with a prefix of
its own), the embedded mode otherwise. The protocol's details, in-process: test_ws_plain.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.servers import NotifyServer

WAIT_S = 10


@pytest.fixture(scope="module")
def live(shared_server):
    server, seeded = shared_server
    return server, {**seeded["ids"], "api_key": seeded["api_key"]}


def url(server: NotifyServer, topic: str, token: str, since: int | None = None) -> str:
    query = f"token={token}" + (f"&since={since}" if since is not None else "")
    return f"ws://127.0.0.1:{server.port}/ws/{topic}/?{query}"


async def next_of(ws, kind: str) -> dict:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        if message["type"] == kind:
            return message


async def closed_with(ws) -> int:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), WAIT_S)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else 1006


async def test_publish_and_receive_over_a_compressed_socket_then_resume(live):
    server, users = live
    sam, oscar = server.token(users["sam"]), server.token(users["oscar"])
    async with connect(url(server, "e2e.live", sam)) as reader:
        assert "permessage-deflate" in reader.response.headers["Sec-WebSocket-Extensions"]
        assert (await next_of(reader, "subscribed"))["last_seq"] == 0
        async with connect(url(server, "e2e.live", oscar)) as writer:
            await next_of(writer, "subscribed")
            for n in range(3):
                await writer.send(json.dumps({"type": "publish", "event": "e", "data": {"n": n}}))
                assert (await next_of(writer, "ack"))["seq"] == n + 1
        got = [await next_of(reader, "notification") for _ in range(3)]
        assert [(m["seq"], m["data"], m["source"]) for m in got] == [
            (1, {"n": 0}, "user"),
            (2, {"n": 1}, "user"),
            (3, {"n": 2}, "user"),
        ]
    async with connect(url(server, "e2e.live", sam, since=1)) as again:
        assert [(await next_of(again, "notification"))["seq"] for _ in range(2)] == [2, 3]
        assert (await next_of(again, "subscribed"))["last_seq"] == 3


async def test_frames_over_64_kb_are_closed_with_1009_by_the_app_and_by_uvicorn(live):
    server, users = live
    sam = server.token(users["sam"])
    for size in (65536 + 1, 1024 * 1024):  # just over: our check; far over: uvicorn's limit
        async with connect(url(server, "e2e.big", sam), max_size=None) as ws:
            await next_of(ws, "subscribed")
            await ws.send(json.dumps({"type": "ping", "pad": "x" * size}))
            assert await closed_with(ws) == 1009


async def test_refusals_carry_their_close_codes(live):
    server, users = live
    for path, code in (
        (url(server, "e2e.x", "forged"), 4401),
        (url(server, "system.health", server.token(users["sam"])), 4403),
        (url(server, "Bad%20Topic", server.token(users["sam"])), 4400),
    ):
        async with connect(path) as ws:
            assert await closed_with(ws) == code


async def test_tokens_in_query_strings_are_kept_out_of_the_server_log(live):
    server, users = live
    token = server.token(users["sam"])
    async with connect(url(server, "e2e.logged", token)) as ws:
        await next_of(ws, "subscribed")
    log = server.log.read_text()
    assert "/ws/e2e.logged/?token=[redacted]" in log  # uvicorn's "[accepted]" line, at INFO
    assert token not in log
