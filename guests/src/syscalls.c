/* syscalls: errno-heavy failing system calls.
 *
 * Every call below is meant to fail, so glibc's syscall wrappers write errno
 * (a negative %gs offset, %gs:-0x20-ish in glibc 2.36) and we read it back
 * straight away. Each iteration also goes through `call *%gs:0x10` (the
 * sysinfo entry) for every syscall, so -ve and +ve %gs accesses interleave
 * tightly: the worst case for a segment-flipping hypervisor. A __thread
 * call counter gives our own code a direct -ve access too (the nosegneg
 * build turns it into %gs:0 + offset).
 *
 * Usage: syscalls [N]   (N iterations, default 2000)
 * Prints per-errno counts and a checksum; output depends only on N.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAXERR 256

static unsigned long counts[MAXERR];
static unsigned long ok_calls;
static __thread unsigned long tls_calls;   /* own TLS: -ve %gs access per call */
static unsigned int checksum = 2166136261u;   /* FNV-1a over errno values */

static void note(long ret)
{
    int e = ret < 0 ? errno : 0;
    tls_calls++;
    if (ret >= 0)
        ok_calls++;
    if (e >= 0 && e < MAXERR)
        counts[e]++;
    checksum = (checksum ^ (unsigned int)e) * 16777619u;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 2000;
    long i;
    char path[64], buf[16];
    struct stat st;
    int e;

    if (n < 0)
        n = 0;
    for (i = 0; i < n; i++) {
        snprintf(path, sizeof path, "/nonexistent-tlslab/%ld", i % 97);
        errno = 0;
        note(open(path, O_RDONLY));                   /* ENOENT */
        note(stat(path, &st));                        /* ENOENT */
        note(lstat("", &st));                         /* ENOENT */
        note(read(-1, buf, sizeof buf));              /* EBADF */
        note(write(-1, buf, 1));                      /* EBADF */
        note(close(-1));                              /* EBADF */
        note(lseek(-1, 0, SEEK_SET));                 /* EBADF */
        note(access(path, F_OK));                     /* ENOENT */
        note(chdir(path));                            /* ENOENT */
        note(dup(-1));                                /* EBADF */
        note(open("/", O_WRONLY));                    /* EISDIR */
        note(rmdir("/nonexistent-tlslab"));           /* ENOENT */
    }
    printf("syscalls: %ld iterations, %ld calls, %lu succeeded\n", n, n * 12, ok_calls);
    for (e = 0; e < MAXERR; e++)
        if (counts[e])
            printf("  errno %3d %-8s %8lu  %s\n", e,
                   e == ENOENT ? "ENOENT" : e == EBADF ? "EBADF" :
                   e == EISDIR ? "EISDIR" : e == 0 ? "-" : "other",
                   counts[e], e ? strerror(e) : "(success)");
    printf("calls noted (thread-local): %lu\n", tls_calls);
    printf("checksum: %08x\n", checksum);
    return 0;
}
