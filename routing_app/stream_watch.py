"""Following a topic on a remote notify server over its SSE endpoint (``manage.py notify watch``):
the HTTP counterpart of stream_follow.py, for a machine without access to the database.

Protocol: https://html.spec.whatwg.org/multipage/server-sent-events.html, as served by
channels_app/sse.py (``/events/<topic>/``; its docstring gives every event). Parsing is
httpx-sse's. Like a browser's EventSource this reconnects after a lost connection or a
``stream-error`` (waiting ``retry``, else a growing backoff) and resumes with ``Last-Event-ID``:
the last seq received, or the ``last_seq`` of the ``subscribed`` event when nothing came yet, so
nothing committed while disconnected is missed; a seq already yielded is never yielded again.
A refusal (401, 403, 404, 400) is final, as for EventSource, and raised with the server's reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, SSEError

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 90  # well above the server's keep-alive (SSE_KEEPALIVE_S, 15 s by default)
BACKOFF_S = (0.5, 30.0)  # first and longest wait before reconnecting
BACKOFF_FACTOR = 1.5  # a server restart (a few seconds) is met within about a second of it
FINAL_STATUSES = {
    400: "check the topic name and --since",
    401: "the token is missing, forged or expired: get a new one with POST /api/v1/tokens",
    403: "this token's user may not read the topic",
    404: "no notify event stream at this URL: check --url (the server's base URL)",
}


class WatchError(Exception):
    """The server refused the stream for good (the message says why and what to do)."""


@dataclass(frozen=True)
class Reset:
    """The resume point ``since`` is no longer kept (or is ahead of the stream): the stream goes
    on after ``last_seq``; seqs in between are not replayed."""

    since: int
    oldest_seq: int | None
    last_seq: int


@dataclass(frozen=True)
class Live:
    """The stream is open and live (after each connect): what follows comes as it is committed."""

    last_seq: int


@dataclass(frozen=True)
class Reconnecting:
    """The connection was lost (``reason``); the next attempt starts in ``delay_s``."""

    reason: str
    delay_s: float


def events_url(base_url: str, topic: str) -> str:
    return f"{base_url.rstrip('/')}/events/{quote(topic, safe='')}/"


def watch(
    base_url: str, topic: str, token: str | None, since: int | None = None
) -> Iterator[dict | Reset | Live | Reconnecting]:
    """Yield ``topic``'s notifications (the envelope of each, in seq order, each once) from the
    server at ``base_url``: those stored after ``since`` (None: only new ones), then live ones,
    forever. ``Reset``, ``Live`` and ``Reconnecting`` say what happened to the stream on the way.

    Raises WatchError when the server refuses the stream (bad token, topic not allowed, no such
    endpoint), never for a lost connection or a server that is down (those are retried).
    """
    url = events_url(base_url, topic)
    params = {"token": token} if token else {}
    timeout = httpx.Timeout(CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S)
    cursor = since
    delay = BACKOFF_S[0]
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
            if cursor is not None:
                headers["Last-Event-ID"] = str(cursor)
            retry_ms = None
            try:
                with client.stream("GET", url, params=params, headers=headers) as response:
                    _check(response)
                    for sse in EventSource(response).iter_sse():
                        delay = BACKOFF_S[0]  # the server answers: the next wait starts short
                        retry_ms = sse.retry if sse.retry is not None else retry_ms
                        item, cursor = _read(sse, cursor)
                        if item is not None:
                            yield item
                reason = "the server ended the stream"
            except (httpx.TransportError, SSEError) as exc:
                reason = _describe(exc)
            except _ServerTrouble as exc:
                reason = str(exc)
            wait = retry_ms / 1000 if retry_ms is not None else delay
            yield Reconnecting(reason, wait)
            time.sleep(wait)
            delay = min(delay * BACKOFF_FACTOR, BACKOFF_S[1])


class _ServerTrouble(Exception):
    """An answer worth retrying (5xx, 429): the server or a proxy in front of it is in trouble."""


def _check(response: httpx.Response) -> None:
    status = response.status_code
    if status in FINAL_STATUSES:
        response.read()
        detail = _detail(response)
        reason = f"{status}, {detail}" if detail else str(status)
        raise WatchError(f"the server refused the stream ({reason}): {FINAL_STATUSES[status]}")
    if status >= 500 or status == 429:
        raise _ServerTrouble(f"the server answered {status}")
    if status != 200:
        raise WatchError(f"the server answered {status}: is --url a notify server?")
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise WatchError(f"the server answered {content_type!r}, not an event stream: check --url")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return ""


def _read(sse, cursor: int | None) -> tuple[dict | Reset | Live | None, int | None]:
    """What one event means for the caller, and the new resume point."""
    if sse.event in ("subscribed", "reset", "stream-error") or sse.id:
        data = json.loads(sse.data)
    else:
        return None, cursor  # ephemeral topic events: not part of the durable stream
    kind = data.get("type")
    if kind == "notification":
        if cursor is not None and data["seq"] <= cursor:
            return None, cursor  # already yielded before a reconnect
        return data, data["seq"]
    if kind == "reset":
        return Reset(data["since"], data.get("oldest_seq"), data["last_seq"]), data["last_seq"]
    if kind == "subscribed":  # live from here: a reconnect resumes after it at the latest
        return Live(data["last_seq"]), data["last_seq"] if cursor is None else cursor
    if kind == "error":
        raise _ServerTrouble(f"{data.get('code')}: {data.get('message')}")
    return None, cursor


def _describe(exc: Exception) -> str:
    """A lost connection in words, without the URL (whose query carries the token)."""
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect to the server"
    if isinstance(exc, httpx.TimeoutException):
        return "the server stopped answering"
    return f"the connection was lost ({type(exc).__name__})"
