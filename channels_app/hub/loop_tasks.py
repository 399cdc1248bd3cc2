"""Handing work to the hub's event loop from any thread, and stopping the hub's tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def call_in_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[[Any], None], arg) -> None:
    """``fn(arg)`` now when called in ``loop``'s thread, else soon in ``loop`` (thread-safe).
    A no-op when no loop runs or it has closed: then nobody in this process is listening."""
    if loop is None or loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(arg)
        return
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:  # the loop closed meanwhile: nobody to deliver to
        return


async def cancel_all(tasks: set[asyncio.Task]) -> None:
    """Cancel ``tasks`` and wait until each has ended."""
    for task in list(tasks):
        task.cancel()
    for task in list(tasks):
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001, S110
            pass  # shutting down: a task's last error no longer matters
