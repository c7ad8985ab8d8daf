"""`tlslab check-descriptor`: the acceptance examples and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tlslab.cli import main

FLAT = "0x00cff2000000ffff"


def run(capsys, *argv):
    status = main(["check-descriptor", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def field(out: str, label: str) -> str:
    for line in out.splitlines():
        if line.startswith(label + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {label!r} line in:\n{out}")


def test_acceptance_flat_segment_allows_minus_four(capsys):
    status, out, err = run(capsys, FLAT, "--offset", "0xfffffffc", "--size", "4")
    assert status == 0 and err == ""
    assert field(out, "base") == "0x00000000"
    assert "effective limit 0xffffffff" in field(out, "limit")
    assert field(out, "dpl") == "3" and field(out, "granularity").startswith("1")
    assert field(out, "native") == "allowed (linear 0xfffffffc)"


def test_acceptance_truncated_segment_refuses_minus_four(capsys):
    status, out, _ = run(capsys, FLAT, "--offset", "0xfffffffc", "--size", "4", "--truncate")
    assert status == 0
    assert field(out, "truncated (nonpae)").startswith("0x00cff2000000bfff")
    assert field(out, "after truncation").startswith("refused: BEYOND_LIMIT")


def test_bytes_form_negative_offset_and_flip(capsys):
    # NPTL-like TCB at 0x0804a000, given as the 8 bytes in memory order
    status, out, _ = run(capsys, "ff", "ff", "00", "a0", "04", "f2", "cf", "08",
                         "--offset=-0x20", "--truncate", "--profile", "pae")
    assert status == 0
    assert field(out, "descriptor").startswith("0x08cff204a000ffff")
    assert field(out, "native") == "allowed (linear 0x08049fe0)"
    # by hand: the last page ends at or below Xen's PAE hole 0xF5800000: ((0xF5800000 - 0x0804A000) >> 12) - 1
    pages = ((0xF580_0000 - 0x0804_A000) >> 12) - 1
    assert pages == 0xED7B5
    # limit 19:16 (0xE) lands in the flags nibble: cf -> ce; limit 15:0 = 0xD7B5
    assert field(out, "truncated (pae)").startswith("0x08cef204a000d7b5")
    assert field(out, "after truncation").startswith("refused: BEYOND_LIMIT")
    assert "expand-down" in field(out, "flip")


def test_write_to_read_only_segment(capsys):
    status, out, _ = run(capsys, "0x00cff0000000ffff", "--offset", "0", "--write")
    assert status == 0 and field(out, "native").startswith("refused: NOT_WRITABLE")


@pytest.mark.parametrize("argv, message", [
    (["0xnothex"], "not hexadecimal"),
    (["0x00cff2000000fff"], "16 hex digits"),
    (["0x00cff2000000ffff0"], "16 hex digits"),
    (["ff", "ff", "00"], "expected 8"),
    (["ff", "ff", "00", "00", "00", "f2", "cf", "zz"], "hex bytes"),
    ([FLAT, "--size", "0"], "size 0"),
    ([FLAT, "--offset", "0x100000000"], "32-bit range"),
    ([FLAT, "--offset", "four"], "not a number"),
])
def test_malformed_input_is_one_line_exit_2(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err
    assert err.startswith("tlslab check-descriptor: error:")


def test_malformed_descriptor_via_the_real_entry_point():
    proc = subprocess.run([sys.executable, "-m", "tlslab", "check-descriptor", "0x12"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
