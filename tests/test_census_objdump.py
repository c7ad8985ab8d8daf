"""The %gs census (guests/manifest.json "gs") re-derived with GNU objdump, not capstone (issue 17, item 4).

``tlslab.census.gs_census`` sweeps executable sections with capstone and
writes the manifest; comparing the manifest with gs_census again only proves
determinism. Here binutils' objdump disassembles the same sections and the
census is recounted from its text: an instruction counts when 0x65 is among
its legacy prefixes; ``%gs:(...)``/``%gs:disp(...)`` is indirect, ``%gs:0x0``
zero, ``%gs:disp`` positive or negative by the sign of the 32-bit displacement.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from conftest import unavailable
from tlslab.guests import guests_dir

PREFIXES = {"f0", "f2", "f3", "2e", "36", "3e", "26", "64", "65", "66", "67"}
KINDS = ("total", "zero", "positive", "negative", "indirect")


def objdump_census(path) -> dict:
    if shutil.which("objdump") is None:
        unavailable("objdump (binutils, installed with gcc-multilib) is missing")
    out = subprocess.run(["objdump", "-d", "-w", "--insn-width=16", str(path)], capture_output=True, text=True,
                         check=True).stdout
    counts = {k: 0 for k in KINDS}
    negative_offsets: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"\s*[0-9a-f]+:\t((?:[0-9a-f]{2} )+)\s*\t?(.*)$", line)
        if not m:
            continue
        prefixes = []
        for b in m.group(1).split():
            if b not in PREFIXES:
                break
            prefixes.append(b)
        if "65" not in prefixes:
            continue
        op = re.search(r"%gs:(-?0x[0-9a-f]+)?(\()?", m.group(2))
        if op is None or op.group(2) or op.group(1) is None:
            kind = "indirect"
        else:
            disp = int(op.group(1), 16) & 0xFFFF_FFFF
            kind = "zero" if disp == 0 else "negative" if disp >= 0x8000_0000 else "positive"
            if kind == "negative":
                key = f"-{(-disp) & 0xFFFF_FFFF:#x}"
                negative_offsets[key] = negative_offsets.get(key, 0) + 1
        counts["total"] += 1
        counts[kind] += 1
    counts["negative_offsets"] = dict(sorted(negative_offsets.items()))
    return counts


def _entries() -> dict:
    return {e["key"]: e for e in json.loads((guests_dir() / "manifest.json").read_text())["binaries"]}


ENTRIES = _entries()


@pytest.mark.parametrize("key", sorted(k for k, e in ENTRIES.items() if "gs" in e))
def test_manifest_census_equals_objdump(key):
    entry = ENTRIES[key]
    path = guests_dir() / entry["path"]
    if not path.is_file():
        unavailable(f"{path} is missing (guests are committed: a broken checkout)")
    want = objdump_census(path)
    got = {k: entry["gs"][k] for k in (*KINDS, "negative_offsets")}
    assert got == want
    assert want["negative"] == sum(want["negative_offsets"].values())


def test_the_recount_sees_each_form():
    """The objdump recount itself on a hand-assembled sample: one instruction of each form."""
    if shutil.which("as") is None:
        unavailable("GNU as (binutils) is missing")
    import tempfile
    from pathlib import Path

    src = ".text\nmovl %gs:0,%eax\nmovl %gs:0x10,%eax\nmovl %gs:-0x20,%eax\nmovl %gs:(%ebx),%eax\n" \
          "addl %gs:4(%esi),%eax\nnop\nmovl %fs:-4,%eax\n"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "s.s").write_text(src)
        subprocess.run(["as", "--32", "-o", f"{d}/s.o", f"{d}/s.s"], check=True)
        c = objdump_census(f"{d}/s.o")
    assert c == {"total": 5, "zero": 1, "positive": 1, "negative": 1, "indirect": 2,
                 "negative_offsets": {"-0x20": 1}}
