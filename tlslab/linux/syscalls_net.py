"""Sockets, as far as programs of a root filesystem touch them: there is no network.

glibc's name service tries the nscd daemon first (``ls -l`` resolving owners:
``socket(AF_UNIX)`` then ``connect("/var/run/nscd/socket")``) and falls back
to the files when that fails. A lab has no daemons: AF_UNIX sockets can be
created, connecting fails as it does natively when nobody listens (ENOENT
when the path does not exist, ECONNREFUSED when it does), and other families
are not supported (EAFNOSUPPORT). i386 glibc 2.36 reaches these through the
``socketcall`` multiplexer or the direct calls; both are served here.
"""

from __future__ import annotations

from tlslab.linux import errno as E
from tlslab.linux import nodes as N
from tlslab.linux.errno import SyscallError
from tlslab.linux.files import O_CLOEXEC, O_NONBLOCK, O_RDWR, OpenFile
from tlslab.linux.syscall_table import signed, syscall

AF_UNIX = 1
SOCK_TYPE_MASK = 0xF
SOCK_NONBLOCK, SOCK_CLOEXEC = O_NONBLOCK, O_CLOEXEC
SYS_SOCKET, SYS_CONNECT = 1, 3
SOCKADDR_UN_PATH = 2  # offset of sun_path in sockaddr_un


def _socket(p, family: int, kind: int, protocol: int) -> int:
    if family != AF_UNIX:
        raise SyscallError(E.EAFNOSUPPORT)
    if kind & SOCK_TYPE_MASK not in (1, 2, 5):  # STREAM, DGRAM, SEQPACKET
        raise SyscallError(E.EINVAL)
    if protocol not in (0, AF_UNIX):
        raise SyscallError(E.EPROTONOSUPPORT)
    node = N.Device(p.vfs.new_ino(), "socket", N.S_IFSOCK | 0o777, uid=p.vfs.uid, gid=p.vfs.gid)
    return p.fds.install(OpenFile(node, O_RDWR | (kind & SOCK_NONBLOCK), b"socket:"),
                         cloexec=bool(kind & SOCK_CLOEXEC))


def _connect(p, fd: int, addr: int, length: int) -> int:
    f = p.fds.get(signed(fd))
    if f.node.fmt != N.S_IFSOCK:
        raise SyscallError(E.ENOTSOCK)
    if length < SOCKADDR_UN_PATH + 1 or length > 110:
        raise SyscallError(E.EINVAL)
    raw = p.mem.read(addr, length)
    if int.from_bytes(raw[:2], "little") != AF_UNIX:
        raise SyscallError(E.EAFNOSUPPORT)
    path = raw[SOCKADDR_UN_PATH:].split(b"\0", 1)[0]
    if not path:
        raise SyscallError(E.ECONNREFUSED)  # abstract namespace: nobody listens
    p.vfs.resolve(path)  # ENOENT / ENOTDIR / EACCES as the path says
    raise SyscallError(E.ECONNREFUSED)


@syscall("socket")
def sys_socket(p, family, kind, protocol):
    return _socket(p, family, kind, protocol)


@syscall("connect")
def sys_connect(p, fd, addr, length):
    return _connect(p, fd, addr, length)


@syscall("socketcall")
def sys_socketcall(p, call, args):
    """The i386 multiplexer: ``args`` points at the call's arguments (32-bit words)."""
    if call == SYS_SOCKET:
        return _socket(p, *(p.mem.read_u32(args + 4 * i) for i in range(3)))
    if call == SYS_CONNECT:
        return _connect(p, *(p.mem.read_u32(args + 4 * i) for i in range(3)))
    raise SyscallError(E.ENOSYS)
