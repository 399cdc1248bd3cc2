"""Figures of the chaos, fuzz and abuse suites: each test states what it injected and what came out.

`record(name, **figures)` keeps one line per test; the suite prints them all at the end of the run
(see conftest.py) and, when ``CHAOS_REPORT`` names a file, appends them there as JSON lines, which
is where docs/guarantees.md takes the figures of the last run from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RECORDED: list[tuple[str, dict[str, object]]] = []


def record(name: str, **figures: object) -> None:
    """Keep one test's figures, e.g. ``record("redis killed", faults=1, published=500, lost=0)``."""
    RECORDED.append((name, figures))
    target = os.environ.get("CHAOS_REPORT")
    if target:
        with Path(target).open("a", encoding="utf-8") as out:
            out.write(json.dumps({"test": name, **figures}, default=str) + "\n")


def lines() -> list[str]:
    return [
        f"{name}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in found.items())
        for name, found in RECORDED
    ]
