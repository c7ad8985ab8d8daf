"""`tlslab run` as a user runs it: output, counters, clean errors, crash reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def tlslab(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlslab", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_run_prints_guest_output_then_counters():
    p = tlslab("run", "lsr", "--strategy", "flip")
    assert p.returncode == 0, p.stderr
    assert "./" in p.stdout  # lsr's listing
    assert "exit status 0" in p.stdout
    assert "segment violations" in p.stdout and "descriptor writes" in p.stdout


def test_run_json_record_has_counters_and_modelled_time():
    p = tlslab("run", "lsr", "--strategy", "emulate", "--json", "-q")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["status"] == 0
    gs = rec["counters"]["segments"]["gs"]
    assert rec["counters"]["strategy"]["traps"] > 1000
    assert gs["negative"] == 0  # every -ve access trapped and was emulated
    assert rec["modelled"]["total_ms"] > 0 and "nominal" in rec["modelled"]["profile"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("run", "lsr", "--strategy", "bogus"), "unknown strategy"),
        (("run", "/etc/passwd"), "not an ELF"),
        (("run", "no-such-guest"), "unknown guest"),
        (("run", "lsr", "--tree", "dirs=many"), "not an integer"),
        (("run", "lsr", "--mode", "native", "--strategy", "flip"), "truncating"),
        (("run", "lsr", "--cost-profile", "nope"), "unknown cost profile"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    p = tlslab(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_dynamic_elf_without_root_filesystem_is_one_line(tmp_path):
    """A dynamic ELF needs the pinned root's ld.so; with no root fetched: one line, exit 2."""
    src = tmp_path / "d.c"
    src.write_text("int main(void){return 0;}\n")
    exe = tmp_path / "d"
    if subprocess.run(["gcc", "-m32", "-o", str(exe), str(src)], capture_output=True).returncode != 0:
        pytest.skip("gcc -m32 unavailable")
    env_cache = tmp_path / "empty-cache"
    p = tlslab("run", str(exe), env={"TLSLAB_CACHE": str(env_cache)})
    assert p.returncode == 2 and "rootfs fetch" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_crashing_guest_is_reported_with_site():
    p = tlslab("run", "lsr", "--strategy", "emulate-2004", "-q")
    assert p.returncode == 1
    assert "guest crashed at 0x" in p.stdout and "<" in p.stdout and "gs:[" in p.stdout
