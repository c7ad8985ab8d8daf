"""End to end: static i386 glibc programs under tlslab (native policy) against the real CPU.

Each program runs on the same synthetic tree twice, once in the guest VFS and
once natively on the materialised copy (cwd = tree root, same argv, exactly
the same environment); stdout, stderr and exit status must be byte-identical,
under ``VCpu(checks=True)`` and ``VCpu(checks=False)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import require_gcc32, unavailable

from tlslab.hypervisor.domain import run_process
from tlslab.linux.process import DEFAULT_ENV, Process
from tlslab.linux.tree import TREE_4K, TREE_SMALL, SyntheticTree
from tlslab.linux.vfs import Vfs
from tlslab.machine.vcpu import VCpu

CFLAGS = ["gcc", "-m32", "-static", "-O2", "-fstack-protector-strong"]

PROGRAMS = {
    "hello": r"""
#include <stdio.h>
int main(int argc, char **argv) { printf("hello, %s (%d args)\n", argv[0], argc); return 7; }
""",
    "walker": r"""
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
static __thread int depth;
static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
static void walk(const char *path) {
    DIR *d = opendir(path); struct dirent *de; char **names = NULL; size_t n = 0, i; char child[4096];
    depth++;
    if (!d) { printf("%s: %s\n", path, strerror(errno)); depth--; return; }
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        names = realloc(names, (n + 1) * sizeof *names); names[n++] = strdup(de->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, cmp);
    for (i = 0; i < n; i++) {
        struct stat st;
        snprintf(child, sizeof child, "%s/%s", path, names[i]);
        if (lstat(child, &st)) { printf("%d %s !%s\n", depth, child, strerror(errno)); continue; }
        printf("%d %s %o %lld %ld\n", depth, child, st.st_mode, (long long)st.st_size, (long)st.st_mtime);
        if (S_ISDIR(st.st_mode)) walk(child);
        if (S_ISLNK(st.st_mode)) { char t[256]; ssize_t k = readlink(child, t, sizeof t - 1);
            if (k >= 0) { t[k] = 0; printf("  -> %s %s\n", t, access(child, F_OK) ? strerror(errno) : "ok"); } }
        free(names[i]);
    }
    free(names);
    depth--;
}
int main(int argc, char **argv) {
    char cwd[256];
    walk(argc > 1 ? argv[1] : ".");
    printf("cwd ok: %d\n", getcwd(cwd, sizeof cwd) != NULL);
    return 0;
}
""",
    "errnos": r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    struct stat st; char buf[8]; int fd;
    const char *paths[] = {"/nonexistent", "", "/dev/null/x", "/proc/self/exe", ".", "..", "/dev/null"};
    for (unsigned i = 0; i < sizeof paths / sizeof *paths; i++) {
        errno = 0; int r = stat(paths[i], &st);
        printf("stat(%s) = %d %s\n", paths[i], r, strerror(errno));
        errno = 0; r = open(paths[i], O_RDONLY | O_DIRECTORY);
        printf("opendir(%s) = %d %s\n", paths[i], r >= 0, strerror(errno));
        if (r >= 0) close(r);
    }
    printf("read(-1) = %zd %s\n", read(-1, buf, 1), strerror(errno));
    printf("open(/, O_WRONLY) = %d %s\n", open("/", O_WRONLY), strerror(errno));
    fd = open("/dev/null", O_RDONLY);
    printf("read(/dev/null) = %zd\n", read(fd, buf, sizeof buf));
    printf("isatty(1) = %d %s\n", isatty(1), strerror(errno));
    printf("lseek(pipe) = %ld %s\n", (long)lseek(1, 0, SEEK_CUR), strerror(errno));
    int mk = mkdir("tmpdir", 0755), rm = rmdir("tmpdir"), again = rmdir("tmpdir");
    printf("mkdir = %d, rmdir = %d, rmdir again = %d %s\n", mk, rm, again, strerror(errno));
    return 0;
}
""",
}


def _on_tmpfs(path: str) -> bool:
    """Is ``path`` on tmpfs? (its readdir order -- newest first -- is what the VFS models)."""
    best, fstype = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype == "tmpfs"


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    """The small synthetic tree, materialised on tmpfs when the host has one."""
    import tempfile

    tree = SyntheticTree(TREE_SMALL)
    if os.path.isdir("/dev/shm") and _on_tmpfs("/dev/shm"):
        base = tempfile.mkdtemp(prefix="tlslab-tree-", dir="/dev/shm")
        root = tree.materialise(os.path.join(base, "root"))
        yield tree, root
        shutil.rmtree(base, ignore_errors=True)
    else:
        yield tree, tree.materialise(tmp_path_factory.mktemp("tree") / "root")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    require_gcc32()
    out = tmp_path_factory.mktemp("progs")
    built = {}
    for name, src in PROGRAMS.items():
        (out / f"{name}.c").write_text(src)
        subprocess.run([*CFLAGS, "-o", str(out / name), str(out / f"{name}.c")], check=True)
        built[name] = str(out / name)
    return built


def native(exe: str, argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = dict(e.decode().split("=", 1) for e in DEFAULT_ENV)  # exactly this env, like `env -i`
    return subprocess.run(argv, executable=exe, cwd=cwd, env=env, capture_output=True, timeout=60)


def guest(exe: str, argv: list[str], tree, checks: bool) -> tuple[int, Process]:
    p = Process(VCpu(checks=checks), exe, argv=argv, vfs=Vfs.from_tree(tree), seed=1)
    return run_process(p), p


def compare(exe, argv, tree, root, checks=True, sort_lines=False):
    n = native(exe, argv, root)
    status, p = guest(exe, argv, tree, checks)
    out_n, out_g = n.stdout, bytes(p.stdout)
    if sort_lines:
        out_n, out_g = sorted(out_n.splitlines()), sorted(out_g.splitlines())
    assert out_g == out_n
    assert bytes(p.stderr) == n.stderr
    assert status == n.returncode
    assert not p.counters.syscalls.unsupported or set(p.counters.syscalls.unsupported) <= {"prctl(172)"}
    return p


@pytest.mark.parametrize("checks", [True, False], ids=["checks", "nochecks"])
@pytest.mark.parametrize("name,args", [("hello", ["a", "b"]), ("walker", ["."]), ("walker", []), ("errnos", [])])
def test_own_programs(programs, small_tree, name, args, checks):
    tree, root = small_tree
    compare(programs[name], [name, *args], tree, root, checks)


# ----------------------------------------------------------------- bundled guests (tlslab.guests)
def _guest_path(key: str) -> str:
    from tlslab.guests import GuestError, resolve_guest

    try:
        return str(resolve_guest(key).path)
    except GuestError as exc:
        unavailable(str(exc))


BUNDLED = [("lsr", ["."]), ("lsr", []), ("syscalls", ["300"]), ("malloc", []), ("stdio", []),
           ("canary", []), ("selfread", [])]


@pytest.mark.parametrize("variant", ["", ".nosegneg"])
@pytest.mark.parametrize("checks", [True, False], ids=["checks", "nochecks"])
@pytest.mark.parametrize("name,args", BUNDLED, ids=[f"{n}-{'-'.join(a) or 'noargs'}" for n, a in BUNDLED])
def test_bundled_guests(small_tree, name, args, checks, variant):
    tree, root = small_tree
    compare(_guest_path(name + variant), [name, *args], tree, root, checks)


def test_host_root_view(small_tree):
    """--root DIR: the guest walks a read-only view of the materialised tree itself."""
    tree, root = small_tree
    exe = _guest_path("lsr")
    n = native(exe, ["lsr", "."], root)
    p = Process(VCpu(checks=True), exe, argv=["lsr", "."], vfs=Vfs.from_host(root), seed=1)
    assert run_process(p) == n.returncode and bytes(p.stdout) == n.stdout


def test_prelink_writes_only_the_overlay(small_tree, tmp_path):
    tree, root = small_tree
    big = max((e for e in tree.entries if e.kind == "file"), key=lambda e: e.size)
    exe = _guest_path("prelink")
    work = tmp_path / "copy"
    shutil.copytree(root, work, symlinks=True)
    n = native(exe, ["prelink", big.path, "out.bin"], str(work))
    status, p = guest(exe, ["prelink", big.path, "out.bin"], tree, True)
    assert (status, bytes(p.stdout)) == (n.returncode, n.stdout)
    assert p.vfs.resolve(b"out.bin").content() == (work / "out.bin").read_bytes()
    assert not os.path.exists(os.path.join(root, "out.bin"))


def test_fs_user(small_tree):
    tree, root = small_tree
    compare(_guest_path("fs-user"), ["fs-user"], tree, root)


def test_identical_runs_identical_counters(small_tree):
    tree, _ = small_tree
    exe = _guest_path("lsr")
    runs = []
    for _ in range(2):
        status, p = guest(exe, ["lsr", "."], tree, True)
        runs.append((status, bytes(p.stdout), p.summary(), p.vcpu.segment_counters(),
                     [(e.instructions, e.entry, e.installed) for e in p.tls_events]))
    assert runs[0] == runs[1]
    summary = runs[0][2]
    assert summary["set_thread_area"] == 1 and summary["instructions"] > 100_000
    assert summary["syscalls"]["by_name"]["statx"] > 300


@pytest.mark.slow
def test_lsr_on_4k_tree(tmp_path):
    tree = SyntheticTree(TREE_4K)
    root = tree.materialise(tmp_path / "t")
    compare(_guest_path("lsr"), ["lsr", "."], tree, root, checks=True)


# ----------------------------------------------------------------- Debian's busybox-static:i386
def _busybox() -> str:
    from tlslab.guests import GuestError, resolve_guest

    try:
        return str(resolve_guest("busybox").path)
    except (GuestError, OSError) as exc:
        unavailable(f"busybox unavailable (tlslab fetch): {exc}")


def _files(tree, suffix="", limit=60):
    return [e.path for e in tree.entries if e.kind == "file" and e.path.endswith(suffix)][:limit]


@pytest.mark.parametrize("applet", ["ls", "find", "md5sum", "sort"])
def test_busybox_applets(small_tree, applet):
    tree, root = small_tree
    exe = _busybox()
    args = {"ls": ["-R", "."], "find": ["."], "md5sum": _files(tree), "sort": _files(tree, ".txt", 20)}[applet]
    # find prints in readdir order: the VFS lists like tmpfs, so the comparison is
    # byte for byte when the native copy is on tmpfs, and as sorted lines otherwise
    compare(exe, ["busybox", applet, *args], tree, root, sort_lines=applet == "find" and not _on_tmpfs(root))
