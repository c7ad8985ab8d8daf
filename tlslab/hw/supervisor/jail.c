/*
 * jail.c: the child side, from fork to the guest's exec. It redirects the
 * standard streams, builds the guest's view of the filesystem (a chroot, a
 * private view of a root filesystem with the data tree mounted in it, or a
 * throwaway overlay of the data tree), drops to the model's uid/gid, asks to
 * be traced, installs the seccomp filter and executes the guest. Failures go
 * back to the supervisor through errfd ("errno stage"). Everything here runs
 * in the child: it reads the options and changes nothing the supervisor keeps.
 */
#include "supervisor.h"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noreturn)) static void child_fail(int fd, const char *stage) {
    int e = errno;
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%d %s", e, stage);
    if (write(fd, buf, n) < 0) {}
    _exit(127);
}

static int open_to(const char *path, int fd, int flags) {
    int f = open(path, flags, 0644);
    if (f < 0) return -1;
    if (f != fd) { if (dup2(f, fd) < 0) return -1; close(f); }
    return 0;
}

/* bind src read-only on dst (created: a directory or an empty file) */
static void bind_ro(int errfd, const char *src, const char *dst, int is_dir) {
    if (is_dir) {
        if (mkdir(dst, 0755) < 0) child_fail(errfd, "mkdir view entry");
    } else {
        int f = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (f < 0) child_fail(errfd, "create view entry");
        close(f);
    }
    if (mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0) child_fail(errfd, "bind mount");
    if (mount(NULL, dst, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
        child_fail(errfd, "remount bind read-only");
}

/* the view holds a symlink as the tree has it (its target text, not what it points to) */
static void copy_symlink(int errfd, const char *src, const char *dst, const char *what) {
    char link[4096];
    ssize_t k = readlink(src, link, sizeof link - 1);
    if (k < 0) child_fail(errfd, what);
    link[k] = 0;
    if (symlink(link, dst) < 0) child_fail(errfd, "symlink view entry");
}

/* In the current directory (a fresh tmpfs): an overlayfs of host directory `lower_src` (`st`: its stat)
 * mounted on `target`, its writes in upper/ here. lower/ is a read-only bind of lower_src; upper/ gets
 * lower_src's mode, owner and times, which the overlay's top directory shows. The option string names
 * only lower, upper and work, relative: commas and colons in lower_src's path stay out of it. */
static void overlay_here(int errfd, const char *lower_src, const struct stat *st, const char *target) {
    if (mkdir("lower", 0700) < 0 || mkdir("upper", st->st_mode & 07777) < 0 || mkdir("work", 0700) < 0)
        child_fail(errfd, "mkdir view entry");
    if (mount(lower_src, "lower", NULL, MS_BIND, NULL) < 0) child_fail(errfd, "bind mount");
    if (mount(NULL, "lower", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
        child_fail(errfd, "remount bind read-only");
    if (chown("upper", st->st_uid, st->st_gid) < 0 || chmod("upper", st->st_mode & 07777) < 0)
        child_fail(errfd, "chown view entry");
    struct timespec ts[2] = {st->st_atim, st->st_mtim};
    if (utimensat(AT_FDCWD, "upper", ts, 0) < 0) child_fail(errfd, "utimensat view entry");
    if (mount("tlslab-tree", target, "overlay", MS_NOSUID | MS_NODEV, "lowerdir=lower,upperdir=upper,workdir=work") < 0)
        child_fail(errfd, "mount overlay");
}

/* Fill view directory dst (on the tmpfs) with src's entries: symlinks copied,
 * everything else bound read-only -- except the directory on the way to the
 * data tree's mount point `rest` (relative, no leading '/'), which is
 * replicated the same way one level down, and the mount point itself, where
 * the data tree (host directory `tree`) is bound (replacing what the root has
 * there; its parent must exist in the root, as in the model). */
static void mount_tree(int errfd, const char *tree, const char *dst, const char *scratch);

static void populate(int errfd, const char *src, const char *dst, const char *rest, const char *tree,
                     const char *scratch) {
    char s2[4096], d2[4096], first[256] = "";
    const char *next = NULL;
    if (rest) {
        while (*rest == '/') rest++;
        const char *e = strchrnul(rest, '/');
        if ((size_t)(e - rest) >= sizeof first) { errno = ENAMETOOLONG; child_fail(errfd, "tree mount point"); }
        memcpy(first, rest, e - rest);
        first[e - rest] = 0;
        while (*e == '/') e++;
        next = *e ? e : NULL;
        if (!first[0] || !strcmp(first, ".") || !strcmp(first, "..")) {
            errno = EINVAL;
            child_fail(errfd, "tree mount point");
        }
    }
    int found = 0;
    DIR *d = opendir(src);
    if (!d) child_fail(errfd, "opendir root");
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        snprintf(s2, sizeof s2, "%s/%s", src, de->d_name);
        snprintf(d2, sizeof d2, "%s/%s", dst, de->d_name);
        struct stat st;
        if (lstat(s2, &st) < 0) child_fail(errfd, "lstat root entry");
        int on_path = first[0] && !strcmp(de->d_name, first);
        if (on_path && !next) continue; /* the mount point: the data tree goes here */
        if (on_path) {
            if (!S_ISDIR(st.st_mode)) { errno = ENOTDIR; child_fail(errfd, "tree mount point"); }
            if (mkdir(d2, st.st_mode & 07777) < 0) child_fail(errfd, "mkdir view entry");
            populate(errfd, s2, d2, next, tree, scratch);
            found = 1;
            continue;
        }
        if (S_ISLNK(st.st_mode)) {
            copy_symlink(errfd, s2, d2, "readlink root entry");
            continue;
        }
        bind_ro(errfd, s2, d2, S_ISDIR(st.st_mode));
    }
    closedir(d);
    if (first[0] && next && !found) { errno = ENOENT; child_fail(errfd, "tree mount point"); }
    if (first[0] && !next) {
        snprintf(d2, sizeof d2, "%s/%s", dst, first);
        mount_tree(errfd, tree, d2, scratch);
    }
}

/* The data tree at its mount point dst of the view: with a scratch directory (outside the view, so
 * unreachable after chroot), a writable overlayfs of the tree whose writes land in a size-bounded
 * tmpfs on scratch, as in the model's in-memory overlay (upper/ gets the tree's mode, owner and times,
 * which the overlay's top directory shows); without one, a read-only bind. Relative option paths
 * (cwd is scratch) keep commas and colons in the tree's path out of the mount options. */
static void mount_tree(int errfd, const char *tree, const char *dst, const char *scratch) {
    if (!scratch) {
        bind_ro(errfd, tree, dst, 1);
        return;
    }
    struct stat st;
    if (stat(tree, &st) < 0) child_fail(errfd, "stat data tree");
    if (mkdir(dst, 0755) < 0) child_fail(errfd, "mkdir view entry");
    /* the tree (and dst) may be relative to the supervisor's cwd: open it before leaving that cwd */
    int tree_fd = open(tree, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int dst_fd = open(dst, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (tree_fd < 0 || dst_fd < 0) child_fail(errfd, "open data tree");
    char tree_path[64], dst_path[64];
    snprintf(tree_path, sizeof tree_path, "/proc/self/fd/%d", tree_fd);
    snprintf(dst_path, sizeof dst_path, "/proc/self/fd/%d", dst_fd);
    if (mount("tlslab-scratch", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=" OVERLAY_SIZE) < 0)
        child_fail(errfd, "mount tmpfs scratch");
    if (chdir(scratch) < 0) child_fail(errfd, "chdir scratch");
    overlay_here(errfd, tree_path, &st, dst_path);
    close(tree_fd);
    close(dst_fd);
}

/* What the model mounts on every guest's root, by name (tlslab/linux/vfs.py): /dev with null, zero,
 * urandom and random (the host's, bound read-only: writes to a device node still reach the device) and
 * /proc/self/exe, a symlink to the model's path of the program (no procfs: its /proc/PID/root of
 * another uid-1000 process would lead out of the jail; so the link is static: right for the program the
 * run starts, while a program it executes sees the same link, where the model's follows each exec). Added under `root` (a directory on the view's
 * tmpfs) where the guest's root has no entry of that name. The model hides both from the root's
 * listing; a directory cannot be hidden, so a listing of "/" shows them here (docs/machine.md).
 * add_tmp (a root filesystem without /tmp): an empty /tmp, mode 1777, on its own size-bounded tmpfs,
 * as the model gives such a root (its files are the guest's writes, gone with the namespace). */
static void add_specials(int errfd, const char *root, int have_dev, int have_proc, int add_tmp,
                         const char *exe_path) {
    static const char *devs[] = {"null", "zero", "urandom", "random"};
    char s2[4096], d2[4096];
    if (!have_dev) {
        snprintf(d2, sizeof d2, "%s/dev", root);
        if (mkdir(d2, 0755) < 0) child_fail(errfd, "mkdir view entry");
        for (size_t k = 0; k < sizeof devs / sizeof devs[0]; k++) {
            snprintf(s2, sizeof s2, "/dev/%s", devs[k]);
            snprintf(d2, sizeof d2, "%s/dev/%s", root, devs[k]);
            if (mknod(d2, S_IFREG | 0644, 0) < 0) child_fail(errfd, "create view entry");
            if (mount(s2, d2, NULL, MS_BIND, NULL) < 0) child_fail(errfd, "bind mount /dev");
            if (mount(NULL, d2, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC, NULL) < 0)
                child_fail(errfd, "remount bind read-only");
        }
    }
    if (!have_proc) {
        snprintf(d2, sizeof d2, "%s/proc", root);
        snprintf(s2, sizeof s2, "%s/proc/self", root);
        if (mkdir(d2, 0555) < 0 || mkdir(s2, 0555) < 0) child_fail(errfd, "mkdir view entry");
        snprintf(d2, sizeof d2, "%s/proc/self/exe", root);
        if (symlink(exe_path ? exe_path : "/bin/prog", d2) < 0) child_fail(errfd, "symlink view entry");
    }
    if (add_tmp) {  /* the model's /tmp of a root filesystem without one: empty, 1777, writes bounded */
        snprintf(d2, sizeof d2, "%s/tmp", root);
        if (mkdir(d2, 0700) < 0) child_fail(errfd, "mkdir view entry");
        if (mount("tlslab-tmp", d2, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=" OVERLAY_SIZE) < 0)
            child_fail(errfd, "mount tmpfs /tmp");
    }
}

/* --view: in a private mount namespace of the child (gone with the guest):
 * a tmpfs on view_dir holding read-only bind mounts of chroot_dir's entries
 * (see populate) and the data tree bound read-only at mount_at; the child
 * then chroots into view_dir. The tmpfs itself stays writable by root only
 * (mode 0755, like the root's own /), so a uid-1000 guest creating a file in
 * / gets EACCES as in the model and as in a plain chroot; it is discarded
 * with the namespace anyway. Neither the root filesystem nor the host's
 * mount table is touched. */
static void build_view(int errfd, const struct options *opt) {
    if (unshare(CLONE_NEWNS) < 0) child_fail(errfd, "unshare(CLONE_NEWNS)");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) child_fail(errfd, "mount private /");
    if (mount("tlslab-view", opt->view_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
        child_fail(errfd, "mount tmpfs view");
    populate(errfd, opt->chroot_dir, opt->view_dir, opt->mount_src ? opt->mount_at : NULL, opt->mount_src,
             opt->scratch_dir);
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/dev", opt->chroot_dir);
    int have_dev = lstat(path, &st) == 0;
    snprintf(path, sizeof path, "%s/proc", opt->chroot_dir);
    int have_proc = lstat(path, &st) == 0;
    snprintf(path, sizeof path, "%s/tmp", opt->chroot_dir);
    int have_tmp = lstat(path, &st) == 0;
    add_specials(errfd, opt->view_dir, have_dev, have_proc, !have_tmp, opt->exe_path);
}

/* --overlay DIR --view EMPTYDIR (runs without a root filesystem): the guest
 * sees DIR as the model shows its data tree, and what it writes lands in a
 * private copy, as in the model's in-memory overlay -- never on the host. In
 * a private mount namespace (gone with the guest), on a size-bounded tmpfs on
 * EMPTYDIR: DIR bound read-only at lower/; an overlayfs of it at tree/
 * (upper/ and work/ on the tmpfs; upper/ gets DIR's mode, owner and times,
 * which the overlay's top directory shows); and root/, the guest's "/": each
 * top-level entry of the tree bound there (symlinks copied), so "/x" is the
 * tree's x as in the model, plus what the model mounts on its root: /dev
 * (null, zero, urandom, random bound read-only) and /proc/self/exe, a
 * symlink to --exe-path, the model's text (static glibc reads it at start-up
 * and mallocs its directory: without it malloc's fault counts change; no
 * procfs: its /proc/PID/root of another uid-1000 process would lead out).
 * The model hides dev and proc from the root's listing; a directory cannot,
 * so the working directory is the overlay itself, detached after root/ is
 * built (no path leads to it; ".." from it stays there, as from the model's
 * root): "." lists exactly the tree. Relative
 * option paths (cwd is the tmpfs) keep commas and colons in DIR out of the
 * mount options. Returns a descriptor of the tree for fchdir after chroot. */
static int build_overlay(int errfd, const struct options *opt) {
    char s2[4096], d2[4096];
    struct stat st;
    if (stat(opt->overlay_dir, &st) < 0) child_fail(errfd, "stat data tree");
    if (!S_ISDIR(st.st_mode)) { errno = ENOTDIR; child_fail(errfd, "stat data tree"); }
    if (unshare(CLONE_NEWNS) < 0) child_fail(errfd, "unshare(CLONE_NEWNS)");
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) child_fail(errfd, "mount private /");
    if (mount("tlslab-view", opt->view_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=" OVERLAY_SIZE) < 0)
        child_fail(errfd, "mount tmpfs view");
    if (chdir(opt->view_dir) < 0) child_fail(errfd, "chdir view");
    if (mkdir("tree", 0700) < 0 || mkdir("root", 0755) < 0) child_fail(errfd, "mkdir view entry");
    overlay_here(errfd, opt->overlay_dir, &st, "tree");
    int have_dev = 0, have_proc = 0;
    DIR *d = opendir("tree");
    if (!d) child_fail(errfd, "opendir data tree");
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        snprintf(s2, sizeof s2, "tree/%s", de->d_name);
        snprintf(d2, sizeof d2, "root/%s", de->d_name);
        struct stat est;
        if (lstat(s2, &est) < 0) child_fail(errfd, "lstat tree entry");
        have_dev |= !strcmp(de->d_name, "dev");
        have_proc |= !strcmp(de->d_name, "proc");
        if (S_ISLNK(est.st_mode)) {
            copy_symlink(errfd, s2, d2, "readlink tree entry");
            continue;
        }
        if (S_ISDIR(est.st_mode) ? mkdir(d2, 0755) < 0 : mknod(d2, S_IFREG | 0644, 0) < 0)
            child_fail(errfd, "create view entry");
        if (mount(s2, d2, NULL, MS_BIND, NULL) < 0) child_fail(errfd, "bind mount");
    }
    closedir(d);
    add_specials(errfd, "root", have_dev, have_proc, 0, opt->exe_path);
    int fd = open("tree", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) child_fail(errfd, "open data tree");
    if (umount2("tree", MNT_DETACH) < 0) child_fail(errfd, "detach data tree");
    return fd;
}

/* The guest's seccomp filter (every strategy). Traced strategies: i386
 * set_thread_area/modify_ldt, execve/execveat (the image's mappings before it
 * goes) and the syscalls that change the guest's signal dispositions or mask
 * (see signals.c) stop for the tracer -- sigaction/sigprocmask
 * only when they change something (second argument non-NULL; signal(2)
 * always); rseq: ENOSYS under --model-env (the model refuses it). Every
 * strategy, the jail: the calls that reach into another process's memory or
 * take its descriptors (ptrace, process_vm_readv/writev, process_madvise,
 * pidfd_open/getfd/send_signal) fail with ENOSYS, as in the model, which has
 * none of them -- a uid-1000 guest could otherwise drive an unjailed host
 * process of the same uid -- also by their x86-64 numbers (a far jump to the
 * 64-bit code segment makes 64-bit calls). Everything else runs. Returns the
 * number of instructions. */
static int build_filter(struct sock_filter *f, int traced, int model_env) {
    enum { TO_TRACE, TO_ERRNO, TO_ARG1 };
    struct { uint32_t nr; int to; } rules[24];
    int nrules = 0;
#define RULE(n, t) (rules[nrules].nr = (n), rules[nrules++].to = (t))
    if (traced) {
        RULE(NR32_SET_THREAD_AREA, TO_TRACE);
        RULE(NR32_MODIFY_LDT, TO_TRACE);
        if (model_env) RULE(NR32_RSEQ, TO_ERRNO);
        RULE(NR32_SIGNAL, TO_TRACE);
        RULE(NR32_SIGRETURN, TO_TRACE);
        RULE(NR32_RT_SIGRETURN, TO_TRACE);
        RULE(NR32_SIGACTION, TO_ARG1);
        RULE(NR32_RT_SIGACTION, TO_ARG1);
        RULE(NR32_SIGPROCMASK, TO_ARG1);
        RULE(NR32_EXECVE, TO_TRACE);
        RULE(NR32_EXECVEAT, TO_TRACE);
        RULE(NR32_RT_SIGPROCMASK, TO_ARG1);
    }
    RULE(NR32_PTRACE, TO_ERRNO);
    RULE(NR32_PROCESS_VM_READV, TO_ERRNO);
    RULE(NR32_PROCESS_VM_WRITEV, TO_ERRNO);
    RULE(NR32_PIDFD_SEND_SIGNAL, TO_ERRNO);
    RULE(NR32_PIDFD_OPEN, TO_ERRNO);
    RULE(NR32_PIDFD_GETFD, TO_ERRNO);
    RULE(NR32_PROCESS_MADVISE, TO_ERRNO);
#undef RULE
    /* the same calls' x86-64 numbers (and every x32 call): the child's own
     * execve, before the guest runs, is a 64-bit call and must pass */
    static const uint32_t x64[] = {101 /* ptrace */, 310, 311 /* process_vm_readv/writev */, 424, 434, 438, 440};
    int n64 = (int)(sizeof x64 / sizeof x64[0]);
    /* layout: arch check; i386: nr load, the rules, a jump to ALLOW; x86-64: nr load, the x32 test, its
     * rules, a jump to ALLOW; the ARG1 test (2), ALLOW, ERRNO, TRACE */
    int l_x64 = 3 + nrules + 1, l_arg1 = l_x64 + 2 + n64 + 1, l_allow = l_arg1 + 2, l_errno = l_allow + 1,
        l_trace = l_errno + 1, n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_I386, 0, l_x64 - n - 1);
    n++;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    for (int i = 0; i < nrules; i++, n++) {
        int to = rules[i].to == TO_TRACE ? l_trace : rules[i].to == TO_ERRNO ? l_errno : l_arg1;
        f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, rules[i].nr, to - n - 1, 0);
    }
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JA | BPF_K, l_allow - n - 1, 0, 0);
    n++;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, l_errno - n - 1, 0);
    n++;
    for (int i = 0; i < n64; i++, n++)
        f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, x64[i], l_errno - n - 1, 0);
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JA | BPF_K, l_allow - n - 1, 0, 0);
    n++;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1]));
    f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, l_allow - n - 1, l_trace - n - 1);
    n++;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE);
    return n;
}

void run_child(struct supervisor *sv, int errfd, char **argv, const char *exe) {
    struct options *opt = &sv->opt;
    int xfd = -1;
    if (opt->stdin_path && open_to(opt->stdin_path, 0, O_RDONLY) < 0) child_fail(errfd, "stdin");
    if (opt->stdout_path && open_to(opt->stdout_path, 1, O_WRONLY | O_CREAT | O_TRUNC) < 0) child_fail(errfd, "stdout");
    if (opt->stderr_path && open_to(opt->stderr_path, 2, O_WRONLY | O_CREAT | O_TRUNC) < 0) child_fail(errfd, "stderr");
    /* a program outside the root: opened here, executed by descriptor after
     * chroot (the kernel then looks up its PT_INTERP inside the root) */
    if (opt->exec_fd && (xfd = open(exe, O_RDONLY | O_CLOEXEC)) < 0) child_fail(errfd, "open program");
    /* no host daemon reachable (abstract unix sockets, the network: the
     * model has none) and no host SysV IPC objects */
    if ((opt->overlay_dir || opt->chroot_dir) && unshare(CLONE_NEWNET | CLONE_NEWIPC) < 0)
        child_fail(errfd, "unshare(CLONE_NEWNET|CLONE_NEWIPC)");
    if (opt->overlay_dir) {
        int tree = build_overlay(errfd, opt);
        if (chroot("root") < 0) child_fail(errfd, "chroot");
        if (fchdir(tree) < 0) child_fail(errfd, "chdir data tree");
        close(tree);
    } else if (opt->chroot_dir) {
        if (opt->view_dir) build_view(errfd, opt);
        if (chroot(opt->view_dir ? opt->view_dir : opt->chroot_dir) < 0) child_fail(errfd, "chroot");
        if (chdir("/") < 0) child_fail(errfd, "chdir /");
    }
    if (opt->cwd_path && chdir(opt->cwd_path) < 0) child_fail(errfd, "chdir");
    /* the model's guest runs as uid/gid 1000: drop root after chroot (no
     * supplementary groups), so the guest can write neither root nor host */
    if (opt->guest_gid >= 0 || opt->guest_uid >= 0) {
        /* a net under the process limit where the supervisor cannot count
         * (untraced): the unprivileged guest's uid may not have more than
         * max_procs processes at once (fork fails with EAGAIN) */
        struct rlimit rl = {(rlim_t)opt->max_procs, (rlim_t)opt->max_procs};
        if (opt->guest_uid > 0 && setrlimit(RLIMIT_NPROC, &rl) < 0) child_fail(errfd, "setrlimit(RLIMIT_NPROC)");
        if (setgroups(0, NULL) < 0) child_fail(errfd, "setgroups");
        if (opt->guest_gid >= 0 && setgid((gid_t)opt->guest_gid) < 0) child_fail(errfd, "setgid");
        if (opt->guest_uid >= 0 && setuid((uid_t)opt->guest_uid) < 0) child_fail(errfd, "setuid");
    }
    /* --model-env: the model's address space is fixed and has nothing mapped
     * for gigabytes above its stack; the host's is randomised, its i386 stack
     * ending a random 0..8 MiB below 4 GiB. Programs that look for the end of
     * their stack (gnulib's c-stack: mincore probes up to the top of the
     * address space) then make a random number of failing calls. A 3 GiB user
     * space (the i386 3G/1G split of a 2004 Linux) without randomisation puts
     * the stack's end at 0xC0000000, GiBs below the top, as in the model.
     * Inherited by every process the guest starts (exec keeps it) */
    if (opt->model_env && personality(PER_LINUX | ADDR_LIMIT_3GB | ADDR_NO_RANDOMIZE) < 0)
        child_fail(errfd, "personality");
    int traced = opt->strategy->traced;
    if (traced) {
        if (ptrace(PTRACE_TRACEME, 0, 0, 0) < 0) child_fail(errfd, "PTRACE_TRACEME");
        raise(SIGSTOP); /* the parent sets options before we go on */
    }
    struct sock_filter filt[64];
    struct sock_fprog prog = {(unsigned short)build_filter(filt, traced, opt->model_env), filt};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) child_fail(errfd, "PR_SET_NO_NEW_PRIVS");
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) child_fail(errfd, "seccomp");
    opt->envv[opt->envc] = NULL;
    if (sv->exec_clock) *sv->exec_clock = now_s();
    if (xfd >= 0) syscall(SYS_execveat, xfd, "", argv, opt->envv, AT_EMPTY_PATH);
    else execve(exe, argv, opt->envv);
    child_fail(errfd, "execve");
}
