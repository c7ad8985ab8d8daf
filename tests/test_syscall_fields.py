"""System-call results against the kernel, field by field (issue 17, item 1).

``tests/probe/sysprobe.c`` (built here with ``gcc -m32 -static``) dumps the raw
bytes of stat64, lstat64, fstatat64, fstat64 (O_PATH and directory
descriptors), statx (following and not), readlink, getdents64 (two buffer
sizes: every record, every field, d_type included), ugetrlimit, getrlimit,
prlimit64, uname and statfs64. It runs natively on a tree materialised on
tmpfs and under tlslab on the same tree, and the two dumps are decoded with
the field tables below (written from the i386 UAPI headers, not from
``tlslab.linux.structs``) and compared field by field.

Two trees:

* ``host``: built here (regular files of several sizes, a hard-linked pair,
  symlinks to a file and to a directory, a dangling and a looping symlink, a
  fifo, nested directories, modes 000/600/4751/1777/555/311/2755, a file of another user) and seen by the
  guest through ``Vfs.from_host`` (``--root DIR`` and root filesystems);
* ``synthetic``: a small synthetic tree (``Vfs.from_tree``), materialised in
  the model's readdir order.

Every field that legitimately differs is in ``DIFFERS``, with the reason;
nothing else may differ. As root (as .ci/run runs) the tree is owned by
1000:1000 and the native probe runs as uid/gid 1000, the guest's user, with
the model's resource limits, so owners and limits are compared too.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import GCC32, require_gcc32, unavailable
from tlslab.hypervisor.domain import run_process
from tlslab.linux.process import DEFAULT_ENV, Process
from tlslab.linux.vfs import Vfs
from tlslab.machine.vcpu import VCpu

PROBE = Path(__file__).parent / "probe" / "sysprobe.c"
GUEST_UID = GUEST_GID = 1000
AS_ROOT = os.geteuid() == 0
ALL = frozenset({"host", "synthetic"})

# --------------------------------------------------------------------- the one list of legitimate differences
# (struct, field) -> (trees where it may differ, why). Nothing else may differ.
DIFFERS: dict[tuple[str, str], tuple[frozenset, str]] = {
    ("stat64", "st_dev"): (ALL, "tlslab's data tree is a fixed disk (8,1) (nodes.DEV_TREE); the host's tmpfs has "
                                "whatever anonymous device number the host gave it"),
    ("statx", "stx_dev_major"): (ALL, "as st_dev"),
    ("statx", "stx_dev_minor"): (ALL, "as st_dev"),
    ("statx", "stx_mnt_id"): (ALL, "the host's mount id; tlslab has one mount, id 1"),
    ("stat64", "__pad0"): (ALL, "padding: the x86-64 kernel's ia32 stat64 (cp_stat64, field by field) does not "
                                "write it (the probe's 0xa5 fill shows through); tlslab zeroes it"),
    ("stat64", "__pad3"): (ALL, "as __pad0"),
    ("stat64", "st_atime after getdents64"): (ALL, "listing a directory updates its atime natively; "
                                                   "tlslab's filesystem is read-only underneath and keeps it"),
    ("stat64", "st_ctime"): (ALL, "a test cannot set the host's ctime (the time of its last chmod/utime); "
                                  "tlslab reports the mtime as ctime, deterministically"),
    ("stat64", "st_ctime_nsec"): (ALL, "as st_ctime"),
    ("statx", "stx_ctime"): (ALL, "as st_ctime"),
    ("statx", "stx_btime"): (ALL, "tmpfs knows creation times (STATX_BTIME in stx_mask); tlslab does not and "
                                  "leaves btime zero and out of the mask (checked below)"),
    ("statx", "stx_mask.btime"): (ALL, "as stx_btime"),
    ("statx", "stx_attributes_mask"): (ALL, "which inode attributes (append-only, immutable, nodump) the "
                                            "filesystem supports: tmpfs supports some, tlslab's none"),
    ("stat64", "st_ino"): (frozenset({"synthetic"}), "a synthetic tree numbers its inodes in creation order "
                                                     "(the host copy gets the host's); host views keep the host's"),
    ("stat64", "__st_ino"): (frozenset({"synthetic"}), "as st_ino"),
    ("statx", "stx_ino"): (frozenset({"synthetic"}), "as st_ino"),
    ("dirent64", "d_ino"): (frozenset({"synthetic"}), "as st_ino"),
    ("dirent64", "d_ino(..)@root"): (ALL, "the tree is the guest's /, whose .. is itself; natively .. of the "
                                          "tree's directory is its host parent"),
    ("dirent64", "d_off"): (ALL, "an opaque cookie for lseek: tmpfs hands out its own (6.6+: stable offsets), "
                                 "tlslab the index of the next entry; programs only pass it back"),
    ("dirent64", "padding"): (ALL, "bytes between a name's NUL and the next record: the kernel does not write "
                                   "them (the probe's 0xa5 fill shows through), tlslab zeroes them"),
    ("utsname", "nodename"): (ALL, "the host's name; tlslab's machine is called tlslab"),
    ("utsname", "release"): (ALL, "the host's kernel; tlslab presents a fixed 6.1.0-tlslab"),
    ("utsname", "version"): (ALL, "as release"),
    ("utsname", "machine"): (ALL, "a 64-bit host kernel says x86_64 to a 32-bit process; tlslab presents an "
                                  "i386 kernel (i686)"),
    ("utsname", "domainname"): (ALL, "the host's NIS domain; tlslab says (none)"),
    ("statfs64", "f_type"): (ALL, "tlslab presents its data tree as ext4; natively it is tmpfs"),
    ("statfs64", "f_blocks"): (ALL, "sizes of the host filesystem vs tlslab's fixed ones"),
    ("statfs64", "f_bfree"): (ALL, "as f_blocks"),
    ("statfs64", "f_bavail"): (ALL, "as f_blocks"),
    ("statfs64", "f_files"): (ALL, "as f_blocks"),
    ("statfs64", "f_ffree"): (ALL, "as f_blocks"),
    ("statfs64", "f_fsid"): (ALL, "the host's filesystem id"),
    ("statfs64", "f_flags"): (ALL, "the host's mount flags"),
}
for _s in ("stat64", "statx"):
    DIFFERS[(_s, "atime of a followed symlink")] = (
        ALL, "following a symlink reads it, which updates its atime natively (relatime); tlslab's links keep it")

# NOT legitimate: where tlslab is wrong today. Each must be fixed under tlslab/ and then removed here
# (test_model_gaps_are_still_there fails as soon as one is fixed, so this list cannot go stale).
MODEL_GAPS: dict[tuple[str, str], tuple[frozenset, str]] = {
    ("stat64", "nlink of a hard-linked file"): (
        frozenset({"host"}), "nodes.host_node drops the host's st_nlink: every non-directory has nlink 1"),
    ("statx", "nlink of a hard-linked file"): (frozenset({"host"}), "as stat64"),
    ("stat64", "blocks of a directory"): (
        ALL, "Node.blocks gives every directory (size+4095)//4096*8: a host view drops the host's st_blocks "
             "(tmpfs 0; ext4 8, which is why the Debian-root tests pass) and a synthetic directory has "
             "tmpfs's size (20 bytes an entry) but a disk's 8 blocks"),
    ("statx", "blocks of a directory"): (ALL, "as stat64"),
    ("rlimit", "infinity through the old getrlimit"): (
        ALL, "syscalls_proc serves getrlimit (76) like ugetrlimit (191); the kernel's old getrlimit reports "
             "RLIM_INFINITY as 0x7fffffff (RLIM_INFINITY of the old ABI), ugetrlimit as 0xffffffff"),
}
if not AS_ROOT:
    for _s, _f in (("stat64", "st_uid"), ("stat64", "st_gid"), ("statx", "stx_uid"), ("statx", "stx_gid")):
        DIFFERS[(_s, _f)] = (ALL, "not root: the tree belongs to the host user, whom tlslab shows as the guest "
                                  "user 1000 (nodes.host_node map_owner); as root both sides are 1000")

# --------------------------------------------------------------------- i386 layouts (from the UAPI headers)
# asm/stat.h struct stat64 (i386), 96 bytes
STAT64_FIELDS = [("st_dev", "Q"), ("__pad0", "4s"), ("__st_ino", "I"), ("st_mode", "I"), ("st_nlink", "I"),
                 ("st_uid", "I"), ("st_gid", "I"), ("st_rdev", "Q"), ("__pad3", "4s"), ("st_size", "q"),
                 ("st_blksize", "I"), ("st_blocks", "Q"), ("st_atime", "I"), ("st_atime_nsec", "I"),
                 ("st_mtime", "I"), ("st_mtime_nsec", "I"), ("st_ctime", "I"), ("st_ctime_nsec", "I"),
                 ("st_ino", "Q")]
# linux/stat.h struct statx, 256 bytes (statx_timestamp: s64 sec, u32 nsec, s32 reserved)
STATX_FIELDS = [("stx_mask", "I"), ("stx_blksize", "I"), ("stx_attributes", "Q"), ("stx_nlink", "I"),
                ("stx_uid", "I"), ("stx_gid", "I"), ("stx_mode", "H"), ("__spare0", "H"), ("stx_ino", "Q"),
                ("stx_size", "Q"), ("stx_blocks", "Q"), ("stx_attributes_mask", "Q"),
                ("stx_atime", "qIi"), ("stx_btime", "qIi"), ("stx_ctime", "qIi"), ("stx_mtime", "qIi"),
                ("stx_rdev_major", "I"), ("stx_rdev_minor", "I"), ("stx_dev_major", "I"), ("stx_dev_minor", "I"),
                ("stx_mnt_id", "Q"), ("rest", "104s")]   # dio/subvol/atomic-write fields: only on request, zero
# asm/statfs.h struct statfs64 (i386, packed), 84 bytes
STATFS64_FIELDS = [("f_type", "I"), ("f_bsize", "I"), ("f_blocks", "Q"), ("f_bfree", "Q"), ("f_bavail", "Q"),
                   ("f_files", "Q"), ("f_ffree", "Q"), ("f_fsid", "ii"), ("f_namelen", "I"), ("f_frsize", "I"),
                   ("f_flags", "I"), ("f_spare", "16s")]
UTS_FIELDS = ("sysname", "nodename", "release", "version", "machine", "domainname")
STATX_BTIME = 0x800
DT = {"fifo": 1, "dir": 4, "reg": 8, "lnk": 10}


def _decode(fields, data: bytes) -> dict[str, object]:
    fmt = "<" + "".join(f for _, f in fields)
    assert struct.calcsize(fmt) == len(data), (fmt, len(data))
    values = list(struct.unpack(fmt, data))
    out = {}
    for name, f in fields:
        n = len(struct.unpack("<" + f, bytes(struct.calcsize("<" + f))))
        out[name] = values[0] if n == 1 else tuple(values[:n])
        del values[:n]
    return out


def decode_dirents(data: bytes) -> list[dict]:
    """linux/dirent.h struct linux_dirent64: u64 d_ino, s64 d_off, u16 d_reclen, u8 d_type, char d_name[]."""
    out, pos = [], 0
    while pos < len(data):
        ino, off, reclen, dtype = struct.unpack_from("<QqHB", data, pos)
        assert reclen >= 20 and pos + reclen <= len(data), (pos, reclen, len(data))
        rec = data[pos:pos + reclen]
        end = rec.index(b"\0", 19)
        out.append({"d_ino": ino, "d_off": off, "d_reclen": reclen, "d_type": dtype, "d_name": rec[19:end],
                    "padding": rec[end + 1:]})
        pos += reclen
    return out


def decode(call: str, data: bytes):
    if call.startswith(("stat64", "lstat64", "fstatat64", "fstat64")):
        return "stat64", _decode(STAT64_FIELDS, data)
    if call.startswith("statx"):
        d = _decode(STATX_FIELDS, data)
        d["stx_mask.btime"] = d["stx_mask"] & STATX_BTIME
        d["stx_mask"] &= ~STATX_BTIME
        return "statx", d
    if call.startswith("statfs64"):
        return "statfs64", _decode(STATFS64_FIELDS, data)
    if call in ("ugetrlimit", "getrlimit"):
        return "rlimit", _decode([("rlim_cur", "I"), ("rlim_max", "I")], data)
    if call == "prlimit64":
        return "rlimit64", _decode([("rlim_cur", "Q"), ("rlim_max", "Q")], data)
    if call == "uname":
        fields = [data[65 * i:65 * (i + 1)] for i in range(6)]
        d = {name: f.split(b"\0", 1)[0] for name, f in zip(UTS_FIELDS, fields)}
        d["nul-padding"] = all(not any(f[f.index(b"\0"):]) for f in fields)
        return "utsname", d
    return "raw", {"bytes": data}


def parse(out: bytes) -> dict[tuple[str, str], tuple[int, int, bytes]]:
    calls = {}
    for line in out.decode().splitlines():
        call, arg, ret, err, hexdata = line.split("\t")
        assert (call, arg) not in calls, f"duplicate probe line {call} {arg}"
        calls[(call, arg)] = (int(ret), int(err), bytes.fromhex(hexdata))
    return calls


S_IFMT, S_IFDIR, S_IFLNK = 0o170000, 0o040000, 0o120000


def _label(call: str, kind: str, field: str, native: dict) -> str:
    """The name under which a field is looked up in DIFFERS / MODEL_GAPS (some differ only in a situation)."""
    mode = native.get("st_mode", native.get("stx_mode", 0)) & S_IFMT
    if field.startswith(("st_atime", "stx_atime")):
        if call.startswith("fstat64-dir"):
            return "st_atime after getdents64"
        if mode == S_IFLNK:
            return "atime of a followed symlink"
    if field in ("st_nlink", "stx_nlink") and mode not in (S_IFDIR, 0) and native[field] > 1:
        return "nlink of a hard-linked file"
    if call == "getrlimit" and native[field] == 0x7FFFFFFF:
        return "infinity through the old getrlimit"
    if field in ("st_blocks", "stx_blocks") and mode == S_IFDIR:
        return "blocks of a directory"
    return field


def compare(native: bytes, guest: bytes, tree: str, gaps: bool = True) -> tuple[list[str], dict]:
    """Every difference not in DIFFERS (nor MODEL_GAPS, with ``gaps``), and what was compared."""
    n, g = parse(native), parse(guest)
    problems = []
    if set(n) != set(g):
        problems.append(f"calls only native: {sorted(set(n) - set(g))[:10]}, only guest: {sorted(set(g) - set(n))[:10]}")
    seen = {"fields": 0, "d_types": set(), "nlinks": set(), "modes": set(), "errnos": set()}

    def allowed(kind: str, field: str) -> bool:
        for table in (DIFFERS, MODEL_GAPS if gaps else {}):
            entry = table.get((kind, field))
            if entry is not None and tree in entry[0]:
                return True
        return False

    for key in sorted(set(n) & set(g)):
        call, arg = key
        (rn, en, dn), (rg, eg, dg) = n[key], g[key]
        if (rn, en) != (rg, eg):
            problems.append(f"{call}({arg}): native returned {rn} errno {en}, tlslab {rg} errno {eg}")
            continue
        seen["errnos"].add(en)
        if len(dn) != len(dg):
            problems.append(f"{call}({arg}): {len(dn)} bytes natively, {len(dg)} under tlslab")
            continue
        if not dn:
            continue
        if call.startswith("getdents64"):
            rn_, rg_ = decode_dirents(dn), decode_dirents(dg)
            if [r["d_name"] for r in rn_] != [r["d_name"] for r in rg_]:
                problems.append(f"{call}({arg}): names {[r['d_name'] for r in rn_]} vs {[r['d_name'] for r in rg_]}")
                continue
            for a, b in zip(rn_, rg_):
                for field in ("d_ino", "d_off", "d_reclen", "d_type", "padding"):
                    seen["fields"] += 1
                    name = "d_ino(..)@root" if field == "d_ino" and arg == "." and a["d_name"] == b".." else field
                    if a[field] != b[field] and not allowed("dirent64", name):
                        problems.append(f"{call}({arg}) {a['d_name']!r} {field}: native {a[field]!r}, tlslab {b[field]!r}")
                seen["d_types"].add(a["d_type"])
            continue
        kind, fn = decode(call, dn)
        _, fg = decode(call, dg)
        if kind == "stat64":
            seen["nlinks"].add(fn["st_nlink"])
            seen["modes"].add(fn["st_mode"])
        if kind == "statx" and fg["stx_mask.btime"] == 0:
            assert fg["stx_btime"] == (0, 0, 0), f"{call}({arg}): btime outside the mask must be zero"
        for field, a in fn.items():
            b = fg[field]
            seen["fields"] += 1
            field = _label(call, kind, field, fn)
            if a != b and not allowed(kind, field):
                show = (lambda v: f"{v:#x}") if isinstance(a, int) and not isinstance(a, bool) else repr
                problems.append(f"{call}({arg}) {kind}.{field}: native {show(a)}, tlslab {show(b)}")
    return problems, seen


# --------------------------------------------------------------------- trees
NS = 1_000_000_000
T0 = 1_100_000_000 * NS + 123_456_789


def build_host_tree(root: Path) -> list[str]:
    """The hand-made tree; returns the paths the probe looks at (relative, '.' first)."""
    root.mkdir()
    files = {"plain.txt": b"hello, world\n", "empty": b"", "page.bin": bytes(range(256)) * 16,
             "big.bin": bytes(10_000), "hard.a": b"two names\n", "secret": b"s\n", "setuid": b"#!/bin/true\n",
             "none": b"", "nested/a/b/c/deep.txt": b"deep\n", "nested/a/one": b"1", "ro/inside": b"x",
             "sticky/t": b"t", "x/hidden": b"h"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "nested/a/sibling").mkdir()
    os.link(root / "hard.a", root / "hard.b")
    os.link(root / "nested/a/one", root / "nested/a/b/two")
    os.symlink("plain.txt", root / "link.file")
    os.symlink("nested/a", root / "link.dir")
    os.symlink("missing/nowhere", root / "dangling")
    os.symlink("loop", root / "loop")
    os.mkfifo(root / "fifo", 0o644)
    modes = {"plain.txt": 0o644, "empty": 0o644, "page.bin": 0o755, "big.bin": 0o640, "hard.a": 0o664,
             "secret": 0o600, "setuid": 0o4751, "none": 0o000, "ro": 0o555, "sticky": 0o1777, "x": 0o311,
             "fifo": 0o620, "nested": 0o750, "nested/a": 0o755, "nested/a/b": 0o700, "nested/a/b/c": 0o755,
             "nested/a/sibling": 0o2755, "nested/a/b/c/deep.txt": 0o444}
    everything = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    for i, rel in enumerate(sorted(everything, key=lambda r: -r.count("/"))):  # deepest first
        full = root / rel
        if AS_ROOT:   # the guest user's, but one file of somebody else's
            owner = 2000 if rel == "sticky/t" else GUEST_UID
            os.chown(full, owner, owner, follow_symlinks=False)
        if not full.is_symlink():
            full.chmod(modes.get(rel, 0o644))
        t = T0 + i * 7_777_777_777
        os.utime(full, ns=(t, t), follow_symlinks=False)
    if AS_ROOT:
        os.chown(root, GUEST_UID, GUEST_GID)
    root.chmod(0o755)
    os.utime(root, ns=(T0 - NS, T0 - NS))
    return [".", *everything, "missing", "plain.txt/x", "link.dir/b", "link.dir/one", "dangling/x"]


def build_synthetic_tree():
    """A small synthetic tree and a host copy that lists in the model's order (tlslab.hw.backend)."""
    from tlslab.hw.backend import materialised_tree, tree_order_matches
    from tlslab.linux.tree import SyntheticTree

    spec = "dirs=6,files=14,symlinks=5,depth=3,seed=17"
    tree = SyntheticTree(spec)
    dest = Path(materialised_tree(spec, fresh=True))
    if not tree_order_matches(str(dest)):
        unavailable("this host cannot list a directory in the model's order (no tmpfs)", ci_installs=False)
    for d in (dest.parent, dest.parent.parent):
        if d != Path("/") and d.name.startswith(("tlslab-hw-tree-", "root")):
            d.chmod(0o755)
    if AS_ROOT:
        for p in [dest, *dest.rglob("*")]:
            os.chown(p, GUEST_UID, GUEST_GID, follow_symlinks=False)
    # materialised_tree listed every directory (to check the order), which touched their atimes
    for e in tree.entries:
        os.utime(dest / e.path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    os.utime(dest, ns=(tree.root_mtime_ns, tree.root_mtime_ns))
    return tree, dest, [".", *(e.path for e in tree.entries)]


# --------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def probe_exe():
    require_gcc32()
    base = Path(tempfile.mkdtemp(prefix="tlslab-probe-"))
    base.chmod(0o755)
    exe = base / "sysprobe"
    subprocess.run([*GCC32, "-O1", "-o", str(exe), str(PROBE)], check=True)
    exe.chmod(0o755)
    yield str(exe)
    shutil.rmtree(base, ignore_errors=True)


def model_limits():
    from tlslab.linux.syscalls_proc import RLIM_INFINITY, RLIMITS

    import resource

    return {r: tuple(resource.RLIM_INFINITY if v == RLIM_INFINITY else v for v in lim) for r, lim in RLIMITS.items()}


def run_native_probe(exe: str, paths: list[str], cwd: Path) -> tuple[bytes, set[int]]:
    """The probe on the host: uid/gid 1000 and the model's limits where this host allows them."""
    import resource

    limits = model_limits()
    refused: set[int] = set()
    for r, lim in limits.items():   # find out which limits can be given to the child
        try:
            pid = os.fork()
        except OSError:
            refused.add(r)
            continue
        if pid == 0:
            try:
                resource.setrlimit(r, lim)
                os._exit(0)
            except Exception:
                os._exit(1)
        if os.waitpid(pid, 0)[1] != 0:
            refused.add(r)

    def child():
        for r, lim in limits.items():
            if r not in refused:
                resource.setrlimit(r, lim)
        if AS_ROOT:
            os.setgroups([])
            os.setgid(GUEST_GID)
            os.setuid(GUEST_UID)

    env = dict(e.decode().split("=", 1) for e in DEFAULT_ENV)
    cp = subprocess.run(["sysprobe", *paths], executable=exe, cwd=cwd, env=env, capture_output=True,
                        preexec_fn=child, timeout=60)
    assert cp.returncode == 0 and not cp.stderr, cp.stderr
    return cp.stdout, refused


def run_guest_probe(exe: str, paths: list[str], vfs: Vfs) -> bytes:
    p = Process(VCpu(checks=True), exe, argv=["sysprobe", *paths], vfs=vfs, seed=1)
    status = run_process(p)
    assert status == 0 and not bytes(p.stderr), bytes(p.stderr)
    assert not p.counters.syscalls.unsupported, p.counters.syscalls.unsupported
    return bytes(p.stdout)


def _drop_refused_limits(out: bytes, refused: set[int]) -> bytes:
    keep = [ln for ln in out.splitlines(keepends=True)
            if not (ln.split(b"\t")[0] in (b"ugetrlimit", b"getrlimit", b"prlimit64")
                    and int(ln.split(b"\t")[1]) in refused)]
    return b"".join(keep)


def _check(native: bytes, guest: bytes, tree: str, refused: set[int]):
    native, guest = _drop_refused_limits(native, refused), _drop_refused_limits(guest, refused)
    problems, seen = compare(native, guest, tree)
    assert not problems, f"{len(problems)} fields differ from the kernel's:\n" + "\n".join(problems[:60])
    return seen


@pytest.fixture(scope="module")
def dumps(probe_exe):
    """tree kind -> (native dump, guest dump, limits the host refused), each run once per module."""
    out = {}
    base = Path(tempfile.mkdtemp(prefix="tlslab-fields-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    base.chmod(0o755)
    try:
        root = base / "root"
        paths = build_host_tree(root)
        native, refused = run_native_probe(probe_exe, paths, root)
        out["host"] = (native, run_guest_probe(probe_exe, paths, Vfs.from_host(root)), refused)
        tree, troot, tpaths = build_synthetic_tree()
        native, refused = run_native_probe(probe_exe, tpaths, troot)
        out["synthetic"] = (native, run_guest_probe(probe_exe, tpaths, Vfs.from_tree(tree)), refused)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def test_host_view_fields_equal_the_kernels(dumps):
    seen = _check(*dumps["host"][:2], "host", dumps["host"][2])
    # the tree exercised what it is meant to: every d_type, hard links, the unusual modes, the errnos
    assert {DT["fifo"], DT["dir"], DT["reg"], DT["lnk"]} <= seen["d_types"]
    assert 2 in seen["nlinks"] and 0o104751 in seen["modes"] and 0o100000 in seen["modes"]
    assert 0o041777 in seen["modes"] and 0o010620 in seen["modes"] and 0o042755 in seen["modes"]
    assert {2, 13, 20, 40} <= seen["errnos"]       # ENOENT, EACCES (x/), ENOTDIR, ELOOP
    assert seen["fields"] > 2000
    assert not (AS_ROOT and dumps["host"][2]), f"as root every model limit can be set natively: {dumps['host'][2]}"


def test_synthetic_tree_fields_equal_the_kernels(dumps):
    seen = _check(*dumps["synthetic"][:2], "synthetic", dumps["synthetic"][2])
    assert {DT["dir"], DT["reg"], DT["lnk"]} <= seen["d_types"]
    assert seen["fields"] > 1000


def test_model_gaps_are_still_there(dumps):
    """MODEL_GAPS lists real differences only: once tlslab fixes one, remove it there (this test says which)."""
    found = set()
    for tree, (native, guest, refused) in dumps.items():
        problems, _ = compare(_drop_refused_limits(native, refused), _drop_refused_limits(guest, refused), tree,
                              gaps=False)
        for line in problems:
            head = line.split(": native")[0].split(" ", 1)[1]
            kind, field = head.split(".", 1)
            assert (kind, field) in MODEL_GAPS, line
            found.add((kind, field))
    assert found == set(MODEL_GAPS), f"fixed in tlslab, remove from MODEL_GAPS: {set(MODEL_GAPS) - found}"


def test_the_comparison_sees_planted_differences():
    """The comparison itself: a changed d_type or nlink in the guest's dump is reported."""
    st = bytearray(96)
    struct.pack_into("<I", st, 20, 1)
    native = b"lstat64\tf\t0\t0\t" + bytes(st).hex().encode() + b"\n"
    struct.pack_into("<I", st, 20, 2)
    guest = b"lstat64\tf\t0\t0\t" + bytes(st).hex().encode() + b"\n"
    problems, _ = compare(native, guest, "host")
    assert problems == ["lstat64(f) stat64.st_nlink: native 0x1, tlslab 0x2"]
    rec = struct.pack("<QqHB", 5, 1, 24, 8) + b"f\0" + bytes(3)
    bad = struct.pack("<QqHB", 5, 1, 24, 8 ^ 2) + b"f\0" + bytes(3)
    problems, _ = compare(b"getdents64-1-0\t.\t24\t0\t" + rec.hex().encode() + b"\n",
                          b"getdents64-1-0\t.\t24\t0\t" + bad.hex().encode() + b"\n", "host")
    assert problems == ["getdents64-1-0(.) b'f' d_type: native 8, tlslab 10"]
