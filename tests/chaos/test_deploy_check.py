"""``manage.py check --deploy`` is clean with the production settings .env.example documents, and
names what is missing without them."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys

import pytest

from tests.chaos.report import record
from tests.servers import ROOT

pytestmark = pytest.mark.timeout(120)

CHECK_TIMEOUT_S = 90  # one Django start on a busy 2-core machine


def documented_production_environment() -> dict[str, str]:
    """The uncommented ``DEBUG``, ``ALLOWED_HOSTS`` and ``SECURE_*`` lines of .env.example, and a
    fresh random SECRET_KEY (the example's is a placeholder)."""
    example = (ROOT / ".env.example").read_text()
    found = dict(re.findall(r"^((?:DEBUG|ALLOWED_HOSTS|SECURE_[A-Z_]+))=(.*)$", example, re.M))
    assert found.get("DEBUG") == "false", "the example is of a production set-up"
    return {**found, "SECRET_KEY": secrets.token_urlsafe(50)}


def check_deploy(extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "SECURE_"))}
    env.update({"DEBUG": "false", **extra})
    return subprocess.run(  # noqa: S603  (our own command line, no shell)
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        check=False,
    )


def test_check_deploy_is_clean_with_the_documented_production_environment():
    documented = documented_production_environment()
    done = check_deploy(documented)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout
    without_https = {k: v for k, v in documented.items() if not k.startswith("SECURE_")}
    bare = check_deploy(without_https)
    warnings = sorted(set(re.findall(r"security\.W\d+", bare.stdout + bare.stderr)))
    # Only the opt-in ones remain: HSTS and the redirect; cookies are secure once DEBUG is off.
    assert warnings == ["security.W004", "security.W008"], bare.stdout + bare.stderr
    record(
        "check --deploy",
        variables_set=len(documented),
        issues_with_them=0,
        issues_without_the_https_ones=len(warnings),
    )
