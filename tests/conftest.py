"""Shared pytest configuration. Keep it small; add fixtures others need here.

``oracle_summary``: tests that compare tlslab with the real CPU store one line
each under their name (how many cases were compared, how many disagreed); the
lines are printed in a "hardware oracle" section at the end of every run, with
or without ``-s``.
"""

from __future__ import annotations

import pytest

_ORACLE_SUMMARY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def oracle_summary(request) -> dict[str, str]:
    return request.config.stash.setdefault(_ORACLE_SUMMARY, {})


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(_ORACLE_SUMMARY, {})
    if lines:
        terminalreporter.section("hardware oracle")
        for name, line in lines.items():
            terminalreporter.write_line(f"{name}: {line}")
