"""The command line notify's server runs with in production (``manage.py serve``'s
``uvicorn_argv``), for the benches that start servers of their own: what they measure is what runs.

It is read in a child process with the server's environment, so the bench itself needs no Django
set-up and no settings of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PRINT_ARGV = """
import json, os, sys
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_project.settings")
django.setup()
from routing_app.management.commands.serve import uvicorn_argv
print(json.dumps(uvicorn_argv("127.0.0.1", int(sys.argv[1]), int(sys.argv[2]))))
"""


def served_argv(env: dict, port: int, workers: int = 1) -> list[str]:
    """``manage.py serve``'s uvicorn command line for 127.0.0.1:``port``, access log off."""
    out = subprocess.run(
        [sys.executable, "-c", _PRINT_ARGV, str(port), str(workers)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [*json.loads(out.strip().splitlines()[-1]), "--no-access-log"]
