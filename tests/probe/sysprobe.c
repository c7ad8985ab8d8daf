/* sysprobe: dump the raw bytes the kernel writes for the structures tlslab's
 * Linux personality fills, so that a test can compare them field by field
 * between a native run and a run under tlslab (tests/test_syscall_fields.py).
 *
 * Built by the test with `gcc -m32 -static`; raw system calls only (no glibc
 * translation of struct stat & co.). One line per call on stdout:
 *
 *     call <TAB> argument <TAB> return value <TAB> errno <TAB> hex bytes
 *
 * argv[1..] are paths (relative to the working directory): every path is
 * stat'ed in every way first, then every directory among them is listed with
 * getdents64 (two buffer sizes), so that no listing touches an access time
 * before a stat reads it. Then limits, uname, statfs64 of ".".
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef O_PATH
#define O_PATH 010000000
#endif
#define AT_FDCWD_ -100
#define AT_SYMLINK_NOFOLLOW_ 0x100
#define STATX_BASIC_STATS_ 0x7ffU
#define STATX_BTIME_ 0x800U

static unsigned char buf[65536];

static void dump(const char *call, const char *arg, long ret, int err, const unsigned char *p, size_t n) {
    size_t i;
    printf("%s\t%s\t%ld\t%d\t", call, arg, ret, ret < 0 ? err : 0);
    for (i = 0; i < n; i++) printf("%02x", p[i]);
    putchar('\n');
}

/* fill with a pattern first: bytes the kernel leaves alone show up as 0xa5 */
static void fill(size_t n) { memset(buf, 0xa5, n); }

static void call_path(const char *name, long nr, const char *path, size_t size) {
    long r;
    fill(size);
    errno = 0;
    r = syscall(nr, path, buf);
    dump(name, path, r, errno, buf, r == 0 ? size : 0);
}

static void stat_all(const char *path) {
    long r;
    int fd;
    call_path("stat64", SYS_stat64, path, 96);
    call_path("lstat64", SYS_lstat64, path, 96);

    fill(96);
    errno = 0;
    r = syscall(SYS_fstatat64, AT_FDCWD_, path, buf, AT_SYMLINK_NOFOLLOW_);
    dump("fstatat64-nofollow", path, r, errno, buf, r == 0 ? 96 : 0);

    fill(256);
    errno = 0;
    r = syscall(SYS_statx, AT_FDCWD_, path, AT_SYMLINK_NOFOLLOW_, STATX_BASIC_STATS_ | STATX_BTIME_, buf);
    dump("statx-nofollow", path, r, errno, buf, r == 0 ? 256 : 0);

    fill(256);
    errno = 0;
    r = syscall(SYS_statx, AT_FDCWD_, path, 0, STATX_BASIC_STATS_, buf);
    dump("statx", path, r, errno, buf, r == 0 ? 256 : 0);

    errno = 0;
    fd = (int)syscall(SYS_open, path, O_PATH | O_NOFOLLOW);
    if (fd >= 0) {
        fill(96);
        errno = 0;
        r = syscall(SYS_fstat64, fd, buf);
        dump("fstat64-opath", path, r, errno, buf, r == 0 ? 96 : 0);
        close(fd);
    } else {
        dump("open-opath", path, fd, errno, buf, 0);
    }

    fill(256);
    errno = 0;
    r = syscall(SYS_readlink, path, buf, 255);
    dump("readlink", path, r, errno, buf, r > 0 ? (size_t)r : 0);
}

static void list_dir(const char *path, unsigned count) {
    char tag[64];
    long r;
    int fd, chunk = 0;
    errno = 0;
    fd = (int)syscall(SYS_open, path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) {
        snprintf(tag, sizeof tag, "open-dir-%u", count);
        dump(tag, path, fd, errno, buf, 0);
        return;
    }
    for (;;) {
        fill(count);
        errno = 0;
        r = syscall(SYS_getdents64, fd, buf, count);
        snprintf(tag, sizeof tag, "getdents64-%u-%d", count, chunk++);
        dump(tag, path, r, errno, buf, r > 0 ? (size_t)r : 0);
        if (r <= 0) break;
    }
    /* fstat64 of a read-only directory descriptor */
    fill(96);
    errno = 0;
    r = syscall(SYS_fstat64, fd, buf);
    snprintf(tag, sizeof tag, "fstat64-dir-%u", count);
    dump(tag, path, r, errno, buf, r == 0 ? 96 : 0);
    close(fd);
}

int main(int argc, char **argv) {
    int i;
    long r;
    char arg[16];
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    for (i = 1; i < argc; i++) stat_all(argv[i]);
    for (i = 1; i < argc; i++) {
        fill(96);
        if (syscall(SYS_lstat64, argv[i], buf) == 0 && (*(unsigned *)(buf + 16) & 0170000) == 0040000) {
            list_dir(argv[i], 32768);
            list_dir(argv[i], 64);
        }
    }
    for (i = 0; i < 16; i++) {
        snprintf(arg, sizeof arg, "%d", i);
        fill(8);
        errno = 0;
        r = syscall(SYS_ugetrlimit, i, buf);
        dump("ugetrlimit", arg, r, errno, buf, r == 0 ? 8 : 0);
        fill(8);
        errno = 0;
        r = syscall(SYS_getrlimit, i, buf);
        dump("getrlimit", arg, r, errno, buf, r == 0 ? 8 : 0);
        fill(16);
        errno = 0;
        r = syscall(SYS_prlimit64, 0, i, NULL, buf);
        dump("prlimit64", arg, r, errno, buf, r == 0 ? 16 : 0);
    }
    fill(16);
    errno = 0;
    r = syscall(SYS_prlimit64, 0, 99, NULL, buf);
    dump("prlimit64", "99", r, errno, buf, r == 0 ? 16 : 0);

    fill(390);
    errno = 0;
    r = syscall(SYS_uname, buf);
    dump("uname", "", r, errno, buf, r == 0 ? 390 : 0);

    fill(84);
    errno = 0;
    r = syscall(SYS_statfs64, ".", 84, buf);
    dump("statfs64", ".", r, errno, buf, r == 0 ? 84 : 0);
    fill(84);
    errno = 0;
    r = syscall(SYS_statfs64, ".", 80, buf);
    dump("statfs64-size80", ".", r, errno, buf, r == 0 ? 84 : 0);
    return 0;
}
