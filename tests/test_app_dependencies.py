"""Dependencies between the apps run one way: channels_app -> routing_app, never back (DESIGN.md).

Every module of routing_app (migrations and management commands included) is read as source, so an
import inside a function counts as much as one at the top, and so do dotted paths handed to
``importlib.import_module``, Django's ``import_string`` and ``__import__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = "channels_app"
# Callables that import the module named by their first argument.
IMPORTING_CALLS = {"import_module", "import_string", "__import__"}


def _names_forbidden(dotted: str | None) -> bool:
    return dotted is not None and (dotted == FORBIDDEN or dotted.startswith(FORBIDDEN + "."))


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def forbidden_imports(source: str) -> list[int]:
    """Line numbers in ``source`` that import channels_app, in any of the forms above."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found = any(_names_forbidden(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found = node.level == 0 and _names_forbidden(node.module)
        elif isinstance(node, ast.Call) and _called_name(node) in IMPORTING_CALLS and node.args:
            first = node.args[0]
            found = isinstance(first, ast.Constant) and isinstance(first.value, str)
            found = found and _names_forbidden(first.value)
        else:
            continue
        if found:
            lines.append(node.lineno)
    return sorted(lines)


def test_no_module_of_routing_app_imports_channels_app():
    modules = sorted((ROOT / "routing_app").rglob("*.py"))
    assert any("migrations" in path.parts for path in modules)
    assert any("commands" in path.parts for path in modules)
    found = [
        f"{path.relative_to(ROOT)}:{line}: {source.splitlines()[line - 1].strip()}"
        for path in modules
        for source in [path.read_text()]
        for line in forbidden_imports(source)
    ]
    assert found == [], "routing_app must not import channels_app:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import channels_app",
        "import channels_app.hub as hub",
        "import os, channels_app.sse",
        "from channels_app import fanout",
        "from channels_app.hub import hub",
        "def publish():\n    from channels_app import fanout\n",
        "importlib.import_module('channels_app.fanout')",
        "from importlib import import_module\nimport_module('channels_app')",
        "import_string('channels_app.presence.RedisPresence')",
        "__import__('channels_app.hub')",
    ],
)
def test_the_check_finds_each_form_of_importing_channels_app(source):
    assert forbidden_imports(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import channels_apps",
        "from . import channels_app",
        "from routing_app import router",
        "import_string('routing_app.transports.email.EmailTransport')",
        "x = 'channels_app.hub'",
    ],
)
def test_the_check_leaves_other_imports_alone(source):
    assert forbidden_imports(source) == []
