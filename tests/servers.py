"""Real processes and peers for the end-to-end tests, one of each kind, shared by every test module.

- ``free_port``, ``wait_listening``: a port to listen on, and waiting until something does;
- ``RedisServer``: a redis-server of the test's own (never the shared one), restartable on its port;
- ``fresh_database``, ``server_environment``: an empty database and the environment of the server
  processes of one test module; ``seed``, ``run_script``, ``trim_retention`` work on it;
- ``NotifyServer``: uvicorn serving notify with exactly the command line of ``manage.py serve``;
- ``CeleryWorker``: ``celery -A notify_project worker`` as ``manage.py serve`` runs it;
- ``SMTPServer`` (aiosmtpd) and ``HTTPReceiver``: the peers of the email, SMS and webhook channels.

Not a test module (tests/test_servers.py shows each piece working).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import httpx

from routing_app.management.commands.serve import celery_worker_argv, uvicorn_argv

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60  # a cold Django + uvicorn (or Celery) start on a busy 2-core machine
STOP_TIMEOUT_S = 15  # above serve's graceful-shutdown budget (5 s), then SIGKILL
SCRIPT_TIMEOUT_S = 180  # a set-up script migrates a fresh database: tens of seconds under load
WAIT_S = 20  # upper bound for one awaited event of a peer; passing runs take far less
LOG_TAIL_CHARS = 3000  # how much of a process's log a failure shows

# Prepended to every script run_script() and python_argv() run: Django set up, as manage.py does.
DJANGO_SETUP = """\
import os
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_project.settings")
django.setup()
"""

SEED_SCRIPT = """
import json
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
from channels_app.tokens import mint
from routing_app.models import ApiKey
call_command("migrate", verbosity=0, interactive=False)
users = get_user_model().objects
people = {
    "sam": users.create_user("sam", "sam@example.com", "pw-sam"),
    "oscar": users.create_user("oscar", "oscar@example.com", "pw-oscar", is_staff=True),
    "olga": users.create_user("olga", "olga@example.com", "pw-olga"),
}
session = SessionStore()
session[SESSION_KEY] = str(people["sam"].pk)
session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
session[HASH_SESSION_KEY] = people["sam"].get_session_auth_hash()
session.create()
key = ApiKey(name="server-test", scopes=["ingest", "tokens"])
raw = key.set_new_key()
key.save()
print("SEED " + json.dumps({
    "api_key": raw,
    "ids": {name: user.pk for name, user in people.items()},
    "tokens": {name: mint(user.pk, 3600).token for name, user in people.items()},
    "sam_session": session.session_key,
}))
"""

TRIM_SCRIPT = """
import sys
from routing_app.stream_writes import trim_retention
from routing_app.models import Topic
topic = Topic.objects.get(name=sys.argv[1])
topic.retention_count = int(sys.argv[2])
topic.save(update_fields=["retention_count"])
print(trim_retention(topic))
"""


# --- ports ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log and log.exists() else ""


def wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path | None = None) -> None:
    """Return once 127.0.0.1:port accepts connections; raise AssertionError (with the end of
    ``log``) if ``proc`` exits first or STARTUP_TIMEOUT_S pass."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with code {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} did not listen in {STARTUP_TIMEOUT_S} s:\n{log_tail(log)}"
            )
        time.sleep(0.05)  # polling a port: there is no event to wait on for "listening"


def end_process(proc: subprocess.Popen | None, first: signal.Signals) -> None:
    """Send ``first`` (SIGTERM: a clean stop; SIGKILL: a crash) unless ``proc`` has exited, and
    reap it; SIGKILL after STOP_TIMEOUT_S."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(first)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


# --- Redis ------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server of the test's own on a free port, without persistence: killed and started
    again it comes back empty on the same port, as a crashed cache would. Extra ``config`` goes on
    its command line (e.g. ``"--client-output-buffer-limit", "pubsub", "1mb", "512kb", "1"``)."""

    def __init__(self, directory: Path, *config: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.config = config
        self.log = directory / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.directory), *self.config]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, "redis-server", self.log)

    def kill(self) -> None:
        """SIGKILL (an outage: clients see their connections drop); a no-op once stopped."""
        end_process(self.proc, signal.SIGKILL)

    def client(self):
        """A synchronous redis-py client of this server."""
        import redis

        return redis.Redis.from_url(self.url)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()


# --- a database and the environment of server processes ---------------------------------------


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


@contextlib.contextmanager
def fresh_database(directory: Path, name: str) -> Iterator[dict[str, str]]:
    """An empty database, as the environment entries that point server processes at it: with a
    Postgres DATABASE_URL, the database ``<its name>_<name>`` beside it (dropped first if an
    interrupted run left it, and on exit); else the SQLite file ``directory/db.sqlite3``."""
    url = os.environ.get("DATABASE_URL", "")
    if not _is_postgres(url):
        yield {"DATABASE_URL": "", "SQLITE_PATH": str(directory / "db.sqlite3")}
        return
    import psycopg

    parsed = urlparse(url)
    database = f"{parsed.path.lstrip('/') or 'notify'}_{name}"
    admin = urlunparse(parsed._replace(path="/postgres"))

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    drop()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        yield {"DATABASE_URL": urlunparse(parsed._replace(path="/" + database))}
    finally:
        drop()


@contextlib.contextmanager
def server_environment(directory: Path, name: str, **extra: str) -> Iterator[dict[str, str]]:
    """The environment of one test module's server processes: this process's (Redis mode when
    REDIS_URL is set, embedded otherwise) without pytest's own variables, a fresh database
    (``fresh_database``), the Redis prefix ``<REDIS_PREFIX>-<name>``, LOG_LEVEL=WARNING, then
    ``extra`` (e.g. ``REDIS_URL=own.url``). The database is dropped on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["LOG_LEVEL"] = "WARNING"
    env["REDIS_PREFIX"] = f"{os.environ.get('REDIS_PREFIX', 'notify')}-{name}"
    with fresh_database(directory, name) as database:
        env.update(database)
        env.update(extra)
        yield env


def python_argv(script: str, *args: str) -> list[str]:
    """The command line that runs ``script`` (with Django set up) in a Python of its own."""
    return [sys.executable, "-c", DJANGO_SETUP + script, *args]


def run_script(env: dict[str, str], script: str, *args: str) -> str:
    """Run ``script`` with Django set up in ``env``; return its stdout. A failure raises
    AssertionError with the end of its stderr."""
    done = subprocess.run(  # noqa: S603  (our own script, no shell)
        python_argv(script, *args),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-LOG_TAIL_CHARS:]
    return done.stdout


def seed(env: dict[str, str]) -> dict:
    """Migrate ``env``'s database and create the personas the server tests use: sam, oscar
    (staff) and olga, an API key with the scopes ingest and tokens, an hour's client token each
    and a session for sam. Returns ``{"api_key", "ids": {name: pk}, "tokens": {name: token},
    "sam_session"}``."""
    line = next(x for x in run_script(env, SEED_SCRIPT).splitlines() if x.startswith("SEED "))
    return json.loads(line.removeprefix("SEED "))


def trim_retention(env: dict[str, str], topic: str, keep: int) -> int:
    """Set ``topic``'s retention to its newest ``keep`` notifications and trim it now, in
    ``env``'s database; return the number of rows deleted."""
    return int(run_script(env, TRIM_SCRIPT, topic, str(keep)).split()[-1])


# --- notify itself ----------------------------------------------------------------------------


class NotifyServer:
    """One uvicorn process serving notify, started with exactly ``manage.py serve``'s command line
    (``uvicorn_argv``) at ``log_level``. Its port stays the same across restarts, and ``env`` is
    read at each start, so a test may restart it with another environment."""

    def __init__(self, env: dict[str, str], log: Path, *, log_level: str = "warning") -> None:
        self.env = env
        self.log = log
        self.log_level = log_level
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.socket_url = f"ws://127.0.0.1:{self.port}/socket"  # the Phoenix endpoint
        self.proc: subprocess.Popen | None = None

    @property
    def argv(self) -> list[str]:
        return [*uvicorn_argv("127.0.0.1", self.port), f"--log-level={self.log_level}"]

    def spawn(self) -> None:
        """Start the process without waiting for it (``wait_ready`` does): several servers then
        start at once."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603  (our own argv, no shell)
                self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        wait_listening(self.port, self.proc, "uvicorn", self.log)

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def stop(self) -> None:
        """SIGTERM: uvicorn closes its connections and drains (a no-op once stopped)."""
        end_process(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no close frames, no presence clean-up, like a crashed process."""
        end_process(self.proc, signal.SIGKILL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def hub_stats(self, api_key: str) -> dict:
        """GET /api/v1/realtime/hub: the process's hub counts."""
        answer = httpx.get(
            f"{self.base}/api/v1/realtime/hub",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    def token(self, user_id: int) -> str:
        """A client token the server accepts (same SECRET_KEY: same settings and environment)."""
        from channels_app.tokens import mint

        return mint(user_id).token

    def post(self, api_key: str, topic: str, event: str, data: dict) -> int:
        """POST one notification through the ingest API; returns the seq it was given."""
        response = httpx.post(
            f"{self.base}/api/v1/notifications",
            json={"topic": topic, "event": event, "data": data},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        assert response.status_code == 202, response.text
        return response.json()["seq"]


# --- Celery -----------------------------------------------------------------------------------


class CeleryWorker:
    """``celery -A notify_project worker`` with ``manage.py serve``'s command line, in ``env``
    (whose REDIS_URL is its broker), named ``<name>@%h`` and with ``concurrency`` processes (one
    by default: two cores are shared). Its output goes to ``log``; ``wait_for_line`` waits on it."""

    def __init__(
        self, env: dict[str, str], log: Path, *, name: str = "worker", concurrency: int = 1
    ) -> None:
        assert env.get("REDIS_URL"), "a Celery worker needs a broker: REDIS_URL"
        self.env = {**env, "PYTHONUNBUFFERED": "1"}  # lines reach the log as they are written
        self.log = log
        self.argv = [*celery_worker_argv(), f"--hostname={name}@%h", f"--concurrency={concurrency}"]
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._changed = threading.Condition()

    def start(self) -> None:
        """Start the worker and return once it says it is ready to consume."""
        self.proc = subprocess.Popen(  # noqa: S603  (our own argv, no shell)
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_line(lambda line: " ready." in line, STARTUP_TIMEOUT_S)

    def _read(self) -> None:
        with self.log.open("a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._changed:
                    self._lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()  # the process ended: waiters stop waiting

    def wait_for_line(self, wanted: Callable[[str], bool], timeout_s: float = WAIT_S) -> str:
        """The first output line (since the start) for which ``wanted`` is true; AssertionError
        with the output so far if the worker exits or ``timeout_s`` pass first."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    if wanted(line):
                        return line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    output = "\n".join(self._lines)[-LOG_TAIL_CHARS:]
                    raise AssertionError(f"not in the Celery worker's output:\n{output}")
                self._changed.wait(left)

    def send_task(self, name: str, *args) -> None:
        """Enqueue task ``name`` on this worker's broker, as the project's producers do (same
        broker, same key prefix: settings.CELERY_BROKER_TRANSPORT_OPTIONS)."""
        from celery import Celery

        producer = Celery(
            broker=self.env["REDIS_URL"],
            broker_transport_options={"global_keyprefix": f"{self.env['REDIS_PREFIX']}:"},
        )
        try:
            producer.send_task(name, args=args)
        finally:
            producer.close()

    def stop(self) -> int:
        """SIGTERM (a warm shutdown: the task in hand finishes); returns the exit code."""
        end_process(self.proc, signal.SIGTERM)
        return self.proc.returncode

    def __enter__(self) -> CeleryWorker:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --- peers of the delivery channels ------------------------------------------------------------


class SMTPServer:
    """An SMTP server (aiosmtpd) on 127.0.0.1 and a free port that keeps every message it
    receives; ``wait_for(n)`` waits until it holds ``n``."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.port = free_port()
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []  # (MAIL FROM, RCPT TOs) per message
        self._changed = threading.Condition()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd's name)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._changed:
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            self._changed.notify_all()
        return "250 Message accepted for delivery"

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[EmailMessage]:
        """The first ``count`` messages, once received; AssertionError after ``timeout_s``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.messages) >= count, timeout_s):
                raise AssertionError(f"{len(self.messages)} of {count} messages received")
            return self.messages[:count]

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SMTPServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


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


class HTTPReceiver:
    """A threaded HTTP server on 127.0.0.1 and a free port that records every request and answers
    each with the next programmed ``Reply`` (``program``), then with ``default``. It stands in
    for an SMS gateway or a webhook endpoint: failing, slow or fine, as a test programs it."""

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self.requests: list[ReceivedRequest] = []
        self._programmed: list[Reply] = []
        self._changed = threading.Condition()
        self._stopping = threading.Event()  # ends the delays of answers still held at stop
        self._httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"

    def program(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order."""
        with self._changed:
            self._programmed.extend(replies)

    def _answer_for(self, request: ReceivedRequest) -> Reply:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
            return self._programmed.pop(0) if self._programmed else self.default

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[ReceivedRequest]:
        """The first ``count`` requests, once received; AssertionError after ``timeout_s``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout_s):
                raise AssertionError(f"{len(self.requests)} of {count} requests received")
            return self.requests[:count]

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
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HTTPReceiver:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
