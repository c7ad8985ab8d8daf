"""Pipes: a bounded byte buffer between two kinds of open file description.

Reading an empty pipe blocks while a writer exists and returns end-of-file
when none does; writing blocks while the pipe is full and fails with EPIPE
(and SIGPIPE) when no reader exists -- as Linux's ``fs/pipe.c`` behaves for
blocking descriptors (O_NONBLOCK gives EAGAIN instead of blocking). Who is a
reader or a writer is computed from the descriptor tables of the live
processes when it matters (``Kernel.pipe_ends_open``), not kept as counts that
could drift.

Named pipes (mkfifo): a :class:`Fifo` node in the filesystem holds the pipe
its openers share. As in Linux's ``fifo_open``, an open for reading waits
until a writer opens and one for writing until a reader does (O_NONBLOCK: a
reader proceeds, a writer gets ENXIO); an opener that is waiting already
counts as a reader or writer (so a writer may write before the waiting reader
has its descriptor); O_RDWR opens at once as both. The buffer lives while
anyone has the FIFO open or is opening it: an open that finds neither starts
an empty pipe, as Linux frees the pipe with its last close.
"""

from __future__ import annotations

from tlslab.linux import nodes as N

PIPE_CAPACITY = 65536  # Linux's default pipe size (16 pages)
PIPE_BUF = 4096        # writes up to this size are atomic


class Pipe:
    """The shared buffer; ``read_end`` and ``write_end`` are the nodes open file descriptions point at."""

    def __init__(self, ino_read: int, ino_write: int, uid: int, gid: int, fifo: Fifo | None = None):
        self.buffer = bytearray()
        self.read_end = PipeEnd(ino_read, self, "r", uid=uid, gid=gid)
        self.write_end = PipeEnd(ino_write, self, "w", uid=uid, gid=gid)
        self.rw_end: PipeEnd | None = None   # a FIFO opened O_RDWR: one description, both ends
        self.fifo = fifo
        self.bytes_written = 0

    @classmethod
    def of_fifo(cls, fifo: Fifo) -> Pipe:
        """The pipe a FIFO's openers share: its ends are the FIFO as fstat sees it (inode, device, mode)."""
        pipe = cls(fifo.ino, fifo.ino, fifo.uid, fifo.gid, fifo=fifo)
        pipe.rw_end = PipeEnd(fifo.ino, pipe, "rw", uid=fifo.uid, gid=fifo.gid)
        for end in (pipe.read_end, pipe.write_end, pipe.rw_end):
            end.mode, end.dev = fifo.mode, fifo.dev
        return pipe

    def nodes_of(self, end: str) -> tuple:
        """The nodes whose open descriptions count as readers (``end`` "r") or writers ("w")."""
        one = self.read_end if end == "r" else self.write_end
        return (one,) if self.rw_end is None else (one, self.rw_end)

    def opening(self, end: str) -> bool:
        """Is a task waiting in open(2) on this pipe's FIFO for ``end``? (It counts as one already.)"""
        return self.fifo is not None and any(e == end for e, _ in self.fifo.waiting.values())

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


class Fifo(N.Node):
    """A named pipe in the filesystem (mkfifo, mknod S_IFIFO): the pipe its openers share, and who waits.

    ``arrivals`` counts opens per end; an opener waiting for the other end remembers the other end's
    count when it started (``waiting``: task -> (end, count)) and may go on once it changed or the
    other end is open, which is Linux's ``wait_for_partner`` on ``r_counter``/``w_counter``.
    """

    __slots__ = ("pipe", "waiting", "arrivals")

    def __init__(self, ino: int, mode: int, **kw):
        super().__init__(ino, N.S_IFIFO | (mode & 0o7777), **kw)
        self.pipe: Pipe | None = None
        self.waiting: dict = {}
        self.arrivals = {"r": 0, "w": 0}
