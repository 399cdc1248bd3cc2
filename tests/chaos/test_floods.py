"""Oversized and half-sent requests, and floods, against a real server run with ``manage.py
serve``'s uvicorn command line: each gets a clear answer (414/431/408/429/4429 or a close) within
a bounded time, and a normal client's requests keep being served meanwhile (its p50/p99 with and
without the flood, recorded as figures; notify_project/uvicorn_protocols.py has the limits).
"""

from __future__ import annotations

import concurrent.futures
import socket
import time

import pytest

from notify_project import uvicorn_protocols as limits
from tests.chaos.abuse_support import (
    ANSWER_WAIT_S,
    get_request,
    live_server,
    raw_exchange,
    upgrade_request,
)
from tests.chaos.report import record

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("floods"), "floods") as running:
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
        "head without its end": (b"GET /api/v1/csrf HTTP/1.1\r\nHost: x\r\n", None, 408),
        "head trickled byte by byte": (b"GET / HTTP/1.1\r\nX-Slow: ", _trickle_head, 408),
        "body shorter than its length": (
            b"POST /api/v1/notifications HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1000\r\n\r\n{",
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
        head_deadline_s=limits.REQUEST_HEAD_TIMEOUT_S,
        body_deadline_s=limits.REQUEST_BODY_TIMEOUT_S,
        slowest_answer_s=round(max(a.elapsed_s for a in answers.values()), 2),
    )
