"""What the realtime edge shows the topics page: its per-process subscriber counts by transport
and who is present. The edge registers a view at start-up (``register_realtime_view``, from its
``AppConfig.ready``), as it registers the router's publisher: routing_app never imports it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class TopicsRealtime:
    """``subscribers[topic][transport]``: live subscribers held by the process that answered
    (each server process has its own). ``present[topic]``: presence users (every process), each
    ``{"key", "user_id", "username", "connections", "online_at"}``. ``problem``: why a part is
    missing (the presence backend unreachable, no realtime edge installed), or ''."""

    subscribers: dict[str, dict[str, int]] = field(default_factory=dict)
    present: dict[str, list[dict]] = field(default_factory=dict)
    problem: str = ""


RealtimeView = Callable[[list[str]], TopicsRealtime]
_view: RealtimeView | None = None


def register_realtime_view(view: RealtimeView) -> None:
    """Make ``view(topics)`` the source of the topics page's realtime figures (one per process)."""
    global _view
    _view = view


def topics_realtime(topics: list[str]) -> TopicsRealtime:
    """The realtime figures of ``topics``; never raises (a failure becomes ``problem``)."""
    if _view is None:
        return TopicsRealtime(problem="no realtime edge in this process")
    try:
        return _view(topics)
    except Exception as exc:  # noqa: BLE001  (degrade: the page shows the rest)
        log.warning("dashboard: realtime figures unavailable: %s", exc)
        return TopicsRealtime(problem=f"realtime figures unavailable: {exc}")
