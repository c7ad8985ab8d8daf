"""`tlslab report` and `tlslab export`: figures, HTML (checked in headless Chromium), CSV."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import unavailable

from benchkit import TINY

from tlslab.cli import main

SPEC = f"""
name = "report-test"
strategies = ["native", "emulate", "flip", "flip-full", "emulate-2004"]
variants = ["default", "nosegneg"]
cost_profile = "fit"          # fitted in this run, whatever profiles are stored
timeout_seconds = 60
[fit]
guest = "lsr"
tree = "{TINY}"
[[guest]]
name = "lsr"
trees = ["{TINY}"]
[[guest]]
name = "canary"
args = ["5"]
variants = ["default"]
"""


def _ensure_chromium() -> str:
    from tlslab.report.browser import find_chromium

    path = find_chromium()
    if path:
        return path
    can_install = os.geteuid() == 0 and shutil.which("apt-get")
    if can_install:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if cp.returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
            cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        path = find_chromium()
        if path:
            return path
        reason = f"apt-get install chromium failed: {cp.stderr.strip()[-300:]}"
    else:
        reason = "chromium is not installed and we cannot install it (not root or no apt-get)"
    unavailable(reason)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    spec = base / "spec.toml"
    spec.write_text(SPEC)
    assert main(["bench", str(spec), "--out", str(base / "results"), "--no-progress"]) == 0
    (run,) = [p for p in (base / "results").iterdir() if (p / "run.json").is_file()]
    return run


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    out = run_dir.parent.parent / "report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    return out


def test_report_files(report):
    for name in ("overhead", "faults", "timeline", "coverage"):
        for ext in ("png", "svg"):
            p = report / f"{name}.{ext}"
            assert p.is_file() and p.stat().st_size > 5000, p
    page = (report / "index.html").read_text()
    assert page.count("data:image/svg+xml;base64,") == 4          # self-contained
    assert "FITTED" in page and "fit target" in page               # calibration honesty
    assert "Keir Fraser 2004" in page and "walk" in page            # Keir's row; the crash site of emulate-2004
    assert "<script" not in page


def test_report_in_headless_chromium(report):
    from tlslab.report.browser import image_status

    chromium = _ensure_chromium()
    images = image_status(report / "index.html", chromium)
    assert len(images) == 4
    for img in images:
        assert img["complete"] and img["width"] > 300 and img["height"] > 150, img


def test_export_csv(run_dir, tmp_path, capsys):
    out = tmp_path / "cells.csv"
    assert main(["export", str(run_dir), "--csv", "-o", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 5 * 2 + 5
    by = {(r["guest"], r["variant"], r["strategy"]): r for r in rows}
    assert by[("lsr", "default", "emulate-2004")]["outcome"] == "guest-crash"
    # symbols are named with their object since dynamic linking: lsr:walk+0x26
    assert by[("lsr", "default", "emulate-2004")]["crash_symbol"].split(":")[-1].startswith("walk")
    flip = by[("lsr", "default", "flip")]
    assert int(flip["faults"]) == int(flip["gs_sign_changes"]) or int(flip["faults"]) > 0
    assert float(flip["faults_per_1k_instructions"]) > 0 and flip["git_commit"]
    assert "modelled_ns[nominal]" in rows[0]
    assert main(["export", str(run_dir)]) == 2                     # a format is required
    assert main(["export", "no-such-run", "--csv"]) == 2
    assert main(["report", "no-such-run"]) == 2
