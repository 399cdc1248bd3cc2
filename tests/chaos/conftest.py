"""The chaos suite prints the figures each of its tests recorded (tests/chaos/report.py)."""

from __future__ import annotations

from tests.chaos import report


def pytest_terminal_summary(terminalreporter) -> None:
    if report.RECORDED:
        terminalreporter.section("chaos, fuzz and abuse figures")
        for line in report.lines():
            terminalreporter.write_line(line)
