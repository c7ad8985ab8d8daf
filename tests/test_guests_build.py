"""The bundled guest binaries, their manifest, the registry and the Debian fetcher.

Native runs need a host that executes i386 ELF binaries (x86-64 Linux with
IA32 emulation); they are skipped with a reason elsewhere. The busybox tests
need the cached package or root + apt + the Debian archive; otherwise skipped.
The rebuild test needs ``gcc -m32`` (Debian gcc-multilib): without it it skips
with the reason, and with CI=true in the environment it fails instead.

The dynamically linked ``.dyn`` builds have their own file, test_guests_dyn.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import unavailable
from elftools.elf.elffile import ELFFile

from tlslab import debian
from tlslab.guests import (
    VARIANT_SUFFIX,
    VARIANTS,
    GuestError,
    gs_census,
    guests_dir,
    list_guests,
    load_manifest,
    resolve_guest,
    sha256_file,
)

GUESTS = ["lsr", "syscalls", "malloc", "stdio", "canary", "fs-user", "selfread", "prelink", "threads"]
# guests whose own source has a __thread variable: the default build has direct
# negative %gs accesses in our code, the nosegneg build none
OWN_TLS = ["lsr", "syscalls", "malloc", "stdio", "canary", "selfread", "threads"]

MANIFEST = load_manifest()
ENTRIES = {e["key"]: e for e in MANIFEST["binaries"]}
KEYS = sorted(ENTRIES)
STATIC_KEYS = sorted(k for k, e in ENTRIES.items() if e["variant"] in ("default", "nosegneg"))


def _bin(key: str) -> Path:
    return guests_dir() / ENTRIES[key]["path"]


# --------------------------------------------------------------------------- host capability

def _native_i386_reason() -> str | None:
    probe = guests_dir() / "bin" / "canary"
    try:
        cp = subprocess.run([str(probe), "1"], capture_output=True, timeout=10)
    except OSError as exc:
        return f"host cannot execute i386 ELF binaries ({exc.strerror})"
    if cp.returncode != 0:
        return f"host ran an i386 binary but it failed (exit {cp.returncode})"
    return None


NATIVE_REASON = _native_i386_reason()
needs_native = pytest.mark.usefixtures("_native_i386")


@pytest.fixture
def _native_i386():
    if NATIVE_REASON is not None:
        unavailable(NATIVE_REASON)


def run(key_or_path, *args, cwd=None) -> subprocess.CompletedProcess:
    exe = str(_bin(key_or_path)) if key_or_path in ENTRIES else str(key_or_path)
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


# --------------------------------------------------------------------------- manifest

def test_manifest_lists_every_guest_in_every_variant():
    assert VARIANTS == ("default", "nosegneg", "dyn")
    assert set(VARIANT_SUFFIX) == set(VARIANTS)
    expected = {g + VARIANT_SUFFIX[v] for g in GUESTS for v in VARIANTS}
    assert set(ENTRIES) == expected and len(MANIFEST["binaries"]) == len(GUESTS) * len(VARIANTS)
    for key, e in ENTRIES.items():
        assert key == e["name"] + VARIANT_SUFFIX[e["variant"]]
        assert e["path"] == "bin/" + key
        if e["variant"] == "dyn":
            assert "-m32 -O2 -fstack-protector-strong" in e["flags"]
            assert "-static" not in e["flags"].split()
        else:
            assert "-m32 -O2 -static -fstack-protector-strong" in e["flags"]
        assert ("-mno-tls-direct-seg-refs" in e["flags"]) == (e["variant"] == "nosegneg")
        assert e["link"]["dynamic"] == (e["variant"] == "dyn")
        assert e["compiler"].startswith("gcc")
        assert e["glibc"].startswith("libc6-dev-i386 2.")


@pytest.mark.parametrize("key", KEYS)
def test_binary_matches_manifest(key):
    e = ENTRIES[key]
    path = _bin(key)
    assert path.is_file(), f"{path} missing: run `make guests`"
    assert path.stat().st_size == e["size"]
    assert sha256_file(path) == e["sha256"]


@pytest.mark.parametrize("name", GUESTS)
def test_source_matches_manifest(name):
    # a source edited without `make guests` would leave stale binaries
    for key in (name + VARIANT_SUFFIX[v] for v in VARIANTS):
        src = guests_dir() / ENTRIES[key]["source"]["path"]
        assert sha256_file(src) == ENTRIES[key]["source"]["sha256"], f"{src} changed: run `make guests`"


@pytest.mark.parametrize("key", STATIC_KEYS)
def test_binary_is_static_elf32_i386_executable(key):
    with open(_bin(key), "rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 32
        assert elf["e_machine"] == "EM_386"
        assert elf["e_type"] == "ET_EXEC"
        types = [seg["p_type"] for seg in elf.iter_segments()]
        assert "PT_INTERP" not in types
        assert "PT_DYNAMIC" not in types
        assert "PT_TLS" in types


@pytest.mark.parametrize("name", GUESTS)
def test_gs_census_default_vs_nosegneg(name):
    d, n = ENTRIES[name]["gs"], ENTRIES[name + ".nosegneg"]["gs"]
    # glibc's archive is the same in both: the libc part of the census must agree
    for kind in ("positive", "indirect"):
        assert d[kind] - d["own"][kind] == n[kind] - n["own"][kind]
    assert n["own"]["negative"] == 0
    if name in OWN_TLS:
        assert d["own"]["negative"] > 0
        assert n["negative"] < d["negative"]
        assert n["own"]["zero"] > d["own"]["zero"]       # movl %gs:0,%reg instead
    else:
        assert ENTRIES[name]["sha256"] == ENTRIES[name + ".nosegneg"]["sha256"]


def test_gs_census_recomputes_to_manifest():
    for key in ("lsr", "lsr.nosegneg"):
        src = guests_dir() / ENTRIES[key]["source"]["path"]
        assert gs_census(_bin(key), src) == ENTRIES[key]["gs"]


def gcc_m32_reason() -> str | None:
    """Why the recorded guests cannot be rebuilt here (static and dynamic -m32), or None."""
    if shutil.which("gcc") is None or shutil.which("make") is None:
        return "gcc/make not installed"
    for extra in (["-static"], []):
        probe = subprocess.run(["gcc", "-m32", *extra, "-x", "c", "-", "-o", os.devnull],
                               input="int main(void){return 0;}", capture_output=True, text=True)
        if probe.returncode != 0:
            return f"gcc -m32 {' '.join(extra)} does not work here (install gcc-multilib)".replace("  ", " ")
    return None


def require_gcc_m32() -> None:
    """Skip without gcc -m32, with the reason; under CI=true fail instead (.ci/run installs it)."""
    reason = gcc_m32_reason()
    if reason is None:
        return
    unavailable(f"gcc -m32 required: {reason}")


def require_recorded_compiler() -> None:
    got = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    if got != ENTRIES["lsr"]["compiler"]:
        unavailable(f"different compiler ({got!r}); byte-identity only holds for the recorded one", ci_installs=False)


@pytest.mark.slow
def test_rebuild_is_byte_identical():
    # `make check` rebuilds every guest in every variant (default, nosegneg, dyn)
    require_gcc_m32()
    require_recorded_compiler()
    cp = subprocess.run(["make", "-s", "-C", str(guests_dir()), "check"],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert f"{len(GUESTS)} x {len(VARIANTS)} binaries byte-identical" in cp.stdout


# --------------------------------------------------------------------------- registry

def test_resolve_bundled_names_and_variants():
    g = resolve_guest("lsr")
    assert (g.name, g.variant, g.key) == ("lsr", "default", "lsr")
    assert g.sha256 == ENTRIES["lsr"]["sha256"]
    assert g.source.name == "lsr.c"
    n1 = resolve_guest("lsr", variant="nosegneg")
    n2 = resolve_guest("lsr.nosegneg")
    assert n1 == n2 and n1.variant == "nosegneg" and n1.path.name == "lsr.nosegneg"
    assert n1.key == "lsr.nosegneg" and not n1.dynamic and not g.dynamic
    assert set(ENTRIES) <= set(list_guests(include_debian=False))


def test_resolve_errors_are_one_line_guest_errors(tmp_path):
    for bad, kw in (("no-such-guest", {}), ("lsr", {"variant": "fast"}), ("./missing", {})):
        with pytest.raises(GuestError) as ei:
            resolve_guest(bad, **kw)
        assert "\n" not in str(ei.value)
    assert issubclass(GuestError, ValueError)


def test_resolve_detects_sha256_mismatch(tmp_path, monkeypatch):
    fake = tmp_path / "guests"
    (fake / "bin").mkdir(parents=True)
    shutil.copy(guests_dir() / "manifest.json", fake / "manifest.json")
    data = bytearray(_bin("canary").read_bytes())
    data[-1] ^= 0xFF
    (fake / "bin" / "canary").write_bytes(bytes(data))
    monkeypatch.setenv("TLSLAB_GUESTS_DIR", str(fake))
    with pytest.raises(GuestError, match="sha256"):
        resolve_guest("canary")
    with pytest.raises(GuestError, match="missing"):
        resolve_guest("lsr")


def test_resolve_external_path():
    g = resolve_guest(str(_bin("malloc")))
    assert g.variant == "external" and g.sha256 == ENTRIES["malloc"]["sha256"]


# --------------------------------------------------------------------------- native runs

def _make_tree(root: Path) -> None:
    """A small tree with every entry type lsr distinguishes, names that sort by bytes."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "Zeta").mkdir()
    (root / "empty").mkdir()
    for i in range(12):
        (root / "a" / f"file{i:02d}.txt").write_text("x" * (i * 37))
    (root / "a" / "b" / "c" / "deep").write_bytes(b"\0" * 4097)
    (root / "Zeta" / "_under").write_text("u\n")
    (root / "Zeta" / "UPPER").write_text("U\n")
    (root / "top.bin").write_bytes(bytes(range(256)))
    (root / "link-file").symlink_to("top.bin")
    (root / "link-dir").symlink_to("a/b")
    (root / "dangling").symlink_to("does/not/exist")
    os.mkfifo(root / "fifo")


def _expected_lsr(arg: str, real: Path) -> str:
    """What lsr must print, computed independently in Python."""
    out: list[str] = []
    tot = {"d": 0, "f": 0, "l": 0, "o": 0, "bytes": 0, "depth": 0}

    def walk(shown: str, path: Path, depth: int) -> None:
        tot["depth"] = max(tot["depth"], depth)
        out.append(f"{shown}:")
        names = sorted(os.listdir(os.fsencode(path)))          # strcmp order
        dirs = []
        for raw in names:
            name = os.fsdecode(raw)
            st = os.lstat(path / name)
            m = st.st_mode
            if stat.S_ISREG(m):
                out.append(f"  f {name} {st.st_size}")
                tot["f"] += 1
                tot["bytes"] += st.st_size
            elif stat.S_ISLNK(m):
                out.append(f"  l {name} -> {os.readlink(path / name)}")
                tot["l"] += 1
            elif stat.S_ISDIR(m):
                out.append(f"  d {name}")
                tot["d"] += 1
                dirs.append(name)
            else:
                ch = "p" if stat.S_ISFIFO(m) else "s" if stat.S_ISSOCK(m) else \
                     "c" if stat.S_ISCHR(m) else "b" if stat.S_ISBLK(m) else "?"
                out.append(f"  {ch} {name}")
                tot["o"] += 1
        out.append("")
        for name in dirs:
            walk(f"{shown}/{name}", path / name, depth + 1)

    walk(arg, real, 1)
    out.append(f"total: {tot['d']} dirs, {tot['f']} files, {tot['l']} links, {tot['o']} other, "
               f"0 errors, {tot['bytes']} bytes, depth {tot['depth']}")
    return "\n".join(out) + "\n"


@needs_native
@pytest.mark.parametrize("variant", ["", ".nosegneg"])
def test_lsr_output_matches_python_model(tmp_path, variant):
    _make_tree(tmp_path / "t")
    cp = run("lsr" + variant, "t", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == _expected_lsr("t", tmp_path / "t")
    assert "  p fifo" in cp.stdout and "  l dangling -> does/not/exist" in cp.stdout


@needs_native
def test_lsr_reports_errors_and_defaults_to_dot(tmp_path):
    cp = run("lsr", tmp_path / "nope")
    assert cp.returncode == 0
    assert "!opendir: No such file or directory" in cp.stdout
    assert "1 errors" in cp.stdout
    (tmp_path / "only").write_text("1")
    cp = run("lsr", cwd=tmp_path)
    assert cp.stdout.startswith(".:\n  f only 1\n")


EXPECT = {
    "syscalls": (["50"], r"syscalls: 50 iterations, 600 calls, 0 succeeded\n.*"
                 r"errno   2 ENOENT +300 .*errno   9 EBADF +250 .*errno  21 EISDIR +50 .*"
                 r"calls noted \(thread-local\): 600\nchecksum: [0-9a-f]{8}\n$"),
    "malloc": ([], r"malloc: 5000 ops: \d+ malloc, \d+ calloc, \d+ realloc, \d+ free\n"
               r"peak live bytes \(thread-local\): \d+\nchecksum: [0-9a-f]{8}\n$"),
    "stdio": ([], r"^00000 \w.*\nstdio: 300 lines: .*\nnumbers: -?\d+, chars \(thread-local\) \d+\n"
              r"checksum: [0-9a-f]{8}\n$"),
    "canary": ([], r"canary: 200 rounds, 200 ERANGE, max depth 65\nresult: [0-9a-f]{8}\n$"),
    "fs-user": ([], r"GDT \(set_thread_area\) descriptor, %fs loaded by the program\n"
                r"fs:0x0  = 000000ab \(area\[0\]  = 000000ab\)\n"
                r"fs:0x10 = 000040ab .*fs:0xffc = deadbeef \(area\[1023\] = deadbeef\)\n"),
    "selfread": ([], r"selfread: 100 probes, acc 169296, counter 4950\n"
                 r"tls_probe span: \d+ bytes, \d+ bytes 0x65, fnv [0-9a-f]{8}\n"),
}


@needs_native
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_guest_runs_natively(name):
    args, pattern = EXPECT[name]
    outs = []
    for key in (name, name + ".nosegneg"):
        cp = run(key, *args)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert re.search(pattern, cp.stdout, re.S), cp.stdout
        outs.append(cp.stdout)
    if name == "selfread":
        # it prints a checksum of its own code, which differs by design
        strip = [re.sub(r"tls_probe span: .*\n", "", o) for o in outs]
        assert strip[0] == strip[1]
        assert outs[0] != outs[1]
    else:
        assert outs[0] == outs[1]


@needs_native
def test_fs_user_ldt(tmp_path):
    cp = run("fs-user", "ldt")
    if "modify_ldt failed" in cp.stdout:
        unavailable(f"kernel refuses modify_ldt: {cp.stdout.strip()}", ci_installs=False)
    assert cp.returncode == 0
    assert "LDT descriptor, %fs loaded by the program" in cp.stdout
    assert run("fs-user").stdout.splitlines()[1:] == cp.stdout.splitlines()[1:]


@needs_native
def test_prelink_relocates_a_copy(tmp_path):
    lib = tmp_path / "libfake.so"
    shutil.copy(_bin("lsr"), lib)
    before = lib.read_bytes()
    outs = []
    for key in ("prelink", "prelink.nosegneg"):
        out = tmp_path / f"out-{key}"
        cp = run(key, lib, out)
        assert cp.returncode == 0, cp.stdout
        m = re.match(r"prelink: read (\d+) bytes, relocated (\d+) words by \+0x100000, "
                     r"wrote (\d+) bytes\ninput fnv [0-9a-f]{8}, output fnv [0-9a-f]{8}\n$", cp.stdout)
        assert m, cp.stdout
        assert int(m[1]) == int(m[3]) == len(before) and int(m[2]) > 0
        data = out.read_bytes()
        assert len(data) == len(before) and data != before
        assert not Path(str(out) + ".tmp").exists()
        outs.append(cp.stdout)
    assert lib.read_bytes() == before
    assert outs[0] == outs[1]
    cp = run("prelink", tmp_path / "missing", tmp_path / "x")
    assert cp.returncode == 1 and "No such file or directory" in cp.stdout


# --------------------------------------------------------------------------- busybox

@pytest.fixture(scope="session")
def busybox():
    try:
        return debian.fetch_package("busybox-static", "i386")
    except debian.DebianUnavailable as exc:
        unavailable(f"busybox-static:i386 unavailable (tlslab fetch): {exc}")


def test_busybox_is_locked_static_i386(busybox):
    lock = debian.load_lock()["packages"]["busybox-static:i386"]
    assert busybox.version == lock["version"]
    assert sha256_file(busybox.deb) == lock["deb_sha256"]
    assert sha256_file(busybox.binary) == lock["binary_sha256"]
    with open(busybox.binary, "rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 32 and elf["e_machine"] == "EM_386"
        assert not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
        assert any(seg["p_type"] == "PT_TLS" for seg in elf.iter_segments())
    assert lock["static"] and lock["gs"]["total"] > 1000
    g = resolve_guest("busybox")
    assert g.path == busybox.binary and g.variant == "debian"
    assert g.key == "busybox" and g.interp is None and not g.dynamic
    assert "busybox" in list_guests()


@needs_native
def test_busybox_runs_natively(busybox, tmp_path):
    _make_tree(tmp_path / "t")
    cp = run(busybox.binary, "ls", "-R", "t", cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("t:\n") and "t/a/b/c:\ndeep\n" in cp.stdout


def test_busybox_cache_corruption_is_detected(busybox, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TLSLAB_CACHE", str(cache))
    pkgdir = debian._pkgdir(cache / "debian", busybox.name, busybox.version, busybox.arch)
    pkgdir.mkdir(parents=True)
    data = bytearray(busybox.deb.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (pkgdir / busybox.deb.name).write_bytes(bytes(data))
    with pytest.raises(debian.DebianMismatch, match="sha256"):
        debian.fetch_package("busybox-static", "i386")
    assert json.loads((guests_dir() / "debian.lock.json").read_text())  # lock untouched
