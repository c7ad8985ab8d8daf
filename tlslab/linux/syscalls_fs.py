"""File and filesystem system calls over ``Vfs`` and the descriptor table."""

from __future__ import annotations

from tlslab.linux import errno as E
from tlslab.linux import nodes as N
from tlslab.linux import structs as S
from tlslab.linux.errno import SyscallError
from tlslab.linux.files import (
    O_ACCMODE, O_APPEND, O_CLOEXEC, O_CREAT, O_DIRECTORY, O_EXCL, O_NOFOLLOW, O_NONBLOCK, O_PATH, O_RDONLY, O_RDWR,
    O_TRUNC, O_WRONLY, OpenFile,
)
from tlslab.linux.kernel import Block
from tlslab.linux.pipes import PIPE_BUF, Fifo, Pipe, PipeEnd
from tlslab.linux.signals import SIGPIPE
from tlslab.linux.syscall_table import signed, syscall
from tlslab.linux.syscalls_proc import realtime_ns, timespec_ns
from tlslab.linux.vfs import R_OK, W_OK, X_OK

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW, AT_REMOVEDIR, AT_SYMLINK_FOLLOW, AT_EMPTY_PATH = 0x100, 0x200, 0x400, 0x1000
SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2
TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGPGRP, TIOCGWINSZ, FIONREAD = 0x5401, 0x5402, 0x5403, 0x5404, 0x540F, 0x5413, 0x541B
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
FD_CLOEXEC = 1
MAX_IO = 1 << 24
MAX_FILE_SIZE = 1 << 31   # one file's size limit (EFBIG beyond); Vfs.resize bounds them all (ENOSPC)


# ------------------------------------------------------------------ helpers
def path_arg(p, addr: int) -> bytes:
    if addr == 0:
        raise SyscallError(E.EFAULT, "NULL path")
    return p.mem.read_cstring(addr, 4096)


def dir_base(p, dirfd: int) -> N.Dir:
    dirfd = signed(dirfd)
    if dirfd == AT_FDCWD:
        return p.vfs.cwd
    node = p.fds.get(dirfd).node
    if not isinstance(node, N.Dir):
        raise SyscallError(E.ENOTDIR)
    return node


def node_at(p, dirfd: int, path_addr: int, flags: int = 0, follow: bool = True) -> N.Node:
    """What a ``*at`` call names: AT_EMPTY_PATH, AT_FDCWD and AT_SYMLINK_NOFOLLOW honoured."""
    path = path_arg(p, path_addr)
    if not path and flags & AT_EMPTY_PATH:
        if signed(dirfd) == AT_FDCWD:
            return p.vfs.cwd
        return p.fds.get(signed(dirfd)).node
    return p.vfs.resolve(path, dir_base(p, dirfd) if not path.startswith(b"/") else None,
                         follow=follow and not flags & AT_SYMLINK_NOFOLLOW)


def _parent_base(p, dirfd: int, path: bytes) -> N.Dir | None:
    return None if path.startswith(b"/") else dir_base(p, dirfd)


# ------------------------------------------------------------------ open/close
def do_open(p, dirfd: int, path_addr: int, flags: int, mode: int) -> int:
    waiting = p.task.fifo_open
    # the re-run of an open that waited for the FIFO's other end keeps its inode, as Linux's does (a
    # handler running before the re-run may open something else: only the same call is the re-run)
    if waiting is not None and waiting[1] == flags and waiting[2] == path_arg(p, path_addr):
        return _open_fifo(p, *waiting)
    vfs = p.vfs
    path = path_arg(p, path_addr)
    base = _parent_base(p, dirfd, path) if path else None
    created = False
    if flags & O_CREAT:
        parent, name = vfs.resolve_parent(path, base)
        try:
            node = vfs.resolve(path, base, follow=not flags & (O_EXCL | O_NOFOLLOW))
        except SyscallError as exc:
            if exc.errno != E.ENOENT or parent.lookup(name) is not None:
                raise
            node = None
        if node is not None and flags & O_EXCL:
            raise SyscallError(E.EEXIST)
        if node is None:
            if path.endswith(b"/"):
                raise SyscallError(E.EISDIR)
            node = vfs.create_file(parent, name, mode)
            created = True
        elif isinstance(node, N.Dir):
            raise SyscallError(E.EISDIR)
    else:
        node = vfs.resolve(path, base, follow=not flags & O_NOFOLLOW)
    if isinstance(node, N.Symlink) and not flags & O_PATH:
        raise SyscallError(E.ELOOP)
    if flags & O_DIRECTORY and not isinstance(node, N.Dir):
        raise SyscallError(E.ENOTDIR)
    acc = flags & O_ACCMODE
    if not flags & O_PATH:
        if isinstance(node, N.Dir) and (acc != O_RDONLY or flags & O_TRUNC):
            raise SyscallError(E.EISDIR)
        want = (R_OK if acc in (O_RDONLY, O_RDWR) else 0) | (W_OK if acc in (O_WRONLY, O_RDWR) else 0)
        if not created and not vfs.may(node, want):
            raise SyscallError(E.EACCES)
        if isinstance(node, N.Device) and node.kind == "host-special":
            raise SyscallError(E.ENXIO)
        if isinstance(node, Fifo):
            return _open_fifo(p, node, flags, path)
        if flags & O_TRUNC and acc != O_RDONLY and isinstance(node, N.File):
            vfs.resize(node, 0)
            node.truncate(0)
            vfs.touch(node)
    return p.fds.install(OpenFile(node, flags, path), cloexec=bool(flags & O_CLOEXEC))


def _open_fifo(p, fifo: Fifo, flags: int, path: bytes) -> int:
    """open(2) of a named pipe (see tlslab.linux.pipes): wait for the other end, then a pipe end."""
    task = p.task
    pipe = fifo.pipe
    if pipe is None or not (p.pipe_end_open(pipe, "r") or p.pipe_end_open(pipe, "w")):
        pipe = fifo.pipe = Pipe.of_fifo(fifo)
    acc = flags & O_ACCMODE
    if acc == O_RDWR:   # Linux: at once, as a reader and a writer
        fifo.arrivals["r"] += 1
        fifo.arrivals["w"] += 1
        node = pipe.rw_end
    else:
        end, other = ("r", "w") if acc == O_RDONLY else ("w", "r")
        waited = fifo.waiting.get(task)
        if waited is None:
            fifo.arrivals[end] += 1
            ticket = fifo.arrivals[other]
        else:
            ticket = waited[1]

        def partner() -> bool:
            return p.pipe_end_open(pipe, other) or fifo.arrivals[other] != ticket

        if flags & O_NONBLOCK:
            if end == "w" and not partner():
                raise SyscallError(E.ENXIO)
        elif not partner():
            fifo.waiting[task] = (end, ticket)
            task.fifo_open = (fifo, flags, path)

            def cancel() -> None:
                fifo.waiting.pop(task, None)
                task.fifo_open = None

            raise Block(f"open fifo {path.decode(errors='replace')}", partner, cancel=cancel)
        fifo.waiting.pop(task, None)
        task.fifo_open = None
        node = pipe.read_end if end == "r" else pipe.write_end
    return p.fds.install(OpenFile(node, flags, path, version=fifo.arrivals["w"]), cloexec=bool(flags & O_CLOEXEC))


def _mknod(p, dirfd: int, path_addr: int, mode: int) -> int:
    """mknod(2): regular files and FIFOs; device nodes and sockets are not modelled (EPERM)."""
    path = path_arg(p, path_addr)
    parent, name = p.vfs.resolve_parent(path, _parent_base(p, dirfd, path))
    kind = mode & N.S_IFMT
    if kind == N.S_IFDIR:
        raise SyscallError(E.EPERM)   # Linux may_mknod: directories come from mkdir
    if path.endswith(b"/"):
        raise SyscallError(E.ENOENT if parent.lookup(name) is None else E.EEXIST)
    if kind in (0, N.S_IFREG):
        if parent.lookup(name) is not None:
            raise SyscallError(E.EEXIST)
        p.vfs.create_file(parent, name, mode)
    elif kind == N.S_IFIFO:
        p.vfs.mkfifo(parent, name, mode)
    elif kind in (N.S_IFCHR, N.S_IFBLK, N.S_IFSOCK):
        raise SyscallError(E.EPERM, "device and socket nodes are not modelled")
    else:
        raise SyscallError(E.EINVAL)
    return 0


@syscall("mknod")
def sys_mknod(p, path, mode, dev):
    return _mknod(p, AT_FDCWD & 0xFFFFFFFF, path, mode)


@syscall("mknodat")
def sys_mknodat(p, dirfd, path, mode, dev):
    return _mknod(p, dirfd, path, mode)


@syscall("open")
def sys_open(p, path, flags, mode):
    return do_open(p, AT_FDCWD & 0xFFFFFFFF, path, flags, mode)


@syscall("openat")
def sys_openat(p, dirfd, path, flags, mode):
    return do_open(p, dirfd, path, flags, mode)


@syscall("creat")
def sys_creat(p, path, mode):
    return do_open(p, AT_FDCWD & 0xFFFFFFFF, path, O_CREAT | O_WRONLY | O_TRUNC, mode)


@syscall("close")
def sys_close(p, fd):
    p.fds.close(signed(fd))
    return 0


@syscall("dup")
def sys_dup(p, fd):
    return p.fds.install(p.fds.get(signed(fd)))


@syscall("dup2")
def sys_dup2(p, old, new):
    f = p.fds.get(signed(old))
    return new if old == new else p.fds.install_at(signed(new), f)


@syscall("dup3")
def sys_dup3(p, old, new, flags):
    if old == new or flags & ~O_CLOEXEC:
        raise SyscallError(E.EINVAL)
    return p.fds.install_at(signed(new), p.fds.get(signed(old)), bool(flags & O_CLOEXEC))


@syscall("fcntl", "fcntl64")
def sys_fcntl64(p, fd, cmd, arg):
    fd = signed(fd)
    f = p.fds.get(fd)
    if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
        return p.fds.install(f, cloexec=cmd == F_DUPFD_CLOEXEC, lowest=signed(arg))
    if cmd == F_GETFD:
        return FD_CLOEXEC if p.fds.fds[fd].cloexec else 0
    if cmd == F_SETFD:
        p.fds.fds[fd].cloexec = bool(arg & FD_CLOEXEC)
        return 0
    if cmd == F_GETFL:
        return f.flags & ~O_CLOEXEC
    if cmd == F_SETFL:
        settable = O_APPEND | 0x800 | 0x2000 | 0x4000 | 0x40000  # APPEND NONBLOCK ASYNC DIRECT NOATIME
        f.flags = (f.flags & ~settable) | (arg & settable)
        return 0
    if cmd in (5, 6, 7, 12, 13, 14):  # F_GETLK/SETLK/SETLKW (+64): no other processes, always granted
        return 0
    raise SyscallError(E.EINVAL, f"fcntl cmd {cmd}")


# ------------------------------------------------------------------ read/write
def _read(p, f: OpenFile, n: int, offset: int | None = None) -> bytes:
    if not f.readable:
        raise SyscallError(E.EBADF)
    node = f.node
    n = min(n, MAX_IO)
    if isinstance(node, N.Dir):
        raise SyscallError(E.EISDIR)
    if isinstance(node, N.File):
        data = node.read_at(f.offset if offset is None else offset, n)
        data = p.page_cache.overlay(node, f.offset if offset is None else offset, data)
        if offset is None:
            f.offset += len(data)
        return data
    if isinstance(node, N.Device):
        return node.read(n)
    if isinstance(node, PipeEnd):
        return _pipe_read(p, f, node.pipe, n)
    raise SyscallError(E.EINVAL)


def _pipe_read(p, f: OpenFile, pipe, n: int) -> bytes:
    if pipe.buffer:
        return pipe.take(n)
    if not p.pipe_end_open(pipe, "w"):
        return b""  # end of file: no writer left
    if f.flags & O_NONBLOCK:
        raise SyscallError(E.EAGAIN)
    blocked = Block("pipe read", lambda: bool(pipe.buffer) or not p.pipe_end_open(pipe, "w"))
    blocked.pipe = pipe
    raise blocked


def _pipe_write(p, f: OpenFile, pipe, data: bytes) -> int:
    if not p.pipe_end_open(pipe, "r"):
        p.raise_signal(SIGPIPE)
        raise SyscallError(E.EPIPE)
    if not data:
        return 0
    n = pipe.put(data)
    if n:
        if p.kernel is not None:
            p.kernel.wake_pipe_reader(pipe)  # the woken reader runs first, as Linux's wakeup preemption does
        return n
    if f.flags & O_NONBLOCK:
        raise SyscallError(E.EAGAIN)
    raise Block("pipe write", lambda: pipe.space >= min(len(data), PIPE_BUF) or not p.pipe_end_open(pipe, "r"))


def _grow(p, node: N.File, end: int) -> None:
    """A write up to byte ``end``: within the per-file and the overlay limits (EFBIG, ENOSPC)."""
    if end > MAX_FILE_SIZE:
        raise SyscallError(E.EFBIG)
    if end > node.size:
        p.vfs.resize(node, end)


def _write(p, f: OpenFile, data: bytes, offset: int | None = None) -> int:
    if not f.writable:
        raise SyscallError(E.EBADF)
    node = f.node
    if isinstance(node, N.File):
        if data:
            p.vfs.touch(node)
        if offset is not None:
            _grow(p, node, offset + len(data))
            p.page_cache.check_write(f.path, offset, data)
            return node.write_at(offset, data)
        if f.flags & O_APPEND:
            f.offset = node.size
        _grow(p, node, f.offset + len(data))
        p.page_cache.check_write(f.path, f.offset, data)
        n = node.write_at(f.offset, data)
        f.offset += n
        return n
    if isinstance(node, N.Device):
        return node.write(data)
    if isinstance(node, PipeEnd):
        return _pipe_write(p, f, node.pipe, data)
    raise SyscallError(E.EINVAL)


@syscall("read")
def sys_read(p, fd, buf, count):
    f = p.fds.get(signed(fd))
    if count and not p.mem.is_mapped(buf, min(count, 1)):
        raise SyscallError(E.EFAULT)
    data = _read(p, f, count)
    p.mem.write(buf, data)
    return len(data)


@syscall("write")
def sys_write(p, fd, buf, count):
    f = p.fds.get(signed(fd))
    return _write(p, f, p.mem.read(buf, min(count, MAX_IO)))


@syscall("pread64")
def sys_pread64(p, fd, buf, count, lo, hi):
    f = p.fds.get(signed(fd))
    if not isinstance(f.node, N.File):
        raise SyscallError(E.ESPIPE)
    data = _read(p, f, count, lo | hi << 32)
    p.mem.write(buf, data)
    return len(data)


@syscall("pwrite64")
def sys_pwrite64(p, fd, buf, count, lo, hi):
    f = p.fds.get(signed(fd))
    if not isinstance(f.node, N.File):
        raise SyscallError(E.ESPIPE)
    return _write(p, f, p.mem.read(buf, count), lo | hi << 32)


def _iovecs(p, iov, iovcnt):
    if iovcnt > 1024:
        raise SyscallError(E.EINVAL)
    raw = p.mem.read(iov, 8 * iovcnt)
    return [S.IOVEC.unpack_from(raw, 8 * i) for i in range(iovcnt)]


@syscall("writev")
def sys_writev(p, fd, iov, iovcnt):
    f = p.fds.get(signed(fd))
    data = b"".join(p.mem.read(base, length) for base, length in _iovecs(p, iov, iovcnt))
    return _write(p, f, data) if data or iovcnt == 0 else _write(p, f, b"")


@syscall("readv")
def sys_readv(p, fd, iov, iovcnt):
    f = p.fds.get(signed(fd))
    total = 0
    for base, length in _iovecs(p, iov, iovcnt):
        data = _read(p, f, length)
        p.mem.write(base, data)
        total += len(data)
        if len(data) < length:
            break
    return total


SEEK_DATA, SEEK_HOLE = 3, 4


def _seek(p, f: OpenFile, offset: int, whence: int) -> int:
    node = f.node
    if isinstance(node, PipeEnd):
        raise SyscallError(E.ESPIPE)  # pipes and FIFOs cannot seek (coreutils' close-stdin tries)
    if isinstance(node, N.Device):
        if node.fmt in (N.S_IFIFO, N.S_IFSOCK) or node.is_tty:
            raise SyscallError(E.ESPIPE)
        return node.written if node.fmt == N.S_IFREG else 0
    if whence == SEEK_SET:
        new = offset
    elif whence == SEEK_CUR:
        new = f.offset + offset
    elif whence == SEEK_END:
        new = node.size + offset if isinstance(node, N.File) else -1
    elif whence in (SEEK_DATA, SEEK_HOLE) and isinstance(node, N.File):
        # no holes in our files: data is everywhere before the end, the only hole is at the end
        if offset < 0 or offset >= node.size:
            raise SyscallError(E.ENXIO)
        new = offset if whence == SEEK_DATA else node.size
    else:
        raise SyscallError(E.EINVAL)
    if new < 0:
        raise SyscallError(E.EINVAL)
    f.offset = new
    return new


@syscall("lseek")
def sys_lseek(p, fd, offset, whence):
    f = p.fds.get(signed(fd))
    new = _seek(p, f, signed(offset), whence)
    if new > 0x7FFFFFFF:
        raise SyscallError(E.EOVERFLOW)
    return new


@syscall("_llseek")
def sys_llseek(p, fd, hi, lo, result, whence):
    f = p.fds.get(signed(fd))
    off = (hi << 32 | lo) - ((1 << 64) if hi & 0x80000000 else 0)
    new = _seek(p, f, off, whence)
    p.mem.write(result, new.to_bytes(8, "little"))
    return 0


# ------------------------------------------------------------------ stat family
@syscall("stat64")
def sys_stat64(p, path, buf):
    p.mem.write(buf, S.pack_stat64(p.vfs.resolve(path_arg(p, path))))
    return 0


@syscall("lstat64")
def sys_lstat64(p, path, buf):
    p.mem.write(buf, S.pack_stat64(p.vfs.resolve(path_arg(p, path), follow=False)))
    return 0


@syscall("fstat64")
def sys_fstat64(p, fd, buf):
    p.mem.write(buf, S.pack_stat64(p.fds.get(signed(fd)).node))
    return 0


@syscall("fstatat64")
def sys_fstatat64(p, dirfd, path, buf, flags):
    p.mem.write(buf, S.pack_stat64(node_at(p, dirfd, path, flags)))
    return 0


@syscall("statx")
def sys_statx(p, dirfd, path, flags, mask, buf):
    p.mem.write(buf, S.pack_statx(node_at(p, dirfd, path, flags)))
    return 0


@syscall("statfs64")
def sys_statfs64(p, path, size, buf):
    if size != S.STATFS64.size:
        raise SyscallError(E.EINVAL)
    p.mem.write(buf, S.pack_statfs64(p.vfs.resolve(path_arg(p, path))))
    return 0


@syscall("fstatfs64")
def sys_fstatfs64(p, fd, size, buf):
    if size != S.STATFS64.size:
        raise SyscallError(E.EINVAL)
    p.mem.write(buf, S.pack_statfs64(p.fds.get(signed(fd)).node))
    return 0


# ------------------------------------------------------------------ directories
@syscall("getdents64")
def sys_getdents64(p, fd, dirp, count):
    f = p.fds.get(signed(fd))
    d = f.node
    if not isinstance(d, N.Dir):
        raise SyscallError(E.ENOTDIR)
    listing = f.dir_listing(d.parent)
    out = bytearray()
    pos = f.offset
    while pos < len(listing):
        name, child = listing[pos]
        rec = S.pack_dirent64(child.ino, pos + 1, N.DT_TYPES.get(child.fmt, 0), name)
        if len(out) + len(rec) > count:
            if not out:
                raise SyscallError(E.EINVAL, "getdents64 buffer too small")
            break
        out += rec
        pos += 1
    p.mem.write(dirp, bytes(out))
    f.offset = pos
    return len(out)


@syscall("getcwd")
def sys_getcwd(p, buf, size):
    path = p.vfs.path_of(p.vfs.cwd) + b"\0"
    if size < len(path):
        raise SyscallError(E.ERANGE)
    p.mem.write(buf, path)
    return len(path)


def _chdir(p, node: N.Node) -> int:
    if not isinstance(node, N.Dir):
        raise SyscallError(E.ENOTDIR)
    if not p.vfs.may(node, X_OK):
        raise SyscallError(E.EACCES)
    p.vfs.cwd = node
    return 0


@syscall("chdir")
def sys_chdir(p, path):
    return _chdir(p, p.vfs.resolve(path_arg(p, path)))


@syscall("fchdir")
def sys_fchdir(p, fd):
    return _chdir(p, p.fds.get(signed(fd)).node)


def _mkdir(p, dirfd, path_addr, mode):
    path = path_arg(p, path_addr)
    parent, name = p.vfs.resolve_parent(path, _parent_base(p, dirfd, path))
    p.vfs.mkdir(parent, name, mode)
    return 0


@syscall("mkdir")
def sys_mkdir(p, path, mode):
    return _mkdir(p, AT_FDCWD & 0xFFFFFFFF, path, mode)


@syscall("mkdirat")
def sys_mkdirat(p, dirfd, path, mode):
    return _mkdir(p, dirfd, path, mode)


def _unlink(p, dirfd, path_addr, directory):
    path = path_arg(p, path_addr)
    parent, name = p.vfs.resolve_parent(path, _parent_base(p, dirfd, path))
    p.vfs.unlink(parent, name, directory)
    return 0


@syscall("rmdir")
def sys_rmdir(p, path):
    return _unlink(p, AT_FDCWD & 0xFFFFFFFF, path, True)


@syscall("unlink")
def sys_unlink(p, path):
    return _unlink(p, AT_FDCWD & 0xFFFFFFFF, path, False)


@syscall("unlinkat")
def sys_unlinkat(p, dirfd, path, flags):
    return _unlink(p, dirfd, path, bool(flags & AT_REMOVEDIR))


RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def _rename(p, olddfd, old_addr, newdfd, new_addr, noreplace: bool = False):
    old, new = path_arg(p, old_addr), path_arg(p, new_addr)
    op, on = p.vfs.resolve_parent(old, _parent_base(p, olddfd, old))
    np_, nn = p.vfs.resolve_parent(new, _parent_base(p, newdfd, new))
    p.vfs.rename(op, on, np_, nn, noreplace=noreplace)
    return 0


@syscall("rename")
def sys_rename(p, old, new):
    return _rename(p, AT_FDCWD & 0xFFFFFFFF, old, AT_FDCWD & 0xFFFFFFFF, new)


@syscall("renameat")
def sys_renameat(p, olddfd, old, newdfd, new):
    return _rename(p, olddfd, old, newdfd, new)


@syscall("renameat2")
def sys_renameat2(p, olddfd, old, newdfd, new, flags):
    """RENAME_NOREPLACE as Linux; RENAME_EXCHANGE and RENAME_WHITEOUT are refused with EINVAL, as by a
    filesystem without them (glibc's callers fall back)."""
    if flags & ~RENAME_NOREPLACE:
        raise SyscallError(E.EINVAL, "renameat2 flags other than RENAME_NOREPLACE")
    return _rename(p, olddfd, old, newdfd, new, noreplace=bool(flags & RENAME_NOREPLACE))


def _link(p, olddfd, old_addr, newdfd, new_addr, flags: int) -> int:
    if flags & ~(AT_SYMLINK_FOLLOW | AT_EMPTY_PATH):
        raise SyscallError(E.EINVAL)
    node = node_at(p, olddfd, old_addr, flags & AT_EMPTY_PATH, follow=bool(flags & AT_SYMLINK_FOLLOW))
    new = path_arg(p, new_addr)
    parent, name = p.vfs.resolve_parent(new, _parent_base(p, newdfd, new))
    p.vfs.link(node, parent, name)
    return 0


@syscall("link")
def sys_link(p, old, new):
    return _link(p, AT_FDCWD & 0xFFFFFFFF, old, AT_FDCWD & 0xFFFFFFFF, new, 0)


@syscall("linkat")
def sys_linkat(p, olddfd, old, newdfd, new, flags):
    return _link(p, olddfd, old, newdfd, new, flags)


@syscall("symlink")
def sys_symlink(p, target, linkpath):
    return sys_symlinkat(p, target, AT_FDCWD & 0xFFFFFFFF, linkpath)


@syscall("symlinkat")
def sys_symlinkat(p, target, dirfd, linkpath):
    t, path = path_arg(p, target), path_arg(p, linkpath)
    parent, name = p.vfs.resolve_parent(path, _parent_base(p, dirfd, path))
    p.vfs.symlink(parent, name, t)
    return 0


def _readlink(p, node: N.Node, buf: int, size: int) -> int:
    if not isinstance(node, N.Symlink) or signed(size) <= 0:
        raise SyscallError(E.EINVAL)
    data = node.target[:size]
    p.mem.write(buf, data)
    return len(data)


@syscall("readlink")
def sys_readlink(p, path, buf, size):
    return _readlink(p, p.vfs.resolve(path_arg(p, path), follow=False), buf, size)


@syscall("readlinkat")
def sys_readlinkat(p, dirfd, path, buf, size):
    return _readlink(p, node_at(p, dirfd, path, AT_EMPTY_PATH, follow=False), buf, size)


def _access(p, node: N.Node, mode: int) -> int:
    if mode & ~7:
        raise SyscallError(E.EINVAL)
    if mode and not p.vfs.may(node, mode):
        raise SyscallError(E.EACCES)
    return 0


@syscall("access")
def sys_access(p, path, mode):
    return _access(p, p.vfs.resolve(path_arg(p, path)), mode)


@syscall("faccessat")
def sys_faccessat(p, dirfd, path, mode):
    return _access(p, node_at(p, dirfd, path), mode)


@syscall("faccessat2")
def sys_faccessat2(p, dirfd, path, mode, flags):
    return _access(p, node_at(p, dirfd, path, flags), mode)


def _chmod(p, node: N.Node, mode: int) -> int:
    if p.vfs.uid not in (0, node.uid):
        raise SyscallError(E.EPERM)
    node.mode = (node.mode & N.S_IFMT) | (mode & 0o7777)
    return 0


@syscall("chmod")
def sys_chmod(p, path, mode):
    return _chmod(p, p.vfs.resolve(path_arg(p, path)), mode)


@syscall("fchmod")
def sys_fchmod(p, fd, mode):
    return _chmod(p, p.fds.get(signed(fd)).node, mode)


@syscall("fchmodat")
def sys_fchmodat(p, dirfd, path, mode):
    return _chmod(p, node_at(p, dirfd, path), mode)


@syscall("umask")
def sys_umask(p, mask):
    old, p.vfs.umask = p.vfs.umask, mask & 0o777
    return old


@syscall("fsync", "fdatasync")
def sys_fsync(p, fd):
    if isinstance(p.fds.get(signed(fd)).node, PipeEnd):
        raise SyscallError(E.EINVAL)   # pipes and FIFOs have nothing to sync (Linux: no fsync method)
    return 0




@syscall("copy_file_range")
def sys_copy_file_range(p, fd_in, off_in, fd_out, off_out, length, flags):
    """Between regular files only (EXDEV otherwise, which makes coreutils fall back to read and
    write, as for files on different filesystems); offsets through the loff_t pointers when given."""
    if flags:
        raise SyscallError(E.EINVAL)
    src, dst = p.fds.get(signed(fd_in)), p.fds.get(signed(fd_out))
    if not src.readable or not dst.writable or dst.flags & O_APPEND:
        raise SyscallError(E.EBADF)
    if not (isinstance(src.node, N.File) and isinstance(dst.node, N.File)):
        raise SyscallError(E.EXDEV if src.node.fmt != N.S_IFDIR and dst.node.fmt != N.S_IFDIR else E.EISDIR)
    pos_in = signed_u64(p.mem.read(off_in, 8)) if off_in else src.offset
    pos_out = signed_u64(p.mem.read(off_out, 8)) if off_out else dst.offset
    if pos_in < 0 or pos_out < 0:
        raise SyscallError(E.EINVAL)
    if src.node is dst.node and pos_in < pos_out + length and pos_out < pos_in + length:
        raise SyscallError(E.EINVAL)   # overlapping ranges of one file
    # through the page cache, as read(2) and write(2) go: a shared code patch travels with the bytes
    data = p.page_cache.overlay(src.node, pos_in, src.node.read_at(pos_in, min(length, MAX_IO)))
    if data:
        _grow(p, dst.node, pos_out + len(data))
        p.page_cache.check_write(dst.path, pos_out, data)
        dst.node.write_at(pos_out, data)
        p.vfs.touch(dst.node)
    if off_in:
        p.mem.write(off_in, (pos_in + len(data)).to_bytes(8, "little"))
    else:
        src.offset = pos_in + len(data)
    if off_out:
        p.mem.write(off_out, (pos_out + len(data)).to_bytes(8, "little"))
    else:
        dst.offset = pos_out + len(data)
    return len(data)


def signed_u64(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def _truncate(p, node: N.Node, length: int) -> int:
    if isinstance(node, N.Dir):
        raise SyscallError(E.EISDIR)
    if not isinstance(node, N.File) or length < 0:
        raise SyscallError(E.EINVAL)
    if length > MAX_FILE_SIZE:
        raise SyscallError(E.EFBIG)
    p.vfs.resize(node, length)
    node.truncate(length)
    p.vfs.touch(node)
    return 0


def _ftruncate(p, fd: int, length: int) -> int:
    f = p.fds.get(signed(fd))
    if not isinstance(f.node, N.File) or not f.writable:
        raise SyscallError(E.EINVAL)
    return _truncate(p, f.node, length)


def _path_truncate(p, path_addr: int, length: int) -> int:
    node = p.vfs.resolve(path_arg(p, path_addr))
    if isinstance(node, N.File) and not p.vfs.may(node, W_OK):
        raise SyscallError(E.EACCES)
    if isinstance(node, N.File) and node.dev in (N.DEV_PROC,):
        raise SyscallError(E.EACCES)
    return _truncate(p, node, length)


@syscall("ftruncate64")
def sys_ftruncate64(p, fd, lo, hi):
    return _ftruncate(p, fd, signed(hi) << 32 | lo)


@syscall("ftruncate")
def sys_ftruncate(p, fd, length):
    return _ftruncate(p, fd, signed(length))


@syscall("truncate64")
def sys_truncate64(p, path, lo, hi):
    return _path_truncate(p, path, signed(hi) << 32 | lo)


@syscall("truncate")
def sys_truncate(p, path, length):
    return _path_truncate(p, path, signed(length))


FALLOC_FL_KEEP_SIZE = 1


@syscall("fallocate")
def sys_fallocate(p, fd, mode, off_lo, off_hi, len_lo, len_hi):
    """Mode 0 (extend the file to offset + length) and KEEP_SIZE (nothing to reserve in memory);
    punching and collapsing holes are refused with EOPNOTSUPP, as by a filesystem without them."""
    f = p.fds.get(signed(fd))
    offset, length = signed(off_hi) << 32 | off_lo, signed(len_hi) << 32 | len_lo
    if offset < 0 or length <= 0:
        raise SyscallError(E.EINVAL)
    if mode & ~FALLOC_FL_KEEP_SIZE:
        raise SyscallError(E.EOPNOTSUPP)
    if not f.writable:
        raise SyscallError(E.EBADF)
    if f.node.fmt == N.S_IFIFO:
        raise SyscallError(E.ESPIPE)
    if not isinstance(f.node, N.File):
        raise SyscallError(E.ENODEV)
    if offset + length > MAX_FILE_SIZE:
        raise SyscallError(E.EFBIG)
    if not mode & FALLOC_FL_KEEP_SIZE and offset + length > f.node.size:
        p.vfs.resize(f.node, offset + length)
        f.node.truncate(offset + length)
    return 0


LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8


@syscall("flock")
def sys_flock(p, fd, operation):
    """Advisory locks always succeed: every lock request is granted at once (no other host process
    shares the guest's files, and the guest's own processes are not made to wait on each other)."""
    p.fds.get(signed(fd))
    if (operation & ~LOCK_NB) not in (LOCK_SH, LOCK_EX, LOCK_UN):
        raise SyscallError(E.EINVAL)
    return 0


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def _utimes(p, node: N.Node, mtime_ns: int | None, explicit: bool) -> int:
    """Set the modification time (the model keeps no access time). Linux's rules: explicit times need
    ownership (or root); "now" needs ownership or write permission."""
    owner = p.vfs.uid in (0, node.uid)
    if not owner and (explicit or not p.vfs.may(node, W_OK)):
        raise SyscallError(E.EPERM if explicit else E.EACCES)
    if node.dev == N.DEV_PROC:
        raise SyscallError(E.EACCES)
    if mtime_ns is not None:
        node.mtime_ns = mtime_ns
    return 0


def _utimensat(p, dirfd, path_addr, times, flags, fmt) -> int:
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
        raise SyscallError(E.EINVAL)
    if path_addr == 0:   # futimens: the descriptor itself
        if signed(dirfd) == AT_FDCWD:
            raise SyscallError(E.EFAULT)
        node = p.fds.get(signed(dirfd)).node
    else:
        node = node_at(p, dirfd, path_addr, flags, follow=not flags & AT_SYMLINK_NOFOLLOW)
    if times == 0:
        return _utimes(p, node, realtime_ns(p), explicit=False)
    (_asec, ansec), (msec, mnsec) = (fmt.unpack(p.mem.read(times + i * fmt.size, fmt.size)) for i in (0, 1))
    for nsec in (ansec, mnsec):
        if nsec not in (UTIME_NOW, UTIME_OMIT) and not 0 <= nsec < 1_000_000_000:
            raise SyscallError(E.EINVAL)
    if mnsec == UTIME_OMIT:
        return _utimes(p, node, None, explicit=ansec not in (UTIME_NOW, UTIME_OMIT))
    if mnsec == UTIME_NOW:
        return _utimes(p, node, realtime_ns(p), explicit=ansec not in (UTIME_NOW, UTIME_OMIT))
    return _utimes(p, node, msec * 1_000_000_000 + mnsec, explicit=True)


@syscall("utimensat")
def sys_utimensat(p, dirfd, path, times, flags):
    return _utimensat(p, dirfd, path, times, flags, S.TIMESPEC32)


@syscall("utimensat_time64")
def sys_utimensat_time64(p, dirfd, path, times, flags):
    return _utimensat(p, dirfd, path, times, flags, S.TIMESPEC64)


@syscall("utimes")
def sys_utimes(p, path, times):
    node = p.vfs.resolve(path_arg(p, path))
    if times == 0:
        return _utimes(p, node, realtime_ns(p), explicit=False)
    _a, (msec, musec) = (S.TIMEVAL32.unpack(p.mem.read(times + i * 8, 8)) for i in (0, 1))
    if not 0 <= musec < 1_000_000:
        raise SyscallError(E.EINVAL)
    return _utimes(p, node, msec * 1_000_000_000 + musec * 1000, explicit=True)


@syscall("ioctl")
def sys_ioctl(p, fd, request, arg):
    node = p.fds.get(signed(fd)).node
    tty = isinstance(node, N.Device) and node.is_tty
    if request == FIONREAD and isinstance(node, N.File):
        p.mem.write_u32(arg, 0)
        return 0
    if not tty:
        raise SyscallError(E.ENOTTY)
    if request == TCGETS:
        p.mem.write(arg, S.pack_termios())
    elif request == TIOCGWINSZ:
        p.mem.write(arg, S.WINSIZE.pack(24, 80, 0, 0))
    elif request == TIOCGPGRP:
        p.mem.write_u32(arg, p.pid)
    elif request not in (TCSETS, TCSETSW, TCSETSF):
        raise SyscallError(E.EINVAL, f"tty ioctl {request:#x}")
    return 0


# ------------------------------------------------------------ extended attributes
# No file of the guest's filesystem carries extended attributes (no ACLs, no
# SELinux labels): reading one fails with ENODATA and listing gives nothing, as
# on a filesystem whose files have none. `ls -l` probes system.posix_acl_access.

@syscall("getxattr")
def sys_getxattr(p, path, name, value, size):
    p.vfs.resolve(path_arg(p, path))
    raise SyscallError(E.ENODATA)


@syscall("lgetxattr")
def sys_lgetxattr(p, path, name, value, size):
    p.vfs.resolve(path_arg(p, path), follow=False)
    raise SyscallError(E.ENODATA)


@syscall("fgetxattr")
def sys_fgetxattr(p, fd, name, value, size):
    p.fds.get(signed(fd))
    raise SyscallError(E.ENODATA)


@syscall("listxattr")
def sys_listxattr(p, path, buf, size):
    p.vfs.resolve(path_arg(p, path))
    return 0


@syscall("llistxattr")
def sys_llistxattr(p, path, buf, size):
    p.vfs.resolve(path_arg(p, path), follow=False)
    return 0


@syscall("flistxattr")
def sys_flistxattr(p, fd, buf, size):
    p.fds.get(signed(fd))
    return 0


@syscall("fadvise64", "fadvise64_64")
def sys_fadvise64(p, fd):
    """Advice only: nothing to do in memory, but the descriptor must be valid."""
    f = p.fds.get(signed(fd))
    if f.node.fmt == N.S_IFIFO:
        raise SyscallError(E.ESPIPE)
    return 0


# ------------------------------------------------------------------ poll
POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20


def _poll_revents(p, fd: int, events: int) -> int:
    entry = p.fds.fds.get(fd)
    if entry is None:
        return POLLNVAL
    f = entry.file
    node = f.node
    if isinstance(node, PipeEnd):
        pipe = node.pipe
        if node.end == "rw":   # a FIFO opened O_RDWR: it is its own writer and reader
            return (POLLIN if pipe.buffer else 0) & events | (POLLOUT if pipe.space else 0) & events
        if node.end == "r":
            ready = POLLIN if pipe.buffer else 0
            # a FIFO reader sees no hang-up until a writer has opened since it did (Linux: f_version)
            hup = not p.pipe_end_open(pipe, "w") and (pipe.fifo is None or pipe.fifo.arrivals["w"] != f.version)
            return (ready & events) | (POLLHUP if hup else 0)
        writable = POLLOUT & events if pipe.space else 0
        return writable | (0 if p.pipe_end_open(pipe, "r") else POLLERR)   # Linux pipe_poll: both
    return events & (POLLIN | POLLOUT)  # files and devices never block


@syscall("poll")
def sys_poll(p, fds, nfds, timeout):
    """Readiness of regular files, devices and pipes; waits (blocks) only on pipes, as nothing else blocks."""
    if nfds > 1024:
        raise SyscallError(E.EINVAL)
    raw = p.mem.read(fds, 8 * nfds) if nfds else b""
    entries = [S.POLLFD.unpack_from(raw, 8 * i) for i in range(nfds)]
    out, ready = bytearray(raw), 0
    for i, (fd, events, _rev) in enumerate(entries):
        revents = 0 if fd < 0 else _poll_revents(p, fd, events | POLLERR | POLLHUP)
        S.POLLFD.pack_into(out, 8 * i, fd, events, revents)
        ready += bool(revents)
    if ready or signed(timeout) == 0:
        if nfds:
            p.mem.write(fds, bytes(out))
        return ready
    if signed(timeout) > 0 and p.kernel is None:
        p.sleep(signed(timeout) * 1_000_000)
        return 0

    def timed_out() -> int:
        if nfds:
            p.mem.write(fds, bytes(out))
        return 0

    deadline = p.kernel.elapsed_ns() + signed(timeout) * 1_000_000 if signed(timeout) > 0 else None
    raise Block("poll", lambda: any(fd >= 0 and _poll_revents(p, fd, ev | POLLERR | POLLHUP)
                                    for fd, ev, _r in entries), deadline_ns=deadline, on_timeout=timed_out,
                restartable=False)   # poll and select return EINTR after a handler, SA_RESTART or not


# ------------------------------------------------------------------ select
FD_SETSIZE = 1024


def _select(p, n: int, sets: tuple[int, int, int], timeout_ns: int | None) -> int:
    """select/pselect on the fds poll can judge: read, write and exception sets of ``n`` bits
    (i386 ``long`` words); ``timeout_ns`` None waits, 0 polls."""
    n = signed(n)
    if n < 0:
        raise SyscallError(E.EINVAL)
    n = min(n, FD_SETSIZE)   # Linux caps n at the size of the fd table (select(getdtablesize(), ...))
    nbytes = (n + 31) // 32 * 4
    masks = [int.from_bytes(p.mem.read(a, nbytes), "little") if a and nbytes else 0 for a in sets]
    wanted = [fd for fd in range(n) if any(m >> fd & 1 for m in masks)]
    for fd in wanted:
        if fd not in p.fds.fds:
            raise SyscallError(E.EBADF)

    def scan() -> tuple[list[int], int]:
        got = [0, 0, 0]
        for fd in wanted:
            rev = _poll_revents(p, fd, POLLIN | POLLOUT | POLLPRI)
            if masks[0] >> fd & 1 and rev & (POLLIN | POLLHUP | POLLERR):
                got[0] |= 1 << fd
            if masks[1] >> fd & 1 and rev & (POLLOUT | POLLERR):
                got[1] |= 1 << fd
            if masks[2] >> fd & 1 and rev & POLLPRI:
                got[2] |= 1 << fd
        return got, sum(bin(m).count("1") for m in got)

    def write(got: list[int]) -> None:
        for a, m in zip(sets, got):
            if a and nbytes:
                p.mem.write(a, m.to_bytes(nbytes, "little"))

    got, ready = scan()
    if ready or timeout_ns == 0:
        write(got)
        return ready
    if p.kernel is None:
        if timeout_ns is None:
            raise SyscallError(E.EINTR)   # a bare process: nothing could ever make it ready
        p.sleep(timeout_ns)
        write([0, 0, 0])
        return 0

    def timed_out() -> int:
        write([0, 0, 0])
        return 0

    deadline = p.kernel.elapsed_ns() + timeout_ns if timeout_ns is not None else None
    raise Block("select", lambda: scan()[1] > 0, deadline_ns=deadline, on_timeout=timed_out, restartable=False)


@syscall("_newselect")
def sys_newselect(p, n, inp, outp, exp, tvp):
    timeout = None
    if tvp:
        sec, usec = S.TIMEVAL32.unpack(p.mem.read(tvp, 8))
        if sec < 0 or not 0 <= usec < 1_000_000:
            raise SyscallError(E.EINVAL)
        timeout = sec * 1_000_000_000 + usec * 1000
    result = _select(p, n, (inp, outp, exp), timeout)
    if tvp and result == 0:
        p.mem.write(tvp, bytes(8))   # the time left, as Linux writes it back: none
    return result


def _pselect(p, n, inp, outp, exp, tsp, sig, fmt) -> int:
    """pselect6 as select with a timespec. Not modelled (stated): its signal-mask argument, the mask
    Linux applies for the wait only; the caller's own mask stays in force."""
    timeout = timespec_ns(p, tsp, fmt) if tsp else None
    return _select(p, n, (inp, outp, exp), timeout)


@syscall("pselect6")
def sys_pselect6(p, n, inp, outp, exp, tsp, sig):
    return _pselect(p, n, inp, outp, exp, tsp, sig, S.TIMESPEC32)


@syscall("pselect6_time64")
def sys_pselect6_time64(p, n, inp, outp, exp, tsp, sig):
    return _pselect(p, n, inp, outp, exp, tsp, sig, S.TIMESPEC64)
