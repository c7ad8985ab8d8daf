"""Open file descriptions and the per-process descriptor table.

Directory reads use a listing snapshot taken when the stream is at position 0;
the position is an entry index, so every ``d_off`` fits 32 bits (glibc's
non-LFS ``readdir`` fails with EOVERFLOW otherwise, docs/measurements.md#glibc).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlslab.linux import errno as E
from tlslab.linux import nodes as N
from tlslab.linux.errno import SyscallError

O_ACCMODE, O_RDONLY, O_WRONLY, O_RDWR = 3, 0, 1, 2
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC, O_APPEND, O_NONBLOCK = 0x40, 0x80, 0x100, 0x200, 0x400, 0x800
O_LARGEFILE, O_DIRECTORY, O_NOFOLLOW, O_CLOEXEC, O_PATH = 0x8000, 0x10000, 0x20000, 0x80000, 0x200000
MAX_FDS = 1024


@dataclass(eq=False)
class OpenFile:
    node: N.Node
    flags: int
    path: bytes
    offset: int = 0
    listing: list[tuple[bytes, N.Node]] | None = field(default=None, repr=False)
    version: int = 0   # a FIFO reader: the writers' open count when it opened (Linux's f_version)

    @property
    def readable(self) -> bool:
        return (self.flags & O_ACCMODE) in (O_RDONLY, O_RDWR) and not self.flags & O_PATH

    @property
    def writable(self) -> bool:
        return (self.flags & O_ACCMODE) in (O_WRONLY, O_RDWR) and not self.flags & O_PATH

    def dir_listing(self, parent: N.Dir) -> list[tuple[bytes, N.Node]]:
        if self.listing is None or self.offset == 0:
            d = self.node
            self.listing = d.readdir_stream(parent)
        return self.listing


@dataclass
class FdEntry:
    file: OpenFile
    cloexec: bool = False


class FdTable:
    def __init__(self):
        self.fds: dict[int, FdEntry] = {}

    def get(self, fd: int) -> OpenFile:
        entry = self.fds.get(fd)
        if entry is None:
            raise SyscallError(E.EBADF, f"fd {fd}")
        return entry.file

    def install(self, file: OpenFile, cloexec: bool = False, lowest: int = 0) -> int:
        fd = lowest
        while fd in self.fds:
            fd += 1
        if fd >= MAX_FDS:
            raise SyscallError(E.EMFILE)
        self.fds[fd] = FdEntry(file, cloexec)
        return fd

    def install_at(self, fd: int, file: OpenFile, cloexec: bool = False) -> int:
        if not 0 <= fd < MAX_FDS:
            raise SyscallError(E.EBADF)
        self.fds[fd] = FdEntry(file, cloexec)
        return fd

    def close(self, fd: int) -> None:
        if self.fds.pop(fd, None) is None:
            raise SyscallError(E.EBADF, f"fd {fd}")

    def copy(self) -> FdTable:
        """fork: a new table whose descriptors refer to the same open file descriptions."""
        table = FdTable()
        table.fds = {fd: FdEntry(entry.file, entry.cloexec) for fd, entry in self.fds.items()}
        return table

    def close_on_exec(self) -> None:
        for fd in [fd for fd, entry in self.fds.items() if entry.cloexec]:
            del self.fds[fd]

    def close_all(self) -> None:
        self.fds.clear()
