"""Shared pytest configuration. Keep it small; add fixtures others need here.

``oracle_summary``: tests that compare tlslab with the real CPU store one line
each under their name (how many cases were compared, how many disagreed); the
lines are printed in a "hardware oracle" section at the end of every run, with
or without ``-s``.

``debian_rootfs``: the materialised pinned Debian i386 root (``tlslab.rootfs``),
built from cached .debs, never downloading (``tlslab rootfs fetch`` does that);
skips with the reason when it is not fetched, fails instead under ``CI=true``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_ORACLE_SUMMARY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def oracle_summary(request) -> dict[str, str]:
    return request.config.stash.setdefault(_ORACLE_SUMMARY, {})


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    from tlslab.rootfs import RootfsUnavailable, materialise

    try:
        return materialise("debian", fetch=False)
    except RootfsUnavailable as exc:
        reason = f"Debian i386 root unavailable: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(_ORACLE_SUMMARY, {})
    if lines:
        terminalreporter.section("hardware oracle")
        for name, line in lines.items():
            terminalreporter.write_line(f"{name}: {line}")
