"""The dashboard's view of the realtime edge (``routing_app.dashboard.realtime``): for each
topic, this process's live hub subscribers by transport and who is present (every process).

Registered from ``ChannelsAppConfig.ready``. Called from a sync view: ``async_to_sync`` runs the
gathering on the server's event loop, where the hub lives and reading its registry is safe. A
caller outside a server (a management command, Django's test client) gets its own loop, whose
hub holds nobody: zero subscribers, which is the truth for that process.
"""

from __future__ import annotations

import asyncio

from asgiref.sync import async_to_sync

from routing_app.dashboard.realtime import TopicsRealtime

from .hub import hub
from .presence import PresenceUnavailable, get_presence, users

# The hub's encodings are its transports, by the name the metrics use.
TRANSPORTS = {"plain": "websocket", "phoenix": "phoenix", "sse": "sse"}


def _subscribers() -> dict[str, dict[str, int]]:
    if hub._loop is not asyncio.get_running_loop():
        return {}  # this loop's hub has never been bound: nobody subscribed through it
    out: dict[str, dict[str, int]] = {}
    for name, state in hub._topics.items():
        counts = {TRANSPORTS.get(enc, enc): len(subs) for enc, subs in state.members.items()}
        joining = len(state.joining)
        if joining:
            counts["joining"] = joining
        out[name] = counts
    return out


async def _gather(topics: list[str]) -> TopicsRealtime:
    figures = TopicsRealtime(subscribers=_subscribers())
    presence = get_presence()
    for topic in topics:
        try:
            figures.present[topic] = users(await presence.list(topic))
        except PresenceUnavailable as exc:
            figures.problem = f"presence unavailable: {exc}"
            break
    return figures


def topics_realtime(topics: list[str]) -> TopicsRealtime:
    """See the module docstring."""
    return async_to_sync(_gather)(topics)
