"""System calls one by one, against a process with scratch memory (no ELF loaded)."""

from __future__ import annotations

import struct

import pytest

from tlslab.linux import errno as E
from tlslab.linux import structs as S
from tlslab.linux.process import Process
from tlslab.linux.syscall_names import SYSCALL_NUMBERS as NR
from tlslab.linux.syscalls import dispatch, implemented
from tlslab.linux.tree import TREE_SMALL
from tlslab.linux.vfs import Vfs
from tlslab.machine.vcpu import VCpu
from tlslab.x86.descriptor import UserDesc

SCRATCH = 0x100000
AT_FDCWD = 0xFFFFFF9C


@pytest.fixture
def proc():
    v = VCpu(checks=False)
    v.mem.map(SCRATCH, 0x10000, 3, "scratch")
    policy_calls = []

    def policy(d):
        policy_calls.append(d)
        return d.with_limit(0xFBFFF)

    p = Process(v, "/nonexistent/prog", vfs=Vfs.from_tree(TREE_SMALL), seed=3, descriptor_policy=policy)
    p.policy_calls = policy_calls
    p.brk_start = p.brk = 0x200000
    return p


def call(p, name, *args):
    r = dispatch(p, NR[name], tuple(a & 0xFFFFFFFF for a in args), p.counters.syscalls)
    return r - (1 << 32) if r & 0x80000000 else r


def put(p, data: bytes, off=0x8000) -> int:
    p.mem.write(SCRATCH + off, data + b"\0")
    return SCRATCH + off


def test_unsupported_is_enosys_and_counted(proc):
    assert dispatch(proc, 9999, (0,) * 6, proc.counters.syscalls) == -E.ENOSYS & 0xFFFFFFFF
    assert call(proc, "vhangup") == -E.ENOSYS
    assert proc.counters.syscalls.unsupported["vhangup(111)"] == 1
    assert "statx" in implemented() and "set_thread_area" in implemented()


def test_write_goes_to_stdout_and_stderr(proc):
    buf = put(proc, b"hi there")
    assert call(proc, "write", 1, buf, 8) == 8
    assert call(proc, "write", 2, buf, 2) == 2
    assert bytes(proc.stdout) == b"hi there" and bytes(proc.stderr) == b"hi"
    assert call(proc, "write", 7, buf, 1) == -E.EBADF
    assert call(proc, "write", 1, 0x5000, 4) == -E.EFAULT


def test_open_read_lseek_close(proc):
    from tlslab.linux.tree import SyntheticTree

    t = SyntheticTree(TREE_SMALL)
    e = next(e for e in t.entries if e.kind == "file" and e.size > 100)
    fd = call(proc, "openat", AT_FDCWD, put(proc, e.path.encode()), 0, 0)
    assert fd == 3
    assert call(proc, "read", fd, SCRATCH, 50) == 50
    assert proc.mem.read(SCRATCH, 50) == t.content(e)[:50]
    assert call(proc, "lseek", fd, -10, 2) == e.size - 10
    res = SCRATCH + 0x100
    assert call(proc, "_llseek", fd, 0, 5, res, 0) == 0 and proc.mem.read(res, 8) == (5).to_bytes(8, "little")
    assert call(proc, "close", fd) == 0 and call(proc, "close", fd) == -E.EBADF
    assert call(proc, "open", put(proc, b"/nonexistent/x"), 0, 0) == -E.ENOENT
    assert call(proc, "open", put(proc, b"/"), 1, 0) == -E.EISDIR
    assert call(proc, "open", put(proc, e.path.encode() + b"/x"), 0, 0) == -E.ENOTDIR


def test_stat64_and_statx_layouts(proc):
    path = put(proc, b".")
    assert call(proc, "stat64", path, SCRATCH) == 0
    st = S.STAT64.unpack(proc.mem.read(SCRATCH, 96))
    mode, nlink, size, ino = st[2], st[3], st[7], st[-1]
    root = proc.vfs.root
    tmpfs_size = 20 * (2 + len(root.entries))  # directories size like tmpfs's (20 bytes per entry)
    subdirs = sum(1 for n in root.entries.values() if n.fmt == 0o040000)
    assert subdirs > 0
    assert mode == 0o040755 and nlink == 2 + subdirs and size == tmpfs_size and ino == 2 and st[1] == 2
    assert call(proc, "statx", AT_FDCWD, path, 0, 0x7FF, SCRATCH) == 0
    sx = S.STATX.unpack(proc.mem.read(SCRATCH, 256))
    assert sx[0] & 0x7FF == 0x7FF and sx[6] == mode and sx[8] == ino and sx[3] == nlink and sx[9] == size
    assert call(proc, "statx", AT_FDCWD, put(proc, b""), 0, 0x7FF, SCRATCH) == -E.ENOENT
    assert call(proc, "statx", 1, put(proc, b""), 0x1000, 0x7FF, SCRATCH) == 0  # AT_EMPTY_PATH on stdout
    assert S.STATX.unpack(proc.mem.read(SCRATCH, 256))[6] & 0o170000 == 0o010000  # a pipe
    assert call(proc, "fstat64", 2, SCRATCH) == 0
    assert S.STAT64.unpack(proc.mem.read(SCRATCH, 96))[2] & 0o170000 == 0o010000     # stderr is a pipe too


def test_getdents64_offsets_fit_32_bits(proc):
    fd = call(proc, "open", put(proc, b"."), 0x10000, 0)
    names, offs = [], []
    while (n := call(proc, "getdents64", fd, SCRATCH, 256)) > 0:
        data, pos = proc.mem.read(SCRATCH, n), 0
        while pos < n:
            ino, off, reclen, dtype = S.DIRENT64_HEAD.unpack_from(data, pos)
            names.append(data[pos + 19 : pos + reclen].rstrip(b"\0"))
            offs.append(off)
            assert reclen % 8 == 0 and 0 < off < 1 << 31
            pos += reclen
    assert names[:2] == [b".", b".."] and len(names) == len(set(names)) > 2
    assert b"dev" not in names and b"proc" not in names
    assert call(proc, "getdents64", fd, SCRATCH, 10) == 0          # at the end: nothing to return, no EINVAL
    assert call(proc, "lseek", fd, 0, 0) == 0
    assert call(proc, "getdents64", fd, SCRATCH, 10) == -E.EINVAL


def test_readlink_getcwd_chdir(proc):
    buf = SCRATCH + 0x200
    assert call(proc, "readlink", put(proc, b"/proc/self/exe"), buf, 100) == len(b"/bin/prog")
    assert proc.mem.read(buf, 9) == b"/bin/prog"
    assert call(proc, "readlink", put(proc, b"."), buf, 100) == -E.EINVAL
    assert call(proc, "getcwd", buf, 100) == 2 and proc.mem.read(buf, 2) == b"/\0"
    assert call(proc, "getcwd", buf, 1) == -E.ERANGE
    assert call(proc, "chdir", put(proc, b"/nope")) == -E.ENOENT


def test_overlay_write_then_read(proc):
    path = put(proc, b"newfile")
    fd = call(proc, "open", path, 0x41 | 0x200, 0o644)  # O_WRONLY|O_CREAT|O_TRUNC
    assert call(proc, "write", fd, put(proc, b"abc", 0x9000), 3) == 3
    assert call(proc, "close", fd) == 0
    assert call(proc, "rename", path, put(proc, b"renamed", 0x9100)) == 0
    fd = call(proc, "open", put(proc, b"renamed", 0x9100), 0, 0)
    assert call(proc, "read", fd, SCRATCH, 10) == 3 and proc.mem.read(SCRATCH, 3) == b"abc"
    assert call(proc, "unlink", put(proc, b"renamed", 0x9100)) == 0
    assert call(proc, "access", put(proc, b"renamed", 0x9100), 0) == -E.ENOENT


def test_ioctl_depends_on_stdout_model(proc):
    assert call(proc, "ioctl", 1, 0x5401, SCRATCH) == -E.ENOTTY
    tty = Process(proc.vcpu, "/nonexistent/prog", stdout="tty")
    assert call(tty, "ioctl", 1, 0x5401, SCRATCH) == 0
    assert call(tty, "ioctl", 1, 0x5413, SCRATCH) == 0 and S.WINSIZE.unpack(proc.mem.read(SCRATCH, 8))[:2] == (24, 80)


def test_brk_and_mmap(proc):
    assert call(proc, "brk", 0) == 0x200000
    assert call(proc, "brk", 0x201234) == 0x201234 and proc.mem.is_mapped(0x201000, 0x234)
    assert call(proc, "brk", 0x200000) == 0x200000 and not proc.mem.is_mapped(0x200000, 1)
    a = call(proc, "mmap2", 0, 0x3000, 3, 0x22, -1, 0)
    assert a > 0 and a % 4096 == 0 and proc.mem.read(a, 16) == bytes(16)
    assert call(proc, "mprotect", a, 0x1000, 1) == 0
    assert call(proc, "munmap", a, 0x3000) == 0 and not proc.mem.is_mapped(a, 1)
    assert call(proc, "mprotect", a, 0x1000, 1) == -E.ENOMEM
    assert call(proc, "mmap2", 0, 0, 3, 0x22, -1, 0) == -E.EINVAL
    fd = call(proc, "open", put(proc, b"/proc/self/exe"), 0, 0)
    assert fd >= 0


def test_set_thread_area_policy_and_get(proc):
    ud = UserDesc(entry_number=0xFFFFFFFF, base_addr=0x123000, limit=0xFFFFF, limit_in_pages=True, useable=True)
    addr = SCRATCH + 0x400
    proc.mem.write(addr, ud.pack())
    assert call(proc, "set_thread_area", addr) == 0
    assert proc.mem.read_u32(addr) == 6  # chosen slot written back
    assert proc.policy_calls == [ud.to_descriptor()]
    assert proc.vcpu.descriptors[6] == ud.to_descriptor().with_limit(0xFBFFF)
    ev = proc.tls_events[0]
    assert (ev.entry, ev.requested, ev.installed.limit) == (6, ud.to_descriptor(), 0xFBFFF)
    proc.mem.write(addr, (6).to_bytes(4, "little") + bytes(12))
    assert call(proc, "get_thread_area", addr) == 0
    got = UserDesc.unpack(proc.mem.read(addr, 16))
    assert got.base_addr == 0x123000 and got.limit == 0xFFFFF  # what the guest asked for
    proc.mem.write(addr, UserDesc(entry_number=3).pack())
    assert call(proc, "set_thread_area", addr) == -E.EINVAL
    proc.mem.write(addr, UserDesc(contents=2).pack())
    assert call(proc, "set_thread_area", addr) == -E.EINVAL


def test_time_and_random_are_deterministic(proc):
    assert call(proc, "clock_gettime64", 1, SCRATCH) == 0
    t1 = S.TIMESPEC64.unpack(proc.mem.read(SCRATCH, 16))
    assert call(proc, "nanosleep", put(proc, S.TIMESPEC32.pack(1, 5)[:-0] if False else S.TIMESPEC32.pack(1, 5)), 0) == 0
    assert call(proc, "clock_gettime", 1, SCRATCH) == 0
    t2 = S.TIMESPEC32.unpack(proc.mem.read(SCRATCH, 8))
    assert (t2[0] - t1[0]) * 10**9 + t2[1] - t1[1] == 1_000_000_005
    assert call(proc, "clock_gettime", 99, SCRATCH) == -E.EINVAL
    assert call(proc, "getrandom", SCRATCH, 16, 0) == 16
    other = Process(proc.vcpu, "/nonexistent/prog", seed=3)
    assert other.random_bytes(16) == proc.mem.read(SCRATCH, 16)


def test_rlimits_uname_ids(proc):
    assert call(proc, "ugetrlimit", 3, SCRATCH) == 0
    assert struct.unpack("<II", proc.mem.read(SCRATCH, 8)) == (8 << 20, 0xFFFFFFFF)
    assert call(proc, "prlimit64", 0, 7, 0, SCRATCH) == 0
    assert call(proc, "uname", SCRATCH) == 0 and proc.mem.read(SCRATCH + 4 * 65, 4) == b"i686"
    assert call(proc, "getuid32") == 1000 and call(proc, "getpid") == call(proc, "gettid") == 1000
    assert call(proc, "rseq", 0, 32, 0, 0) == -E.ENOSYS
