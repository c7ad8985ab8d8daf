"""Path resolution, errors, overlay writes, host view (read-only), specials."""

from __future__ import annotations

import os

import pytest

from tlslab.linux import errno as E
from tlslab.linux import nodes as N
from tlslab.linux.errno import SyscallError
from tlslab.linux.vfs import Vfs


def _vfs():
    root = N.Dir(2)
    a = root.attach(b"a", N.Dir(3))
    a.attach(b"f", N.File(4, data=b"hello"))
    a.attach(b"up", N.Symlink(5, b".."))
    a.attach(b"dangling", N.Symlink(6, b"nowhere"))
    root.attach(b"loop1", N.Symlink(7, b"loop2"))
    root.attach(b"loop2", N.Symlink(8, b"loop1"))
    root.attach(b"abs", N.Symlink(9, b"/a/f"))
    locked = root.attach(b"locked", N.Dir(10, N.S_IFDIR | 0o700, uid=0, gid=0))
    locked.attach(b"secret", N.File(11, data=b"x"))
    return Vfs(root, exe_path=b"/bin/prog")


def _errno(fn):
    with pytest.raises(SyscallError) as info:
        fn()
    return info.value.errno


def test_resolution():
    v = _vfs()
    assert v.resolve(b"/a/f").ino == 4
    assert v.resolve(b"a/./f").ino == 4
    assert v.resolve(b"/a/../a/f").ino == 4
    assert v.resolve(b"/../../a/f").ino == 4
    assert v.resolve(b"/a/up/a/f").ino == 4
    assert v.resolve(b"/abs").ino == 4
    assert v.resolve(b"/abs", follow=False).ino == 9
    assert v.resolve(b"/a/up/", follow=False).ino == 2  # trailing slash follows


def test_errors():
    v = _vfs()
    assert _errno(lambda: v.resolve(b"")) == E.ENOENT
    assert _errno(lambda: v.resolve(b"/nope")) == E.ENOENT
    assert _errno(lambda: v.resolve(b"/a/f/x")) == E.ENOTDIR
    assert _errno(lambda: v.resolve(b"/a/f/")) == E.ENOTDIR
    assert _errno(lambda: v.resolve(b"/loop1")) == E.ELOOP
    assert v.resolve(b"/loop1", follow=False).ino == 7
    assert _errno(lambda: v.resolve(b"/a/dangling")) == E.ENOENT
    assert _errno(lambda: v.resolve(b"/locked/secret")) == E.EACCES
    assert _errno(lambda: v.resolve(b"/" + b"x" * 300)) == E.ENAMETOOLONG


def test_cwd_and_getcwd_path():
    v = _vfs()
    v.cwd = v.resolve(b"/a")
    assert v.resolve(b"f").ino == 4
    assert v.path_of(v.cwd) == b"/a"
    assert v.path_of(v.root) == b"/"


def test_specials_are_hidden_but_resolvable():
    v = _vfs()
    assert b"dev" not in v.root.entries and b"proc" not in v.root.entries
    assert v.resolve(b"/dev/null").rdev == (1, 3)
    assert v.resolve(b"/proc/self/exe", follow=False).target == b"/bin/prog"
    assert isinstance(v.resolve(b"/proc/self/exe"), N.File)
    u1 = v.resolve(b"/dev/urandom").read(16)
    assert Vfs(N.Dir(2)).resolve(b"/dev/urandom").read(16) == u1  # seeded


def test_overlay_changes():
    v = _vfs()
    a = v.resolve(b"/a")
    f = v.create_file(a, b"new", 0o666)
    assert f.mode & 0o777 == 0o644 and v.resolve(b"/a/new") is f
    v.mkdir(a, b"sub", 0o777)
    assert _errno(lambda: v.mkdir(a, b"sub", 0o777)) == E.EEXIST
    v.rename(a, b"new", v.resolve(b"/a/sub"), b"moved")
    assert v.resolve(b"/a/sub/moved") is f
    assert _errno(lambda: v.unlink(a, b"sub", directory=True)) == E.ENOTEMPTY
    assert _errno(lambda: v.unlink(a, b"sub")) == E.EISDIR
    v.unlink(v.resolve(b"/a/sub"), b"moved")
    v.unlink(a, b"sub", directory=True)
    assert _errno(lambda: v.resolve(b"/a/sub")) == E.ENOENT
    assert _errno(lambda: v.rename(v.root, b"a", a, b"inside")) == E.EINVAL


def test_host_view_is_read_only(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"host")
    os.symlink("d/f", tmp_path / "l")
    v = Vfs.from_host(tmp_path)
    f = v.resolve(b"/l")
    assert f.read_at(0, 10) == b"host"
    f.write_at(0, b"GUEST")
    assert f.read_at(0, 10) == b"GUEST"
    v.unlink(v.resolve(b"/d"), b"f")
    v.create_file(v.root, b"created", 0o644)
    assert (tmp_path / "d" / "f").read_bytes() == b"host"
    assert sorted(os.listdir(tmp_path)) == ["d", "l"]
    assert v.resolve(b"/d").ino == v.resolve(b"/d").ino < 1 << 32


def test_host_directory_stream_has_dots_where_the_host_put_them(tmp_path):
    """readdir of a host directory: "." and ".." once each, at the host's positions, names in host order."""
    import os as _os

    from tlslab.linux.files import O_RDONLY, OpenFile
    from tlslab.linux.nodes import host_readdir

    for i in range(40):
        (tmp_path / f"f{i:02d}").write_text("x")
    names, dots = host_readdir(_os.fsencode(tmp_path))
    assert names == [_os.fsencode(n) for n in _os.listdir(tmp_path)]
    vfs = Vfs.from_host(tmp_path)
    stream = [name for name, _ in OpenFile(vfs.root, O_RDONLY, b"/").dir_listing(vfs.root)]
    assert stream.count(b".") == 1 and stream.count(b"..") == 1
    assert [n for n in stream if n not in (b".", b"..")] == names
    if dots is not None:
        assert (stream.index(b"."), stream.index(b"..")) == dots


def test_a_root_filesystem_without_tmp_gets_a_writable_one(tmp_path):
    """Packages do not ship /tmp (base-files makes it): a root filesystem without one gets an empty
    1777 directory whose files live in the overlay; a root with its own /tmp keeps it, and a data
    tree at "/" (no root filesystem) gets none."""
    tmp_path.chmod(0o755)
    (tmp_path / "bin").mkdir()
    v = Vfs.from_host(tmp_path, map_owner=False, list_specials=True)
    tmp = v.resolve(b"/tmp")
    assert tmp.fmt == N.S_IFDIR and tmp.mode & 0o7777 == 0o1777 and tmp.uid == 0
    assert b"tmp" in v.root.entries
    assert v.may(tmp, 2 | 1)                      # uid 1000 may create there
    assert not (tmp_path / "tmp").exists()        # nothing on the host
    (tmp_path / "tmp").mkdir(mode=0o755)
    own = Vfs.from_host(tmp_path, map_owner=False, list_specials=True).resolve(b"/tmp")
    assert own.mode & 0o7777 == 0o755
    data = tmp_path / "data"
    data.mkdir()
    assert b"tmp" not in Vfs.from_host(data).root.entries


@pytest.mark.parametrize("which", ["", "2"])
def test_named_pipes_in_the_model(debian_rootfs, which):
    """The FIFO scripts of the hw oracle test (tests/test_hw_dynamic.py), in the model alone: their output
    is the one the real kernel printed (checked there where the host can run it)."""
    import test_hw_dynamic as H

    from tlslab.experiment import RunSpec, execute

    r, _ = execute(RunSpec("/bin/dash", ("-c", getattr(H, "FIFO_SCRIPT" + which)), tree=None, rootfs="debian"))
    assert r.ok and r.status == 0
    assert r.stdout == getattr(H, "FIFO_OUTPUT" + which)
    # (timeout(1) tries timer_create, unsupported, then falls back to alarm)
    assert not [name for name in r.counters["linux"]["syscalls"]["unsupported"] if "mknod" in name]
