"""The peers of the delivery channels, for the tests of email, SMS and webhook deliveries: an SMTP
server (aiosmtpd) that keeps what it receives, and an HTTP receiver (an SMS gateway, a webhook
endpoint) that records requests and answers as a test programs it. tests/test_servers.py shows
both working.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.servers import WAIT_S, Inbox, Started, free_port


class SMTPServer(Started):
    """An SMTP server (aiosmtpd) on 127.0.0.1 and a free port that keeps every message it
    receives; ``wait_for(n)`` waits until it holds ``n``."""

    def __init__(
        self,
        credentials: tuple[str, str] | None = None,
        refuse: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        """``credentials``: (user, password) the server then requires (SMTP AUTH on the plain
        connection); ``refuse``: recipient address -> the reply to its RCPT (e.g. ``"550 5.1.1
        No such user"``); ``port``: the port of a server this one replaces (default: free)."""
        from aiosmtpd.controller import Controller

        self.port = port or free_port()
        self.messages: Inbox[EmailMessage] = Inbox("messages")
        self.envelopes: list[tuple[str, list[str]]] = []  # (MAIL FROM, RCPT TOs) per message
        self.logins: list[tuple[str, str]] = []  # (user, password) of every AUTH attempt
        self._credentials = credentials
        self._refuse = refuse or {}
        auth = {}
        if credentials is not None:
            # Tests have no certificates: AUTH without TLS, on loopback only.
            auth = {
                "authenticator": self._authenticate,
                "auth_required": True,
                "auth_require_tls": False,
            }
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **auth)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        login = (auth_data.login.decode(), auth_data.password.decode())
        self.logins.append(login)
        # handled=False: aiosmtpd then answers the refusal (535) itself.
        return AuthResult(success=login == self._credentials, handled=False)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:  # noqa: N802
        if address in self._refuse:
            return self._refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.messages.put(message)
        return "250 Message accepted for delivery"

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[EmailMessage]:
        """The first ``count`` messages, once received; AssertionError after ``timeout_s``."""
        return self.messages.wait_for(count, timeout_s)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


@dataclass
class Reply:
    """One programmed answer of an HTTPReceiver: after ``delay_s``, ``status`` with ``body``."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class HTTPReceiver(Started):
    """A threaded HTTP server on 127.0.0.1 and a free port that records every request and answers
    each with the next programmed ``Reply`` (``program``), then with ``default``. It stands in
    for an SMS gateway or a webhook endpoint: failing, slow or fine, as a test programs it."""

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self.requests: Inbox[ReceivedRequest] = Inbox("requests")
        self._programmed: list[Reply] = []
        self._programming = threading.Lock()
        self._stopping = threading.Event()  # ends the delays of answers still held at stop
        self._httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"

    def program(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order."""
        with self._programming:
            self._programmed.extend(replies)

    def _answer_for(self, request: ReceivedRequest) -> Reply:
        with self._programming:
            reply = self._programmed.pop(0) if self._programmed else self.default
        self.requests.put(request)
        return reply

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[ReceivedRequest]:
        """The first ``count`` requests, once received; AssertionError after ``timeout_s``."""
        return self.requests.wait_for(count, timeout_s)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = ReceivedRequest(
                    self.command, self.path, dict(self.headers.items()), self.rfile.read(length)
                )
                reply = receiver._answer_for(request)
                if reply.delay_s and receiver._stopping.wait(reply.delay_s):
                    return  # stopping: drop the held answer
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        return Handler

    def start(self) -> None:
        # serve_forever checks for shutdown() every poll_interval (0.5 s by default): a shorter
        # one keeps each test's teardown short.
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def closed_port_url(scheme: str) -> str:
    """A URL of ``scheme`` on 127.0.0.1 where nothing listens: a provider that refuses."""
    return f"{scheme}://127.0.0.1:{free_port()}"
