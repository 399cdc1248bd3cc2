"""Real server processes for the realtime tests: a database of their own, a redis-server of their
own, and uvicorn run the way production runs it (settings.UVICORN_WS_ARGS).

Not a test module: test_ws_server.py and test_ws_overload.py use it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import httpx
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60  # a cold Django + uvicorn start on a busy 2-core machine

SETUP_SCRIPT = """
import json, os, importlib
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_project.settings")
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0, interactive=False)
from django.contrib.auth import get_user_model
from routing_app.models import ApiKey
User = get_user_model()
oscar = User.objects.create_user("oscar", "oscar@example.com", "pw", is_staff=True)
sam = User.objects.create_user("sam", "sam@example.com", "pw")
key = ApiKey(name="ws-test", scopes=["ingest", "tokens"])
raw = key.set_new_key()
key.save()
print("SETUP " + json.dumps({"oscar": oscar.pk, "sam": sam.pk, "api_key": raw}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, what: str = "server") -> None:
    """Wait until 127.0.0.1:port accepts connections (a readiness probe, not a test timing)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{what} exited with code {proc.returncode}") from None
            assert time.monotonic() < deadline, f"{what} did not listen in {STARTUP_TIMEOUT_S} s"
            time.sleep(0.05)


class RedisServer:
    """A redis-server of the test's own on a free port (the shared one is never touched)."""

    def __init__(self, directory: Path, *config: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.config = config
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.directory), *self.config]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


def fresh_postgres_database(url: str, suffix: str):
    """Create an empty database next to the one in `url`; return its URL and a drop function."""
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/") + suffix
    admin = urlunparse(parsed._replace(path="/postgres"))

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    drop()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunparse(parsed._replace(path="/" + name)), drop


def server_processes_env(tmp_dir: Path, name: str, **extra: str):
    """Environment for server processes of one test module: the test's own, a fresh database
    (Postgres next to DATABASE_URL's, else SQLite in ``tmp_dir``) and a Redis prefix of its own.
    Returns (env, drop) where drop removes the database (None for SQLite)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["LOG_LEVEL"] = "WARNING"
    env["REDIS_PREFIX"] = os.environ.get("REDIS_PREFIX", "notify") + f"-{name}"
    env.update(extra)
    drop = None
    if os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
        env["DATABASE_URL"], drop = fresh_postgres_database(os.environ["DATABASE_URL"], f"_{name}")
    else:
        env.pop("DATABASE_URL", None)
        env["SQLITE_PATH"] = str(tmp_dir / "db.sqlite3")
    return env, drop


def run_setup_script(script: str, env: dict[str, str]) -> dict:
    """Run a Python set-up script in ``env``; return the JSON it prints after ``SETUP ``."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("SETUP "))
    return json.loads(line[len("SETUP ") :])


class ServerDatabase:
    """A fresh database for server processes: Postgres next to DATABASE_URL's, else SQLite."""

    def __init__(self, tmp_dir: Path, suffix: str) -> None:
        self.env: dict[str, str] = {}
        self._drop = None
        url = os.environ.get("DATABASE_URL", "")
        if url.startswith(("postgres://", "postgresql://")):
            self.env["DATABASE_URL"], self._drop = fresh_postgres_database(url, suffix)
        else:
            self.env["DATABASE_URL"] = ""
            self.env["SQLITE_PATH"] = str(tmp_dir / "db.sqlite3")

    def drop(self) -> None:
        if self._drop:
            self._drop()


def server_env(db: ServerDatabase, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(db.env)
    env.update({"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "LOG_LEVEL": "WARNING"})
    env.update(extra)
    return env


def seed(env: dict[str, str]) -> dict:
    """Migrate the server database and create oscar (staff), sam and an API key."""
    done = subprocess.run(
        [sys.executable, "-c", SETUP_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("SETUP "))
    return json.loads(line[len("SETUP ") :])


class ServerProcess:
    """uvicorn serving notify_project.asgi with the production WebSocket options."""

    def __init__(self, env: dict[str, str], log: Path, log_level: str = "warning") -> None:
        self.env = env
        self.log_level = log_level
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "notify_project.asgi:application",
                    "--host=127.0.0.1",
                    f"--port={self.port}",
                    "--lifespan=off",
                    f"--log-level={self.log_level}",
                    "--no-access-log",
                    *settings.UVICORN_WS_ARGS,
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_port(self.port, self.proc, "uvicorn")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def hub_stats(self, api_key: str) -> dict:
        answer = httpx.get(
            f"{self.base}/api/v1/realtime/hub",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def token(self, user_id: int) -> str:
        """A client token the server accepts (same SECRET_KEY: same settings and environment)."""
        from channels_app.tokens import mint

        return mint(user_id).token
