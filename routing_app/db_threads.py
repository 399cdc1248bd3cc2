"""The threads async code uses for database work, each holding its own connection.

Why a pool of our own rather than ``sync_to_async``'s defaults: Django's thread-sensitive mode runs
every call on one shared thread (requests would queue behind each other's transactions), and the
event loop's default executor is shared with everything else in the process and has no hook to
clean connections. Here each call:

- runs on one of ``DB_THREADS`` threads (``SQLITE_DB_THREADS`` on SQLite), so at most that many
  transactions (and Postgres connections) per process are in flight;
- starts and ends with ``close_old_connections()`` in that thread, as Django does around a
  request, so a connection broken by a database restart is dropped and the next call reconnects
  (Django's request signals only clean the connection of its own shared sync thread, never ours).

``close_all()`` closes every pool thread's connection (tests, and before dropping a database).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connections

# Concurrent DB calls per process. Enough to overlap network waits on a busy topic, few enough
# that several processes stay well under Postgres's max_connections (default 100).
DB_THREADS = 8
# SQLite (the embedded mode) has one writer at a time anyway, and an in-memory shared-cache
# database (the tests') fails at once on a table lock instead of waiting: one thread there.
SQLITE_DB_THREADS = 1

P = ParamSpec("P")
R = TypeVar("R")

_executor: ThreadPoolExecutor | None = None
_workers = 0
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor, _workers
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                sqlite = connections["default"].vendor == "sqlite"
                _workers = SQLITE_DB_THREADS if sqlite else DB_THREADS
                _executor = ThreadPoolExecutor(max_workers=_workers, thread_name_prefix="notify-db")
    return _executor


def _clean_call(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()


async def run(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn(*args, **kwargs)`` on a pool thread and return its result (or raise its error)."""
    return await sync_to_async(_clean_call, thread_sensitive=False, executor=_pool())(
        fn, *args, **kwargs
    )


def close_all() -> None:
    """Close the database connection of every pool thread (blocks until done).

    As many jobs as the pool has threads each wait at a barrier until all are running, so every
    thread of the pool (started or not yet) takes exactly one of them.
    """
    if _executor is None:
        return  # never used: no connections
    pool = _executor
    barrier = threading.Barrier(_workers)

    def close_mine() -> None:
        barrier.wait(timeout=30)
        connections.close_all()

    for future in [pool.submit(close_mine) for _ in range(_workers)]:
        future.result()
