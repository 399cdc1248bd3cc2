"""The two commands behind `make run`: `demo` installs idempotent demo data, `serve` runs every
process the mode needs and stops them all together. `serve` is tested as a real process tree."""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command

from routing_app import demo
from routing_app.management.commands import serve
from routing_app.models import ApiKey, Channel, Delivery, Notification, Route, Topic
from tests.servers import RedisServer, free_port, run_script

READY_TIMEOUT_S = 60  # generous: two cores shared with other test processes
MANAGE = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py")]


# --- demo -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def debug_mode(settings):
    """The demo is for DEBUG (embedded) mode; pytest-django turns DEBUG off."""
    settings.DEBUG = True


@pytest.mark.django_db
def test_demo_installs_admin_key_channels_routes_topics_and_is_idempotent(tmp_path, capsys):
    key_file = tmp_path / "key"
    call_command("demo", key_file=key_file)
    first = capsys.readouterr().out
    raw = key_file.read_text().strip()
    assert f"Admin login: admin / {settings.DEMO_ADMIN_PASSWORD}" in first
    assert raw in first
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(settings.DEMO_ADMIN_PASSWORD)
    assert ApiKey.objects.get(name="demo").hashed_key == hashlib.sha256(raw.encode()).hexdigest()
    assert set(Channel.objects.values_list("kind", flat=True)) == {
        "websocket",
        "phoenix",
        "sse",
        "pubsub",
        "email",
        "sms",
        "webhook",
    }
    assert Channel.objects.get(kind="email").providers.get().url == "console://"
    alerts = Route.objects.get(topic_pattern="alerts.#")
    assert alerts.min_severity == "error" and list(alerts.users.all()) == [admin]
    assert set(Topic.objects.values_list("name", flat=True)) >= {
        "alerts.k8s",
        "reverse_flow:cluster-a",
        "system.health",
    }
    counts = (Notification.objects.count(), Delivery.objects.count(), Route.objects.count())
    assert counts[0] > 0 and counts[1] == 1, "the demo error alert is routed to the admin's email"

    call_command("demo", key_file=key_file)
    again = capsys.readouterr().out
    assert raw in again and "unchanged" in again, "a known key is reused"
    assert (Notification.objects.count(), Delivery.objects.count(), Route.objects.count()) == counts
    assert ApiKey.objects.count() == 1 and get_user_model().objects.count() == 1


@pytest.mark.django_db
def test_demo_makes_a_new_key_when_the_stored_one_no_longer_matches(tmp_path, capsys):
    key_file = tmp_path / "key"
    call_command("demo", key_file=key_file)
    old = key_file.read_text().strip()
    ApiKey.objects.filter(name="demo").update(revoked=True)
    call_command("demo", key_file=key_file)
    new = key_file.read_text().strip()
    assert new != old and new in capsys.readouterr().out
    row = ApiKey.objects.get(name="demo")
    assert not row.revoked and row.hashed_key == ApiKey.hash(new)
    assert key_file.stat().st_mode & 0o077 == 0, "the key file is readable by its owner only"


@pytest.mark.django_db
def test_demo_refuses_the_default_admin_password_when_debug_is_off(tmp_path, settings):
    settings.DEBUG = False
    with pytest.raises(ImproperlyConfigured, match="set DEMO_ADMIN_PASSWORD"):
        call_command("demo", key_file=tmp_path / "key")
    assert not get_user_model().objects.exists()
    settings.DEMO_ADMIN_PASSWORD = "a-long-chosen-password"
    call_command("demo", key_file=tmp_path / "key")
    assert get_user_model().objects.get(username="admin").check_password("a-long-chosen-password")


@pytest.mark.django_db
def test_demo_admin_keeps_the_published_password_only_while_bound_to_loopback(tmp_path, capsys):
    call_command("demo", key_file=tmp_path / "key", host="127.0.0.1")
    out = capsys.readouterr().out
    assert "Admin login: admin / admin  (the published demo password: kept only while bound" in out
    for host in ("localhost", "::1", "[::1]", "127.0.0.2"):
        assert demo.admin_login_for(host).password == "admin", host

    banner = serve.Command().banner("0.0.0.0", 8000, tmp_path / "key")  # noqa: S104
    admin = get_user_model().objects.get(username="admin")
    assert not admin.check_password("admin"), "bound to every address, admin/admin is gone"
    [line] = [x for x in banner.splitlines() if "login: admin / " in x]
    password = line.split("login: admin / ")[1].split()[0]
    assert admin.check_password(password) and len(password) >= 16
    assert "shown this once" in line
    again = serve.Command().banner("0.0.0.0", 8000, tmp_path / "key")  # noqa: S104
    assert password not in again, "the generated password is printed once"
    assert "not the demo password" in again


@pytest.mark.django_db
def test_demo_for_a_public_bind_address_gives_the_admin_a_random_password(tmp_path, capsys):
    call_command("demo", key_file=tmp_path / "key", host="192.0.2.10")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Admin login"))
    password = line.removeprefix("Admin login: admin / ").split()[0]
    assert password != "admin" and "shown this once" in line
    assert get_user_model().objects.get(username="admin").check_password(password)


@pytest.mark.django_db
def test_a_chosen_demo_password_is_kept_on_any_bind_address(tmp_path, capsys, settings):
    settings.DEMO_ADMIN_PASSWORD = "a-long-chosen-password"
    call_command("demo", key_file=tmp_path / "key", host="0.0.0.0")  # noqa: S104
    assert "Admin login: admin / a-long-chosen-password\n" in capsys.readouterr().out
    assert demo.admin_login_for("0.0.0.0").password == "a-long-chosen-password"  # noqa: S104


# --- serve ----------------------------------------------------------------------------------


class Output:
    """Lines of a child's merged stdout/stderr, read on a thread, awaited with a timeout."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, wanted: Callable[[str], bool], timeout: float = READY_TIMEOUT_S) -> str:
        """The first line, seen already or still to come, for which ``wanted`` is true: the
        children (uvicorn, the Celery worker and beat) write in any order, so a line may have
        passed while an earlier wait looked for another one."""
        for line in self.seen:
            if wanted(line):
                return line
        try:
            while True:
                line = self.lines.get(timeout=timeout)
                self.seen.append(line)
                if wanted(line):
                    return line
        except queue.Empty:
            raise AssertionError("not seen; output so far:\n" + "\n".join(self.seen)) from None


def embedded_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(SQLITE_PATH=str(tmp_path / "db.sqlite3"), DEBUG="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture
def start_serve(tmp_path) -> Iterator[Callable[..., tuple[subprocess.Popen, Output]]]:
    started: list[subprocess.Popen] = []

    def start(env: dict[str, str], port: int) -> tuple[subprocess.Popen, Output]:
        process = subprocess.Popen(
            [*MANAGE, "serve", "--port", str(port), "--key-file", str(tmp_path / "key")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(process)
        return process, Output(process)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def pids_from_banner(line: str) -> dict[str, int]:
    return {name.strip(): int(pid) for name, pid in re.findall(r"([a-z ]+) \(pid (\d+)\)", line)}


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_embedded_prints_login_and_key_serves_admin_with_css_and_stops_on_ctrl_c(
    tmp_path, start_serve
):
    env = embedded_env(tmp_path)
    # What `make run` does before `serve`, in one process (each Django start-up costs seconds).
    demo_output = run_script(
        env,
        "from django.core.management import call_command\n"
        "call_command('migrate', verbosity=0)\n"
        f"call_command('demo', '--key-file', {str(tmp_path / 'key')!r})\n",
    )
    raw = (tmp_path / "key").read_text().strip()
    assert raw in demo_output
    port = free_port()
    serve, output = start_serve(env, port)

    output.wait_for(lambda line: line.startswith("notify is running (embedded"))
    assert f"http://127.0.0.1:{port}/" in output.wait_for(lambda line: "URL:" in line)
    assert "login: admin / admin" in output.wait_for(lambda line: "Admin:" in line)
    assert raw in output.wait_for(lambda line: "API key:" in line)
    pids = pids_from_banner(output.wait_for(lambda line: "Processes:" in line))
    assert set(pids) == {"uvicorn"}

    login = httpx.get(f"http://127.0.0.1:{port}/admin/login/")
    assert login.status_code == 200 and "Django site admin" in login.text
    css = httpx.get(f"http://127.0.0.1:{port}/static/admin/css/base.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")

    serve.send_signal(signal.SIGINT)
    assert serve.wait(timeout=READY_TIMEOUT_S) == 0
    assert not is_running(pids["uvicorn"])


@pytest.fixture
def own_redis(tmp_path) -> Iterator[str]:
    """A private redis-server, so this test's Celery worker takes no one else's tasks."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    with RedisServer(tmp_path) as server:
        yield server.url


def test_serve_with_redis_runs_worker_and_beat_and_stops_all_when_one_dies(
    tmp_path, start_serve, own_redis
):
    env = embedded_env(tmp_path, REDIS_URL=own_redis)
    serve, output = start_serve(env, free_port())
    pids = pids_from_banner(output.wait_for(lambda line: "Processes:" in line))
    assert set(pids) == {"uvicorn", "celery worker", "celery beat"}
    output.wait_for(lambda line: "beat: Starting" in line)
    output.wait_for(lambda line: re.search(r"celery@\S+ ready", line) is not None)

    os.kill(pids["uvicorn"], signal.SIGKILL)
    output.wait_for(lambda line: "uvicorn exited with code -9; stopping" in line)
    assert serve.wait(timeout=READY_TIMEOUT_S) != 0
    assert not any(is_running(pid) for pid in pids.values())


def test_serve_refuses_several_workers_without_redis(settings):
    settings.REDIS_URL = ""
    with pytest.raises(CommandError, match="several workers need REDIS_URL"):
        call_command("serve", workers=2, port=free_port())


def test_the_served_application_freezes_what_start_up_made(tmp_path):
    """Full collections skip the ~150,000 objects of start-up (a ~75 ms pause otherwise); in a
    process of its own, as a server's, whose figures thread does not meet this test's database."""
    code = "import gc, notify_project.asgi; print(gc.get_freeze_count())"
    env = {**embedded_env(tmp_path), "DJANGO_SETTINGS_MODULE": "notify_project.settings"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 50_000
