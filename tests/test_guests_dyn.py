"""The dynamically linked ``.dyn`` builds of the bundled guests.

``guests/bin/<name>.dyn``: the same sources as the static builds, ``-m32 -O2
-fstack-protector-strong`` without ``-static``, a PIE (Debian gcc's default),
linked against Debian 12's multilib glibc 2.36: PT_INTERP ``/lib/ld-linux.so.2``,
NEEDED ``libc.so.6`` only. Registry: ``lsr.dyn`` == ``("lsr", "dyn")``,
``GuestBinary.dynamic``.

The rebuild test needs ``gcc -m32`` (Debian gcc-multilib) and the native runs
need ``/lib/ld-linux.so.2`` for i386 (Debian libc6-i386, which gcc-multilib
brings): without them they skip with the reason, and under CI=true they fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import unavailable
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from tlslab.guests import (
    VARIANT_SUFFIX,
    VARIANTS,
    GuestBinary,
    GuestError,
    elf_interp,
    gs_census,
    guests_dir,
    list_guests,
    load_manifest,
    resolve_guest,
    sha256_file,
)

GUESTS = ["lsr", "syscalls", "malloc", "stdio", "canary", "fs-user", "selfread", "prelink", "threads"]
OWN_TLS = ["lsr", "syscalls", "malloc", "stdio", "canary", "selfread", "threads"]   # have a __thread variable
INTERP = "/lib/ld-linux.so.2"

ENTRIES = {e["key"]: e for e in load_manifest()["binaries"]}
DYN = [g + ".dyn" for g in GUESTS]


def _bin(key: str) -> Path:
    return guests_dir() / ENTRIES[key]["path"]


def _require(reason: str | None, what: str) -> None:
    if reason is not None:
        unavailable(f"{what}: {reason}")


def _elf_facts(path: Path) -> dict:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        segs = {seg["p_type"]: seg for seg in elf.iter_segments()}
        needed, flags_1 = [], 0
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                for tag in sec.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif tag.entry.d_tag == "DT_FLAGS_1":
                        flags_1 = tag.entry.d_val
        return {
            "class": elf.elfclass, "machine": elf["e_machine"], "type": elf["e_type"],
            "interp": segs["PT_INTERP"].get_interp_name() if "PT_INTERP" in segs else None,
            "needed": needed, "pie": bool(flags_1 & 0x08000000), "tls": "PT_TLS" in segs,
            "symtab": elf.get_section_by_name(".symtab") is not None,
        }


# --------------------------------------------------------------------------- the binaries

@pytest.mark.parametrize("key", DYN)
def test_dyn_binary_is_i386_pie_with_ld_linux_and_only_libc(key):
    e = ENTRIES[key]
    path = _bin(key)
    assert sha256_file(path) == e["sha256"] and path.stat().st_size == e["size"]
    facts = _elf_facts(path)
    assert (facts["class"], facts["machine"]) == (32, "EM_386")
    assert facts["type"] == "ET_DYN" and facts["pie"]          # Debian gcc's default PIE, kept
    assert facts["interp"] == INTERP
    assert facts["needed"] == ["libc.so.6"]
    assert facts["symtab"]                                     # not stripped: the census needs it
    assert facts["tls"] == (e["name"] in OWN_TLS)              # only our own __thread variables
    link = e["link"]
    assert link == {**link, "dynamic": True, "elf_type": "ET_DYN", "pie": True,
                    "interp": INTERP, "needed": ["libc.so.6"]}
    assert link["glibc_shared"].startswith("libc6-i386 2.36-")
    assert link["glibc_runtime"].startswith("libc6:i386 2.36-")
    assert e["glibc"].startswith("libc6-dev-i386 2.36-")
    # the shared glibc linked against at build time is the dev package's version
    assert link["glibc_shared"].split()[1] == e["glibc"].split()[1]
    # ... and the same upstream glibc as the pinned i386 root's libc6:i386
    roots = json.loads((guests_dir() / "rootfs.lock.json").read_text())["roots"]
    root_libc = [p["version"] for r in roots.values() for p in r["packages"]
                 if p["package"] == "libc6" and p["arch"] == "i386"]
    assert root_libc and link["glibc_runtime"].split()[1] == root_libc[0]
    assert root_libc[0].split("-")[0] == link["glibc_shared"].split()[1].split("-")[0]


def test_dyn_flags_are_the_static_ones_without_static():
    for g in GUESTS:
        static, dyn = ENTRIES[g]["flags"].split(), ENTRIES[g + ".dyn"]["flags"].split()
        assert [f for f in static if f != "-static"] == dyn
        assert ENTRIES[g + ".dyn"]["source"] == ENTRIES[g]["source"]
        assert not ENTRIES[g]["link"]["dynamic"] and ENTRIES[g]["link"]["interp"] is None


# --------------------------------------------------------------------------- registry

def test_resolve_dyn_name_and_variant_are_the_same_guest():
    a, b = resolve_guest("lsr.dyn"), resolve_guest("lsr", "dyn")
    assert a == b
    assert (a.name, a.variant, a.key) == ("lsr", "dyn", "lsr.dyn")
    assert a.path.name == "lsr.dyn" and a.sha256 == ENTRIES["lsr.dyn"]["sha256"]
    assert a.source.name == "lsr.c"
    assert a.dynamic and a.interp == INTERP
    for static in (resolve_guest("lsr"), resolve_guest("lsr.nosegneg"), resolve_guest("lsr", "nosegneg")):
        assert not static.dynamic and static.interp is None
    # every bundled guest, every variant
    for g in GUESTS:
        for v in VARIANTS:
            guest = resolve_guest(g, v)
            assert guest == resolve_guest(g + VARIANT_SUFFIX[v])
            assert guest.key == g + VARIANT_SUFFIX[v]
            assert guest.dynamic == (v == "dyn")


def test_list_guests_lists_the_dyn_builds():
    names = list_guests(include_debian=False)
    assert set(DYN) <= set(names)
    assert len(names) == len(GUESTS) * len(VARIANTS)


def test_variant_suffix_is_the_one_naming_mechanism():
    assert VARIANT_SUFFIX == {"default": "", "nosegneg": ".nosegneg", "dyn": ".dyn"}
    assert tuple(VARIANT_SUFFIX) == VARIANTS


def test_dyn_errors_are_one_line(tmp_path):
    cases = (("lsr", {"variant": "dynamic"}), ("busybox.dyn", {}), ("nope.dyn", {}))
    for bad, kw in cases:
        with pytest.raises(GuestError) as ei:
            resolve_guest(bad, **kw)
        assert "\n" not in str(ei.value)
    with pytest.raises(GuestError, match="dyn"):        # the choices name the new variant
        resolve_guest("lsr", variant="fast")


def test_dyn_sha256_is_verified(tmp_path, monkeypatch):
    fake = tmp_path / "guests"
    (fake / "bin").mkdir(parents=True)
    (fake / "manifest.json").write_bytes((guests_dir() / "manifest.json").read_bytes())
    data = bytearray(_bin("lsr.dyn").read_bytes())
    data[-1] ^= 0xFF
    (fake / "bin" / "lsr.dyn").write_bytes(bytes(data))
    monkeypatch.setenv("TLSLAB_GUESTS_DIR", str(fake))
    with pytest.raises(GuestError, match="sha256") as ei:
        resolve_guest("lsr.dyn")
    assert "\n" not in str(ei.value)


def test_external_paths_read_pt_interp(tmp_path):
    dyn = resolve_guest(str(_bin("malloc.dyn")))
    assert dyn.variant == "external" and dyn.dynamic and dyn.interp == INTERP
    static = resolve_guest(str(_bin("malloc")))
    assert static.variant == "external" and not static.dynamic
    # a copy under another name: the answer comes from the program headers, not the name
    copy = tmp_path / "plain"
    copy.write_bytes(_bin("canary.dyn").read_bytes())
    assert resolve_guest(str(copy)).dynamic
    # not an ELF, truncated ELF, empty: no PT_INTERP, no exception
    for i, blob in enumerate((b"#!/bin/sh\n", _bin("lsr.dyn").read_bytes()[:60], b"")):
        p = tmp_path / f"junk{i}"
        p.write_bytes(blob)
        assert elf_interp(p) is None
        assert not GuestBinary(p.name, "external", p, sha256_file(p)).dynamic


def test_elf_interp_agrees_with_pyelftools_on_host_elves():
    # 64-bit and 32-bit, dynamic and static, as far as this host has them
    candidates = [Path("/bin/sh"), Path("/usr/bin/env"), *(_bin(k) for k in ("lsr", "lsr.dyn", "selfread.dyn"))]
    checked = 0
    for path in candidates:
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                want = next((s.get_interp_name() for s in elf.iter_segments() if s["p_type"] == "PT_INTERP"), None)
        except Exception:
            continue
        assert elf_interp(path) == want, path
        checked += 1
    assert checked >= 3


# --------------------------------------------------------------------------- %gs census

@pytest.mark.parametrize("name", GUESTS)
def test_gs_census_dyn(name):
    d, s = ENTRIES[name + ".dyn"]["gs"], ENTRIES[name]["gs"]
    # libc's %gs accesses live in libc.so.6: the executable has only its own code's
    assert {k: v for k, v in d.items() if k != "own"} == d["own"]
    assert d["indirect"] == 0 and d["zero"] == s["own"]["zero"]  # &buf of a __thread array: one %gs:0 load
    # a PIE's own TLS accesses stay literal negatives (local-exec), as many as in
    # the static build, at smaller offsets (only the executable's TLS block is below the TCB)
    for kind in ("total", "zero", "positive", "negative", "indirect"):
        assert d["own"][kind] == s["own"][kind], kind
    assert (d["negative"] > 0) == (name in OWN_TLS)
    assert s["total"] > 1000 > d["total"]


def test_gs_census_dyn_recomputes_to_manifest():
    for key in ("lsr.dyn", "canary.dyn"):
        src = guests_dir() / ENTRIES[key]["source"]["path"]
        assert gs_census(_bin(key), src) == ENTRIES[key]["gs"]
        assert gs_census(_bin(key)) == {k: v for k, v in ENTRIES[key]["gs"].items() if k != "own"}


# --------------------------------------------------------------------------- rebuild

def _gcc_m32_dynamic_reason() -> str | None:
    try:
        probe = subprocess.run(["gcc", "-m32", "-x", "c", "-", "-o", os.devnull],
                               input="int main(void){return 0;}", capture_output=True, text=True)
    except OSError as exc:
        return f"gcc not installed ({exc.strerror})"
    if probe.returncode != 0:
        return "gcc -m32 does not work here (install gcc-multilib)"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", GUESTS)
def test_dyn_rebuild_is_byte_identical(name, tmp_path):
    _require(_gcc_m32_dynamic_reason(), "gcc -m32")
    got = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    if got != ENTRIES[name + ".dyn"]["compiler"]:
        unavailable(f"different compiler ({got!r}); byte-identity only holds for the recorded one", ci_installs=False)
    e = ENTRIES[name + ".dyn"]
    argv = e["command"].split()
    out = argv.index("-o") + 1
    assert argv[out] == e["path"]
    argv[out] = str(tmp_path / (name + ".dyn"))
    cp = subprocess.run(argv, cwd=guests_dir(), capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert sha256_file(argv[out]) == e["sha256"]


# --------------------------------------------------------------------------- native runs

def _native_dyn_reason() -> str | None:
    if not Path(INTERP).exists():
        return f"{INTERP} missing: the host has no i386 glibc (Debian libc6-i386, via gcc-multilib)"
    try:
        cp = subprocess.run([str(_bin("canary.dyn")), "1"], capture_output=True, timeout=10)
    except OSError as exc:
        return f"host cannot execute i386 ELF binaries ({exc.strerror})"
    if cp.returncode != 0:
        return f"host ran canary.dyn but it failed (exit {cp.returncode}): {cp.stderr[:200]!r}"
    return None


ARGS = {"syscalls": ["50"], "malloc": [], "stdio": [], "canary": [], "fs-user": [], "selfread": []}


@pytest.mark.parametrize("name", sorted(ARGS))
def test_dyn_runs_natively_like_the_static_build(name):
    _require(_native_dyn_reason(), "native i386 dynamic execution")
    outs = []
    for key in (name, name + ".dyn"):
        cp = subprocess.run([str(_bin(key)), *ARGS[name]], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        outs.append(cp.stdout)
    if name == "selfread":
        # it checksums its own code and libc functions, which differ by design
        outs = [o.splitlines()[0] for o in outs]
    assert outs[0] == outs[1] and outs[0]


def test_dyn_lsr_runs_natively_like_the_static_build(tmp_path):
    _require(_native_dyn_reason(), "native i386 dynamic execution")
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "f").write_text("12345")
    (root / "l").symlink_to("a/f")
    outs = [subprocess.run([str(_bin(k)), "t"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=30).stdout for k in ("lsr", "lsr.dyn")]
    assert outs[0] == outs[1]
    assert re.search(r"total: 2 dirs, 1 files, 1 links, 0 other, 0 errors, 5 bytes", outs[1])
