"""``manage.py notify tail`` and ``notify watch`` run as a user runs them: in a terminal (a
pseudo-terminal, where Ctrl-C is the \\x03 the terminal turns into SIGINT) or into a pipe, against
one real server whose database tail reads and whose SSE endpoint watch reads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.core.management import CommandError, call_command
from ptyprocess import PtyProcess

from tests.servers import ROOT, WAIT_S, Inbox, NotifyServer, seeded_server

INTERRUPTED_EXIT = 130
# The text format: time, topic, #seq, severity, event, data.
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (\S+) #(\d+) (\S+) (\S+) (.*)$")


@dataclass
class Server:
    process: NotifyServer
    setup: dict

    @property
    def env(self) -> dict[str, str]:
        return self.process.env

    def post(self, topic: str, event: str, data: dict | None = None) -> int:
        return self.process.post(self.setup["api_key"], topic, event, data or {})


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with seeded_server(tmp_path_factory.mktemp("tail"), "tail") as (process, setup):
        yield Server(process, setup)


def notify_argv(*args: str) -> list[str]:
    return [sys.executable, "manage.py", "notify", *args]


class Terminal:
    """A command in a pseudo-terminal; the lines it shows (stdout and stderr, as a user sees
    them) arrive in ``lines``."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = PtyProcess.spawn(argv, cwd=str(ROOT), env=env, dimensions=(24, 250))
        self.lines: Inbox[str] = Inbox("terminal lines")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        partial = ""
        while True:
            try:
                chunk = self.proc.read(4096).decode(errors="replace")
            except EOFError:
                break
            *complete, partial = (partial + chunk).replace("\r\n", "\n").split("\n")
            for line in complete:
                self.lines.put(line)
        if partial:
            self.lines.put(partial)
        self.lines.close()

    def wait_line(self, text: str) -> str:
        return self.lines.first(lambda line: text in line)

    def seqs(self) -> list[int]:
        """The seqs of the notification lines shown so far, in order."""
        return [int(m[2]) for line in self.lines.items if (m := TEXT_LINE.match(line))]

    def ctrl_c(self) -> int | None:
        """Type Ctrl-C; return the exit code once the command has ended and its output is in."""
        self.proc.write(b"\x03")
        self.proc.wait()
        self._reader.join(WAIT_S)
        return self.proc.exitstatus

    def output(self) -> str:
        return "\n".join(self.lines.items)

    def close(self) -> None:
        if self.proc.isalive():
            self.proc.terminate(force=True)


@pytest.fixture
def terminal() -> Iterator:
    opened: list[Terminal] = []

    def start(*args: str, env: dict[str, str]) -> Terminal:
        opened.append(Terminal(notify_argv(*args), env))
        return opened[-1]

    yield start
    for term in opened:
        term.close()


# --- tail -----------------------------------------------------------------------------------


def test_tail_prints_only_new_notifications_in_order_and_ends_on_ctrl_c(server, terminal):
    server.post("tail.term", "old", {"n": 1})
    server.post("tail.term", "old", {"n": 2})

    tail = terminal("tail", "tail.term", env=server.env)
    tail.wait_line("following tail.term after seq 2")
    server.post("tail.term", "pod.crash", {"pod": "api-7d9f"})
    server.post("tail.term", "pod.ok", {"n": 4})
    line = tail.wait_line("#4 ")

    assert TEXT_LINE.match(line).groups() == ("tail.term", "4", "info", "pod.ok", '{"n":4}')
    assert tail.ctrl_c() == INTERRUPTED_EXIT
    assert tail.seqs() == [3, 4]
    assert "pod.crash" in tail.output() and "old" not in tail.output()
    assert "Traceback" not in tail.output()


def test_tail_without_redis_replays_after_since_follows_as_json_and_ends_at_a_closed_pipe(server):
    """Without REDIS_URL (as in the embedded mode) the tail hears no wake-up: it reads the stream
    at intervals, and still prints each notification once, in order."""
    for n in range(1, 4):
        server.post("tail.pipe", "tick", {"n": n})
    tail = subprocess.Popen(
        notify_argv("tail", "tail.pipe", "--since", "1", "--format", "json"),
        cwd=ROOT,
        env={**server.env, "REDIS_URL": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        replayed = [json.loads(tail.stdout.readline()) for _ in range(2)]
        server.post("tail.pipe", "tick", {"n": 4})
        live = json.loads(tail.stdout.readline())
        tail.stdout.close()  # the reader leaves, as `| head -3` does
        server.post("tail.pipe", "tick", {"n": 5})  # the next write meets the closed pipe
        code = tail.wait(WAIT_S)
        errors = tail.stderr.read()
    finally:
        tail.kill()
        tail.wait()

    assert [(e["seq"], e["data"]) for e in [*replayed, live]] == [
        (2, {"n": 2}),
        (3, {"n": 3}),
        (4, {"n": 4}),
    ]
    assert set(live) == {"type", "topic", "seq", "id", "event", "data", "severity", "source", "ts"}
    assert code == 0
    assert "following tail.pipe after seq 1" in errors and "Traceback" not in errors


# --- watch ----------------------------------------------------------------------------------


def test_watch_resumes_after_the_server_restarts_without_losing_or_repeating(server, terminal):
    server.post("watch.term", "deploy", {"n": 1})
    env = {**server.env, "NOTIFY_TOKEN": server.setup["tokens"]["sam"]}  # no --token needed
    watch = terminal("watch", "watch.term", "--url", server.process.base, "--since", "0", env=env)
    watch.wait_line("live after seq 1")
    server.post("watch.term", "deploy", {"n": 2})
    watch.wait_line("#2 ")

    server.process.kill()
    watch.wait_line("reconnecting")
    # Committed while the watcher is disconnected: it must come with the resume.
    sent = subprocess.run(
        notify_argv("send", "--topic", "watch.term", "--event", "deploy", "--data", '{"n":3}'),
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    server.process.start()
    watch.wait_line("#3 ")
    watch.wait_line("live after seq 3")
    server.post("watch.term", "deploy", {"n": 4})
    watch.wait_line("#4 ")

    assert watch.ctrl_c() == INTERRUPTED_EXIT
    assert watch.seqs() == [1, 2, 3, 4]
    assert "Traceback" not in watch.output()


@pytest.mark.parametrize(
    ("path", "token_suffix", "says"),
    [
        ("", "x", ["401", "token"]),
        ("/nothing", "", ["404", "--url"]),
    ],
    ids=["forged token", "not a notify server's base URL"],
)
def test_watch_refusals_say_what_is_wrong_and_end(server, path, token_suffix, says):
    token = server.setup["tokens"]["sam"] + token_suffix
    url = server.process.base + path
    with pytest.raises(CommandError) as refused:
        call_command("notify", "watch", "alerts.k8s", "--url", url, "--token", token)
    assert all(part in str(refused.value) for part in says), refused.value
    assert token not in str(refused.value)
