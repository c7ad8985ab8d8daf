"""Issue 12, item 4: under ``--backend hw`` a static i386 guest has no path to write the host.

Every hw run is jailed (``tlslab.hw.backend``'s module docstring): a guest
without a root filesystem runs as uid/gid 1000 in a private mount namespace,
chrooted into a view of its data tree whose writes go to a throwaway overlay.
A hostile static i386 program (built here with ``gcc -m32 -static``) attacks
absolute host paths that uid 1000 could write if it reached them -- a
world-writable directory given by absolute path, /tmp, /dev/shm, its own
binary's directory, the materialised tree, and /proc/PID/root of a host
process of uid 1000 -- by create, overwrite, mkdir, symlink, rename, chmod,
truncate and unlink, again after climbing with "..", and tries mount, chroot
and a user namespace; and the ways out that are no path: ptrace (also as a
64-bit call, through the 64-bit code segment) and process_vm_writev of a
host process of uid 1000, a host abstract unix socket
and TCP port, a host SysV shared memory segment. A control run of the same
binary outside the jail, as uid 1000, succeeds at them: the attacks work,
only the jail stops them. Every attempt inside must fail and the host must be
unchanged afterwards. Not prevented: signals to host processes of uid 1000
(that would take a PID namespace; README, hardware backend).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import GCC32, require_gcc32, unavailable
from tlslab.guests import resolve_guest
from tlslab.hw import backend

GUEST_UID = 1000
ATTACKS = ("create", "mkdir", "symlink", "rename", "chmod", "truncate", "unlink", "climb", "escape")

HOSTILE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *op, const char *path, int rc) {
    printf("%s %s -> %s\n", op, path, rc < 0 ? strerrorname_np(errno) : "ok");
    fflush(stdout);
}

static int create(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (fd < 0) return -1;
    int rc = write(fd, "pwned\n", 6) == 6 ? 0 : -1;
    close(fd);
    return rc;
}

static void attack(const char *tag, const char *p) {
    char q[4096];
    report(tag, p, create(p));
    snprintf(q, sizeof q, "%s.d", p); report("mkdir", q, mkdir(q, 0777));
    snprintf(q, sizeof q, "%s.l", p); report("symlink", q, symlink("/etc/passwd", q));
    snprintf(q, sizeof q, "%s.r", p); report("rename", p, rename(p, q));
    report("chmod", p, chmod(p, 0777));
    report("truncate", p, truncate(p, 0));
    report("unlink", p, unlink(p));
}

/* a 64-bit system call from this 32-bit program: far jump to the 64-bit code segment and back */
long gate64(long nr, long a1, long a2);
__asm__(
    ".text\n.globl gate64\ngate64:\n"
    "  pushl %ebx\n  pushl %esi\n  pushl %edi\n  pushl %ebp\n"
    "  movl 20(%esp), %eax\n  movl 24(%esp), %edi\n  movl 28(%esp), %esi\n"
    "  ljmp $0x33, $1f\n"
    ".code64\n"
    "1: movl %edi, %edi\n  movl %esi, %esi\n  movl %eax, %eax\n  xorl %edx, %edx\n  xorl %r10d, %r10d\n"
    "  movl %esp, %esp\n  syscall\n"
    "  pushq $0x23\n  leaq 2f(%rip), %rcx\n  pushq %rcx\n  lretq\n"
    ".code32\n"
    "2: popl %ebp\n  popl %edi\n  popl %esi\n  popl %ebx\n  ret\n");

/* other ways out than a path: another process of the same uid, host daemons, host shared memory */
static int special(const char *a) {
    if (!strncmp(a, "pid:", 4)) {
        pid_t pid = atoi(a + 4);
        char buf[4] = "pwn";
        struct iovec mine = {buf, 4}, theirs = {(void *)0x8048000, 4};
        int rc = ptrace(PTRACE_ATTACH, pid, 0, 0) < 0 ? -1 : 0;
        report("ptrace-attach", a, rc);
        if (rc == 0) { waitpid(pid, NULL, 0); ptrace(PTRACE_DETACH, pid, 0, 0); }
        report("process_vm_writev", a, process_vm_writev(pid, &mine, 1, &theirs, 1, 0) < 0 ? -1 : 0);
        long r = gate64(101 /* x86-64 ptrace */, PTRACE_ATTACH, pid);
        if (r < 0) errno = (int)-r;
        report("ptrace64-attach", a, r < 0 ? -1 : 0);
        if (r == 0) { waitpid(pid, NULL, 0); gate64(101, PTRACE_DETACH, pid); }
    } else if (!strncmp(a, "abstract:", 9)) {
        struct sockaddr_un un = {AF_UNIX};
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        strncpy(un.sun_path + 1, a + 9, sizeof un.sun_path - 2);
        report("connect-abstract", a, connect(fd, (struct sockaddr *)&un, sizeof un.sun_family + 1 + strlen(a + 9)));
        close(fd);
    } else if (!strncmp(a, "tcp:", 4)) {
        struct sockaddr_in in = {AF_INET, htons(atoi(a + 4)), {htonl(INADDR_LOOPBACK)}};
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        report("connect-tcp", a, connect(fd, (struct sockaddr *)&in, sizeof in));
        close(fd);
    } else if (!strncmp(a, "shm:", 4)) {
        void *m = shmat(atoi(a + 4), NULL, 0);
        report("shmat", a, m == (void *)-1 ? -1 : 0);
        if (m != (void *)-1) memcpy(m, "pwned", 6);
    } else {
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    int i, k;
    printf("uid %d gid %d\n", (int)getuid(), (int)getgid());
    for (i = 1; i < argc; i++) if (special(argv[i])) argv[i] = NULL;
    for (i = 1; i < argc; i++) if (argv[i]) attack("create", argv[i]);
    for (k = 0; k < 64; k++) if (chdir("..") < 0) break;   /* as far up as ".." goes, then relative */
    for (i = 1; i < argc; i++) if (argv[i]) attack("climb", argv[i] + 1);
    report("mount", "/", mount("none", "/", "tmpfs", 0, NULL));
    report("chroot", "/", chroot("/"));
    /* a user namespace would give CAP_SYS_CHROOT: the classic chroot escape */
    if (unshare(CLONE_NEWUSER) == 0) {
        report("unshare", "CLONE_NEWUSER", 0);
        chdir("/");
        mkdir("tlslab-esc", 0755);
        report("chroot", "tlslab-esc", chroot("tlslab-esc"));
        for (k = 0; k < 64; k++) chdir("..");
        for (i = 1; i < argc; i++) if (argv[i]) attack("escape", argv[i] + 1);
    } else {
        report("unshare", "CLONE_NEWUSER", -1);
    }
    printf("done\n");
    return 0;
}
"""

# What the model lets a guest write (its tree, through its overlay), compared line by line with the model.
WRITER = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void put(const char *path, const char *text, int flags) {
    int fd = open(path, O_WRONLY | O_CREAT | flags, 0644);
    if (fd < 0) { printf("open %s: %s\n", path, strerror(errno)); return; }
    if (write(fd, text, strlen(text)) < 0) printf("write %s: %s\n", path, strerror(errno));
    close(fd);
}

static void show(const char *path) {
    char buf[256];
    int fd = open(path, O_RDONLY), n;
    if (fd < 0) { printf("read %s: %s\n", path, strerror(errno)); return; }
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    buf[n < 0 ? 0 : n] = 0;
    printf("%s: %s", path, buf);
}

int main(int argc, char **argv) {
    char link[256];
    struct stat a, b;
    ssize_t n;
    put("new.txt", "made by the guest\n", O_TRUNC);
    show("new.txt");
    put(argv[1], "overwritten\n", O_TRUNC);             /* a file of the tree, relative */
    show(argv[1]);
    printf("mkdir: %d\n", mkdir("made", 0755));
    put("made/inner", "inner\n", O_TRUNC);
    show("made/inner");
    printf("same node: %d\n", stat(argv[1], &a) == 0 && stat(argv[2], &b) == 0 && a.st_ino == b.st_ino);
    printf("unlink: %d\n", unlink(argv[1]));
    n = readlink("/proc/self/exe", link, sizeof link - 1);
    link[n < 0 ? 0 : n] = 0;
    printf("exe: %s\n", link);
    put("/dev/null", "discarded\n", 0);
    return 0;
}
"""


def _snapshot(*roots) -> dict:
    """Every entry under ``roots``: type, mode, owner, size, mtime, content hash / link target."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [".", *dirnames, *filenames]:
                p = os.path.normpath(os.path.join(dirpath, name))
                st = os.lstat(p)
                if os.path.islink(p):
                    what = os.readlink(p)
                elif os.path.isfile(p):
                    what = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                else:
                    what = sorted(os.listdir(p))
                out[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, what)
    return out


@pytest.fixture(scope="module")
def hw_ok():
    from tlslab.experiment import RunSpec

    if os.geteuid() != 0:
        unavailable(backend.ROOT_NEEDED)
    require_gcc32()
    try:
        backend.run_spec(RunSpec("syscalls", ("1",), strategy="native"))
    except backend.HwUnavailable as exc:
        unavailable(f"hw backend: {exc}")
    return True


@pytest.fixture
def world(tmp_path):
    """Host places uid 1000 could write if it reached them: world-writable dirs under /tmp, the binary's among them."""
    base = Path(tempfile.mkdtemp(prefix="tlslab-jail-test-", dir="/tmp"))
    base.chmod(0o777)
    exe_dir, victims = base / "bin", base / "victims"
    for d in (exe_dir, victims):
        d.mkdir()
        d.chmod(0o777)
    (victims / "existing").write_text("original\n")
    (victims / "existing").chmod(0o666)
    for name, src in (("hostile", HOSTILE), ("writer", WRITER)):
        (tmp_path / f"{name}.c").write_text(src)
        cp = subprocess.run([*GCC32, "-O1", "-o", str(exe_dir / name), str(tmp_path / f"{name}.c")],
                            capture_output=True, text=True)
        assert cp.returncode == 0, cp.stderr
        (exe_dir / name).chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def host_services():
    """Ways out that are no path: a host process of uid 1000, an abstract unix socket and a TCP port listening,
    a SysV shared memory segment anyone may write. Yields the guest arguments naming them."""
    import socket

    tag = uuid.uuid4().hex[:12]
    holder = subprocess.Popen(["sleep", "120"], user=GUEST_UID, group=GUEST_UID, extra_groups=[])
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(f"\0tlslab-jail-{tag}")
    unix.listen(4)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    args = [f"pid:{holder.pid}", f"abstract:tlslab-jail-{tag}", f"tcp:{tcp.getsockname()[1]}"]
    shm = None
    if shutil.which("ipcmk"):
        cp = subprocess.run(["ipcmk", "-M", "4096", "-p", "0666"], capture_output=True, text=True)
        if cp.returncode == 0 and cp.stdout.split()[-1:] and cp.stdout.split()[-1].isdigit():
            shm = cp.stdout.split()[-1]
            args.append(f"shm:{shm}")
    yield holder, args
    holder.kill()
    holder.wait()
    unix.close()
    tcp.close()
    if shm is not None:
        subprocess.run(["ipcrm", "-m", shm], capture_output=True)


SPECIALS = ("ptrace-attach", "process_vm_writev", "ptrace64-attach", "connect-abstract", "connect-tcp", "shmat")


def _attack_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.split(" ", 1)[0] in ATTACKS]


def test_the_attacks_work_outside_the_jail(hw_ok, world, host_services):
    """Control: the same binary run directly on the host as uid 1000 does write the host, attaches to a host
    process of its uid, reaches the listening sockets and the shared memory."""
    _holder, services = host_services
    control = world / "control"
    control.mkdir()
    control.chmod(0o777)
    p = subprocess.run([str(world / "bin" / "hostile"), str(control / "x"), *services], capture_output=True,
                       text=True, user=GUEST_UID, group=GUEST_UID, extra_groups=[], timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"create {control / 'x'} -> ok" in p.stdout
    assert f"mkdir {control / 'x'}.d -> ok" in p.stdout
    assert (control / "x.d").is_dir() and (control / "x.l").is_symlink()
    for what in ("ptrace-attach", "ptrace64-attach", "connect-abstract", "connect-tcp",
                 *(["shmat"] if len(services) > 3 else [])):
        assert f"{what} " in p.stdout and [line for line in p.stdout.splitlines()
                                          if line.startswith(what + " ") and line.endswith("-> ok")], p.stdout


@pytest.mark.parametrize("strategy", ["native", "emulate", "flip", "untraced"])
def test_static_guest_cannot_write_the_host(hw_ok, world, host_services, strategy):
    """`tlslab run --backend hw -s S HOSTILE -- TARGETS` (untraced, which the CLI does not offer and where no
    tracer stops anything: through ``run_spec``)."""
    tree = backend.materialised_tree("small")
    tree_file = next(os.path.join(tree, n) for n in sorted(os.listdir(tree)) if os.path.isfile(os.path.join(tree, n)))
    tag = uuid.uuid4().hex[:12]
    holder, services = host_services
    targets = [
        str(world / "victims" / "existing"),            # overwrite an existing host file
        str(world / "victims" / "new"),                 # a new file in a dir given by absolute path
        f"/tmp/tlslab-hostile-{tag}",
        f"/dev/shm/tlslab-hostile-{tag}",
        str(world / "bin" / "planted"),                 # next to its own binary
        os.path.join(tree, f"planted-{tag}"),            # the host copy of its tree
        tree_file,
        f"/proc/{holder.pid}/root{world}/victims/viaproc",   # a host process of the same uid
        f"/proc/{holder.pid}/root/tmp/tlslab-hostile-{tag}",
    ]
    before = _snapshot(world, tree)
    if strategy == "untraced":
        from tlslab.experiment import RunSpec

        r, _ = backend.run_spec(RunSpec(str(world / "bin" / "hostile"), (*targets, *services),
                                        strategy=strategy))
        assert r.status == 0 and r.ok, r.stderr
        out = r.stdout.decode()
    else:
        p = subprocess.run([sys.executable, "-m", "tlslab", "run", "--backend", "hw", "-s", strategy,
                            str(world / "bin" / "hostile"), "--", *targets, *services],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        out = p.stdout
    assert f"uid {GUEST_UID} gid {GUEST_UID}" in out and "done" in out, out
    lines = _attack_lines(out)
    assert len(lines) == 7 * len(targets) * 2, out   # create..unlink, for each target, directly and after climbing
    assert not [line for line in lines if line.endswith("-> ok")], out
    assert "mount / -> EPERM" in out and "chroot / -> EPERM" in out
    assert "unshare CLONE_NEWUSER -> EPERM" in out   # the kernel refuses user namespaces inside a chroot
    # no other process of its uid to drive (seccomp: ENOSYS, as in the model), no host socket, no host SysV IPC
    for what in ("ptrace-attach", "process_vm_writev", "ptrace64-attach"):   # 64-bit: by its x86-64 number
        assert f"{what} pid:{holder.pid} -> ENOSYS" in out, out
    special = [line for line in out.splitlines() if line.split(" ", 1)[0] in SPECIALS]
    assert len(special) == len(services) + 2 and not [line for line in special if line.endswith("-> ok")], out
    assert holder.poll() is None
    assert _snapshot(world, tree) == before
    assert not [n for n in os.listdir("/tmp") if n.startswith(f"tlslab-hostile-{tag}")]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"tlslab-hostile-{tag}")]
    assert not os.path.lexists(os.path.join("/", "tlslab-esc"))


def test_dynamic_guest_cannot_write_the_host(hw_ok, debian_rootfs, world, host_services, tmp_path):
    """The same attacks from a dynamic i386 build, which runs chrooted into the pinned root (as in the model)."""
    from tlslab.experiment import RunSpec

    exe = world / "bin" / "hostile.dyn"
    cp = subprocess.run(["gcc", "-m32", "-O1", "-o", str(exe), str(tmp_path / "hostile.c")], capture_output=True,
                        text=True)
    if cp.returncode != 0:
        unavailable(f"gcc -m32 cannot link a dynamic i386 program here: {cp.stderr.strip()[-200:]}")
    exe.chmod(0o755)
    holder, services = host_services
    tag = uuid.uuid4().hex[:12]
    targets = [str(world / "victims" / "existing"), str(world / "bin" / "planted"), f"/tmp/tlslab-hostile-{tag}",
               f"/dev/shm/tlslab-hostile-{tag}", "/etc/tlslab-hostile", "/tlslab-hostile"]
    before = _snapshot(world)
    root_before = sorted(os.listdir(debian_rootfs))
    r, _ = backend.run_spec(RunSpec(str(exe), (*targets, *services), strategy="emulate"))
    out = r.stdout.decode()
    assert r.status == 0 and "done" in out, (out, r.stderr)
    assert r.summary.get("chroot") and r.summary["uid"] == GUEST_UID
    lines = _attack_lines(out)
    assert len(lines) == 7 * len(targets) * 2, out
    # the root has no /tmp, so the jail gives the guest its own (a private tmpfs, as the model's /tmp):
    # writes there succeed and stay there (the host's /tmp is checked below); nothing else may succeed
    own_tmp = f"tmp/tlslab-hostile-{tag}"
    assert f"create /{own_tmp} -> ok" in out, out
    assert not [line for line in lines if line.endswith("-> ok") and own_tmp not in line], out
    special = [line for line in out.splitlines() if line.split(" ", 1)[0] in SPECIALS]
    assert len(special) == len(services) + 2 and not [line for line in special if line.endswith("-> ok")], out
    assert _snapshot(world) == before and sorted(os.listdir(debian_rootfs)) == root_before
    assert not [n for n in (*os.listdir("/tmp"), *os.listdir("/dev/shm")) if n.startswith(f"tlslab-hostile-{tag}")]
    assert holder.poll() is None


def test_root_dir_guest_writes_land_in_the_overlay(hw_ok, world):
    """``--root DIR``: the guest may write its tree as in the model, never DIR itself."""
    data = world / "victims"
    before = _snapshot(world)
    r, _ = backend.run_spec(_spec(world, "emulate", root=str(data), args=("existing", "/existing")))
    assert r.status == 0, r.stderr
    assert b"new.txt: made by the guest\n" in r.stdout and b"same node: 1\n" in r.stdout
    assert b"existing: overwritten\n" in r.stdout and b"made/inner: inner\n" in r.stdout
    assert _snapshot(world) == before


def _spec(world, strategy, **kw):
    from tlslab.experiment import RunSpec

    return RunSpec(str(world / "bin" / "writer"), kw.pop("args"), strategy=strategy, **kw)


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_guest_writes_to_its_tree_as_in_the_model(hw_ok, world, strategy):
    """What the model lets the guest write (its tree: new files, overwrites, mkdir, unlink; "/x" is "./x";
    /proc/self/exe reads as the model's /bin/NAME; /dev/null takes writes) the jailed guest writes too, with
    the same output and fault counts -- into a throwaway overlay: the host's copy of the tree is unchanged."""
    from tlslab.experiment import execute

    tree = backend.materialised_tree("small")
    name = next(n for n in sorted(os.listdir(tree)) if os.path.isfile(os.path.join(tree, n)))
    spec = _spec(world, strategy, args=(name, "/" + name))
    before = _snapshot(tree)
    model, _ = execute(spec)
    hw, _ = backend.run_spec(spec)
    assert model.crash is None and hw.ok
    assert hw.stdout == model.stdout and hw.stderr == model.stderr and hw.status == model.status == 0
    assert b"same node: 1\n" in hw.stdout and b"unlink: 0\n" in hw.stdout and b"exe: /bin/writer\n" in hw.stdout
    assert hw.faults == sum(s["violations"] for s in model.sites)
    assert _snapshot(tree) == before


def test_without_namespaces_the_run_fails_with_one_line(hw_ok, monkeypatch, capsys):
    """A host (or container) that refuses mount namespaces: one line, exit 1 -- never an unjailed run."""
    from tlslab.cli import main

    real_run = backend.subprocess.run

    def no_sys_admin(cmd, *a, **kw):   # the supervisor without CAP_SYS_ADMIN: its unshare -> EPERM
        return real_run(["setpriv", "--bounding-set", "-sys_admin", "--", *cmd], *a, **kw)

    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv (util-linux)")
    monkeypatch.setattr(backend.subprocess, "run", no_sys_admin)
    with pytest.raises(backend.HwUnavailable, match=r"hw backend unavailable: unshare\(CLONE_NEW.*every hw guest runs"):
        backend.run_hw(resolve_guest("syscalls").path, ["syscalls", "1"], strategy="untraced")
    rc = main(["run", "--backend", "hw", "-s", "emulate", "syscalls", "--", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and "every hw guest runs" in lines[0], err
    assert "Traceback" not in err


def test_non_root_is_refused_with_one_line(monkeypatch, capsys):
    """Without root the guest cannot be jailed: the hw backend is unavailable (exit 1), it never runs unjailed."""
    from tlslab.cli import main

    monkeypatch.setattr(backend.os, "geteuid", lambda: 1000)
    with pytest.raises(backend.HwUnavailable, match="needs root"):
        backend.run_hw(sys.executable, strategy="native")
    rc = main(["run", "--backend", "hw", "lsr"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and backend.ROOT_NEEDED in lines[0], err
