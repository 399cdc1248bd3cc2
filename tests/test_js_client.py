"""The JavaScript client (static/notify/) in headless Chromium against a live server.

A real uvicorn process (tests/servers.py) serves notify (Redis mode when REDIS_URL is set), a
second one on the same database stands in for "another server" that keeps accepting posts while
the first is down. A tiny static server in this process serves the test page (tests/js/page/),
static/notify/ and vue's browser build, from another origin than the API, as a Nuxt app would be.
tests/js/browser_driver.js drives Chromium with playwright-core; what we assert is what the page
renders.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.servers import (
    STARTUP_TIMEOUT_S,
    NotifyServer,
    free_port,
    seed,
    server_environment,
    trim_retention,
)

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "js"
CHROMIUM = Path("/usr/bin/chromium")
WAIT_TIMEOUT_MS = 20_000  # upper bound for one awaited page condition; passing runs take far less
RECONNECT_TIMEOUT_MS = 30_000  # includes the client's backoff (capped at 1 s in the page)
NODE_TEST_FILES = (
    "socket.test.js",
    "composables.test.js",
    "sse.test.js",
    "reconnect.test.js",
    "fallback.test.js",
)


def _missing_tools() -> list[str]:
    missing = []
    if not shutil.which("node"):
        missing.append("node")
    if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
        missing.append("tests/js/node_modules (npm ci --prefix tests/js)")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    return missing


@pytest.fixture(scope="module")
def tools() -> None:
    """`make test` installs them; in CI their absence is a failure, elsewhere a skip."""
    missing = _missing_tools()
    if missing and os.environ.get("CI", "").lower() == "true":
        pytest.fail("the JS client tests need: " + ", ".join(missing))
    if missing:
        pytest.skip("run `make test` once to install: " + ", ".join(missing))


# --- a database and the server processes ---------------------------------------------------


@pytest.fixture(scope="module")
def server_env(tools, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Environment of the server processes: a database of their own, migrated, with user "sam"
    and an API key (scopes ingest, tokens) in env["TEST_API_KEY"]."""
    with server_environment(tmp_path_factory.mktemp("jsclient"), "jsclient") as env:
        env["TEST_API_KEY"] = seed(env)["api_key"]
        yield env


@pytest.fixture(scope="module")
def servers(server_env, tmp_path_factory) -> Iterator[tuple[NotifyServer, NotifyServer]]:
    """(main, other): the page talks to `main`; `other` shares its database (and Redis)."""
    log_dir = tmp_path_factory.mktemp("jsclient-logs")
    main = NotifyServer(server_env, log_dir / "main.log")
    other = NotifyServer(server_env, log_dir / "other.log")
    try:
        # The page's origin must be allowed (CORS for SSE and tokens, Origin check for sockets).
        page_port = free_port()
        server_env["NOTIFY_ALLOWED_ORIGINS"] = f"http://127.0.0.1:{page_port}"
        server_env["TEST_PAGE_PORT"] = str(page_port)
        main.spawn()  # both start at once; the browser fixture waits for them
        other.spawn()
        yield main, other
    finally:
        main.kill()
        other.kill()


# --- the page and the browser --------------------------------------------------------------


class _PageFiles(SimpleHTTPRequestHandler):
    """/ -> tests/js/page/, /static/notify/ -> static/notify/, /vendor/ -> vue's dist/."""

    ROUTES = {
        "/static/notify/": ROOT / "static" / "notify",
        "/vendor/": JS_DIR / "node_modules" / "vue" / "dist",
        "/": JS_DIR / "page",
    }

    def translate_path(self, path: str) -> str:
        path = urlparse(path).path
        for prefix, directory in self.ROUTES.items():
            if path.startswith(prefix):
                relative = Path(path[len(prefix) :])
                if ".." in relative.parts:
                    return str(directory / "__forbidden__")
                return str(directory / relative)
        return str(JS_DIR / "page" / "__missing__")

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def page_server(servers, server_env) -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", int(server_env["TEST_PAGE_PORT"])), _PageFiles)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Browser:
    """The page, driven through tests/js/browser_driver.js (one JSON line per call); ``driver``
    names another script of tests/js speaking the same protocol (dashboard_driver.js)."""

    def __init__(
        self, page_url: str, api: str, api_key: str, log: Path, driver: str = "browser_driver.js"
    ) -> None:
        self.log = log
        self._err = log.open("w")
        self.proc = subprocess.Popen(
            ["node", str(JS_DIR / driver), *([page_url] if page_url else [])],
            cwd=JS_DIR,
            env={**os.environ, "NOTIFY_API": api, "NOTIFY_API_KEY": api_key},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next_id = 0
        first = self._line(STARTUP_TIMEOUT_S)
        assert json.loads(first) == {"ready": True}, first

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _line(self, timeout_s: float) -> str:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"browser driver silent; its log:\n{self.logs()}") from None
        if line is None:
            raise AssertionError(f"browser driver exited; its log:\n{self.logs()}")
        return line

    def logs(self) -> str:
        self._err.flush()
        return self.log.read_text()[-4000:]

    def _call(self, op: str, expr: str, timeout_ms: int = WAIT_TIMEOUT_MS, **fields):
        self._next_id += 1
        call = {"id": self._next_id, "op": op, "expr": expr, "timeoutMs": timeout_ms, **fields}
        self.proc.stdin.write(json.dumps(call) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._line(timeout_ms / 1000 + 10))
        assert reply["id"] == self._next_id
        if not reply["ok"]:
            raise AssertionError(f"{op} {expr!r}: {reply['error']}\npage log:\n{self.logs()}")
        return reply["value"]

    def eval(self, expr: str):
        return self._call("eval", expr)

    def wait_equal(self, expr: str, expected, timeout_ms: int = WAIT_TIMEOUT_MS) -> None:
        """Wait until the page expression's JSON equals `expected`; on timeout show both."""
        want = json.dumps(expected, separators=(",", ":"))
        try:
            self._call("wait", f"JSON.stringify({expr}) === {json.dumps(want)}", timeout_ms)
        except AssertionError as exc:
            raise AssertionError(
                f"{expr} never became {want}; it is {json.dumps(self.eval(expr))}\n{exc}"
            ) from None

    def leave(self) -> None:
        """Navigate away (to about:blank): the page, its sockets and streams are gone."""
        self._call("leave", "")

    def come_back(self) -> None:
        """Load the test page again (its origin's localStorage kept)."""
        self._call("return", "")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


@pytest.fixture(scope="module")
def browser(page_server, servers, server_env, tmp_path_factory) -> Iterator[Browser]:
    main, _ = servers
    log = tmp_path_factory.mktemp("jsclient-browser") / "driver.log"
    page = f"{page_server}/index.html?api={main.base}"
    b = Browser(page, main.base, server_env["TEST_API_KEY"], log)
    try:
        for server in servers:
            server.wait_ready()
        yield b
    finally:
        b.close()


# --- tests ---------------------------------------------------------------------------------


def test_client_unit_tests_pass_in_node(tools):
    """Backoff bounds, queue flush order and overflow, resume/dedupe, close codes, heartbeats,
    the SSE fallback and the offline state;
    the composables open nothing during server-side rendering and close with their scope."""
    done = subprocess.run(
        ["node", "--test", *(str(JS_DIR / name) for name in NODE_TEST_FILES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout


def test_notification_reaches_manager_and_composable(browser, servers, server_env):
    main, _ = servers
    topic = "jsclient.live"
    browser.eval(f"harness.startManager('m-live', '{topic}')")
    browser.eval(f"harness.mountTopic('c-live', '{topic}')")
    # Live-only subscriptions: post only once the server says the subscription is live.
    browser.wait_equal("harness.managerLog('m-live').subscribed", 1)
    browser.wait_equal("harness.connectedText('c-live')", "true")

    seq = main.post(server_env["TEST_API_KEY"], topic, "js.hello", {"greeting": "hi"})

    browser.wait_equal("harness.managerLog('m-live').seqs", [seq])
    browser.wait_equal("harness.seqs('c-live')", [seq])
    text = browser.eval("document.querySelector('#c-live li').textContent")
    assert text == 'js.hello {"greeting":"hi"}'
    browser.eval("harness.stopManager('m-live')")
    browser.eval("harness.unmount('c-live')")


def test_forbidden_topic_stops_and_reports(browser):
    browser.eval("harness.startManager('m-forbidden', 'system.secret')")
    browser.wait_equal("harness.managerLog('m-forbidden').state", "stopped")
    log = browser.eval("harness.managerLog('m-forbidden')")
    assert {"code": 4403, "fatal": True} in log["errors"]
    assert log["seqs"] == []


def _post_elsewhere_then_restart(servers, key: str, topic: str, before: list[int]) -> list[int]:
    """With the page's server down, post two notifications through the other server, then restart
    the page's server on the same port; returns every seq of the topic so far."""
    main, other = servers
    missed = [other.post(key, topic, "js.tick", {"n": n}) for n in (3, 4)]
    main.start()
    return before + missed


def test_socket_clients_reconnect_after_server_restart_and_resume_in_order(
    browser, servers, server_env
):
    main, _ = servers
    key = server_env["TEST_API_KEY"]
    topic = "jsclient.resume"
    browser.eval(f"harness.startManager('m-resume', '{topic}')")
    browser.eval(f"harness.mountTopic('c-resume', '{topic}')")
    browser.wait_equal("harness.managerLog('m-resume').subscribed", 1)
    browser.wait_equal("harness.connectedText('c-resume')", "true")
    shown = ("harness.managerLog('m-resume').seqs", "harness.seqs('c-resume')")

    before = [main.post(key, topic, "js.tick", {"n": n}) for n in (1, 2)]
    for expr in shown:
        browser.wait_equal(expr, before)

    main.kill()
    # Both noticed the loss by themselves (no close frame from a killed process).
    browser.wait_equal("harness.managerLog('m-resume').state", "reconnecting")
    browser.wait_equal("harness.stateText('c-resume')", "reconnecting")
    everything = _post_elsewhere_then_restart(servers, key, topic, before)

    for expr in shown:
        browser.wait_equal(expr, everything, RECONNECT_TIMEOUT_MS)
    # Live again after the resume, still exactly once each.
    everything.append(main.post(key, topic, "js.tick", {"n": 5}))
    assert everything == [1, 2, 3, 4, 5]
    for expr in shown:
        browser.wait_equal(expr, everything)
    assert browser.eval("harness.managerLog('m-resume').subscribed") == 2
    browser.eval("harness.unmount('c-resume')")
    browser.eval("harness.stopManager('m-resume')")


def test_sse_composable_reconnects_after_server_restart_and_resumes_in_order(
    browser, servers, server_env
):
    main, _ = servers
    key = server_env["TEST_API_KEY"]
    topic = "jsclient.sse-restart"
    browser.eval(f"harness.mountSse('s-resume', '{topic}', ['js.tick'])")
    browser.wait_equal("harness.stateText('s-resume')", "open")
    browser.wait_equal("harness.connectedText('s-resume')", "true")  # live: posts now reach it
    before = [main.post(key, topic, "js.tick", {"n": n}) for n in (1, 2)]
    browser.wait_equal("harness.seqs('s-resume')", before)

    main.kill()
    everything = _post_elsewhere_then_restart(servers, key, topic, before)

    browser.wait_equal("harness.seqs('s-resume')", everything, RECONNECT_TIMEOUT_MS)
    everything.append(main.post(key, topic, "js.tick", {"n": 5}))
    assert everything == [1, 2, 3, 4, 5]
    browser.wait_equal("harness.seqs('s-resume')", everything)
    browser.wait_equal("harness.stateText('s-resume')", "open")
    # The browser reconnected by itself (Last-Event-ID header): still the first EventSource.
    assert browser.eval("harness.readyStates('s-resume')") == [1]
    browser.eval("harness.unmount('s-resume')")


def test_sse_composable_reconnects_with_a_fresh_token_when_the_browser_gives_up(
    browser, servers, server_env
):
    """The server comes back with a rotated SECRET_KEY: the browser's own reconnect (old token in
    the URL) is refused and the EventSource closes; the composable opens a new one with a fresh
    token and `lastEventId` in the query, and nothing is missed or repeated."""
    main, _ = servers
    key = server_env["TEST_API_KEY"]
    topic = "jsclient.sse-token"
    browser.eval(f"harness.mountSse('s-token', '{topic}', ['js.tick'])")
    browser.wait_equal("harness.stateText('s-token')", "open")
    browser.wait_equal("harness.connectedText('s-token')", "true")  # live: posts now reach it
    before = [main.post(key, topic, "js.tick", {"n": n}) for n in (1, 2)]
    browser.wait_equal("harness.seqs('s-token')", before)

    main.kill()
    main.env = {**server_env, "SECRET_KEY": "rotated-test-key-" + "x" * 40}
    everything = _post_elsewhere_then_restart(servers, key, topic, before)

    browser.wait_equal("harness.seqs('s-token')", everything, RECONNECT_TIMEOUT_MS)
    everything.append(main.post(key, topic, "js.tick", {"n": 5}))
    browser.wait_equal("harness.seqs('s-token')", everything)
    # The first EventSource gave up (CLOSED == 2); the second is the composable's own.
    assert browser.eval("harness.readyStates('s-token')") == [2, 1]
    browser.eval("harness.unmount('s-token')")


def test_sse_composable_is_connected_once_the_stream_is_live(browser, servers, server_env):
    """`connected` waits for the server's `subscribed` (replay over, live): a notification posted
    as soon as it is true arrives, on a live-only stream."""
    main, _ = servers
    topic = "jsclient.sse-live"
    browser.eval(f"harness.mountSse('s-live', '{topic}', ['js.tick'])")
    browser.wait_equal("harness.connectedText('s-live')", "true")
    assert browser.eval("harness.stateText('s-live')") == "open"
    seq = main.post(server_env["TEST_API_KEY"], topic, "js.tick", {"n": 1})
    browser.wait_equal("harness.seqs('s-live')", [seq])
    browser.eval("harness.unmount('s-live')")


def test_sse_composable_resumes_from_a_given_last_event_id(browser, servers, server_env):
    """A manual (re)connect sends `lastEventId` in the query; the server replays after it."""
    main, _ = servers
    topic = "jsclient.sse-resume"
    seqs = [main.post(server_env["TEST_API_KEY"], topic, "js.tick", {"n": n}) for n in (1, 2, 3)]
    browser.eval(f"harness.mountSse('s-from-1', '{topic}', ['js.tick'], '{seqs[0]}')")
    browser.wait_equal("harness.seqs('s-from-1')", seqs[1:])
    browser.eval("harness.unmount('s-from-1')")


def test_resume_beyond_retention_is_surfaced_as_reset(browser, servers, server_env):
    """Asked to resume after seq 1 when the server only keeps seq 3: both clients say so."""
    main, _ = servers
    key = server_env["TEST_API_KEY"]
    topic = "jsclient.trimmed"
    for n in (1, 2, 3):
        main.post(key, topic, "js.tick", {"n": n})
    trim_retention(server_env, topic, 1)
    notice = {"type": "reset", "topic": topic, "since": 1, "oldest_seq": 3, "last_seq": 3}

    browser.eval(f"harness.startManager('m-trimmed', '{topic}', 1)")
    browser.eval(f"harness.mountSse('s-trimmed', '{topic}', ['js.tick'], '1')")
    browser.wait_equal("harness.managerLog('m-trimmed').resets", [notice])
    browser.wait_equal("harness.resetShown('s-trimmed')", notice)
    main.post(key, topic, "js.tick", {"n": 4})
    # Nothing is replayed after a reset: both go on after last_seq.
    browser.wait_equal("harness.managerLog('m-trimmed').seqs", [4])
    browser.wait_equal("harness.seqs('s-trimmed')", [4])
    browser.eval("harness.stopManager('m-trimmed')")
    browser.eval("harness.unmount('s-trimmed')")


def test_unmount_removes_listeners_and_closes_connections(browser, servers, server_env):
    main, _ = servers
    key = server_env["TEST_API_KEY"]
    topic = "jsclient.unmount"
    browser.eval(f"harness.mountTopic('c-keep', '{topic}')")
    browser.eval(f"harness.mountTopic('c-gone', '{topic}')")
    browser.eval(f"harness.mountSse('s-gone', '{topic}', ['js.tick'])")
    browser.wait_equal("harness.connectedText('c-keep')", "true")
    browser.wait_equal("harness.connectedText('c-gone')", "true")
    browser.wait_equal("harness.stateText('s-gone')", "open")
    browser.wait_equal("harness.connectedText('s-gone')", "true")  # live: posts now reach it
    first = main.post(key, topic, "js.tick", {"n": 1})
    for app in ("c-keep", "c-gone", "s-gone"):
        browser.wait_equal(f"harness.seqs('{app}')", [first])

    browser.eval("harness.unmount('c-gone')")
    browser.eval("harness.unmount('s-gone')")
    # WebSocket.CLOSED == 3, EventSource.CLOSED == 2: nothing left open by the unmounted apps.
    browser.wait_equal("harness.readyStates('c-gone')", [3])
    browser.wait_equal("harness.readyStates('s-gone')", [2])

    second = main.post(key, topic, "js.tick", {"n": 2})
    browser.wait_equal("harness.seqs('c-keep')", [first, second])
    assert browser.eval("harness.callbacks('c-gone')") == 1
    assert browser.eval("harness.callbacks('s-gone')") == 1
    assert browser.eval("harness.seqs('c-gone')") is None  # its DOM is gone too
    browser.eval("harness.unmount('c-keep')")


def test_composable_outside_a_component_runs_until_stopped(browser, servers, server_env):
    """From a store or plugin: no mount to wait for, so it connects at once; stop() or disposing
    its effect scope closes the socket."""
    main, _ = servers
    topic = "jsclient.detached"
    browser.eval(f"harness.startDetached('d-plain', '{topic}')")
    browser.eval(f"harness.startInScope('d-scope', '{topic}')")
    browser.wait_equal("harness.detached('d-plain').connected", True)
    browser.wait_equal("harness.detached('d-scope').connected", True)
    seq = main.post(server_env["TEST_API_KEY"], topic, "js.tick", {"n": 1})
    browser.wait_equal("harness.detached('d-plain').seqs", [seq])
    browser.wait_equal("harness.detached('d-scope').seqs", [seq])

    browser.eval("harness.stopDetached('d-plain')")
    browser.eval("harness.disposeScope('d-scope')")
    browser.wait_equal("harness.readyStates('d-plain')", [3])
    browser.wait_equal("harness.readyStates('d-scope')", [3])
    assert browser.eval("harness.detached('d-plain').state") == "closed"
    assert "[Vue warn]" not in browser.logs()


def test_composable_follows_a_reactive_topic(browser, servers, server_env):
    """useNotifyTopic(ref): switching the topic leaves the old one (socket closed, list cleared)."""
    main, _ = servers
    key = server_env["TEST_API_KEY"]
    browser.eval("harness.mountSwitchable('c-switch', 'jsclient.first')")
    browser.wait_equal("harness.connectedText('c-switch')", "true")
    main.post(key, "jsclient.first", "js.first", {})
    browser.wait_equal("harness.texts('c-switch')", ["jsclient.first js.first"])

    browser.eval("harness.switchTopic('c-switch', 'jsclient.second')")
    browser.wait_equal("harness.texts('c-switch')", [])
    browser.wait_equal("harness.connectedText('c-switch')", "true")
    main.post(key, "jsclient.first", "js.first", {})  # no longer followed
    main.post(key, "jsclient.second", "js.second", {})
    browser.wait_equal("harness.texts('c-switch')", ["jsclient.second js.second"])
    browser.wait_equal("harness.readyStates('c-switch')", [3, 1])
    browser.eval("harness.unmount('c-switch')")
