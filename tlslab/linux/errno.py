"""Linux errno values (asm-generic/errno-base.h, errno.h), fixed here.

Explicit rather than Python's ``errno`` module so that the guest sees Linux
numbers whatever the host is. Handlers signal failure by raising
:class:`SyscallError`; the dispatcher turns it into ``-errno`` in eax.
"""

from __future__ import annotations

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENXIO = 6
E2BIG = 7
ENOEXEC = 8
EBADF = 9
ECHILD = 10
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EEXIST = 17
EXDEV = 18
ENODEV = 19
ENOTDIR = 20
EISDIR = 21
EINVAL = 22
ENFILE = 23
EMFILE = 24
ENOTTY = 25
EFBIG = 27
ENOSPC = 28
ESPIPE = 29
EROFS = 30
EMLINK = 31
EPIPE = 32
ERANGE = 34
ENAMETOOLONG = 36
ENOSYS = 38
ENOTEMPTY = 39
ELOOP = 40
ENODATA = 61
EOVERFLOW = 75
ENOTSOCK = 88
EPROTONOSUPPORT = 93
EOPNOTSUPP = 95
EAFNOSUPPORT = 97
ECONNREFUSED = 111
ETIMEDOUT = 110

NAMES = {v: k for k, v in globals().items() if k.startswith("E") and isinstance(v, int)}


class SyscallError(Exception):
    """A system call fails with ``errno``; the guest sees ``-errno`` in eax."""

    def __init__(self, errno: int, detail: str = ""):
        super().__init__(f"{NAMES.get(errno, errno)}{': ' + detail if detail else ''}")
        self.errno = errno
