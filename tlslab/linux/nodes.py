"""In-memory inodes of the guest filesystem: directories, files, symlinks, devices.

Every node lives in host memory; host-backed nodes read the host lazily and
never write to it, so any guest write lands in this private overlay (a file is
copied up on its first write). Names are bytes, as the guest sees them.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
from collections.abc import Callable

S_IFMT, S_IFSOCK, S_IFLNK, S_IFREG, S_IFBLK = 0o170000, 0o140000, 0o120000, 0o100000, 0o060000
S_IFDIR, S_IFCHR, S_IFIFO = 0o040000, 0o020000, 0o010000
DT_TYPES = {S_IFIFO: 1, S_IFCHR: 2, S_IFDIR: 4, S_IFBLK: 6, S_IFREG: 8, S_IFLNK: 10, S_IFSOCK: 12}

# st_dev of the mounts, as (major, minor): a disk for the tree, devtmpfs, proc
DEV_TREE = (8, 1)
DEV_DEVTMPFS = (0, 5)
DEV_PROC = (0, 22)
TMPFS_DIRENT_SIZE = 20  # BOGO_DIRENT_SIZE in Linux mm/shmem.c
DIR_SIZE = 4096
GUEST_UID = GUEST_GID = 1000  # the guest's user and group (see Vfs)


class Node:
    """What ``stat`` reports, plus the kind-specific payload in subclasses."""

    __slots__ = ("ino", "mode", "uid", "gid", "mtime_ns", "dev", "rdev", "__weakref__")

    def __init__(self, ino: int, mode: int, mtime_ns: int = 0, uid: int = 1000, gid: int = 1000,
                 dev: tuple[int, int] = DEV_TREE, rdev: tuple[int, int] = (0, 0)):
        self.ino, self.mode, self.mtime_ns, self.uid, self.gid = ino, mode, mtime_ns, uid, gid
        self.dev, self.rdev = dev, rdev

    @property
    def fmt(self) -> int:
        return self.mode & S_IFMT

    @property
    def size(self) -> int:
        return 0

    @property
    def nlink(self) -> int:
        return 1

    @property
    def blocks(self) -> int:
        """512-byte blocks, as a 4 KiB-block filesystem allocates them."""
        return (self.size + 4095) // 4096 * 8

    def __repr__(self) -> str:
        return f"<{type(self).__name__} ino={self.ino} mode={self.mode:o}>"


class Dir(Node):
    __slots__ = ("_entries", "parent", "name", "hidden", "_loader", "host_size", "_host_order", "dot_positions")

    def __init__(self, ino: int, mode: int = S_IFDIR | 0o755, loader: Callable[[Dir], dict] | None = None, **kw):
        super().__init__(ino, mode, **kw)
        self._entries: dict[bytes, Node] | None = None if loader else {}
        self._loader = loader
        self._host_order = False
        self.parent: Dir = self
        self.name = b""
        self.hidden: dict[bytes, Node] = {}  # mounts reachable by name but not listed (see vfs)
        self.host_size: int | None = None
        # where the host's readdir returned "." and ".." (ext4 hashes them in among the names);
        # None: first, as tmpfs and in-memory directories do
        self.dot_positions: tuple[int, int] | None = None

    @property
    def entries(self) -> dict[bytes, Node]:
        if self._entries is None:
            self._entries = {}
            for name, node in self._loader(self).items():
                self.attach(name, node)
            self._loader = None
            self._host_order = True
        return self._entries

    def attach(self, name: bytes, node: Node) -> Node:
        self.entries[name] = node
        if isinstance(node, Dir):
            node.parent, node.name = self, name
        return node

    def lookup(self, name: bytes) -> Node | None:
        return self.hidden.get(name) or self.entries.get(name)

    def listing(self) -> list[tuple[bytes, Node]]:
        """Entries in the order readdir returns them.

        A host directory (``--root``) lists in the host's own readdir order, so
        a guest walk matches a native walk of the same directory. An in-memory
        directory (synthetic tree, overlay) lists newest first, as tmpfs does:
        a synthetic tree materialised onto tmpfs gives byte-identical output
        even for programs that do not sort (find).
        """
        items = list(self.entries.items())
        return items if self._host_order else items[::-1]

    def readdir_stream(self, parent: Dir) -> list[tuple[bytes, Node]]:
        """Everything readdir returns, "." and ".." included, in the order it returns them."""
        items = self.listing()
        if self.dot_positions is None:
            return [(b".", self), (b"..", parent)] + items
        out = list(items)
        for pos, entry in sorted(zip(self.dot_positions, ((b".", self), (b"..", parent))), key=lambda x: x[0]):
            out.insert(min(pos, len(out)), entry)
        return out

    @property
    def size(self) -> int:
        """tmpfs's directory size (20 bytes per entry incl. . and ..), or the host's."""
        if self.host_size is not None:
            return self.host_size
        return TMPFS_DIRENT_SIZE * (2 + len(self.entries))

    @property
    def nlink(self) -> int:
        return 2 + sum(1 for n in self.entries.values() if isinstance(n, Dir))


class File(Node):
    __slots__ = ("_data", "_source", "_size", "host_path", "links", "written")

    def __init__(self, ino: int, mode: int = S_IFREG | 0o644, data: bytes | None = None,
                 source: Callable[[], bytes] | None = None, size: int | None = None,
                 host_path: bytes | None = None, **kw):
        super().__init__(ino, mode, **kw)
        self.host_path = host_path  # the host file a read-only view reads (None: in memory)
        self.links = 1              # directory entries naming it (link(2) adds, unlink removes)
        self.written = False        # the guest changed its content (a host file's copy is then its own)
        self._data = bytearray(data) if data is not None else None
        self._source = source
        self._size = len(data) if data is not None else (size or 0)

    def content(self) -> bytes | bytearray:
        if self._data is None:
            if self._source is None:
                return b""
            return self._source()
        return self._data

    def _writable(self) -> bytearray:
        self.written = True
        if self._data is None:  # copy-up into the private overlay
            self._data = bytearray(self.content())
            self._source = None
        return self._data

    @property
    def size(self) -> int:
        return len(self._data) if self._data is not None else self._size

    def read_at(self, offset: int, n: int) -> bytes:
        if self._data is None and self._source is not None:
            data = self._source()
            if len(data) > 1 << 16:  # keep big host files once read
                self._data = bytearray(data)
            return bytes(data[offset : offset + n])
        return bytes(self.content()[offset : offset + n])

    def write_at(self, offset: int, data: bytes) -> int:
        buf = self._writable()
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
        return len(data)

    def truncate(self, length: int) -> None:
        buf = self._writable()
        if length < len(buf):
            del buf[length:]
        else:
            buf.extend(bytes(length - len(buf)))

    @property
    def nlink(self) -> int:
        return self.links


class Symlink(Node):
    __slots__ = ("target", "magic")

    def __init__(self, ino: int, target: bytes, magic: Node | None = None, **kw):
        kw.setdefault("mode", S_IFLNK | 0o777)
        super().__init__(ino, **kw)
        self.target = target
        self.magic = magic  # /proc/self/exe style: following it yields this node

    @property
    def size(self) -> int:
        return len(self.target)

    @property
    def blocks(self) -> int:
        return 0


class Device(Node):
    """A character device or stream: null, zero, urandom, tty, pipe, or an output file.

    ``sink`` receives written bytes (guest stdout/stderr); ``source`` gives read bytes.
    """

    __slots__ = ("kind", "sink", "source", "written")

    def __init__(self, ino: int, kind: str, mode: int, sink: Callable[[bytes], None] | None = None,
                 source: Callable[[int], bytes] | None = None, **kw):
        super().__init__(ino, mode, **kw)
        self.kind, self.sink, self.source, self.written = kind, sink, source, 0

    @property
    def size(self) -> int:
        return self.written if self.fmt == S_IFREG else 0

    @property
    def blocks(self) -> int:
        return 0 if self.fmt != S_IFREG else super().blocks

    @property
    def is_tty(self) -> bool:
        return self.kind == "tty"

    def read(self, n: int) -> bytes:
        if self.kind == "zero":
            return bytes(n)
        return self.source(n) if self.source else b""

    def write(self, data: bytes) -> int:
        if self.sink:
            self.sink(data)
        self.written += len(data)
        return len(data)


def host_loader(path: bytes, ino_offset: int = 0, map_owner: bool = True) -> Callable[[Dir], dict]:
    """A loader listing host directory ``path`` lazily, read-only (for ``--root`` and root filesystems)."""

    def load(directory: Dir) -> dict[bytes, Node]:
        out: dict[bytes, Node] = {}
        try:
            names, dots = host_readdir(path)  # the host's readdir order, deliberately unsorted
        except OSError:
            return out
        directory.dot_positions = dots
        for name in names:
            out[name] = host_node(os.path.join(path, name), ino_offset, map_owner)
        return out

    return load


class _Dirent(ctypes.Structure):  # glibc's struct dirent on 64-bit Linux (= dirent64)
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.opendir.restype = ctypes.c_void_p
        lib.opendir.argtypes = [ctypes.c_char_p]
        lib.readdir.restype = ctypes.POINTER(_Dirent)
        lib.readdir.argtypes = [ctypes.c_void_p]
        lib.closedir.argtypes = [ctypes.c_void_p]
        _LIBC = lib
    return _LIBC


def host_readdir(path: bytes) -> tuple[list[bytes], tuple[int, int] | None]:
    """The names of host directory ``path`` in readdir order, and where "." and ".." came in it.

    ``os.listdir`` drops "." and ".."; a program that walks a directory sees
    them wherever the filesystem returns them (ext4: at their hash positions),
    and that order decides what it allocates when. Falls back to os.listdir
    (dots first) where libc's readdir cannot be called this way (not 64-bit Linux).
    """
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return os.listdir(path), None
    lib = _libc()
    handle = lib.opendir(path)
    if not handle:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    names: list[bytes] = []
    dots = {}
    try:
        while True:
            ent = lib.readdir(handle)
            if not ent:
                break
            name = ent.contents.d_name
            if name in (b".", b".."):
                dots[name] = len(names) + len(dots)
            else:
                names.append(name)
    finally:
        lib.closedir(handle)
    return names, (dots[b"."], dots[b".."]) if len(dots) == 2 else None


def _fold_ino(ino: int) -> int:
    """Host inode numbers folded into 32 bits: glibc's non-LFS calls need that (EOVERFLOW)."""
    return ((ino ^ (ino >> 32)) & 0xFFFFFFFF) or 1


def host_node(path: bytes, ino_offset: int = 0, map_owner: bool = True) -> Node:
    """A read-only view of host file ``path``.

    ``map_owner``: files the host user owns belong to the guest user (``--root``
    of one's own files: the guest runs "as" the host user, so permissions work
    out as for a native run by that user). A root filesystem keeps its owners
    (root), as a chroot shows them.
    """
    st = os.lstat(path)
    uid = GUEST_UID if map_owner and st.st_uid == os.geteuid() else st.st_uid
    gid = GUEST_GID if map_owner and st.st_gid == os.getegid() else st.st_gid
    kw = dict(mtime_ns=st.st_mtime_ns, uid=uid, gid=gid)
    ino = _fold_ino(st.st_ino + ino_offset)
    if stat.S_ISDIR(st.st_mode):
        d = Dir(ino, st.st_mode, loader=host_loader(path, ino_offset, map_owner), **kw)
        d.host_size = st.st_size
        return d
    if stat.S_ISREG(st.st_mode):
        def source(p=path) -> bytes:
            with open(p, "rb") as f:
                return f.read()
        return File(ino, st.st_mode, source=source, size=st.st_size, host_path=path, **kw)
    if stat.S_ISLNK(st.st_mode):
        return Symlink(ino, os.readlink(path), mode=st.st_mode, **kw)
    # fifos, sockets, device nodes: visible, never opened on the host
    return Device(ino, "host-special", st.st_mode, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), **kw)
