"""Oversized and half-sent requests, and floods, against a real server run with ``manage.py
serve``'s uvicorn command line: each gets a clear answer (414/431/408/429/4429 or a close) within
a bounded time, and a normal client's requests keep being served meanwhile (its p50/p99 with and
without the flood, recorded as figures; notify_project/uvicorn_protocols.py has the limits).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from channels_app import connect_rate
from notify_project import uvicorn_protocols as limits
from tests.chaos.abuse_support import (
    ANSWER_WAIT_S,
    NormalClient,
    get_request,
    live_server,
    measure_during,
    raw_exchange,
    run_async,
    upgrade_request,
)
from tests.chaos.report import record

pytestmark = pytest.mark.timeout(240)


# Shorter request deadlines than production's (10 s head, 30 s body) so that the half-sent and
# slowloris cases end sooner; what is tested is that they are answered, not the figures.
HEAD_DEADLINE_S, BODY_DEADLINE_S = 2, 3


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    deadlines = {
        "REQUEST_HEAD_TIMEOUT_S": str(HEAD_DEADLINE_S),
        "REQUEST_BODY_TIMEOUT_S": str(BODY_DEADLINE_S),
    }
    with live_server(tmp_path_factory.mktemp("floods"), "floods", **deadlines) as running:
        yield running


def test_oversized_request_heads_get_414_or_431_at_once(live):
    token = live.tokens["sam"]
    padding = "x" * (9 * 1024)
    big_header = b"X-Padding: " + b"p" * (64 * 1024) + b"\r\n"
    many_headers = b"".join(b"X-H%d: v\r\n" % n for n in range(limits.MAX_HEADER_COUNT + 50))
    long_line = b"X-Long: " + b"l" * (9 * 1024) + b"\r\n"  # under the head limit, over websockets'
    cases = {
        "websocket upgrade, 9 KB token": (upgrade_request(f"/ws/t/?token={padding}"), 414),
        "plain GET, 10 KB URL": (get_request("/api/v1/csrf?pad=" + "y" * 10240), 414),
        "plain GET, 64 KB header": (get_request("/", extra_headers=big_header), 431),
        "websocket upgrade, 64 KB header": (
            upgrade_request(f"/ws/t/?token={token}", extra_headers=big_header),
            431,
        ),
        "plain GET, 150 headers": (get_request("/", extra_headers=many_headers), 431),
        "websocket upgrade, 150 headers": (
            upgrade_request(f"/ws/t/?token={token}", extra_headers=many_headers),
            431,
        ),
        "websocket upgrade, one 9 KB header line": (
            upgrade_request(f"/ws/t/?token={token}", extra_headers=long_line),
            431,
        ),
    }
    answers = {name: raw_exchange(live.port, request) for name, (request, _) in cases.items()}
    assert {name: answer.status for name, answer in answers.items()} == {
        name: status for name, (_, status) in cases.items()
    }
    rss_before = live.server.rss_bytes()
    huge = raw_exchange(live.port, get_request("/", extra_headers=b"X-Huge: " + b"h" * 64 * 2**20))
    assert huge.status == 431
    record(
        "oversized request heads",
        cases_tried=len(cases) + 1,
        answered_as_expected=len(cases) + 1,
        slowest_answer_s=round(max(a.elapsed_s for a in [*answers.values(), huge]), 2),
        rss_growth_after_64_mb_header_kb=(live.server.rss_bytes() - rss_before) // 1024,
    )


def test_requests_under_the_limits_still_pass(live):
    token = live.tokens["sam"]
    seven_kb = "x" * (7 * 1024)
    upgrade = raw_exchange(live.port, upgrade_request(f"/ws/t/?token={token}&pad={seven_kb}"))
    assert upgrade.status == 101
    plain = raw_exchange(live.port, get_request("/api/v1/csrf?pad=" + "y" * 7000))
    assert plain.status == 200
    # a head just under the size and count limits (Host is one of the headers)
    line = b"X-Fill-%d: " + b"f" * 4000 + b"\r\n"
    big = b"".join(line % n for n in range(7))  # 28 KB
    assert raw_exchange(live.port, get_request("/api/v1/csrf", extra_headers=big)).status == 200
    most = b"".join(b"X-H%d: v\r\n" % n for n in range(limits.MAX_HEADER_COUNT - 1))
    assert raw_exchange(live.port, get_request("/api/v1/csrf", extra_headers=most)).status == 200


def test_pipelined_and_keep_alive_requests_are_all_answered(live):
    request = get_request("/api/v1/csrf")
    with socket.create_connection(("127.0.0.1", live.port), timeout=ANSWER_WAIT_S) as sock:
        sock.sendall(request * 3)  # three at once: the second and third wait for the first
        received = b""
        while received.count(b"HTTP/1.1 200") < 3:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {received.count(b'HTTP/1.1 200')} answers"
            received += chunk
        sock.sendall(request)  # and one more on the same connection afterwards
        while received.count(b"HTTP/1.1 200") < 4:
            chunk = sock.recv(65536)
            assert chunk, "closed before the fourth answer"
            received += chunk
        # a later request on the connection is held to the same head limit from its first byte
        big = b"X-Big: " + b"b" * (limits.MAX_REQUEST_HEAD_BYTES + 1) + b"\r\n"
        with contextlib.suppress(OSError):  # the server may answer and close mid-send
            sock.sendall(get_request("/api/v1/csrf", extra_headers=big))
        while b"HTTP/1.1 431" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"closed without a 431: {received[-300:]!r}"
            received += chunk


def _trickle_head(sock: socket.socket) -> None:
    """Send one header byte about every quarter second until the server answers or closes
    (slowloris), for at most ANSWER_WAIT_S."""
    sock.settimeout(0.25)  # the pace of the trickle, not a wait for an event
    deadline = time.monotonic() + ANSWER_WAIT_S
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"X")
            if sock.recv(65536, socket.MSG_PEEK):
                break
        except TimeoutError:
            continue
        except OSError:
            break
    sock.settimeout(ANSWER_WAIT_S)


def test_half_sent_requests_are_answered_408_within_the_deadlines(live):
    cases = {
        "nothing sent": (b"", None, 408),
        "head without its end": (b"GET /api/v1/csrf HTTP/1.1\r\nHost: 127.0.0.1\r\n", None, 408),
        "head trickled byte by byte": (b"GET / HTTP/1.1\r\nX-Slow: ", _trickle_head, 408),
        "body shorter than its length": (
            b"POST /api/v1/notifications HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
            None,
            408,
        ),
    }
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futures = {
            name: pool.submit(raw_exchange, live.port, request, trickle=trickle)
            for name, (request, trickle, _) in cases.items()
        }
        answers = {name: future.result() for name, future in futures.items()}
    assert {name: answer.status for name, answer in answers.items()} == {
        name: status for name, (_, _, status) in cases.items()
    }
    record(
        "half-sent requests",
        cases_tried=len(cases),
        answered_408=sum(a.status == 408 for a in answers.values()),
        head_deadline_s=HEAD_DEADLINE_S,
        body_deadline_s=BODY_DEADLINE_S,
        slowest_answer_s=round(max(a.elapsed_s for a in answers.values()), 2),
    )


# --- floods, each beside a normal client -------------------------------------------------------

NORMAL_REQUESTS = 100  # the normal client's requests alone, then as many during the flood
MAX_CONNECTS = 3000  # connection attempts at most (the flood also stops with the normal client)
FLOOD_ADDRESS = "203.0.113.7"  # a documentation address (RFC 5737): not loopback, so limited
CONNECTING_TASKS = 4  # one client's connects in flight at once
PUBLISH_FLOOD_FRAMES = 3000
TOKEN_FLOOD_REQUESTS = 400
TOKEN_FLOOD_CONCURRENCY = 8
SLOWLORIS_CONNECTIONS = 150
TRICKLE_PACE_S = 0.5  # one byte per connection this often


def history_client(live) -> NormalClient:
    """A normal API client reading a topic's history with its key."""
    headers = {"Authorization": f"Bearer {live.api_key}"}
    url = f"{live.base}/api/v1/topics/alerts.k8s/notifications?limit=10"
    return NormalClient(
        request=lambda client: client.get(url, headers=headers),
        check=lambda answer: answer.status_code == 200 and "notifications" in answer.json(),
    )


def normal_figures(quiet: NormalClient, loud: NormalClient) -> dict[str, object]:
    assert quiet.wrong == [] and loud.wrong == [], (quiet.wrong[:5], loud.wrong[:5])
    assert len(loud.latencies_ms) == NORMAL_REQUESTS
    alone, during = quiet.figures(), loud.figures()
    return {
        "normal_requests": 2 * NORMAL_REQUESTS,
        "normal_wrong": 0,
        "normal_p50_ms_alone": alone["p50_ms"],
        "normal_p99_ms_alone": alone["p99_ms"],
        "normal_p50_ms_during": during["p50_ms"],
        "normal_p99_ms_during": during["p99_ms"],
    }


def test_connection_flood_gets_429_while_a_normal_client_is_served(live):
    url = f"ws://127.0.0.1:{live.port}/ws/flood.connect/?token={live.tokens['sam']}"
    flooder = {"X-Forwarded-For": FLOOD_ADDRESS}  # as the proxy in front says who it is
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + ANSWER_WAIT_S

    def more(done: threading.Event) -> bool:
        if outcomes.total() >= MAX_CONNECTS or time.monotonic() > deadline:
            return False
        return not (done.is_set() and outcomes["http 429"])

    async def connect_repeatedly(done: threading.Event) -> None:
        while more(done):
            try:
                async with connect(
                    url, additional_headers=flooder, open_timeout=ANSWER_WAIT_S
                ) as ws:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), ANSWER_WAIT_S))
                    outcomes[frame["type"]] += 1
            except ConnectionClosed as closed:
                outcomes[f"closed {closed.rcvd.code if closed.rcvd else 1006}"] += 1
            except InvalidStatus as refused:
                answer = refused.response
                retry = "retry-after" in answer.headers
                outcomes[
                    f"http {answer.status_code}" + ("" if retry else " without Retry-After")
                ] += 1
            except (OSError, TimeoutError) as exc:
                outcomes[f"no answer: {type(exc).__name__}"] += 1

    async def flood(done: threading.Event) -> None:
        await asyncio.gather(*(connect_repeatedly(done) for _ in range(CONNECTING_TASKS)))

    quiet, loud = measure_during(lambda: history_client(live), NORMAL_REQUESTS, run_async(flood))
    figures = normal_figures(quiet, loud)
    assert set(outcomes) <= {"subscribed", "http 429"} and outcomes["http 429"], outcomes
    # other addresses (and this machine's own) connect as usual
    for others in ({"X-Forwarded-For": "198.51.100.2"}, {}):
        assert asyncio.run(first_frame(url, others))["type"] == "subscribed"
    record(
        "connection flood",
        attempts=outcomes.total(),
        subscribed=outcomes["subscribed"],
        refused_429=outcomes["http 429"],
        burst=connect_rate.CONNECT_BURST,
        per_s=connect_rate.CONNECTS_PER_S,
        **figures,
    )


async def first_frame(url: str, headers: dict[str, str]) -> dict:
    async with connect(url, additional_headers=headers, open_timeout=ANSWER_WAIT_S) as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), ANSWER_WAIT_S))


def test_publish_flood_on_one_socket_gets_rate_limited_frames(live):
    topic = "flood.publish"
    url = f"ws://127.0.0.1:{live.port}/ws/{topic}/?token={live.tokens['oscar']}"
    replies: Counter[str] = Counter()
    close_code: list[int] = []

    async def flood(done: threading.Event) -> None:
        async with connect(url, open_timeout=ANSWER_WAIT_S, max_queue=None) as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
            for n in range(PUBLISH_FLOOD_FRAMES):
                frame = {"type": "publish", "event": "flood", "data": {"n": n}, "ref": str(n)}
                await ws.send(json.dumps(frame))
            try:
                while sum(replies.values()) < PUBLISH_FLOOD_FRAMES:
                    reply = json.loads(await asyncio.wait_for(ws.recv(), ANSWER_WAIT_S))
                    if reply["type"] in ("ack", "error"):  # one per publish frame
                        replies[reply.get("code") or reply["type"]] += 1
            except ConnectionClosed as closed:
                close_code.append(closed.rcvd.code if closed.rcvd else 1006)

    quiet, loud = measure_during(lambda: history_client(live), NORMAL_REQUESTS, run_async(flood))
    figures = normal_figures(quiet, loud)
    assert set(replies) <= {"ack", "rate_limited"}, replies
    assert replies["rate_limited"] > 0 or close_code, replies
    assert close_code in ([], [4429]), close_code  # 4429: the flooder did not read its answers
    history = httpx.get(
        f"{live.base}/api/v1/topics/{topic}/notifications?limit=1",
        headers={"Authorization": f"Bearer {live.api_key}"},
        timeout=ANSWER_WAIT_S,
    ).json()
    assert history["last_seq"] >= replies["ack"]  # every acknowledged publish is stored
    record(
        "publish flood on one socket",
        frames_sent=PUBLISH_FLOOD_FRAMES,
        acked=replies["ack"],
        rate_limited=replies["rate_limited"],
        closed_with=close_code[0] if close_code else "open",
        stored=history["last_seq"],
        **figures,
    )


def test_token_minting_flood_gets_429_with_retry_after(live):
    answers: Counter[int] = Counter()
    without_retry_after: list[int] = []

    async def flood(done: threading.Event) -> None:
        headers = {"Authorization": f"Bearer {live.api_key}"}
        sent = 0
        async with httpx.AsyncClient(base_url=live.base, timeout=ANSWER_WAIT_S) as client:

            async def mint() -> None:
                nonlocal sent
                while sent < TOKEN_FLOOD_REQUESTS and not done.is_set():
                    sent += 1
                    answer = await client.post(
                        "/api/v1/tokens", json={"user": "sam"}, headers=headers
                    )
                    answers[answer.status_code] += 1
                    if answer.status_code == 429 and "retry-after" not in answer.headers:
                        without_retry_after.append(answer.status_code)

            await asyncio.gather(*(mint() for _ in range(TOKEN_FLOOD_CONCURRENCY)))

    quiet, loud = measure_during(lambda: history_client(live), NORMAL_REQUESTS, run_async(flood))
    figures = normal_figures(quiet, loud)
    assert set(answers) <= {200, 429}, answers
    assert without_retry_after == []
    record(
        "token minting flood",
        requests=answers.total(),
        minted=answers[200],
        refused_429=answers[429],
        **figures,
    )


def test_token_minting_flood_with_forged_keys_gets_401(live):
    answers: Counter[int] = Counter()

    async def flood(done: threading.Event) -> None:
        sent = 0
        async with httpx.AsyncClient(base_url=live.base, timeout=ANSWER_WAIT_S) as client:

            async def mint() -> None:
                nonlocal sent
                while sent < TOKEN_FLOOD_REQUESTS and not done.is_set():
                    sent += 1
                    forged = {"Authorization": f"Bearer nk_forged{sent:04d}_" + "A" * 32}
                    answer = await client.post(
                        "/api/v1/tokens", json={"user": "sam"}, headers=forged
                    )
                    answers[answer.status_code] += 1

            await asyncio.gather(*(mint() for _ in range(TOKEN_FLOOD_CONCURRENCY)))

    quiet, loud = measure_during(lambda: history_client(live), NORMAL_REQUESTS, run_async(flood))
    figures = normal_figures(quiet, loud)
    assert set(answers) == {401}, answers
    record(
        "token minting flood, forged keys",
        requests=answers.total(),
        refused_401=answers[401],
        **figures,
    )


def slowloris(port: int, request_head: bytes, count: int) -> Counter[str]:
    """``count`` connections sending ``request_head`` and then one more header byte each
    TRICKLE_PACE_S, until each is answered or closed (at most ANSWER_WAIT_S): what each got."""
    outcomes: Counter[str] = Counter()
    pending: set[socket.socket] = set()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WAIT_S)
        sock.sendall(request_head)
        sock.setblocking(False)
        pending.add(sock)
    deadline = time.monotonic() + ANSWER_WAIT_S
    while pending and time.monotonic() < deadline:
        for sock in list(pending):
            try:
                received = sock.recv(4096)
            except BlockingIOError:
                with contextlib.suppress(BlockingIOError, OSError):
                    sock.send(b"X")
                continue
            except OSError:
                received = b""
            status = received.split(b" ", 2)[1].decode() if received.startswith(b"HTTP/") else ""
            outcomes[status or "closed"] += 1
            pending.discard(sock)
            sock.close()
        time.sleep(TRICKLE_PACE_S)  # the pace of the trickle, not a wait for an event
    outcomes["unanswered"] = len(pending)
    for sock in pending:
        sock.close()
    return outcomes


@pytest.mark.parametrize(
    "kind, head",
    [
        ("HTTP", b"GET /api/v1/csrf HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "),
        ("SSE", b"GET /events/alerts.k8s/?token=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "),
    ],
)
def test_slowloris_connections_get_408_while_a_normal_client_is_served(live, kind, head):
    if b"%s" in head:
        head = head % live.tokens["sam"].encode()
    outcomes: Counter[str] = Counter()

    def flood(done: threading.Event) -> None:
        outcomes.update(slowloris(live.port, head, SLOWLORIS_CONNECTIONS))

    quiet, loud = measure_during(lambda: history_client(live), NORMAL_REQUESTS, flood)
    figures = normal_figures(quiet, loud)
    assert outcomes == Counter({"408": SLOWLORIS_CONNECTIONS, "unanswered": 0}), outcomes
    record(
        f"slowloris on {kind}",
        connections=SLOWLORIS_CONNECTIONS,
        answered_408=outcomes["408"],
        head_deadline_s=HEAD_DEADLINE_S,
        **figures,
    )


async def test_connect_limit_answers_sse_and_websocket_past_the_burst_with_429():
    """In-process, with a burst of 2 and a refill too slow to matter: the third connection of an
    address is refused, SSE and WebSocket sharing the bucket; other addresses and other paths
    pass."""
    passed: list[str] = []

    async def app(scope, receive, send) -> None:
        passed.append(f"{scope['type']} {scope['path']} {scope['client'][0]}")

    limited = connect_rate.limit_connects(app, connect_rate.ConnectBuckets(0.001, 2))
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    def scope(kind: str, path: str, address: str) -> dict:
        extensions = {"websocket.http.response": {}} if kind == "websocket" else {}
        return {
            "type": kind,
            "path": path,
            "method": "GET",
            "client": (address, 5000),
            "extensions": extensions,
        }

    for kind, path in [("http", "/events/t/"), ("websocket", "/ws/t/"), ("http", "/events/t/")]:
        await limited(scope(kind, path, "203.0.113.8"), receive, send)
    await limited(scope("websocket", "/ws/t/", "203.0.113.8"), receive, send)
    await limited(scope("http", "/api/v1/csrf", "203.0.113.8"), receive, send)
    await limited(scope("websocket", "/ws/t/", "198.51.100.3"), receive, send)
    await limited(scope("websocket", "/ws/t/", "127.0.0.1"), receive, send)
    assert passed == [
        "http /events/t/ 203.0.113.8",
        "websocket /ws/t/ 203.0.113.8",
        "http /api/v1/csrf 203.0.113.8",
        "websocket /ws/t/ 198.51.100.3",
        "websocket /ws/t/ 127.0.0.1",
    ]
    starts = [m for m in sent if m["type"].endswith(".start")]
    assert [(m["type"], m["status"]) for m in starts] == [
        ("http.response.start", 429),
        ("websocket.http.response.start", 429),
    ]
    assert all(dict(m["headers"])[b"retry-after"] for m in starts)
