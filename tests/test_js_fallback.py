"""The JavaScript client's fallback to SSE and its offline state, in headless Chromium against a
live server (the machinery of tests/test_js_client.py: its page, driver and browser).

The page reaches the server through ``UpgradeGate``, a small proxy in this process that, while it
refuses, answers every WebSocket upgrade with 403 (as proxies that do not pass upgrades do) and
lets plain HTTP through: SSE and the publish endpoint keep working, WebSockets cannot open.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.servers import NotifyServer, free_port, run_script, seed, server_environment
from tests.test_js_client import (
    RECONNECT_TIMEOUT_MS,
    Browser,
    _PageFiles,
    tools,  # noqa: F401  (a fixture)
)

REFUSAL = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
HEAD_MAX_BYTES = 64 * 1024
# Users may publish on these topics (the fresh-install rules let only staff publish).
PUBLISH_RULE = """
from channels_app.models import TopicRule
TopicRule.objects.create(position=5, pattern="jsfallback.#", audience="authenticated",
    effect="allow", can_read=True, can_publish=True, description="the fallback tests publish")
"""


class UpgradeGate:
    """A TCP proxy to ``upstream_port``. While ``refusing``, a request asking for a WebSocket
    upgrade gets 403 and nothing reaches the server; ``drop_websockets()`` cuts the upgraded
    connections it passed, as a proxy that starts refusing would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refusing = False
        self.refused = 0
        self._upgraded: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < HEAD_MAX_BYTES:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            head += chunk
        upgrade = b"upgrade: websocket" in head.lower()
        if upgrade and self.refusing:
            with self._lock:
                self.refused += 1
            client.sendall(REFUSAL)
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        if upgrade:
            with self._lock:
                self._upgraded.append(client)
        upstream.sendall(head)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)

    def drop_websockets(self) -> None:
        with self._lock:
            upgraded, self._upgraded = self._upgraded, []
        for conn in upgraded:
            conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until either side ends, then close both."""
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass  # the other direction closed them
    finally:
        for conn in (source, sink):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


# --- one server, the gate, the page and the browser for the module -------------------------


@pytest.fixture(scope="module")
def server_env(tools, tmp_path_factory) -> Iterator[dict[str, str]]:  # noqa: F811
    with server_environment(tmp_path_factory.mktemp("jsfallback"), "jsfallback") as env:
        env["TEST_API_KEY"] = seed(env)["api_key"]
        run_script(env, PUBLISH_RULE)
        env["TEST_PAGE_PORT"] = str(free_port())
        env["NOTIFY_ALLOWED_ORIGINS"] = f"http://127.0.0.1:{env['TEST_PAGE_PORT']}"
        yield env


@pytest.fixture(scope="module")
def server(server_env, tmp_path_factory) -> Iterator[NotifyServer]:
    process = NotifyServer(server_env, tmp_path_factory.mktemp("jsfallback-logs") / "server.log")
    process.spawn()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def gate(server) -> Iterator[UpgradeGate]:
    proxy = UpgradeGate(server.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def browser(server, gate, server_env, tmp_path_factory) -> Iterator[Browser]:
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", int(server_env["TEST_PAGE_PORT"])), _PageFiles)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    log = tmp_path_factory.mktemp("jsfallback-browser") / "driver.log"
    page = f"http://127.0.0.1:{httpd.server_port}/index.html?api={gate.base}"
    b = Browser(page, server.base, server_env["TEST_API_KEY"], log)
    try:
        server.wait_ready()
        yield b
    finally:
        b.close()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def allowed(gate) -> Iterator[UpgradeGate]:
    """The gate lets upgrades through at the start and the end of a test."""
    gate.refusing = False
    yield gate
    gate.refusing = False


# --- tests ---------------------------------------------------------------------------------


def test_refused_upgrades_fall_back_to_sse_and_back_with_every_seq_once_in_order(
    browser, server, server_env, allowed
):
    """On a WebSocket, then (upgrades refused, the live socket cut) over SSE, resuming after the
    last seq, with a publish over HTTP, then (upgrades allowed) back on a WebSocket: the manager
    delivers every notification exactly once, in order, across both switches."""
    gate, key, topic = allowed, server_env["TEST_API_KEY"], "jsfallback.switch"
    log = "harness.managerLog('f-switch')"
    browser.eval(f"harness.startFallback('f-switch', '{topic}')")
    browser.wait_equal(f"{log}.subscribed", 1)
    assert browser.eval("harness.transport('f-switch')") == "websocket"
    seqs = [server.post(key, topic, "js.tick", {"n": n}) for n in (1, 2)]
    browser.wait_equal(f"{log}.seqs", seqs)

    gate.refusing = True
    gate.drop_websockets()
    seqs.append(server.post(key, topic, "js.tick", {"n": 3}))  # while the client has no socket
    browser.wait_equal(f"{log}.transports", ["sse"], RECONNECT_TIMEOUT_MS)
    assert gate.refused >= 2  # fallback.after in the page
    browser.wait_equal(f"{log}.seqs", seqs)
    seqs.append(server.post(key, topic, "js.tick", {"n": 4}))
    browser.wait_equal(f"{log}.seqs", seqs)

    browser.eval("harness.publish('f-switch', 'js.said', {n: 5})")
    browser.wait_equal(f"{log}.acks.length", 1)
    ack = browser.eval(f"{log}.acks[0]")
    assert (ack.get("type"), ack.get("seq")) == ("ack", 5), ack
    seqs.append(ack["seq"])
    browser.wait_equal(f"{log}.seqs", seqs)  # the published notification, over SSE, once
    assert browser.eval("harness.transport('f-switch')") == "sse"

    gate.refusing = False
    seqs.append(server.post(key, topic, "js.tick", {"n": 6}))  # during the switch back
    browser.wait_equal(f"{log}.transports", ["sse", "websocket"], RECONNECT_TIMEOUT_MS)
    seqs.append(server.post(key, topic, "js.tick", {"n": 7}))
    browser.wait_equal(f"{log}.seqs", seqs)
    assert seqs == [1, 2, 3, 4, 5, 6, 7]
    # The event stream was closed once the socket was live (EventSource.CLOSED == 2).
    browser.wait_equal("harness.readyStates('f-switch-sse')", [2])
    browser.eval("harness.stopManager('f-switch')")


def test_page_that_never_gets_a_websocket_lives_on_sse(browser, server, server_env, allowed):
    """Upgrades refused from the start: every notification arrives over SSE, in order, once,
    and the WebSocket is retried (and refused) meanwhile without disturbing the stream."""
    gate, key, topic = allowed, server_env["TEST_API_KEY"], "jsfallback.never"
    gate.refusing = True
    refused_before = gate.refused
    log = "harness.managerLog('f-never')"
    browser.eval(f"harness.startFallback('f-never', '{topic}')")
    browser.wait_equal(f"{log}.transports", ["sse"], RECONNECT_TIMEOUT_MS)
    browser.wait_equal(f"{log}.subscribed", 1)
    seqs = [server.post(key, topic, "js.tick", {"n": n}) for n in (1, 2, 3)]
    browser.wait_equal(f"{log}.seqs", seqs)
    # The WebSocket was tried again (two refused before the fallback, then the retries), and
    # the stream went on.
    browser.wait_equal("harness.readyStates('f-never-ws').length >= 3", True, RECONNECT_TIMEOUT_MS)
    assert gate.refused - refused_before >= 3
    seqs.append(server.post(key, topic, "js.tick", {"n": 4}))
    browser.wait_equal(f"{log}.seqs", seqs)
    assert browser.eval(f"{log}.transports") == ["sse"]
    browser.eval("harness.stopManager('f-never')")


def test_persisted_notifications_show_at_once_then_resume_without_gap_or_duplicate(
    browser, server, server_env, allowed
):
    """persist: true keeps the list across page loads: the reloaded page shows it before the
    server could answer (the token, and so every connection, is held back), marked cached; then
    it resumes after the stored seq, getting what was posted while the page was gone, once."""
    key, topic = server_env["TEST_API_KEY"], "jsfallback.persist"
    browser.eval(f"harness.mountPersisted('p-list', '{topic}')")
    browser.wait_equal("harness.connectedText('p-list')", "true")
    seqs = [server.post(key, topic, "js.tick", {"n": n}) for n in (1, 2)]
    browser.wait_equal("harness.seqs('p-list')", seqs)

    browser.leave()
    seqs += [server.post(key, topic, "js.tick", {"n": n}) for n in (3, 4)]  # page gone
    browser.come_back()

    browser.eval("harness.holdTokens()")
    first = browser.eval(f"harness.mountPersisted('p-list', '{topic}')")
    assert first == {"seqs": [1, 2], "cached": [True, True], "flag": True, "sockets": 0}
    browser.wait_equal("harness.cachedMarks('p-list')", [True, True])  # rendered, still held
    assert browser.eval("harness.cachedText('p-list')") == "true"
    assert browser.eval("harness.readyStates('p-list')") == []

    browser.eval("harness.releaseTokens()")
    browser.wait_equal("harness.seqs('p-list')", seqs)
    browser.wait_equal("harness.cachedText('p-list')", "false")
    seqs.append(server.post(key, topic, "js.tick", {"n": 5}))
    browser.wait_equal("harness.seqs('p-list')", seqs)
    assert seqs == [1, 2, 3, 4, 5]
    assert browser.eval("harness.cachedMarks('p-list')") == [True, True, False, False, False]
    browser.eval("harness.unmount('p-list')")
