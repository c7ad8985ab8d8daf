"""Kill tests for surviving mutants of tlslab/linux syscalls (benchmarks/mutation.py, issue 17 item 6).

Calls the personality directly (as test_linux_syscalls does) and checks the
bytes it writes, decoded with layouts written here from the i386 UAPI headers
(not from tlslab.linux.structs). Values that are tlslab's own model choices
(a fixed 512 MiB machine) are labelled as such.
"""

from __future__ import annotations

import struct

import pytest

from tlslab.linux import errno as E
from tlslab.linux.process import Process
from tlslab.linux.syscall_names import SYSCALL_NUMBERS as NR
from tlslab.linux.syscalls import dispatch
from tlslab.linux.tree import TREE_SMALL
from tlslab.linux.vfs import Vfs
from tlslab.machine.vcpu import VCpu

SCRATCH = 0x100000


@pytest.fixture
def proc():
    v = VCpu(checks=False)
    v.mem.map(SCRATCH, 0x10000, 3, "scratch")
    p = Process(v, "/nonexistent/prog", vfs=Vfs.from_tree(TREE_SMALL), seed=3)
    p.brk_start = p.brk = 0x200000
    return p


def call(p, name, *args):
    r = dispatch(p, NR[name], tuple(a & 0xFFFFFFFF for a in args), p.counters.syscalls)
    return r - (1 << 32) if r & 0x80000000 else r


def test_madvise_dontneed_zeroes_private_pages_and_other_advice_does_not(proc):
    a = call(proc, "mmap2", 0, 0x3000, 3, 0x22, -1, 0)
    proc.mem.write(a, b"\x5a" * 0x3000)
    assert call(proc, "madvise", a, 0x1000, 3) == 0            # MADV_WILLNEED: contents kept
    assert proc.mem.read(a, 0x3000) == b"\x5a" * 0x3000
    assert call(proc, "madvise", a + 0x1000, 0x800, 4) == 0   # MADV_DONTNEED, length rounded up to the page
    assert proc.mem.read(a, 0x1000) == b"\x5a" * 0x1000
    assert proc.mem.read(a + 0x1000, 0x1000) == bytes(0x1000)
    assert proc.mem.read(a + 0x2000, 0x1000) == b"\x5a" * 0x1000
    assert call(proc, "madvise", a + 1, 0x1000, 4) == -E.EINVAL
    assert call(proc, "madvise", 0x7000_0000, 0x1000, 4) == 0  # unmapped: nothing to zero, no fault


# linux/sysinfo.h (i386): long uptime; unsigned long loads[3], totalram, freeram, sharedram, bufferram,
# totalswap, freeswap; unsigned short procs, pad; unsigned long totalhigh, freehigh; unsigned int mem_unit;
# char _f[20 - 2*sizeof(long) - sizeof(int)] (= 8): 64 bytes
SYSINFO = [("uptime", "l"), ("load1", "L"), ("load5", "L"), ("load15", "L"), ("totalram", "L"), ("freeram", "L"),
           ("sharedram", "L"), ("bufferram", "L"), ("totalswap", "L"), ("freeswap", "L"), ("procs", "H"),
           ("pad", "H"), ("totalhigh", "L"), ("freehigh", "L"), ("mem_unit", "I"), ("_f", "8s")]


def test_sysinfo_bytes(proc):
    buf = SCRATCH + 0x100
    proc.mem.write(buf, b"\xa5" * 80)
    assert call(proc, "sysinfo", buf) == 0
    fmt = "<" + "".join(f for _, f in SYSINFO)
    assert struct.calcsize(fmt) == 64
    raw = proc.mem.read(buf, 80)
    assert raw[64:] == b"\xa5" * 16                       # nothing written past the struct
    d = dict(zip([n for n, _ in SYSINFO], struct.unpack(fmt, raw[:64])))
    # the model's machine (a choice, pinned): 512 MiB, half free, no swap, no load, one process, byte units
    assert d["uptime"] > 0
    assert (d["load1"], d["load5"], d["load15"]) == (0, 0, 0)
    assert (d["totalram"], d["freeram"], d["mem_unit"]) == (512 << 20, 256 << 20, 1)
    assert (d["sharedram"], d["bufferram"], d["totalswap"], d["freeswap"]) == (0, 0, 0, 0)
    assert (d["procs"], d["pad"], d["totalhigh"], d["freehigh"], d["_f"]) == (1, 0, 0, 0, bytes(8))


# asm/statfs.h struct statfs64 (i386, packed): 84 bytes
STATFS64 = [("f_type", "I"), ("f_bsize", "I"), ("f_blocks", "Q"), ("f_bfree", "Q"), ("f_bavail", "Q"),
            ("f_files", "Q"), ("f_ffree", "Q"), ("f_fsid0", "i"), ("f_fsid1", "i"), ("f_namelen", "I"),
            ("f_frsize", "I"), ("f_flags", "I"), ("f_spare", "16s")]


@pytest.mark.parametrize("path,fstype", [(b"/", 0xEF53), (b"/proc", 0x9FA0)])
def test_statfs64_bytes(proc, path, fstype):
    p_addr, buf = SCRATCH + 0x8000, SCRATCH + 0x200
    proc.mem.write(p_addr, path + b"\0")
    proc.mem.write(buf, b"\xa5" * 100)
    assert call(proc, "statfs64", p_addr, 84, buf) == 0
    fmt = "<" + "".join(f for _, f in STATFS64)
    raw = proc.mem.read(buf, 100)
    assert struct.calcsize(fmt) == 84 and raw[84:] == b"\xa5" * 16
    d = dict(zip([n for n, _ in STATFS64], struct.unpack(fmt, raw[:84])))
    assert d["f_type"] == fstype   # EXT4_SUPER_MAGIC for the data tree, PROC_SUPER_MAGIC for /proc
    # the model's filesystem (a choice, pinned; test_syscall_fields lists these as differing from the host's):
    # 4 GiB of 4 KiB blocks, half free and available, 256 Ki inodes with 128 Ki free, fsid (0x801, 0),
    # names up to 255 bytes, ST_RELATIME
    assert (d["f_bsize"], d["f_frsize"], d["f_namelen"], d["f_flags"]) == (4096, 4096, 255, 0x20)
    assert (d["f_blocks"], d["f_bfree"], d["f_bavail"]) == (1 << 20, 1 << 19, 1 << 19)
    assert (d["f_files"], d["f_ffree"]) == (1 << 18, 1 << 17)
    assert (d["f_fsid0"], d["f_fsid1"], d["f_spare"]) == (0x801, 0, bytes(16))
    assert call(proc, "statfs64", p_addr, 88, buf) == -E.EINVAL


def test_rt_sigprocmask_cannot_block_sigkill_or_sigstop(proc):
    new, old = SCRATCH + 0x300, SCRATCH + 0x310
    proc.mem.write(new, b"\xff" * 8)
    assert call(proc, "rt_sigprocmask", 2, new, 0, 8) == 0          # SIG_SETMASK: everything
    assert call(proc, "rt_sigprocmask", 0, 0, old, 8) == 0
    mask = int.from_bytes(proc.mem.read(old, 8), "little")
    # signal n is bit n - 1: SIGKILL (9) and SIGSTOP (19) stay clear, every other bit set
    assert mask == (1 << 64) - 1 - (1 << 8) - (1 << 18), hex(mask)
    assert call(proc, "rt_sigprocmask", 2, new, 0, 4) == -E.EINVAL


def test_sigaltstack_reports_a_disabled_stack(proc):
    old = SCRATCH + 0x400
    proc.mem.write(old, b"\xa5" * 16)
    assert call(proc, "sigaltstack", 0, old) == 0
    # stack_t (i386): void *ss_sp; int ss_flags; size_t ss_size
    assert struct.unpack("<IiI", proc.mem.read(old, 12)) == (0, 2, 0)   # SS_DISABLE
    assert proc.mem.read(old + 12, 4) == b"\xa5" * 4


def test_mincore(proc):
    a = call(proc, "mmap2", 0, 0x3000, 3, 0x22, -1, 0)
    vec = SCRATCH + 0x500
    proc.mem.write(vec, b"\xa5" * 8)
    assert call(proc, "mincore", a, 0x2001, vec) == 0
    assert proc.mem.read(vec, 8) == b"\x01\x01\x01" + b"\xa5" * 5
    assert call(proc, "mincore", a + 1, 0x1000, vec) == -E.EINVAL
    assert call(proc, "mincore", a, 0x4000, vec) == -E.ENOMEM


def test_termios_control_characters_are_the_kernels_defaults():
    from tlslab.linux import structs as S

    raw = S.pack_termios()
    assert len(raw) == 36
    iflag, oflag, cflag, lflag, line = struct.unpack_from("<IIIIB", raw)
    # include/linux/tty.h INIT_C_CC: ^C ^\ DEL ^U ^D, VTIME 0, VMIN 1, VSWTC 0, ^Q ^S ^Z, VEOL 0, ^R ^O ^W ^V, VEOL2 0
    assert raw[17:] == bytes([3, 28, 127, 21, 4, 0, 1, 0, 17, 19, 26, 0, 18, 15, 23, 22, 0, 0, 0])
    # tty_std_termios: ICRNL|IXON, OPOST|ONLCR, B38400|CS8|CREAD|HUPCL, ISIG|ICANON|ECHO|ECHOE|ECHOK|ECHOCTL|ECHOKE|IEXTEN
    assert (iflag, oflag, cflag, lflag, line) == (0x500, 0x5, 0xBF, 0x8A3B, 0)
