"""The signing key: set by SECRET_KEY, or made at random once and kept in a gitignored file by the
embedded default; never a constant in the code, and required when DEBUG is off."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core import signing

from channels_app import tokens
from tests.servers import ROOT, python_argv

# The signing key the embedded default once had, as a constant in its published settings.
FORMERLY_PUBLISHED_KEY = "insecure-dev-only-key-do-not-use-in-production"  # noqa: S105
PRINT_KEY = "from django.conf import settings; print(settings.SECRET_KEY)"


def settings_process(**env: str) -> subprocess.CompletedProcess:
    """Load the settings in a fresh Python with ``env`` (no SECRET_KEY unless given) and print
    the signing key."""
    base = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "SECRET_KEY_FILE")}
    return subprocess.run(  # noqa: S603  (our own script, no shell)
        python_argv(PRINT_KEY),
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_token_signed_offline_with_the_formerly_published_key_is_refused():
    forged = signing.dumps(
        {"u": 1, "e": int(time.time()) + 3600}, key=FORMERLY_PUBLISHED_KEY, salt=tokens.SALT
    )
    assert settings.SECRET_KEY != FORMERLY_PUBLISHED_KEY
    with pytest.raises(tokens.TokenError, match="signature is invalid"):
        tokens.verify(forged)


def test_no_signing_key_is_written_in_the_settings():
    source = (Path(settings.BASE_DIR) / "notify_project" / "settings.py").read_text()
    assert settings.SECRET_KEY not in source
    assert FORMERLY_PUBLISHED_KEY not in source


def test_without_secret_key_a_random_key_is_made_once_and_kept_owner_only(tmp_path):
    key_file = tmp_path / "secret-key"
    first = settings_process(DEBUG="true", SECRET_KEY_FILE=str(key_file))
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip()
    assert len(key) >= 50 and key_file.read_text().strip() == key
    assert key_file.stat().st_mode & 0o077 == 0, "the key file is readable by its owner only"
    again = settings_process(DEBUG="true", SECRET_KEY_FILE=str(key_file))
    assert again.stdout.strip() == key, "every process of the checkout signs with the same key"
    other = settings_process(DEBUG="true", SECRET_KEY_FILE=str(tmp_path / "elsewhere"))
    assert other.stdout.strip() not in ("", key), "another checkout gets a key of its own"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["elsewhere", "secret-key"], "no draft file is left behind"


def test_the_key_file_is_gitignored():
    ignored = subprocess.run(  # noqa: S603, S607  (git, our own arguments)
        ["git", "check-ignore", "-q", str(settings.SECRET_KEY_FILE)], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, f"{settings.SECRET_KEY_FILE} must be in .gitignore"


def test_secret_key_from_the_environment_is_used_and_no_file_is_made(tmp_path):
    key_file = tmp_path / "secret-key"
    done = settings_process(
        DEBUG="true", SECRET_KEY="set-by-the-operator-" + "x" * 40, SECRET_KEY_FILE=str(key_file)
    )
    assert done.stdout.strip() == "set-by-the-operator-" + "x" * 40, done.stderr
    assert not key_file.exists()


def test_debug_off_without_secret_key_refuses_to_start_and_says_how_to_fix_it(tmp_path):
    key_file = tmp_path / "secret-key"
    done = settings_process(DEBUG="false", SECRET_KEY_FILE=str(key_file))
    assert done.returncode != 0
    assert "SECRET_KEY is not set and DEBUG is off: set SECRET_KEY" in done.stderr
    assert not key_file.exists(), "production never falls back to a local key"


def test_an_unwritable_key_file_place_is_refused_with_how_to_fix_it(tmp_path):
    done = settings_process(DEBUG="true", SECRET_KEY_FILE=str(tmp_path / "missing" / "key"))
    assert done.returncode != 0
    assert "cannot keep a signing key in" in done.stderr and "set SECRET_KEY" in done.stderr
