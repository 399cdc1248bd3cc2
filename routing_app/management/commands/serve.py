"""``manage.py serve``: run every process the configured mode needs, as children of this one.

- always the production ASGI server: uvicorn ``notify_project.asgi:application``;
- with ``REDIS_URL`` also a Celery worker and Celery beat (embedded mode runs tasks in-process and
  has no beat).

Children run in their own sessions, so a terminal's Ctrl-C reaches only this supervisor, which
forwards one SIGTERM to each (a second Ctrl-C kills them). When any child exits, the others are
stopped and this command exits with that child's code. On Linux each child also gets SIGTERM if
this supervisor dies without cleaning up.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection
from django.urls import Resolver404, resolve

from routing_app import demo
from routing_app.management.commands.demo import login_note

STOP_TIMEOUT_S = 10  # graceful shutdown budget before SIGKILL (uvicorn drains, Celery warm-stops)
# uvicorn's own default, stated: an idle keep-alive connection is closed after this; a publisher
# reconnects (the proxy in front keeps its own pool, docs/deployment.md).
KEEP_ALIVE_TIMEOUT_S = 5
READY_TIMEOUT_S = 60  # how long to wait for the server to accept connections before giving up
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent() -> None:  # pragma: no cover (runs in the forked child)
    """Between fork and exec: ask Linux to SIGTERM this child when the supervisor dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def uvicorn_argv(host: str, port: int, workers: int = 1) -> list[str]:
    """uvicorn's command line for serving ``notify_project.asgi`` as production runs it.

    The tests' server processes (tests/servers.py) run this same command line, so what they test
    is what runs.
    """
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "notify_project.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--lifespan",
        "off",  # Django has no lifespan handlers
        # open SSE streams and sockets would hold a plain shutdown until SIGKILL
        "--timeout-graceful-shutdown",
        str(STOP_TIMEOUT_S // 2),
        # uvicorn's httptools protocol with bounded request heads and header/body deadlines, and
        # an answer to every refused WebSocket upgrade (notify_project/uvicorn_protocols.py)
        "--http",
        "notify_project.uvicorn_protocols:HttpProtocol",
        "--timeout-keep-alive",
        str(KEEP_ALIVE_TIMEOUT_S),
        *settings.UVICORN_WS_ARGS,
    ]


CELERY_COMMAND = (sys.executable, "-m", "celery", "-A", "notify_project")


def celery_worker_argv() -> list[str]:
    """The Celery worker's command line as production runs it (tests/servers.py runs it too)."""
    return [*CELERY_COMMAND, "worker", "--loglevel", "INFO"]


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.exit_code is None


class Supervisor:
    """Start children, stop them all when one exits or on a signal, reap them."""

    def __init__(self, children: list[Child], write) -> None:
        self.children = children
        self.write = write
        self.stopping = False
        self.first_exit: Child | None = None

    def start(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGALRM, lambda *_: self._send(signal.SIGKILL))
        for child in self.children:
            if self.stopping:
                break  # interrupted while starting: start nothing more
            child.process = subprocess.Popen(  # noqa: S603  (our own argv, no shell)
                child.argv, start_new_session=True, preexec_fn=_die_with_parent
            )

    def _on_signal(self, signum, _frame) -> None:
        if self.stopping:
            self.write("Stopping at once.")
            self._send(signal.SIGKILL)
        else:
            self.write(f"{signal.Signals(signum).name}: stopping {self._names()}...")
            self.stop()

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._send(signal.SIGTERM)
            signal.alarm(STOP_TIMEOUT_S)

    def _send(self, signum: int) -> None:
        for child in self.children:
            if child.running:
                try:
                    child.process.send_signal(signum)
                except ProcessLookupError:
                    continue  # exited between the check and the signal; reaped below

    def _names(self) -> str:
        return ", ".join(c.name for c in self.children if c.running)

    def reap(self, block: bool) -> None:
        """Record exited children; the first unexpected exit stops the rest."""
        while any(c.running for c in self.children):
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return  # nothing exited (non-blocking)
            for child in self.children:
                if child.process and child.process.pid == pid:
                    child.exit_code = os.waitstatus_to_exitcode(status)
                    child.process.returncode = child.exit_code
                    if not self.stopping:
                        self.first_exit = child
                        self.write(
                            f"{child.name} exited with code {child.exit_code}; "
                            f"stopping {self._names() or 'nothing else'}."
                        )
                        self.stop()

    def wait_listening(self, host: str, port: int) -> bool:
        """True once ``host:port`` accepts connections; False if stopping or out of time."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.reap(block=False)
            if self.stopping:
                return False
            try:
                socket.create_connection((host, port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.1)  # a readiness probe, not a test: poll the port
        return False

    def exit_code(self) -> int:
        self.reap(block=True)
        signal.alarm(0)
        if self.first_exit is None:
            return 0  # stopped on request
        return self.first_exit.exit_code or 1


class Command(BaseCommand):
    help = "Run the ASGI server (uvicorn) and, with REDIS_URL, a Celery worker and beat."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
        parser.add_argument("--key-file", type=Path, default=demo.DEFAULT_KEY_FILE)

    def handle(self, *args, host: str, port: int, workers: int, key_file: Path, **options):
        if workers > 1 and not settings.REDIS_URL:
            # Each process would have its own in-memory channel layer and hub: a notification
            # ingested in one would never reach sockets held by another.
            raise CommandError("several workers need REDIS_URL (the embedded mode is one process)")
        # While Redis is away each worker admits its share of a key's ingest rate (settings): the
        # workers of this host are the processes to share it among, unless the operator says more.
        os.environ.setdefault("INGEST_SERVER_PROCESSES", str(workers))
        children = [Child("uvicorn", uvicorn_argv(host, port, workers))]
        schedule_dir = None
        if settings.REDIS_URL:
            schedule_dir = tempfile.TemporaryDirectory(prefix="notify-beat-")
            children += [
                Child("celery worker", celery_worker_argv()),
                Child(
                    "celery beat",
                    [
                        *CELERY_COMMAND,
                        "beat",
                        "--loglevel",
                        "INFO",
                        "--schedule",
                        str(Path(schedule_dir.name) / "celerybeat-schedule"),
                    ],
                ),
            ]
        banner = self.banner(host, port, key_file)
        connection.close()  # the children open their own
        supervisor = Supervisor(children, self.say)
        supervisor.start()
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]")
        if supervisor.wait_listening(probe_host, port):
            pids = ", ".join(f"{c.name} (pid {c.process.pid})" for c in children)
            self.say(banner + f"  Processes: {pids}\nPress Ctrl-C to stop.\n")
        elif not supervisor.stopping:
            self.say(f"The server did not listen on {host}:{port} in {READY_TIMEOUT_S} s.")
            supervisor.stop()
        code = supervisor.exit_code()
        if schedule_dir:
            schedule_dir.cleanup()
        if code:
            sys.exit(code)

    def say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def banner(self, host: str, port: int, key_file: Path) -> str:
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        url = f"http://{shown_host}:{port}"
        db = (
            "Postgres"
            if settings.USING_POSTGRES
            else f"SQLite ({settings.DATABASES['default']['NAME']})"
        )
        mode = (
            f"{db}, Redis (channel layer, cache, Celery)"
            if settings.REDIS_URL
            else f"embedded: {db}, in-memory channel layer, tasks in-process"
        )
        try:
            login = demo.admin_login_for(host)
            key = demo.current_api_key(key_file)
        except DatabaseError as exc:
            self.stderr.write(f"Could not read the demo login and key: {exc}")
            login, key = demo.DemoLogin(demo.ADMIN_USERNAME, None), None
        password = login.password or "(not the demo password; run `manage.py demo` if missing)"
        lines = [
            "",
            f"notify is running ({mode})",
            f"  URL:       {url}/",
            f"  Admin:     {url}/admin/   login: {login.username} / {password}{login_note(login)}",
        ]
        if key:
            lines.append(f"  API key:   {key}")
            body = {
                "topic": "alerts.k8s",
                "event": "pod.crash",
                "severity": "error",  # the demo routes errors on alerts.# by email too
                "data": {"pod": "api-1"},
            }
            lines.append(
                f"  Try:       curl -H 'Authorization: Bearer {key}' "
                "-H 'Content-Type: application/json' "
                f"-d '{json.dumps(body, separators=(',', ':'))}' "
                f"{url}/api/v1/notifications"
            )
        else:
            lines.append("  API key:   none known: run `python manage.py demo` to make one")
        try:
            resolve("/api/v1/docs")
            lines.append(f"  API docs:  {url}/api/v1/docs")
        except Resolver404:
            pass  # the API is not mounted yet
        return "\n".join(lines) + "\n"
