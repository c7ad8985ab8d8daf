"""The guest's filesystem namespace: path resolution, permissions, and changes.

The root is either a synthetic tree (``tree.py``) or a read-only view of a host
directory (``--root DIR``); writes go to a private in-memory overlay (see
``nodes``). ``/dev`` (null, zero, urandom) and ``/proc/self/exe`` are mounted
on the root but *hidden from its listing*: they resolve by name, yet a walk of
the tree root lists exactly the tree, byte-identical to a native walk of the
materialised tree.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
import functools
import os
import random

from tlslab.linux import errno as E
from tlslab.linux import nodes as N
from tlslab.linux.errno import SyscallError

DEV_TMPFS = (0, 23)          # the /tmp a root filesystem gets (an anonymous device, as a tmpfs has)
OVERLAY_BYTES = 256 << 20   # what the guest's files may grow by in all (ENOSPC beyond), as the
                            # hw backend's overlay tmpfs (size=256m) allows
MAX_SYMLINKS = 40
NAME_MAX = 255
PATH_MAX = 4096
R_OK, W_OK, X_OK = 4, 2, 1
FIRST_OVERLAY_INO = 1 << 30  # inodes of files the guest creates


class Vfs:
    """One guest's view: root, cwd, mounts; all failures are ``SyscallError``."""

    def __init__(self, root: N.Dir, exe_path: bytes = b"/bin/prog", exe_source=None, seed: int = 0,
                 uid: int = 1000, gid: int = 1000, umask: int = 0o022, list_specials: bool = False):
        self.root = root
        self.root.parent, self.root.name = root, b""
        self.cwd: N.Dir = root
        self.uid, self.gid, self.umask = uid, gid, umask
        self.exe_path = exe_path
        # the guest's CLOCK_REALTIME in ns (set by the process): the times of files the guest creates
        # or changes. None: the epoch, as before a process exists.
        self.clock: Callable[[], int] | None = None
        self._ino = [FIRST_OVERLAY_INO]  # shared by every process's view (fork)
        self._grown = [0]                # bytes files grew by in all (OVERLAY_BYTES), shared likewise
        self._urandom = random.Random(f"tlslab-urandom:{seed}")
        self._mount_specials(exe_source, list_specials)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_tree(cls, spec, **kw) -> Vfs:
        from tlslab.linux.tree import SyntheticTree

        tree = spec if isinstance(spec, SyntheticTree) else _synthetic_tree(str(spec))
        return cls(tree.build(), **kw)

    @classmethod
    def from_host(cls, directory: str | os.PathLike, map_owner: bool = True, **kw) -> Vfs:
        """A read-only view of a host directory (see ``nodes.host_node`` for ``map_owner``)."""
        path = os.fsencode(directory)
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{os.fsdecode(path)} is not a directory")
        root = N.host_node(path, map_owner=map_owner)
        return cls(root, **kw)

    def mount(self, path: bytes, tree: N.Dir) -> N.Dir:
        """Mount directory ``tree`` at absolute guest ``path`` (replacing what the root has there).

        The mount point's parent must exist; the mount is listed in it, as a
        mount on an existing directory would be. Used to put a data tree
        (``--tree``, ``--root``) inside a root filesystem.
        """
        if not path.startswith(b"/") or path.rstrip(b"/") == b"":
            raise ValueError(f"mount point must be an absolute path below /, not {os.fsdecode(path)!r}")
        parent, name = self.resolve_parent(path.rstrip(b"/"))
        if name in (b".", b".."):
            raise ValueError(f"bad mount point {os.fsdecode(path)!r}")
        parent.entries.pop(name, None)
        parent.attach(name, tree)
        return tree

    def new_ino(self) -> int:
        self._ino[0] += 1
        return self._ino[0]

    def fork(self) -> Vfs:
        """A child process's view: the same filesystem, its own working directory and identity."""
        view = copy.copy(self)
        return view

    def _mount_specials(self, exe_source, listed: bool) -> None:
        """/dev and /proc/self/exe on the root (and /tmp on a root filesystem without one). A root
        filesystem lists them in "/", as a Linux system's root (and the hw backend's view of one)
        does; a data tree at "/" hides them, so that a walk of it lists exactly the tree."""
        dev = N.Dir(self.new_ino(), dev=N.DEV_DEVTMPFS, uid=0, gid=0)
        for name, kind, minor in ((b"null", "null", 3), (b"zero", "zero", 5), (b"urandom", "urandom", 9),
                                  (b"random", "urandom", 8)):
            dev.attach(name, N.Device(self.new_ino(), kind, N.S_IFCHR | 0o666, source=self._urandom.randbytes
                                      if kind == "urandom" else None, dev=N.DEV_DEVTMPFS, rdev=(1, minor), uid=0, gid=0))
        proc = N.Dir(self.new_ino(), N.S_IFDIR | 0o555, dev=N.DEV_PROC, uid=0, gid=0)
        self_dir = proc.attach(b"self", N.Dir(self.new_ino(), N.S_IFDIR | 0o555, dev=N.DEV_PROC, uid=0, gid=0))
        exe = N.File(self.new_ino(), N.S_IFREG | 0o755, source=exe_source, dev=N.DEV_PROC, uid=0, gid=0)
        self_dir.attach(b"exe", N.Symlink(self.new_ino(), self.exe_path, magic=exe, dev=N.DEV_PROC, uid=0, gid=0))
        for name, node in ((b"dev", dev), (b"proc", proc)):
            if listed and self.root.lookup(name) is None:
                self.root.attach(name, node)
            else:
                self.root.hidden[name] = node
            node.parent, node.name = self.root, name
        if listed and self.root.lookup(b"tmp") is None:
            # a root filesystem without /tmp (packages do not ship it: Debian's base-files makes it) gets
            # an empty world-writable sticky one, as every Linux system has; its files go to the overlay
            self.root.attach(b"tmp", N.Dir(self.new_ino(), N.S_IFDIR | 0o1777, dev=DEV_TMPFS, uid=0, gid=0))

    # ------------------------------------------------------------ permissions
    def may(self, node: N.Node, want: int) -> bool:
        if self.uid == 0:
            return not (want & X_OK) or node.fmt == N.S_IFDIR or bool(node.mode & 0o111)
        if node.uid == self.uid:
            bits = node.mode >> 6
        elif node.gid == self.gid:
            bits = node.mode >> 3
        else:
            bits = node.mode
        return (bits & want & 7) == want

    # ------------------------------------------------------------ resolution
    def resolve(self, path: bytes, base: N.Dir | None = None, follow: bool = True) -> N.Node:
        """The node ``path`` names, from ``base`` (default cwd) for relative paths."""
        if not path:
            raise SyscallError(E.ENOENT, "empty path")
        if len(path) >= PATH_MAX:
            raise SyscallError(E.ENAMETOOLONG)
        return self._walk(path, base or self.cwd, follow, [0])

    def _walk(self, path: bytes, base: N.Dir, follow: bool, links: list[int]) -> N.Node:
        cur: N.Node = self.root if path.startswith(b"/") else base
        parts = [p for p in path.split(b"/") if p]
        must_be_dir = path.endswith(b"/")
        for i, part in enumerate(parts):
            if not isinstance(cur, N.Dir):
                raise SyscallError(E.ENOTDIR, path.decode(errors="replace"))
            if not self.may(cur, X_OK):
                raise SyscallError(E.EACCES, path.decode(errors="replace"))
            if len(part) > NAME_MAX:
                raise SyscallError(E.ENAMETOOLONG)
            if part == b".":
                continue
            if part == b"..":
                cur = cur.parent
                continue
            child = cur.lookup(part)
            if child is None:
                raise SyscallError(E.ENOENT, path.decode(errors="replace"))
            last = i == len(parts) - 1
            if isinstance(child, N.Symlink) and (not last or follow or must_be_dir):
                links[0] += 1
                if links[0] > MAX_SYMLINKS:
                    raise SyscallError(E.ELOOP, path.decode(errors="replace"))
                child = child.magic if child.magic is not None else self._walk(child.target, cur, True, links)
            cur = child
        if must_be_dir and not isinstance(cur, N.Dir):
            raise SyscallError(E.ENOTDIR, path.decode(errors="replace"))
        return cur

    def resolve_parent(self, path: bytes, base: N.Dir | None = None) -> tuple[N.Dir, bytes]:
        """The directory that holds ``path``'s last component, and that component."""
        if not path:
            raise SyscallError(E.ENOENT, "empty path")
        stripped = path.rstrip(b"/")
        if not stripped:  # "/" itself
            return self.root, b"."
        head, _, name = stripped.rpartition(b"/")
        if b"/" not in stripped:
            parent = base or self.cwd
        else:
            parent = self.resolve(head or b"/", base)
        if not isinstance(parent, N.Dir):
            raise SyscallError(E.ENOTDIR)
        if len(name) > NAME_MAX:
            raise SyscallError(E.ENAMETOOLONG)
        return parent, name

    def path_of(self, d: N.Dir) -> bytes:
        """Absolute guest path of directory ``d`` (for getcwd)."""
        parts = []
        while d is not self.root:
            parts.append(d.name)
            if d.parent is d:
                break
            d = d.parent
        return b"/" + b"/".join(reversed(parts))

    # ------------------------------------------------------------ changes (overlay)
    def now(self) -> int:
        return self.clock() if self.clock is not None else 0

    def resize(self, node: N.File, new_size: int) -> None:
        """Account ``node`` growing (or shrinking) to ``new_size`` bytes before it does: the guest's
        files live in host memory, so what they may grow by in all is bounded (ENOSPC)."""
        delta = new_size - node.size
        if delta > 0 and self._grown[0] + delta > OVERLAY_BYTES:
            raise SyscallError(E.ENOSPC)
        self._grown[0] = max(0, self._grown[0] + delta)

    def touch(self, *nodes: N.Node) -> None:
        """The content of ``nodes`` changed now (a file written; a directory's entries)."""
        now = self.now()
        for node in nodes:
            node.mtime_ns = now

    def _check_writable_dir(self, parent: N.Dir) -> None:
        if not self.may(parent, W_OK | X_OK):
            raise SyscallError(E.EACCES)
        if parent.dev in (N.DEV_PROC, N.DEV_DEVTMPFS):
            raise SyscallError(E.EACCES)

    def create_file(self, parent: N.Dir, name: bytes, mode: int) -> N.File:
        self._check_writable_dir(parent)
        node = N.File(self.new_ino(), N.S_IFREG | (mode & 0o7777 & ~self.umask), data=b"",
                      uid=self.uid, gid=self.gid, mtime_ns=self.now(), dev=parent.dev)
        parent.attach(name, node)
        self.touch(parent)
        return node

    def mkdir(self, parent: N.Dir, name: bytes, mode: int) -> N.Dir:
        if name in (b".", b"..") or parent.lookup(name) is not None:
            raise SyscallError(E.EEXIST)
        self._check_writable_dir(parent)
        self.touch(parent)
        return parent.attach(name, N.Dir(self.new_ino(), N.S_IFDIR | (mode & 0o7777 & ~self.umask),
                                         uid=self.uid, gid=self.gid, mtime_ns=self.now(), dev=parent.dev))

    def mkfifo(self, parent: N.Dir, name: bytes, mode: int) -> N.Node:
        """A named pipe (mknod S_IFIFO); the guest's like any file it creates."""
        from tlslab.linux.pipes import Fifo

        if name in (b".", b"..") or parent.lookup(name) is not None:
            raise SyscallError(E.EEXIST)
        self._check_writable_dir(parent)
        self.touch(parent)
        return parent.attach(name, Fifo(self.new_ino(), mode & ~self.umask, uid=self.uid, gid=self.gid,
                                        mtime_ns=self.now(), dev=parent.dev))

    def symlink(self, parent: N.Dir, name: bytes, target: bytes) -> None:
        if parent.lookup(name) is not None:
            raise SyscallError(E.EEXIST)
        self._check_writable_dir(parent)
        parent.attach(name, N.Symlink(self.new_ino(), target, uid=self.uid, gid=self.gid, mtime_ns=self.now(),
                                      dev=parent.dev))
        self.touch(parent)

    def unlink(self, parent: N.Dir, name: bytes, directory: bool = False) -> None:
        if name in (b".", b".."):
            raise SyscallError(E.EINVAL if name == b"." else E.ENOTEMPTY)
        node = parent.lookup(name)
        if node is None:
            raise SyscallError(E.ENOENT)
        if name in parent.hidden:
            raise SyscallError(E.EBUSY)
        self._check_writable_dir(parent)
        if directory:
            if not isinstance(node, N.Dir):
                raise SyscallError(E.ENOTDIR)
            if node.entries:
                raise SyscallError(E.ENOTEMPTY)
            if node is self.cwd or node is self.root:
                raise SyscallError(E.EBUSY)
        elif isinstance(node, N.Dir):
            raise SyscallError(E.EISDIR)
        del parent.entries[name]
        self.touch(parent)
        if isinstance(node, N.File):
            node.links -= 1
            if node.links == 0:   # its bytes are given back (an open descriptor may still use them)
                self._grown[0] = max(0, self._grown[0] - node.size)

    def link(self, node: N.Node, parent: N.Dir, name: bytes) -> None:
        """A second name for ``node`` (link(2)): not for directories; same filesystem only."""
        if isinstance(node, N.Dir):
            raise SyscallError(E.EPERM)
        if name in (b".", b"..") or parent.lookup(name) is not None:
            raise SyscallError(E.EEXIST)
        self._check_writable_dir(parent)
        if node.dev != parent.dev or node.dev in (N.DEV_PROC, N.DEV_DEVTMPFS):
            raise SyscallError(E.EXDEV)
        parent.attach(name, node)
        self.touch(parent)
        if isinstance(node, N.File):
            node.links += 1

    def rename(self, old_parent: N.Dir, old: bytes, new_parent: N.Dir, new: bytes,
               noreplace: bool = False) -> None:
        node = old_parent.lookup(old)
        if node is None:
            raise SyscallError(E.ENOENT)
        if noreplace and new_parent.lookup(new) is not None:
            raise SyscallError(E.EEXIST)
        if old in (b".", b"..") or new in (b".", b".."):
            raise SyscallError(E.EBUSY)
        self._check_writable_dir(old_parent)
        self._check_writable_dir(new_parent)
        if node.dev != new_parent.dev:
            raise SyscallError(E.EXDEV)
        if isinstance(node, N.Dir):  # not into itself
            d = new_parent
            while True:
                if d is node:
                    raise SyscallError(E.EINVAL)
                if d.parent is d:
                    break
                d = d.parent
        existing = new_parent.lookup(new)
        if existing is node:
            return
        if existing is not None:
            if isinstance(existing, N.Dir) != isinstance(node, N.Dir):
                raise SyscallError(E.EISDIR if isinstance(existing, N.Dir) else E.ENOTDIR)
            if isinstance(existing, N.Dir) and existing.entries:
                raise SyscallError(E.ENOTEMPTY)
        del old_parent.entries[old]
        new_parent.attach(new, node)
        self.touch(old_parent, new_parent)
        if isinstance(existing, N.File):
            existing.links -= 1


def data_tree(tree=None, host_dir: str | os.PathLike | None = None) -> N.Dir:
    """A data tree to mount (``Vfs.mount``): a synthetic tree spec, or a read-only host directory."""
    if host_dir is not None:
        path = os.fsencode(host_dir)
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{os.fsdecode(path)} is not a directory")
        return N.host_node(path)
    from tlslab.linux.tree import SyntheticTree

    spec = tree if isinstance(tree, SyntheticTree) else _synthetic_tree(str(tree))
    return spec.build()


@functools.lru_cache(maxsize=8)
def _synthetic_tree(spec: str):
    """Generated trees are pure functions of their spec; ``build()`` still makes fresh nodes."""
    from tlslab.linux.tree import SyntheticTree

    return SyntheticTree(spec)
