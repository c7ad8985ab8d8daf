"""Pipes: a bounded byte buffer between two kinds of open file description.

Reading an empty pipe blocks while a writer exists and returns end-of-file
when none does; writing blocks while the pipe is full and fails with EPIPE
(and SIGPIPE) when no reader exists -- as Linux's ``fs/pipe.c`` behaves for
blocking descriptors (O_NONBLOCK gives EAGAIN instead of blocking). Who is a
reader or a writer is computed from the descriptor tables of the live
processes when it matters (``Kernel.pipe_ends_open``), not kept as counts that
could drift.
"""

from __future__ import annotations

from tlslab.linux import nodes as N

PIPE_CAPACITY = 65536  # Linux's default pipe size (16 pages)
PIPE_BUF = 4096        # writes up to this size are atomic


class Pipe:
    """The shared buffer; ``read_end`` and ``write_end`` are the nodes open file descriptions point at."""

    def __init__(self, ino_read: int, ino_write: int, uid: int, gid: int):
        self.buffer = bytearray()
        self.read_end = PipeEnd(ino_read, self, "r", uid=uid, gid=gid)
        self.write_end = PipeEnd(ino_write, self, "w", uid=uid, gid=gid)
        self.bytes_written = 0

    @property
    def space(self) -> int:
        return PIPE_CAPACITY - len(self.buffer)

    def take(self, n: int) -> bytes:
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def put(self, data: bytes) -> int:
        n = min(len(data), self.space)
        if len(data) <= PIPE_BUF and n < len(data):
            return 0  # atomic: all or nothing for small writes
        self.buffer += data[:n]
        self.bytes_written += n
        return n


class PipeEnd(N.Node):
    """One end of a pipe, as fstat sees it (a FIFO of size 0)."""

    __slots__ = ("pipe", "end")

    def __init__(self, ino: int, pipe: Pipe, end: str, **kw):
        super().__init__(ino, N.S_IFIFO | 0o600, dev=(0, 14), **kw)
        self.pipe = pipe
        self.end = end
