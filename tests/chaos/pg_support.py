"""A Postgres of a fault test's own, and the environment of server processes that use it.

``PostgresServer`` runs ``initdb`` in a fresh directory and serves it on a free port of 127.0.0.1
(never the machine's shared Postgres): ``pause``/``resume`` stop and continue every process of the
cluster (SIGSTOP/SIGCONT to the postmaster and every backend: the sockets stay open, nothing
answers, as a frozen host or a stalled disk would look), ``restart`` stops it with a fast shutdown
(every connection is cut) and starts it again on the same port with its data.

Postgres refuses to run as root: under root the cluster runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.servers import (
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Started,
    end_process,
    free_port,
    log_tail,
    wait_listening,
)

DATABASE = "notify"
SERVER_USER = "postgres"  # who runs the cluster when the tests run as root


def _binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    assert on_path, "no Postgres server binaries: install postgresql (initdb, postgres)"
    return Path(on_path).parent


class PostgresServer(Started):
    """A Postgres cluster of the test's own on a free port (see the module docstring)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bin = _binaries()
        self.directory = Path(tempfile.mkdtemp(prefix="notify-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._user = SERVER_USER if os.geteuid() == 0 else None
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *argv: str) -> None:
        done = subprocess.run(  # noqa: S603  (our own argv, no shell)
            argv, user=self._user, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, f"{argv[0]} failed:\n{done.stdout}\n{done.stderr}"

    def start(self) -> None:
        """initdb on the first start, then serve; return once it accepts connections and the
        database ``notify`` exists."""
        first = not self.data.exists()
        if first:
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "--no-sync", "-E", "UTF8",
            )  # fmt: skip
        argv = [
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.directory}",
            "-c", "fsync=off", "-c", "max_connections=60",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603  (our own argv, no shell)
                argv, user=self._user, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the test's terminal is not for it
            )  # fmt: skip
        wait_listening(self.port, self.proc, "postgres", self.log)
        self._wait_ready()
        if first:
            self.execute(f'CREATE DATABASE "{DATABASE}"', database="postgres")

    def _wait_ready(self) -> None:
        """Listening comes before accepting sessions (start-up, recovery after a restart):
        poll pg_isready (0 = accepting, 1 = rejecting while starting) until it says so."""
        argv = [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t", "5"]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while subprocess.run(argv, capture_output=True, check=False).returncode != 0:  # noqa: S603
            assert time.monotonic() < deadline, f"postgres not ready:\n{log_tail(self.log)}"
            time.sleep(0.1)  # polling: nothing to wait on for "accepting sessions"

    def execute(self, sql: str, params: tuple = (), database: str = DATABASE) -> list[tuple]:
        """Run one statement (autocommit) on a connection of our own; its rows, if any."""
        import psycopg

        url = f"postgres://postgres@127.0.0.1:{self.port}/{database}"
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def _backends(self) -> list[int]:
        """The postmaster's children (each backend is its own process group leader, so a signal
        to the postmaster's group would miss them)."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        return pids

    def _signal_cluster(self, signum: signal.Signals) -> None:
        """The postmaster first (once stopped it forks no new backend), then every child."""
        os.kill(self.proc.pid, signum)
        for pid in self._backends():
            with contextlib.suppress(ProcessLookupError):  # a backend that just exited
                os.kill(pid, signum)

    def pause(self) -> None:
        """SIGSTOP every process of the cluster (the postmaster first: no new backend starts
        meanwhile): connections stay open, nothing answers."""
        self._signal_cluster(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: the cluster goes on where it stopped."""
        self._signal_cluster(signal.SIGCONT)
        self.paused = False

    def restart(self) -> None:
        """A fast shutdown (SIGINT: every session is cut, nothing lost), then start again."""
        if self.paused:
            self.resume()
        end_process(self.proc, signal.SIGINT)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._signal_cluster(signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        shutil.rmtree(self.directory, ignore_errors=True)


def own_environment(name: str, database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of server processes on a database and Redis of the test's own: this
    process's without pytest's variables, LOG_LEVEL=WARNING, the Redis prefix
    ``<REDIS_PREFIX>-<name>``, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        LOG_LEVEL="WARNING",
        REDIS_PREFIX=f"{os.environ.get('REDIS_PREFIX', 'notify')}-{name}",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        **extra,
    )
    return env
