"""The README and .env.example document every environment variable settings.py reads."""

from __future__ import annotations

import re
from pathlib import Path

from django.conf import settings

ROOT = Path(settings.BASE_DIR)


def variables_read_by_settings() -> set[str]:
    source = (ROOT / "notify_project" / "settings.py").read_text()
    return set(re.findall(r'env_(?:str|bool|int|list)\(\s*"([A-Z0-9_]+)"', source))


def test_every_environment_variable_is_in_readme_table_and_env_example():
    names = variables_read_by_settings()
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY"} <= names
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()
    assert sorted(n for n in names if f"| `{n}` |" not in readme) == []
    assert sorted(n for n in names if not re.search(rf"^(# )?{n}=", example, re.M)) == []


def test_readme_opens_with_the_two_commands():
    first_block = (ROOT / "README.md").read_text().split("```")[1]
    assert "make run" in first_block and "make test" in first_block
