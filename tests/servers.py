"""Real processes and peers for the end-to-end tests, one of each kind, shared by every test module.

- ``free_port``, ``wait_listening``: a port to listen on, and waiting until something does;
- ``RedisServer``: a redis-server of the test's own (never the shared one), restartable on its port;
- ``fresh_database``, ``server_environment``: an empty database and the environment of the server
  processes of one test module; ``seed`` (a copy of one seeded template per run, on Postgres),
  ``run_script``, ``trim_retention`` work on it;
- ``NotifyServer``: uvicorn serving notify with exactly the command line of ``manage.py serve``;
- ``CeleryWorker``: ``celery -A notify_project worker`` as ``manage.py serve`` runs it;
- ``spawned``: several of those started at once;
- ``Inbox``: what arrives on other threads, waited for without sleeps.

The peers of the email, SMS and webhook channels (an SMTP server, an HTTP receiver) are in
tests/peers.py. Not a test module (tests/test_servers.py shows each piece working).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar
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
key = ApiKey(name="server-test", scopes=list(ApiKey.SCOPES))
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


class Started(ABC):
    """``with thing:`` starts it and stops it at the end."""

    @abstractmethod
    def start(self) -> None:
        """Start, and return once ready to serve."""

    @abstractmethod
    def stop(self) -> object:
        """Stop cleanly (a no-op once stopped)."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def spawned(processes: Sequence) -> Iterator[Sequence]:
    """Start ``processes`` (``NotifyServer``, ``CeleryWorker``: anything with ``spawn``,
    ``wait_ready`` and ``stop``) at once, since a cold start takes seconds each, and return once
    all are ready; stop them all at the end."""
    try:
        for process in processes:
            process.spawn()
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in processes:
            process.stop()


T = TypeVar("T")


class Inbox(Generic[T]):
    """What arrives on other threads (a process's output lines, received messages), in order;
    readers wait for what they need. ``close()`` says nothing more will come."""

    def __init__(self, what: str) -> None:
        self.what = what  # named in failures
        self.items: list[T] = []
        self._closed = False
        self._changed = threading.Condition()

    def put(self, item: T) -> None:
        with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> list[T]:
        """The first ``count`` items, once they are in; AssertionError after ``timeout_s``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.items) >= count, timeout_s):
                raise AssertionError(f"{len(self.items)} of {count} {self.what} arrived")
            return self.items[:count]

    def first(self, wanted: Callable[[T], bool], timeout_s: float = WAIT_S) -> T:
        """The first item (since the start) for which ``wanted`` is true; AssertionError with
        the last items if it is closed first or ``timeout_s`` pass."""

        def found() -> T | None:
            return next((item for item in self.items if wanted(item)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._closed, timeout_s)
            if (item := found()) is None:
                tail = "\n".join(map(str, self.items[-40:]))
                raise AssertionError(f"not among the {self.what}:\n{tail}")
            return item


# --- Redis ------------------------------------------------------------------------------------


class RedisServer(Started):
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

    def stop(self) -> None:
        """SIGTERM: a clean stop (a no-op once stopped)."""
        end_process(self.proc, signal.SIGTERM)

    def client(self):
        """A synchronous redis-py client of this server."""
        import redis

        return redis.Redis.from_url(self.url)


# --- a database and the environment of server processes ---------------------------------------


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


def _admin_connection(url: str):
    """An autocommit connection to the ``postgres`` database of ``url``'s server."""
    import psycopg

    return psycopg.connect(urlunparse(urlparse(url)._replace(path="/postgres")), autocommit=True)


def _database_name(url: str) -> str:
    return urlparse(url).path.lstrip("/")


def _server(url: str) -> tuple[str | None, int | None]:
    parsed = urlparse(url)
    return parsed.hostname, parsed.port or 5432


def _drop_database(url: str, name: str) -> None:
    """Drop the database ``name`` on ``url``'s server, if there (its connections ended first)."""
    with _admin_connection(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_database(directory: Path, name: str) -> Iterator[dict[str, str]]:
    """An empty database, as the environment entries that point server processes at it: with a
    Postgres DATABASE_URL, the database ``<its name>_<name>`` beside it (dropped first if an
    interrupted run left it, and on exit); else the SQLite file ``directory/db.sqlite3``."""
    url = os.environ.get("DATABASE_URL", "")
    if not _is_postgres(url):
        yield {"DATABASE_URL": "", "SQLITE_PATH": str(directory / "db.sqlite3")}
        return
    database = f"{_database_name(url) or 'notify'}_{name}"
    _drop_database(url, database)
    with _admin_connection(url) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        yield {"DATABASE_URL": urlunparse(urlparse(url)._replace(path="/" + database))}
    finally:
        _drop_database(url, database)


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


@contextlib.contextmanager
def seeded_server(directory: Path, name: str, **extra: str) -> Iterator[tuple[NotifyServer, dict]]:
    """notify running for the block on a seeded database of its own (``server_environment``
    with ``extra``): the server and what ``seed`` made for it."""
    with server_environment(directory, name, **extra) as env:
        setup = seed(env)
        process = NotifyServer(env, directory / "server.log")
        try:
            process.start()
            yield process, setup
        finally:
            process.stop()


def seed(env: dict[str, str]) -> dict:
    """Migrate ``env``'s database and create the personas the server tests use: sam, oscar
    (staff) and olga, an API key with the scopes ingest and tokens, an hour's client token each
    and a session for sam. Returns ``{"api_key", "ids": {name: pk}, "tokens": {name: token},
    "sam_session"}``.

    On Postgres the first call of a run seeds a template database and every call (that one
    included) replaces ``env``'s fresh database by a copy of it (``CREATE DATABASE ... TEMPLATE``:
    a fraction of a second, where migrating and hashing three passwords take seconds): the same
    rows, the same raw key, tokens and session in each module's database.
    """
    url = env.get("DATABASE_URL", "")
    shared = os.environ.get("DATABASE_URL", "")
    # Only on the run's own Postgres: a test's private server (tests/chaos/pg_support.py) ends
    # with its module, and another may come up on the same port without the template.
    if not (_is_postgres(url) and _is_postgres(shared) and _server(url) == _server(shared)):
        return _run_seed(env)
    signing = tuple(env.get(name, "") for name in SEEDED_WITH)
    template = _seeded_templates.get(signing)
    if template is None or time.monotonic() - template[2] > SEEDED_TOKENS_FRESH_S:
        name = f"{_database_name(shared) or 'notify'}_seeded_{next(_template_numbers)}"
        template = _seeded_templates[signing] = (name, _seed_template(env, name), time.monotonic())
    name, answer, _ = template
    _drop_database(url, _database_name(url))
    _copy_database(url, name, _database_name(url))
    return copy.deepcopy(answer)  # callers may change theirs


# What the seed's answer depends on beyond the database's rows: the key its tokens are signed with.
SEEDED_WITH = ("SECRET_KEY", "SECRET_KEY_FILE", "DEBUG")
SEEDED_TOKENS_FRESH_S = 1800  # the seeded tokens live an hour: a template is seeded anew after half
# SEEDED_WITH's values -> (template database, seed's answer, monotonic time it was seeded)
_seeded_templates: dict[tuple[str, ...], tuple[str, dict, float]] = {}
_template_numbers = itertools.count()


def _run_seed(env: dict[str, str]) -> dict:
    line = next(x for x in run_script(env, SEED_SCRIPT).splitlines() if x.startswith("SEED "))
    return json.loads(line.removeprefix("SEED "))


def _seed_template(env: dict[str, str], name: str) -> dict:
    """Seed the database ``name`` (made afresh beside ``env``'s) in ``env``; dropped at exit."""
    url = env["DATABASE_URL"]
    _drop_database(url, name)  # left by an interrupted run
    with _admin_connection(url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    atexit.register(_drop_database, url, name)
    template_url = urlunparse(urlparse(url)._replace(path="/" + name))
    answer = _run_seed({**env, "DATABASE_URL": template_url})
    with _admin_connection(url) as conn:  # a copy needs a template nobody is connected to
        conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    return answer


def _copy_database(url: str, template: str, name: str) -> None:
    """Create the database ``name`` as a copy of ``template`` on ``url``'s server."""
    import psycopg

    deadline = time.monotonic() + WAIT_S
    with _admin_connection(url) as conn:
        while True:
            try:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                return
            except psycopg.errors.ObjectInUse:
                # An autovacuum worker that entered the template before it was closed to
                # connections: it leaves within moments.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def trim_retention(env: dict[str, str], topic: str, keep: int) -> int:
    """Set ``topic``'s retention to its newest ``keep`` notifications and trim it now, in
    ``env``'s database; return the number of rows deleted."""
    return int(run_script(env, TRIM_SCRIPT, topic, str(keep)).split()[-1])


# --- notify itself ----------------------------------------------------------------------------


class NotifyServer(Started):
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


class CeleryWorker(Started):
    """``celery -A notify_project worker`` with ``manage.py serve``'s command line, in ``env``
    (whose REDIS_URL is its broker), named ``<name>@%h`` and with ``concurrency`` processes (one
    by default: two cores are shared). Its output goes to ``log``; ``wait_for_line`` waits on it."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *,
        name: str = "worker",
        concurrency: int = 1,
        beat: bool = False,
    ) -> None:
        assert env.get("REDIS_URL"), "a Celery worker needs a broker: REDIS_URL"
        self.env = {**env, "PYTHONUNBUFFERED": "1"}  # lines reach the log as they are written
        self.log = log
        self.argv = [*celery_worker_argv(), f"--hostname={name}@%h", f"--concurrency={concurrency}"]
        if beat:  # the periodic tasks (the sweeper) in this worker, as one `celery beat` would
            self.argv += ["--beat", f"--schedule={log.with_suffix('.beat-schedule')}"]
        self.proc: subprocess.Popen | None = None
        self.output: Inbox[str] = Inbox("Celery worker's output lines")

    def start(self) -> None:
        """Start the worker and return once it says it is ready to consume."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start the process without waiting for it (``wait_ready`` does; see ``spawned``)."""
        self.proc = subprocess.Popen(  # noqa: S603  (our own argv, no shell)
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self) -> None:
        self.wait_for_line(lambda line: " ready." in line, STARTUP_TIMEOUT_S)

    def _read(self) -> None:
        with self.log.open("a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.output.put(line.rstrip("\n"))
        self.output.close()  # the process ended: waiters stop waiting

    def wait_for_line(self, wanted: Callable[[str], bool], timeout_s: float = WAIT_S) -> str:
        """The first output line (since the start) for which ``wanted`` is true; AssertionError
        with the output so far if the worker exits or ``timeout_s`` pass first."""
        return self.output.first(wanted, timeout_s)

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

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, as a crashed host would: nothing is
        acknowledged, nothing finished."""
        pids = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)
