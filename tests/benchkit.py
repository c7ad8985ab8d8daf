"""What the bench, bench-hw and report tests share: a tiny tree, the CLI call, reading a run's records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = "dirs=3,files=20,symlinks=2,depth=2,seed=3"  # a synthetic tree small enough for many cells


def bench(*args, env=None, **kw) -> subprocess.CompletedProcess:
    """``tlslab bench --no-progress ARGS`` in a subprocess, from the repository root."""
    return subprocess.run([sys.executable, "-m", "tlslab", "bench", "--no-progress", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, **kw)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "cells.jsonl").read_text().splitlines() if line.strip()]
