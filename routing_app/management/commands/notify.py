"""``manage.py notify send|tail|watch``: post a notification, or follow a topic in a terminal.

- ``send --topic T --event E [--data JSON] [--severity S] [--source S]``
- ``tail TOPIC [--since N] [--format text|json]``: the topic's durable stream, read from the
  database (stream_follow.py).
- ``watch TOPIC --url URL [--token T] [--since N] [--format text|json]``: the same from a remote
  server over SSE (stream_watch.py); the token may come from ``NOTIFY_TOKEN`` instead.

tail and watch print one line per notification and run until interrupted: Ctrl-C exits with 130
and a closed pipe (``| head``) with 0, without a traceback, as Unix tools do.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from routing_app.ingest import IngestError
from routing_app.models import SEVERITIES, SOURCES
from routing_app.notify_api import notify
from routing_app.stream_follow import FollowError, Following, Trimmed, follow
from routing_app.stream_watch import Live, Reconnecting, Reset, WatchError, watch
from routing_app.topics import is_valid_topic

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
FORMATS = ("text", "json")


def _since(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


_since.__name__ = "seq (a whole number, 0 or more)"  # argparse names the type in its error


class Command(BaseCommand):
    help = "Send a notification, or follow a topic's notifications in a terminal."

    def add_arguments(self, parser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        send = actions.add_parser("send", help="store and route one notification")
        send.add_argument("--topic", required=True, help="e.g. alerts.k8s or user:42")
        send.add_argument("--event", required=True, help="e.g. pod.crashloop")
        send.add_argument("--data", default="{}", help='a JSON object, e.g. \'{"pod": "web-1"}\'')
        send.add_argument("--severity", default="info", choices=SEVERITIES)
        send.add_argument("--source", default="system", choices=SOURCES)
        send.add_argument("--idempotency-key", default=None)

        tail = actions.add_parser("tail", help="follow a topic's stored and new notifications")
        watch = actions.add_parser("watch", help="follow a topic on a remote server over SSE")
        for follower in (tail, watch):
            follower.add_argument("topic", help="e.g. alerts.k8s")
            follower.add_argument(
                "--since",
                type=_since,
                default=None,
                help="print the notifications after this seq first (0: all stored); "
                "default: only new ones",
            )
            follower.add_argument(
                "--format",
                choices=FORMATS,
                default="text",
                help="text: one readable line each; json: the envelope, one object per line",
            )
        watch.add_argument("--url", required=True, help="the server, e.g. https://notify.example")
        watch.add_argument(
            "--token",
            default=None,
            help="a client token (POST /api/v1/tokens); default: $NOTIFY_TOKEN",
        )

    def handle(self, *args, **options) -> None:
        action = options["action"]
        if action == "send":
            self._send(options)
            return
        topic = options["topic"]
        if not is_valid_topic(topic):
            raise CommandError(f"{topic!r} is not a valid topic name, e.g. alerts.k8s or user:42")
        if action == "tail":
            items = follow(topic, options["since"])
        else:
            token = options["token"] or settings.NOTIFY_TOKEN or None
            items = watch(options["url"], topic, token, options["since"])
        self._print_stream(items, options["format"])

    def _send(self, options: dict) -> None:
        try:
            data = json.loads(options["data"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--data is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CommandError('--data must be a JSON object, e.g. \'{"key": "value"}\'')
        try:
            result = notify(
                options["topic"],
                options["event"],
                data,
                severity=options["severity"],
                source=options["source"],
                idempotency_key=options["idempotency_key"],
            )
        except IngestError as exc:
            raise CommandError(str(exc)) from None
        state = "stored" if result.created else "already stored (same idempotency key)"
        self.stdout.write(f"{state}: topic {result.topic} seq {result.seq} id {result.id}")

    def _print_stream(self, items: Iterable, fmt: str) -> None:
        """One line per notification on stdout (flushed at once: a pipe to jq sees each line as
        it comes), notes on stderr, until Ctrl-C or a closed stdout."""
        try:
            for item in items:
                if isinstance(item, dict):
                    self.stdout.write(format_line(item, fmt))
                    self.stdout.flush()
                else:
                    # Styled before the line ends: the colour must not run into the next line.
                    note = self.style.WARNING(f"notify: {describe(item)}")
                    self.stderr.write(note, style_func=_as_is)
                    self.stderr.flush()
        except (FollowError, WatchError) as exc:
            raise CommandError(str(exc)) from None
        except KeyboardInterrupt:
            raise SystemExit(INTERRUPTED_EXIT) from None
        except BrokenPipeError:
            # The reader left (``| head``): done. Point stdout at /dev/null so that flushing it
            # at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None


def _as_is(text: str) -> str:
    return text


def format_line(envelope: dict, fmt: str) -> str:
    """``json``: the envelope as compact JSON. ``text``: time (UTC), topic, seq, severity, event
    and data, e.g. ``2026-12-04T19:00:01Z alerts.k8s #42 error pod.crash {"pod":"api-7d9f"}``."""
    if fmt == "json":
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
    when = datetime.fromisoformat(envelope["ts"]).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    data = json.dumps(envelope["data"], separators=(",", ":"), ensure_ascii=False)
    fields = (when, envelope["topic"], f"#{envelope['seq']}", envelope["severity"])
    return " ".join((*fields, envelope["event"], data))


def describe(item: Following | Trimmed | Live | Reset | Reconnecting) -> str:
    """A note for stderr on what happens to the stream."""
    if isinstance(item, Following):
        return f"following {item.topic} after seq {item.after_seq} (Ctrl-C to stop)"
    if isinstance(item, Live):
        return f"connected; live after seq {item.last_seq} (Ctrl-C to stop)"
    if isinstance(item, Trimmed):
        return f"seqs {item.first}-{item.last} are no longer stored (retention); skipped"
    if isinstance(item, Reset):
        return (
            f"seq {item.since} can no longer be resumed (oldest kept: {item.oldest_seq}); "
            f"continuing after seq {item.last_seq}"
        )
    return f"{item.reason}; reconnecting in {item.delay_s:.1f} s"
