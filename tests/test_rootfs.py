"""The pinned Debian i386 root filesystem (tlslab.rootfs, `tlslab rootfs`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import unavailable

from tlslab import rootfs
from tlslab.guests import GuestError

# package -> files of the root it must provide (the programs other tests run)
REQUIRED = {
    "coreutils": ["bin/ls"],
    "dash": ["bin/dash"],
    "libc6": ["lib/ld-linux.so.2"],
    "findutils": ["usr/bin/find"],
    "grep": ["bin/grep"],
    "sed": ["bin/sed"],
}
LIBRARIES = {"libacl1", "libattr1", "libgmp10", "libselinux1", "libpcre2-8-0"}


def _tlslab(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlslab", *args],
                          capture_output=True, text=True, **kw)


def _linked_cache(tmp_path, corrupt: str | None = None):
    """A cache dir whose .debs link to the real cache's (one corrupted copy if asked)."""
    cache = tmp_path / "cache"
    for pkg in rootfs.locked_packages("debian"):
        src, dst = rootfs.deb_path(pkg), rootfs.deb_path(pkg, cache)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if pkg["package"] == corrupt:
            data = bytearray(src.read_bytes())
            data[len(data) // 2] ^= 0xFF
            dst.write_bytes(bytes(data))
        else:
            dst.symlink_to(src)
    return cache


# --------------------------------------------------------------------------- lock

def test_lock_integrity():
    entry = rootfs.lock_entry("debian")
    assert entry["suite"] == "bookworm" and entry["arch"] == "i386"
    packages = entry["packages"]
    names = [p["package"] for p in packages]
    assert len(names) == len(set(names))
    # the lock is generated from the one list in code
    assert [(p["package"], p["arch"]) for p in packages] == list(rootfs.DEBIAN_PACKAGES)
    assert set(REQUIRED) | LIBRARIES <= set(names)
    for p in packages:
        assert re.fullmatch(r"[0-9a-f]{64}", p["sha256"]), p
        assert p["version"] and p["arch"] in ("i386", "all"), p
        assert p["deb"].endswith(f"_{p['arch']}.deb") and p["size"] > 0, p
        assert p["deb"].startswith(f"{p['package']}_{p['version'].replace(':', '%3a')}_"), p
    assert rootfs.ROOTFS_NAMES == ("debian",)


def test_unknown_name_is_one_line_guest_error():
    with pytest.raises(GuestError, match=r"unknown root filesystem 'nosuch' \(known: debian\)"):
        rootfs.materialise("nosuch", fetch=False)


def test_cli_unknown_name_exit_2_one_line():
    cp = _tlslab("rootfs", "path", "nosuch")
    assert cp.returncode == 2
    assert cp.stdout == ""
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "known: debian" in lines[0], cp.stderr
    assert "Traceback" not in cp.stderr


def test_not_fetched_is_unavailable_with_hint(tmp_path):
    with pytest.raises(rootfs.RootfsUnavailable, match="run `tlslab rootfs fetch`"):
        rootfs.materialise("debian", fetch=False, cache_dir=tmp_path)
    cp = _tlslab("rootfs", "path", "--cache-dir", str(tmp_path))
    assert cp.returncode == 2 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert "tlslab rootfs fetch" in cp.stderr and "Traceback" not in cp.stderr
    assert not (tmp_path / "rootfs").exists()


def test_cli_list_shows_the_lock():
    cp = _tlslab("rootfs", "list")
    assert cp.returncode == 0, cp.stderr
    for p in rootfs.locked_packages("debian"):
        assert f"{p['package']}:{p['arch']}" in cp.stdout and p["version"] in cp.stdout


# --------------------------------------------------------------------------- materialised root

def test_root_has_the_programs_and_a_real_usr_lib(debian_rootfs):
    for files in REQUIRED.values():
        for rel in files:
            assert (debian_rootfs / rel).is_file(), rel
    assert rootfs.count_entries(debian_rootfs / "usr" / "lib") >= 5000
    # read-only to guests: nothing in it is world-writable
    for dirpath, dirnames, filenames in os.walk(debian_rootfs):
        for entry in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, entry))
            assert os.path.islink(os.path.join(dirpath, entry)) or not st.st_mode & 0o002, entry


def test_stamp_is_beside_the_root_not_inside(debian_rootfs):
    stamp_file = debian_rootfs.with_name(debian_rootfs.name + ".json")
    stamp = json.loads(stamp_file.read_text())
    assert stamp["name"] == "debian" and debian_rootfs.name == f"debian-{stamp['key']}-r{rootfs.RECIPE}"
    assert stamp["key"] == rootfs.lock_key(rootfs.lock_entry("debian"))
    assert stamp["usr_lib_entries"] == rootfs.count_entries(debian_rootfs / "usr" / "lib")
    assert not any(p.suffix == ".json" for p in debian_rootfs.iterdir())
    info = rootfs.describe("debian")
    assert info["path"] == debian_rootfs and info["usr_lib_entries"] >= 5000
    assert {p["package"] for p in info["packages"]} >= set(REQUIRED)


def test_cli_path_prints_the_root_last(debian_rootfs):
    cp = _tlslab("rootfs", "path")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip().splitlines()[-1] == str(debian_rootfs)


def test_corrupt_deb_is_a_mismatch_naming_the_file(debian_rootfs, tmp_path):
    cache = _linked_cache(tmp_path, corrupt="grep")
    with pytest.raises(rootfs.RootfsMismatch, match=r"grep_3[^ ]*_i386\.deb sha256"):
        rootfs.materialise("debian", fetch=False, cache_dir=cache)
    assert not (cache / "rootfs").exists()    # verified before anything is unpacked


@pytest.mark.slow
def test_concurrent_materialise_and_unstamped_rebuild(debian_rootfs, tmp_path):
    cache = _linked_cache(tmp_path)
    code = ("import sys; from tlslab.rootfs import materialise; "
            "print(materialise('debian', fetch=False, cache_dir=sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    root = type(debian_rootfs)(paths.pop())
    stamp_file = root.with_name(root.name + ".json")
    assert stamp_file.is_file()
    # exactly the root, its stamp and the flock file: no staging or trash left
    names = sorted(p.name for p in root.parent.iterdir())
    assert names == sorted([root.name, stamp_file.name, f".{root.name}.lock"]), names
    assert rootfs.count_entries(root / "usr" / "lib") == \
        rootfs.count_entries(debian_rootfs / "usr" / "lib")

    # a root without its stamp is incomplete: rebuilt from scratch
    stamp_file.unlink()
    (root / "leftover").write_text("partial")
    assert rootfs.materialise("debian", fetch=False, cache_dir=cache) == root
    assert not (root / "leftover").exists() and stamp_file.is_file()
    assert (root / "bin" / "ls").is_file()


def test_native_ls_R_usr_lib_in_chroot(debian_rootfs):
    if os.geteuid() != 0:
        unavailable("chroot needs root (run as root, as .ci/run does)")
    chroot = shutil.which("chroot")
    if chroot is None:
        unavailable("no chroot(8) on this host")
    cp = subprocess.run([chroot, str(debian_rootfs), "/bin/ls", "-R", "/usr/lib"],
                        capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert "/usr/lib/python3/dist-packages/django:" in cp.stdout
