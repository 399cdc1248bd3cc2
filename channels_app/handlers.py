"""What a client's ``request_update`` does, per topic family: a small registry.

A Phoenix client pushes ``request_update`` on a joined topic; the handler registered for the first
pattern matching the topic (patterns as in ``routing_app/topics.py``, e.g. ``reverse_flow:*``)
computes a response. The socket replies ``{"status": "ok", "response": <it>}`` to the asker and,
when the handler was registered with a ``broadcast`` event name, sends the same response as that
event to every client joined on the topic, on every process (``hub.broadcast_event``).

The built-in handler for ``reverse_flow:*`` re-reads the topic's current state from the durable
stream (``stream_reads.current_state``: last seq and latest notifications) and broadcasts it as
``reverse_flow_update``.

Register your own at import time of an app's ``ready()``::

    @handlers.register("deploy:*", broadcast="deploy_update")
    async def deploy_status(request: handlers.UpdateRequest) -> dict:
        return {"state": ...}
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from routing_app import stream_reads
from routing_app.topics import topic_matches, validate_topic_pattern

from .authz import Principal


@dataclass(frozen=True)
class UpdateRequest:
    topic: str
    payload: dict  # what the client pushed with request_update
    principal: Principal  # already allowed to read the topic


Handler = Callable[[UpdateRequest], Awaitable[dict]]


@dataclass(frozen=True)
class Registration:
    pattern: str
    handler: Handler
    broadcast: str | None  # event name sent to every joined client, or None


class NoHandler(LookupError):
    """No handler is registered for this topic's family."""


_registry: list[Registration] = []


def register(pattern: str, broadcast: str | None = None) -> Callable[[Handler], Handler]:
    """Decorator: handle ``request_update`` on topics matching ``pattern``. First match wins;
    registering the same pattern again replaces the earlier handler."""
    validate_topic_pattern(pattern)

    def decorate(handler: Handler) -> Handler:
        _registry[:] = [r for r in _registry if r.pattern != pattern]
        _registry.append(Registration(pattern, handler, broadcast))
        return handler

    return decorate


def unregister(pattern: str) -> None:
    _registry[:] = [r for r in _registry if r.pattern != pattern]


def registration_for(topic: str) -> Registration:
    """The registration handling ``topic``. Raises NoHandler."""
    for registration in _registry:
        if topic_matches(registration.pattern, topic):
            return registration
    raise NoHandler(f"topic {topic!r} has no request_update handler")


@register("reverse_flow:*", broadcast="reverse_flow_update")
async def reverse_flow_state(request: UpdateRequest) -> dict:
    """Built-in: a ``reverse_flow:<name>`` joiner asks for the current state again."""
    return await stream_reads.current_state(request.topic)
