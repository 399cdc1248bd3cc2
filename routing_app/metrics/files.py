"""The multiprocess files of this host's processes, one directory per role under
``METRICS_DIR`` (``web/``, ``worker/``, ...; settings points ``PROMETHEUS_MULTIPROC_DIR`` at this
process's), and the collector that sums all of them.

A role's directory is wiped when a new run of that role starts, never while its processes live:
each process compares a marker in the directory with its parent process (uvicorn's or Celery's
main process, or the shell that started a single process), under a file lock, so the workers of
one run share the directory and the next run starts from zero. Counters of a process that ended
stay (a counter must not go backwards); live gauges of a process that is gone, even one killed
with SIGKILL, are skipped and their files removed (``mark_process_dead``).
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
from collections.abc import Iterable

from django.conf import settings
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MARKER = ".run"


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (the first is the state, so
    field N of proc(5) is index N - 3); [] when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot), or '' when it is gone."""
    fields = stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""


def prepare() -> str:
    """Make this process's directory ready; wipe it when this process starts a new run of its
    role. Returns the directory."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    parent = os.getppid()
    run = f"{parent}:{_start_time(parent)}"
    with open(os.path.join(settings.METRICS_DIR, f".{settings.METRICS_ROLE}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = os.path.join(directory, MARKER)
        try:
            with open(marker) as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != run:
            shutil.rmtree(directory, ignore_errors=True)
            os.makedirs(directory, exist_ok=True)
            with open(marker, "w") as f:
                f.write(run)
    return directory


def role_directories() -> dict[str, str]:
    """role -> directory, for every role that has one on this host."""
    base = settings.METRICS_DIR
    if not os.path.isdir(base):
        return {}
    return {
        name: os.path.join(base, name)
        for name in sorted(os.listdir(base))
        if not name.startswith(".") and os.path.isdir(os.path.join(base, name))
    }


def _pid_of(path: str) -> int:
    return int(os.path.basename(path).rsplit("_", 1)[1].removesuffix(".db"))


def _alive(pid: int) -> bool:
    return bool(_start_time(pid))


def live_pids(directory: str) -> set[int]:
    """The processes with files in ``directory`` that are still running."""
    return {pid for pid in map(_pid_of, glob.glob(os.path.join(directory, "*.db"))) if _alive(pid)}


def current_files() -> list[str]:
    """Every role's files, minus the live gauges of processes that are gone (removed)."""
    files = []
    for directory in role_directories().values():
        for path in glob.glob(os.path.join(directory, "*.db")):
            name = os.path.basename(path)
            if name.startswith("gauge_live") and not _alive(_pid_of(path)):
                mark_process_dead(_pid_of(path), directory)
                continue
            files.append(path)
    return files


class HostCollector:
    """Every process's metrics on this host, summed, as one collector (``/metrics``)."""

    def collect(self) -> Iterable:
        return MultiProcessCollector.merge(current_files(), accumulate=True)
