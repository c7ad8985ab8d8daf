"""`tlslab run` as a user runs it: output, counters, clean errors, crash reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require_gcc32, unavailable


def tlslab(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlslab", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _native_lsr_listing() -> bytes:
    """lsr run natively (the real CPU) in the small tree materialised on the host: what the guest must print."""
    from tlslab.guests import resolve_guest
    from tlslab.hw.backend import materialised_tree
    from tlslab.linux.process import DEFAULT_ENV

    env = dict(e.decode().split("=", 1) for e in DEFAULT_ENV)
    exe = str(resolve_guest("lsr").path)
    cp = subprocess.run(["lsr"], executable=exe, cwd=materialised_tree("small"), env=env, capture_output=True,
                        timeout=60)
    assert cp.returncode == 0
    return cp.stdout


def _table_value(out: str, label: str) -> str:
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2 and cells[0] == label:
            return cells[1]
    raise AssertionError(f"no {label!r} row in:\n{out}")


def test_run_prints_guest_output_then_counters():
    p = tlslab("run", "lsr", "--strategy", "flip")
    assert p.returncode == 0, p.stderr
    native = _native_lsr_listing().decode()
    assert p.stdout.startswith(native + "exit status 0\n"), p.stdout[:400]
    # flip takes one fault per sign change of the %gs offset, and writes one descriptor per fault
    gs = _table_value(p.stdout, "%gs accesses (direct)")
    sign_changes = gs.split("sign changes ")[1].rstrip(")")
    assert _table_value(p.stdout, "segment violations (#GP)") == sign_changes
    assert _table_value(p.stdout, "descriptor writes") == sign_changes


def test_run_json_record_has_counters_and_modelled_time():
    p = tlslab("run", "lsr", "--strategy", "emulate", "--json", "-q")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["status"] == 0
    gs = rec["counters"]["segments"]["gs"]
    native = json.loads(tlslab("run", "lsr", "--strategy", "native", "--json", "-q").stdout)
    negative = native["counters"]["segments"]["gs"]["negative"]
    assert negative > 1000
    assert rec["counters"]["strategy"]["traps"] == negative   # one emulation per negative access
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
    require_gcc32()
    if subprocess.run(["gcc", "-m32", "-o", str(exe), str(src)], capture_output=True).returncode != 0:
        unavailable("gcc -m32 (dynamic) does not work here")
    env_cache = tmp_path / "empty-cache"
    p = tlslab("run", str(exe), env={"TLSLAB_CACHE": str(env_cache)})
    assert p.returncode == 2 and "rootfs fetch" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_crashing_guest_is_reported_with_site():
    p = tlslab("run", "lsr", "--strategy", "emulate-2004", "-q")
    assert p.returncode == 1
    assert "guest crashed at 0x" in p.stdout and "<" in p.stdout and "gs:[" in p.stdout
