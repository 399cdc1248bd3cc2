"""Routing: sources -> router -> channels.

Kept import-light (Django imports it before apps are ready): ``notify`` and ``anotify`` load
``routing_app.notify_api`` on first use.
"""

_LAZY = {"notify", "anotify"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import notify_api

        return getattr(notify_api, name)
    raise AttributeError(f"module 'routing_app' has no attribute {name!r}")
