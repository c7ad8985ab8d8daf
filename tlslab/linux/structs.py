"""Byte layouts of the Linux i386 structures the system calls write.

All little-endian and unpadded ("<"), with explicit pad fields where the i386
ABI has them. Sizes are asserted at import: struct stat64 is 96 bytes, struct
statx 256, struct statfs64 84, struct new_utsname 390.
"""

from __future__ import annotations

import struct

from tlslab.linux import nodes as N

STAT64 = struct.Struct("<Q4xIIIIIQ4xqIQIIIIIIQ")
STATX = struct.Struct("<IIQIIIHHQQQQqIiqIiqIiqIiIIIIQII96x")
STATFS64 = struct.Struct("<IIQQQQQiiIII16x")
TIMESPEC32 = struct.Struct("<iI")
TIMESPEC64 = struct.Struct("<qq")
TIMEVAL32 = struct.Struct("<iI")
POLLFD = struct.Struct("<ihh")  # struct pollfd: fd, events, revents
RLIMIT32 = struct.Struct("<II")
RLIMIT64 = struct.Struct("<QQ")
IOVEC = struct.Struct("<II")
WINSIZE = struct.Struct("<HHHH")
DIRENT64_HEAD = struct.Struct("<QqHB")
assert (STAT64.size, STATX.size, STATFS64.size) == (96, 256, 84)

STATX_BASIC_STATS = 0x7FF
STATX_MNT_ID = 0x1000
UTSNAME_FIELD = 65


def encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``: what stat64's st_dev/st_rdev carry."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _times(node: N.Node) -> tuple[int, int]:
    return node.mtime_ns // 1_000_000_000, node.mtime_ns % 1_000_000_000


def pack_stat64(node: N.Node) -> bytes:
    sec, nsec = _times(node)
    return STAT64.pack(
        encode_dev(*node.dev), node.ino & 0xFFFFFFFF, node.mode, node.nlink, node.uid, node.gid,
        encode_dev(*node.rdev), node.size, 4096, node.blocks, sec, nsec, sec, nsec, sec, nsec, node.ino,
    )


def pack_statx(node: N.Node, mnt_id: int = 1) -> bytes:
    sec, nsec = _times(node)
    dev, rdev = node.dev, node.rdev
    return STATX.pack(
        STATX_BASIC_STATS | STATX_MNT_ID, 4096, 0, node.nlink, node.uid, node.gid, node.mode & 0xFFFF, 0,
        node.ino, node.size, node.blocks, 0,
        sec, nsec, 0,          # atime
        0, 0, 0,               # btime (not in the mask)
        sec, nsec, 0,          # ctime
        sec, nsec, 0,          # mtime
        rdev[0], rdev[1], dev[0], dev[1], mnt_id, 0, 0,
    )


def pack_statfs64(node: N.Node) -> bytes:
    fstype = {N.DEV_PROC: 0x9FA0, N.DEV_DEVTMPFS: 0x01021994}.get(node.dev, 0xEF53)
    return STATFS64.pack(fstype, 4096, 1 << 20, 1 << 19, 1 << 19, 1 << 18, 1 << 17, 0x801, 0, 255, 4096, 0x20)


def pack_dirent64(ino: int, next_off: int, dtype: int, name: bytes) -> bytes:
    reclen = (DIRENT64_HEAD.size + len(name) + 1 + 7) & ~7
    rec = DIRENT64_HEAD.pack(ino, next_off, reclen, dtype) + name
    return rec + bytes(reclen - len(rec))


def pack_utsname(fields: tuple[bytes, ...]) -> bytes:
    return b"".join(f[: UTSNAME_FIELD - 1].ljust(UTSNAME_FIELD, b"\0") for f in fields)


def pack_termios() -> bytes:
    """A plausible cooked-mode ``struct termios`` (kernel layout, 36 bytes) for a modelled tty."""
    cc = bytes([3, 28, 127, 21, 4, 0, 1, 0, 17, 19, 26, 0, 18, 15, 23, 22, 0, 0, 0])
    return struct.pack("<IIIIB", 0x500, 0x5, 0xBF, 0x8A3B, 0) + cc
