/*
 * tracee.c: the plumbing every other file uses to look at or change a
 * stopped tracee -- its TLS descriptors, its memory, its instruction bytes --
 * and the clock. No state of the run: these take a tid and touch only it.
 */
#include "supervisor.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int get_area(pid_t tid, int entry, struct udesc *out) {
    uint32_t raw[4];
    if (ptrace(PTRACE_GET_THREAD_AREA, tid, (void *)(long)entry, raw) < 0) return -1;
    out->entry = raw[0]; out->base = raw[1]; out->limit = raw[2]; out->flags = raw[3];
    return 0;
}

int set_area(pid_t tid, const struct udesc *d) {
    uint32_t raw[4] = {d->entry, d->base, d->limit, d->flags};
    return ptrace(PTRACE_SET_THREAD_AREA, tid, (void *)(long)d->entry, raw) < 0 ? -1 : 0;
}

int read_mem(pid_t tid, uint32_t addr, void *buf, size_t n) {
    struct iovec l = {buf, n}, r = {(void *)(uintptr_t)addr, n};
    return process_vm_readv(tid, &l, 1, &r, 1, 0) == (ssize_t)n ? 0 : -1;
}

int write_mem(pid_t tid, uint32_t addr, const void *buf, size_t n) {
    struct iovec l = {(void *)buf, n}, r = {(void *)(uintptr_t)addr, n};
    return process_vm_writev(tid, &l, 1, &r, 1, 0) == (ssize_t)n ? 0 : -1;
}

/* instruction bytes: one process_vm_readv with the 15 bytes split at a page
 * boundary, so an unmapped next page still yields the bytes before it;
 * PEEKTEXT (which also reads execute-only pages) if that fails */
int fetch_insn(pid_t tid, uint32_t eip, uint8_t *buf) {
    uint32_t first = 0x1000 - (eip & 0xFFF);
    if (first > 15) first = 15;
    struct iovec l = {buf, 15}, r[2] = {{(void *)(uintptr_t)eip, first},
                                        {(void *)(uintptr_t)(eip + first), 15 - first}};
    ssize_t got = process_vm_readv(tid, &l, 1, r, first < 15 ? 2 : 1, 0);
    if (got > 0) return (int)got;
    int n = 0;
    uint64_t a = eip & ~7ull;
    while (n < 15) {
        errno = 0;
        long w = ptrace(PTRACE_PEEKTEXT, tid, (void *)a, 0);
        if (errno) break;
        for (int i = 0; i < 8; i++) {
            uint64_t at = a + i;
            if (at >= eip && n < 16) buf[n++] = (uint8_t)((uint64_t)w >> (8 * i));
        }
        a += 8;
    }
    return n > 15 ? 15 : n;
}

/* The value of a field of /proc/TID/status ("Tgid", "SigBlk"), read into buf
 * (size n: the file's first n - 1 bytes are searched); NULL if not found. */
const char *proc_status_field(pid_t tid, const char *field, char *buf, size_t n) {
    char path[64], key[32];
    snprintf(path, sizeof path, "/proc/%d/status", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    ssize_t got = read(fd, buf, n - 1);
    close(fd);
    if (got <= 0) return NULL;
    buf[got] = 0;
    snprintf(key, sizeof key, "\n%s:", field);
    const char *p = strstr(buf, key);
    return p ? p + strlen(key) : NULL;
}

/* Does any byte of [addr, addr + n) lie in a shared mapping of tid (or in none: unreadable maps count
 * as shared)? Memory another process can write while this one is stopped. */
int in_shared_mapping(pid_t tid, uint32_t addr, uint32_t n) {
    char path[64], line[4352];
    snprintf(path, sizeof path, "/proc/%d/maps", tid);
    FILE *f = fopen(path, "r");
    if (!f) return 1;
    uint64_t at = addr, end = (uint64_t)addr + n;
    int shared = 0;
    while (at < end && fgets(line, sizeof line, f)) {
        unsigned long long lo, hi;
        char perms[8];
        if (sscanf(line, "%llx-%llx %7s", &lo, &hi, perms) < 3 || hi <= at) continue;
        if (lo > at) break; /* a hole: nothing mapped there */
        if (perms[3] == 's') shared = 1;
        at = hi;
    }
    fclose(f);
    return shared || at < end;
}

/* a stop report that is a group-stop, not a signal-delivery stop */
int is_group_stop(pid_t tid) {
    siginfo_t si;
    return ptrace(PTRACE_GETSIGINFO, tid, 0, &si) < 0 && errno == EINVAL;
}
