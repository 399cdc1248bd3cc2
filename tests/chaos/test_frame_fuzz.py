"""Property-based frames against the plain and the Phoenix socket (hypothesis).

Random JSON, wrong types, huge and non-finite numbers, deep nesting, lone surrogates, unknown
types and events, binary frames and frames around the 64 KB limit, each sent to a live socket of
the real ASGI application (``WebsocketCommunicator``), followed by a barrier frame whose answer
marks the end of what the server said about it. Every case must get an answer (an error frame,
a reply or the frame's ordinary answer) or a documented close code, every answer must be valid
UTF-8 JSON of the protocol's shape, no handler may crash or log a traceback, and a neighbour
socket on the same topic keeps receiving published notifications throughout.

Bounded and deterministic: hypothesis draws a fixed number of cases per protocol with
``derandomize=True`` (the same cases every run); they are then played in order. The rate limit
is tested on its own (test_ws_plain.py, test_phoenix_protocol.py): here the bucket's clock moves a
second per frame, so every case is handled rather than refused for speed.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import logging

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from channels_app import socket_auth, tokens
from channels_app.close_codes import CloseCode
from channels_app.frame_limits import FrameBudget
from channels_app.frames import ErrorCode
from channels_app.hub import hub
from channels_app.presence import get_presence
from routing_app.ingest import NotificationIn, ingest
from tests.chaos.report import record

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

CASES_PER_PROTOCOL = 300
WAIT_S = 10  # upper bound for one awaited frame; passing runs take milliseconds
TOPIC = "alerts.k8s"
NEIGHBOUR_CHECK_EVERY = 100  # cases between two notifications the neighbour must receive
LIMIT = 65536  # settings.MAX_MESSAGE_BYTES
# The only codes a fuzzed frame may close a socket with (docs/realtime-contract.md).
ALLOWED_CLOSE_CODES = {CloseCode.TOO_BIG}
PLAIN_TYPES = {"subscribed", "notification", "reset", "ping", "pong", "ack", "presence", "event"}


# --- what is sent ------------------------------------------------------------------------------

surrogates = st.sampled_from(["\ud800", "\udc00", "x\udfff", "\udbff\udbff"])
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | surrogates
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def dumps(value, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)  # NaN and Infinity as Python writes them


def nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "[" else '{"a":' * depth + "1" + "}" * depth


def sized(size: int, char: str, frame: str) -> str:
    """``frame`` (ending in ``"pad": ""}`` or ``{}]``-style) padded to about ``size`` bytes."""
    pad = char * max(0, (size - len(frame.encode())) // len(char.encode()))
    return frame.replace('"pad":""', f'"pad":"{pad}"')


raw_texts = st.one_of(
    st.text(max_size=60),
    st.builds(nested, st.integers(1, 20_000), st.sampled_from(["[", "{"])),
    st.integers(300, 6000).map(lambda n: "9" * n),
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "[1e400]", '"\\ud800"', "\ufeff{}"]),
)
binaries = st.binary(max_size=64) | st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1]).map(bytes)
sizes = st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, LIMIT + 4])
pad_chars = st.sampled_from(["x", "\u00e9", "\u20ac", "\U0001f600"])


def frames_of(objects, edge_frame: str):
    """Cases: ("text", str) or ("bytes", bytes)."""
    as_text = st.builds(dumps, objects, st.booleans())
    edges = st.builds(sized, sizes, pad_chars, st.just(edge_frame))
    return st.one_of(
        as_text.map(lambda t: ("text", t)),
        raw_texts.map(lambda t: ("text", t)),
        edges.map(lambda t: ("text", t)),
        binaries.map(lambda b: ("bytes", b)),
        st.builds(dumps, values, st.booleans()).map(lambda t: ("text", t)),
    )


plain_frames = frames_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["ping", "pong", "publish", "resume", "presence", "x"]) | values},
        optional={"ref": values, "since": values, "event": values, "data": values},
    ),
    '{"type":"ping","pad":""}',
)
topics = st.sampled_from([TOPIC, "phoenix", "reverse_flow:a", "user:1", "Bad Topic", "", "a\n"])
events = st.sampled_from(["phx_join", "phx_leave", "heartbeat", "request_update", "x"])
phoenix_frames = frames_of(
    st.tuples(
        st.none() | st.text(max_size=5) | values,
        st.none() | st.text(max_size=5) | values,
        topics | st.text(max_size=12) | values,
        events | values,
        st.fixed_dictionaries({}, optional={"since": values}) | values,
    ).map(list)
    | st.lists(values, max_size=7),
    '["1","2","alerts.k8s","heartbeat",{"pad":""}]',
)


def draw_cases(strategy) -> list:
    """A fixed, reproducible list of cases drawn by hypothesis (generation only: the cases are
    played afterwards against one live socket, which shrinking could not replay)."""
    cases: list = []

    @settings(
        max_examples=CASES_PER_PROTOCOL,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(strategy)
    def collect(case):
        cases.append(case)

    collect()
    return cases


# --- fixtures and the socket side ----------------------------------------------------------------


@pytest.fixture
async def rules(_db_pool_closed_at_end, monkeypatch):
    from django.apps import apps

    migration = importlib.import_module("channels_app.migrations.0002_default_topic_rules")
    await sync_to_async(migration.create_defaults)(apps, None)
    socket_auth.forget_principals()
    ticks = itertools.count()
    monkeypatch.setattr(FrameBudget, "clock", staticmethod(lambda: float(next(ticks))))
    yield
    await hub.aclose()
    await get_presence().close()
    socket_auth.forget_principals()


def application():
    from notify_project.asgi import application as app

    return app


async def open_socket(path: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application(), path)
    connected, code = await comm.connect(timeout=WAIT_S)
    assert connected, f"{path} refused with {code}"
    return comm


async def publish() -> int:
    [result] = await sync_to_async(ingest)([NotificationIn(topic=TOPIC, event="fuzz", data={})])
    return result.seq


class Tally:
    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.failures: list[str] = []
        self.closes: dict[int, int] = {}
        self.answers = 0

    def fail(self, case, why: str) -> None:
        self.failures.append(f"{why}: {str(case)[:160]!r}")


async def play(comm, case, barrier: str, barrier_done, check_answer, tally: Tally):
    """Send one case, then the barrier; judge everything until the barrier's answer. Returns
    the socket, or None when the server closed it (with a code that is then checked)."""
    kind, body = case
    # send_input, not send_to: an empty frame is a frame too
    await comm.send_input({"type": "websocket.receive", kind: body})
    await comm.send_to(text_data=barrier)
    answered = False
    while True:
        output = await comm.receive_output(timeout=WAIT_S)  # re-raises a crashed app's error
        if output["type"] == "websocket.close":
            code = output.get("code", 1000)
            tally.closes[int(code)] = tally.closes.get(int(code), 0) + 1
            if code not in ALLOWED_CLOSE_CODES:
                tally.fail(case, f"closed with undocumented code {code}")
            return None
        text = output.get("text")
        try:
            text.encode()
            answer = json.loads(text)
        except (AttributeError, UnicodeEncodeError, ValueError):
            tally.fail(case, f"answer is not UTF-8 JSON text: {output!r:.120}")
            continue
        if barrier_done(answer):
            if not answered and not (tally.protocol == "plain" and is_pong(case)):
                tally.fail(case, "no answer")
            return comm
        answered = True
        tally.answers += 1
        problem = check_answer(answer)
        if problem:
            tally.fail(case, problem)


def plain_answer_problem(answer) -> str | None:
    if not isinstance(answer, dict) or not isinstance(answer.get("type"), str):
        return f"not a plain frame: {answer!r:.120}"
    if answer["type"] == "error":
        if answer.get("code") not in set(ErrorCode):
            return f"unknown error code {answer.get('code')!r}"
        return None
    if answer["type"] not in PLAIN_TYPES:
        return f"unknown frame type {answer['type']!r}"
    return None


def phoenix_answer_problem(answer) -> str | None:
    if not (isinstance(answer, list) and len(answer) == 5 and isinstance(answer[3], str)):
        return f"not a Phoenix frame: {answer!r:.120}"
    if answer[3] == "phx_reply" and answer[4].get("status") not in ("ok", "error"):
        return f"reply without a status: {answer!r:.120}"
    return None


def is_pong(case) -> bool:
    """A ``pong`` is the one frame the plain protocol leaves unanswered."""
    kind, body = case
    if kind != "text":
        return False
    try:
        frame = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(frame, dict) and frame.get("type") == "pong" and len(body) <= LIMIT // 4


async def neighbour_receives(neighbour, seq: int, is_notification) -> bool:
    while True:
        output = await neighbour.receive_output(timeout=WAIT_S)
        if output["type"] != "websocket.send":
            return False
        if is_notification(json.loads(output["text"]), seq):
            return True


async def run_protocol(
    name, path, cases, barrier_of, barrier_done_of, check, neighbour_seq, caplog
):
    """Play ``cases`` on one socket (reopened after each documented close) while a neighbour on
    the same topic must keep receiving; returns the tally and what the neighbour received."""
    tally = Tally(name)
    neighbour = await neighbour_open(path, name)
    comm = await open_socket(path)
    received = expected = 0
    for index, case in enumerate(cases):
        barrier = barrier_of(index)
        sock = await play(comm, case, barrier, barrier_done_of(index), check, tally)
        if sock is None:
            await comm.disconnect()
            comm = await open_socket(path)
        if (index + 1) % NEIGHBOUR_CHECK_EVERY == 0:
            expected += 1
            seq = await publish()
            received += await neighbour_receives(neighbour, seq, neighbour_seq)
    await comm.disconnect()
    await neighbour.disconnect()
    crashes = [
        r
        for r in caplog.records
        if r.exc_info or r.levelno >= logging.ERROR or r.name == "channels_app.sender"
    ]
    for crash in crashes:
        tally.failures.append(f"logged: {crash.getMessage()[:160]}")
    return tally, expected, received


async def neighbour_open(path: str, name: str):
    neighbour = await open_socket(path)
    if name == "plain":
        while (await neighbour.receive_json_from(timeout=WAIT_S))["type"] != "subscribed":
            pass
    else:
        ref = "n1"
        await neighbour.send_to(text_data=json.dumps([ref, ref, TOPIC, "phx_join", {}]))
        while True:
            frame = await neighbour.receive_json_from(timeout=WAIT_S)
            if frame[3] == "presence_state":
                break
    return neighbour


def size_of(body) -> int:
    return len(body) if isinstance(body, bytes) else len(body.encode("utf-8", "surrogatepass"))


def deeper_than_64(text: str) -> bool:
    depth = deepest = 0
    for char in text[:200]:
        depth += (char in "[{") - (char in "]}")
        deepest = max(deepest, depth)
    return deepest > 64


def lone_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    try:
        json.dumps(json.loads(text), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        pass
    return False


def report(name: str, cases, tally: Tally, expected: int, received: int) -> None:
    record(
        f"frame fuzz, {name} socket",
        cases_tried=len(cases),
        binary_cases=sum(1 for kind, _ in cases if kind == "bytes"),
        over_64_kb=sum(1 for _, body in cases if size_of(body) > LIMIT),
        nested_past_64=sum(1 for kind, body in cases if kind == "text" and deeper_than_64(body)),
        with_lone_surrogates=sum(
            1 for kind, body in cases if kind == "text" and lone_surrogate(body)
        ),
        answers=tally.answers,
        closes=dict(sorted(tally.closes.items())) or 0,
        failures=len(tally.failures),
        neighbour_published=expected,
        neighbour_received=received,
    )
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert received == expected


# --- the two protocols ---------------------------------------------------------------------------


async def test_fuzzed_plain_frames_get_an_error_or_a_documented_close(rules, operator, caplog):
    caplog.set_level(logging.WARNING)
    cases = draw_cases(plain_frames)
    # staff: a publish that passes the frame checks goes on to ingest's validation
    path = f"/ws/{TOPIC}/?token={tokens.mint(operator.pk).token}"
    tally, expected, received = await run_protocol(
        "plain",
        path,
        cases,
        lambda i: json.dumps({"type": f"barrier-{i}", "ref": f"b{i}"}),
        lambda i: lambda answer: isinstance(answer, dict) and answer.get("ref") == f"b{i}",
        plain_answer_problem,
        lambda frame, seq: frame.get("type") == "notification" and frame.get("seq") == seq,
        caplog,
    )
    report("plain", cases, tally, expected, received)


async def test_fuzzed_phoenix_frames_get_an_error_or_a_documented_close(rules, subscriber, caplog):
    caplog.set_level(logging.WARNING)
    cases = draw_cases(phoenix_frames)
    path = f"/socket/websocket?vsn=2.0.0&token={tokens.mint(subscriber.pk).token}"
    tally, expected, received = await run_protocol(
        "phoenix",
        path,
        cases,
        lambda i: json.dumps([None, f"b{i}", "phoenix", "heartbeat", {}]),
        lambda i: lambda answer: isinstance(answer, list) and answer[1:2] == [f"b{i}"],
        phoenix_answer_problem,
        lambda frame, seq: frame[3] == "notification" and frame[4].get("seq") == seq,
        caplog,
    )
    report("phoenix", cases, tally, expected, received)


# --- over the wire: a real uvicorn process --------------------------------------------------------

WIRE_CASES = 30  # of the drawn cases per protocol, on top of the fixed ones; with their barriers
# they stay under one socket's burst of frames (frame_limits), so none is refused for its rate
WIRE_FIXED = [
    ("text", '{"type": "bogus", "ref": "\\ud800"}'),
    ("text", '[null, "\\udc00", "phoenix", "heartbeat", {}]'),
    ("text", "[" * 10_000 + "]" * 10_000),
    ("text", '{"type": "ping", "x": 1e999}'),
    ("utf8", b'{"type": "ping", "x": "\xed\xa0\x80"}'),  # a surrogate as bytes: not UTF-8
    ("bytes", b""),
    ("bytes", bytes(LIMIT)),
    ("bytes", bytes(LIMIT + 1)),
    ("text", sized(LIMIT, "x", '{"type":"ping","pad":""}')),
    ("text", sized(LIMIT + 1, "x", '{"type":"ping","pad":""}')),
]
# uvicorn (websockets) closes a text frame that is not UTF-8 with 1007 before the app sees it
WIRE_CLOSE_CODES = ALLOWED_CLOSE_CODES | {1007}


@pytest.fixture(scope="module")
def live(shared_server):
    return shared_server


async def wire_play(ws, case, barrier: str, barrier_done, tally: Tally) -> bool:
    """``play`` over a real socket; False when the server closed it."""
    from websockets.exceptions import ConnectionClosed

    kind, body = case
    try:
        if kind == "text":
            try:
                body.encode()
            except UnicodeEncodeError:  # raw surrogates cannot cross the wire as text
                body = body.encode("utf-8", "surrogatepass")
                kind = "utf8"
        await ws.send(body, text=kind != "bytes")
        await ws.send(barrier)
        answered = False
        while True:
            answer = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            if barrier_done(answer):
                if not answered and not (tally.protocol == "plain" and is_pong(case)):
                    tally.fail(case, "no answer")
                return True
            answered = True
            tally.answers += 1
    except ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd else 1006
        tally.closes[code] = tally.closes.get(code, 0) + 1
        if code not in WIRE_CLOSE_CODES:
            tally.fail(case, f"closed with undocumented code {code}")
        return False


@pytest.mark.parametrize("protocol", ["plain", "phoenix"])
async def test_fuzzed_frames_over_the_wire_leave_the_server_and_neighbours_unharmed(protocol, live):
    from websockets.asyncio.client import connect

    server, seeded = live
    token = seeded["tokens"]["sam"]
    if protocol == "plain":
        url = f"ws://127.0.0.1:{server.port}/ws/{TOPIC}/?token={token}"
        drawn = draw_cases(plain_frames)[:WIRE_CASES]
        barrier_of = lambda i: json.dumps({"type": f"barrier-{i}", "ref": f"b{i}"})  # noqa: E731
        done_of = lambda i: lambda a: isinstance(a, dict) and a.get("ref") == f"b{i}"  # noqa: E731
    else:
        url = f"ws://127.0.0.1:{server.port}/socket/websocket?vsn=2.0.0&token={token}"
        drawn = draw_cases(phoenix_frames)[:WIRE_CASES]
        barrier_of = lambda i: json.dumps([None, f"b{i}", "phoenix", "heartbeat", {}])  # noqa: E731
        done_of = lambda i: lambda a: isinstance(a, list) and a[1:2] == [f"b{i}"]  # noqa: E731
    cases = WIRE_FIXED + drawn
    tally = Tally(protocol)
    async with connect(f"ws://127.0.0.1:{server.port}/ws/{TOPIC}/?token={token}") as neighbour:
        while json.loads(await asyncio.wait_for(neighbour.recv(), WAIT_S))["type"] != "subscribed":
            pass
        ws = await connect(url, max_size=None)
        for index, case in enumerate(cases):
            if not await wire_play(ws, case, barrier_of(index), done_of(index), tally):
                ws = await connect(url, max_size=None)
        await ws.close()
        seq = await asyncio.to_thread(server.post, seeded["api_key"], TOPIC, "fuzz", {})
        while True:
            frame = json.loads(await asyncio.wait_for(neighbour.recv(), WAIT_S))
            if frame["type"] == "notification" and frame["seq"] == seq:
                break
    log = server.log.read_text(errors="replace")
    for line in ("Traceback", "could not be sent", "Exception in ASGI application"):
        if line in log:
            tally.failures.append(f"server log has {line!r}")
    record(
        f"frame fuzz over the wire, {protocol} socket",
        cases_tried=len(cases),
        answers=tally.answers,
        closes=dict(sorted(tally.closes.items())) or 0,
        failures=len(tally.failures),
        neighbour_published=1,
        neighbour_received=1,
    )
    assert not tally.failures, "\n".join(tally.failures[:20])
