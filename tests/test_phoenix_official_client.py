"""The OFFICIAL ``phoenix`` npm client (Socket, Channel, Presence) against live servers.

Real uvicorn processes (tests/servers.py) serve notify on a database of their own (Redis mode when
REDIS_URL is set, embedded otherwise); a second process on the same database stands in for
"another server" that takes posts while the first is down. tests/js/phoenix_client.mjs runs the
client in Node and reports what it sees, one JSON line per event; notifications are posted
through the ingest API. Protocol edge cases, in-process: test_phoenix_protocol.py.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import NotifyServer, seed, server_environment

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "js"
WAIT_S = 20  # upper bound for one awaited client event; passing runs take far less
# Presence entries of a killed process stop being listed after this (the default is 30 s).
PRESENCE_TTL_S = 4


@pytest.fixture(scope="module")
def tools() -> None:
    """`make test` installs them; in CI their absence is a failure, elsewhere a skip."""
    missing = []
    if not shutil.which("node"):
        missing.append("node")
    if not (JS_DIR / "node_modules" / "phoenix").is_dir():
        missing.append("tests/js/node_modules (npm ci --prefix tests/js)")
    if missing and os.environ.get("CI", "").lower() == "true":
        pytest.fail("the phoenix client tests need: " + ", ".join(missing))
    if missing:
        pytest.skip("run `make test` once to install: " + ", ".join(missing))


class Live:
    """The servers and what the setup made: an API key (ingest, tokens) and user ids."""

    def __init__(self, main: NotifyServer, other: NotifyServer, api_key: str, ids: dict[str, int]):
        self.main, self.other, self.api_key, self.ids = main, other, api_key, ids

    def post(
        self, topic: str, event: str = "step.done", server: NotifyServer | None = None, **data
    ):
        """POST through the ingest API; returns the seq the notification got."""
        return (server or self.main).post(self.api_key, topic, event, data)

    def token(self, username: str) -> str:
        response = httpx.post(
            f"{self.main.base}/api/v1/tokens",
            json={"user": username},
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=10,
        )
        assert response.status_code in (200, 201), response.text
        return response.json()["token"]


@pytest.fixture(scope="module")
def live(tools, tmp_path_factory) -> Iterator[Live]:
    directory = tmp_path_factory.mktemp("phoenix")
    with server_environment(directory, "phoenix", PRESENCE_TTL_S=str(PRESENCE_TTL_S)) as env:
        setup = seed(env)
        main = NotifyServer(env, directory / "main.log")
        other = NotifyServer(env, directory / "other.log")
        try:
            main.spawn()  # both start at once: a cold start takes seconds
            other.spawn()
            main.wait_ready()
            other.wait_ready()
            yield Live(main, other, setup["api_key"], setup["ids"])
        finally:
            main.stop()
            other.stop()


class Driver:
    """tests/js/phoenix_client.mjs: commands in, the client's events out (one JSON per line)."""

    def __init__(self, log: Path) -> None:
        self._stderr = log.open("w")
        self.proc = subprocess.Popen(
            ["node", str(JS_DIR / "phoenix_client.mjs")],
            cwd=JS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[dict | None] = queue.Queue()
        self.seen: list[dict] = []  # every event, in arrival order
        self._unread: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.wait(type="ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def send(self, **command) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def wait(self, predicate=None, **match) -> dict:
        """The first event not returned before that has every ``match`` item (and satisfies
        ``predicate``); fails after WAIT_S with what the client did see."""

        def fits(event: dict) -> bool:
            if any(event.get(k) != v for k, v in match.items()):
                return False
            return predicate is None or predicate(event)

        for index, event in enumerate(self._unread):
            if fits(event):
                return self._unread.pop(index)
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if event is None:
                break
            self.seen.append(event)
            if event.get("type") == "driver_error":
                raise AssertionError(f"driver: {event}")
            if fits(event):
                return event
            self._unread.append(event)
        raise AssertionError(f"no event {match} within {WAIT_S} s; saw: {self.seen[-15:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._stderr.close()


@pytest.fixture
def client(live, tmp_path) -> Iterator[Driver]:
    driver = Driver(tmp_path / "node.log")
    try:
        yield driver
    finally:
        driver.close()


def connect(
    driver: Driver,
    live: Live,
    name: str,
    user: str,
    auth_token: bool = False,
    server: NotifyServer | None = None,
) -> None:
    """Connect client ``name`` as ``user``: token as a socket param (sent in the query string) or
    as the authToken option (sent as the Sec-WebSocket-Protocol bearer)."""
    token = live.token(user)
    options = {"authToken": token} if auth_token else {"params": {"token": token}}
    url = (server or live.main).socket_url
    driver.send(cmd="connect", client=name, url=url, **options)
    driver.wait(client=name, type="open")


def keys_of(sync: dict) -> set[str]:
    return {entry["key"] for entry in sync["presences"]}


# --- the tests ----------------------------------------------------------------------------------


def test_join_of_allowed_topic_receives_current_state(live, client):
    topic = "reverse_flow:e2e-state"
    live.post(topic, step="plan")
    live.post(topic, step="apply")
    connect(client, live, "sam", "sam")

    client.send(cmd="join", client="sam", topic=topic)
    assert client.wait(client="sam", type="join_ok")["response"] == {}
    state = client.wait(client="sam", type="message", event="current_state")["payload"]
    assert state["topic"] == topic and state["last_seq"] == 2
    assert [n["data"]["step"] for n in state["notifications"]] == ["plan", "apply"]


def test_join_of_forbidden_topic_is_refused_with_reason(live, client):
    connect(client, live, "sam", "sam")
    client.send(cmd="join", client="sam", topic="system.audit")
    refused = client.wait(client="sam", type="join_error")
    assert "system.audit" in refused["response"]["reason"]
    client.send(cmd="leave", client="sam", topic="system.audit")  # stops the client's rejoins


def test_notification_posted_through_ingest_api_arrives_as_notification(live, client):
    topic = "alerts.e2e-live"
    connect(client, live, "sam", "sam")
    client.send(cmd="join", client="sam", topic=topic)
    client.wait(client="sam", type="join_ok")

    seq = live.post(topic, "pod.crash", pod="api-7")
    notification = client.wait(client="sam", type="message", event="notification")["payload"]
    assert (notification["topic"], notification["seq"]) == (topic, seq)
    assert notification["event"] == "pod.crash" and notification["data"] == {"pod": "api-7"}


def test_request_update_is_answered_and_every_joined_client_gets_reverse_flow_update(live, client):
    topic = "reverse_flow:e2e-update"
    live.post(topic, step="plan")
    connect(client, live, "sam", "sam")
    connect(client, live, "oscar", "oscar", auth_token=True)
    for name in ("sam", "oscar"):
        client.send(cmd="join", client=name, topic=topic)
        client.wait(client=name, type="join_ok")

    client.send(cmd="push", client="sam", topic=topic, event="request_update", tag="ask")
    reply = client.wait(client="sam", type="reply", tag="ask")
    assert reply["status"] == "ok"
    assert reply["response"]["last_seq"] == 1
    for name in ("sam", "oscar"):
        update = client.wait(client=name, type="message", event="reverse_flow_update")
        assert update["payload"] == reply["response"]


def test_two_clients_see_each_other_through_presence_on_sync(live, client):
    topic = "room.e2e-presence"
    connect(client, live, "sam", "sam")
    connect(client, live, "oscar", "oscar")
    both = {str(live.ids["sam"]), str(live.ids["oscar"])}
    for name in ("sam", "oscar"):
        client.send(cmd="join", client=name, topic=topic)
    for name in ("sam", "oscar"):
        sync = client.wait(lambda e: keys_of(e) == both, client=name, type="sync")
        usernames = {u for entry in sync["presences"] for u in entry["usernames"]}
        assert usernames == {"sam", "oscar"}

    client.send(cmd="disconnect", client="oscar")
    alone = client.wait(lambda e: keys_of(e) == {str(live.ids["sam"])}, client="sam", type="sync")
    assert alone["topic"] == topic


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="processes share presence via Redis")
def test_clients_on_two_server_processes_see_each_other_and_get_broadcasts(live, client):
    topic = "reverse_flow:e2e-two-processes"
    connect(client, live, "sam", "sam")
    connect(client, live, "oscar", "oscar", server=live.other)
    both = {str(live.ids["sam"]), str(live.ids["oscar"])}
    for name in ("sam", "oscar"):
        client.send(cmd="join", client=name, topic=topic)
    for name in ("sam", "oscar"):
        client.wait(lambda e: keys_of(e) == both, client=name, type="sync")

    client.send(cmd="push", client="oscar", topic=topic, event="request_update", tag="ask")
    assert client.wait(client="oscar", type="reply", tag="ask")["status"] == "ok"
    client.wait(client="sam", type="message", event="reverse_flow_update")
    seq = live.post(topic, step="plan")  # posted to main, delivered on both
    for name in ("sam", "oscar"):
        notification = client.wait(client=name, type="message", event="notification")
        assert notification["payload"]["seq"] == seq


def test_client_rejoins_after_server_restart_and_recovers_missed_notifications(live, client):
    topic = "deploy.e2e-restart"
    connect(client, live, "sam", "sam")
    client.send(cmd="join", client="sam", topic=topic, resume=True)
    client.wait(client="sam", type="join_ok")
    sam = str(live.ids["sam"])
    client.wait(lambda e: keys_of(e) == {sam}, client="sam", type="sync")
    first = live.post(topic, step="build")
    client.wait(client="sam", type="message", event="notification")

    live.main.kill()
    client.wait(client="sam", type="close")
    missed = [live.post(topic, server=live.other, step=s) for s in ("test", "ship")]
    live.main.start()

    client.wait(client="sam", type="join_ok")  # the client rejoined by itself, with since
    after = live.post(topic, step="done")
    received = [
        client.wait(client="sam", type="message", event="notification")["payload"]["seq"]
        for _ in range(3)
    ]
    assert [first, *received] == [first, *missed, after] == [1, 2, 3, 4]
    # The killed process never untracked: its entry stops being listed after PRESENCE_TTL_S and
    # its leave reaches the client, which ends with exactly its new presence.
    synced = client.wait(
        lambda e: [len(x["usernames"]) for x in e["presences"]] == [1], client="sam", type="sync"
    )
    assert keys_of(synced) == {sam}
