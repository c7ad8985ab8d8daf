/* threads: NPTL threads passing a token round a ring (issue 11, item 4).
 *
 * N threads (default 4) sit in a ring. One mutex guards the ring; every
 * thread waits on its own condition variable until the token is handed to it,
 * takes it, does some work with its own __thread data (a turn counter, a
 * running sum and a 64-byte buffer filled with snprintf), makes two failing
 * system calls and checks errno (close(-1) -> EBADF, open of a missing file
 * -> ENOENT), then hands the token to the next thread and signals that
 * thread's condition variable. Each thread takes R turns (default 200).
 * Before it waits, a thread leaves errno at a value of its own (EBADF or
 * ENOENT, alternating with the thread number) and checks it is still there
 * when it wakes: errno is per thread (a negative %gs offset), and the other
 * threads set it to the other value meanwhile.
 *
 * The token goes round in a fixed order, so everything computed is the same
 * whatever the host scheduler does; the main thread replays the ring
 * sequentially after pthread_join and checks the threads' results against it.
 * Output: per-thread totals in thread order, then a checksum. Nothing printed
 * depends on time, pids, tids or addresses.
 *
 * Usage: threads [N [R]]   (1 <= N <= 64, R >= 0)
 *
 * System calls: strace -f of `threads.dyn 4 200` and `threads 4 200` on this
 * host (Linux 6.18, glibc 2.36-9+deb12u14), what the model has to provide:
 *   start-up   dyn: ld.so's access/openat/statx/read/mmap2/mprotect/munmap of
 *              libc.so.6; static: brk, readlink("/proc/self/exe") (result
 *              unused if it fails). Both: set_thread_area({entry_number=-1,
 *              base=TCB, limit=0xfffff, seg_32bit, limit_in_pages, useable})
 *              -> entry 12, set_tid_address, set_robust_list(head, 12), rseq
 *              (ENOSYS is fine), ugetrlimit(RLIMIT_STACK), getrandom(4 bytes,
 *              GRND_NONBLOCK) and brk (malloc), rt_sigaction(SIGRT_1, SA_ONSTACK|
 *              SA_RESTART|SA_SIGINFO) + rt_sigprocmask(SIG_UNBLOCK, [RTMIN RT_1])
 *   create     per thread, in the parent: mmap2(NULL, 135168, PROT_NONE,
 *              MAP_PRIVATE|MAP_ANONYMOUS|MAP_STACK) (4 KiB guard + 128 KiB
 *              stack), mprotect(stack+4096, 131072, PROT_READ|PROT_WRITE),
 *              rt_sigprocmask(SIG_BLOCK, ~[], &old), then
 *              clone3({flags=0x3d0f00 = CLONE_VM|CLONE_FS|CLONE_FILES|
 *              CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM|CLONE_SETTLS|
 *              CLONE_PARENT_SETTID|CLONE_CHILD_CLEARTID, child_tid = parent_tid
 *              = &pd->tid, exit_signal=0, stack, stack_size (0x20400 dyn,
 *              0x20780 static), tls = &user_desc{entry_number=12 (the main
 *              thread's), base_addr = the new TCB at the top of the stack
 *              mapping, limit=0xfffff, seg_32bit, limit_in_pages, useable}},
 *              size 88) -- on ENOSYS glibc retries with clone (120), same
 *              flags -- and rt_sigprocmask(SIG_SETMASK, &old)
 *   child      rseq, set_robust_list(&pd->robust_head, 12),
 *              rt_sigprocmask(SIG_SETMASK, []); never set_thread_area: its
 *              %gs descriptor is the CLONE_SETTLS one
 *   ring       every turn in every thread: close(-1) = -1 EBADF, openat(
 *              AT_FDCWD, "/nonexistent-tlslab/threads-I", O_RDONLY)
 *              = -1 ENOENT, odd threads one more close(-1). Futexes (4 x 200,
 *              one run; the counts vary, the output does not): pthread_cond_wait
 *              futex(cv, FUTEX_WAIT_BITSET_PRIVATE|FUTEX_CLOCK_REALTIME, v,
 *              NULL, FUTEX_BITSET_MATCH_ANY) ~796; mutex contention
 *              futex(m, FUTEX_WAIT_PRIVATE, 2, NULL) ~520; pthread_cond_signal
 *              and mutex unlock futex(x, FUTEX_WAKE_PRIVATE, 1) ~1590; ~445
 *              of the waits return EAGAIN (the word changed). No REQUEUE ops
 *              (glibc >= 2.25 condvars never requeue), no timeouts.
 *   exit       thread: rt_sigprocmask(SIG_BLOCK, ~[RT_1]), madvise(stack,
 *              114688, MADV_DONTNEED), then exit(0) -- syscall 1, which ends
 *              the *thread*, not exit_group -- and the kernel clears pd->tid
 *              and does a shared FUTEX_WAKE on it (CLONE_CHILD_CLEARTID).
 *              main: pthread_join waits with futex(&pd->tid,
 *              FUTEX_WAIT_BITSET|FUTEX_CLOCK_REALTIME (not private), tid,
 *              NULL, FUTEX_BITSET_MATCH_ANY) while the thread runs; statx(1),
 *              ioctl(1, TCGETS), one write(1), exit_group(0).
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAXTHREADS 64
#define STACK_SIZE (128 * 1024)

struct result {
    unsigned long turns;
    unsigned int sum;           /* of the work values this thread computed */
    unsigned long ebadf, enoent;
    unsigned long errno_kept;   /* wake-ups that found errno as the thread left it */
    char last[64];              /* its __thread buffer at the end */
};

static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ring_cond[MAXTHREADS];
static int nthreads, turn;              /* turn: who holds the token */
static unsigned int token = 0x9e3779b9u;
static long rounds;
static struct result results[MAXTHREADS];

static __thread unsigned long tls_turns;        /* own TLS: -ve %gs accesses */
static __thread unsigned int tls_sum;
static __thread unsigned long tls_ebadf, tls_enoent, tls_kept;
static __thread char tls_buf[64];

/* The work of one turn: depends only on the thread number, its turn number
 * and the token it was handed; shared with the sequential replay. */
static unsigned int work(int id, unsigned long n, unsigned int tok, char *buf, size_t len)
{
    unsigned int h = 2166136261u ^ tok;
    int i, k;

    k = snprintf(buf, len, "t%d n%lu tok %08x", id, n, tok);
    for (i = 0; i < 8; i++)
        for (const char *p = buf; p < buf + k; p++)
            h = (h ^ (unsigned char)*p) * 16777619u;
    return h;
}

static unsigned int next_token(unsigned int tok, unsigned int w)
{
    return (tok ^ w) * 2654435761u + 1;
}

static void *ring(void *arg)
{
    int id = (int)(long)arg, want;
    char path[48];

    snprintf(path, sizeof path, "/nonexistent-tlslab/threads-%d", id);
    pthread_mutex_lock(&ring_lock);
    while (tls_turns < (unsigned long)rounds) {
        want = id & 1 ? EBADF : ENOENT;
        while (turn != id)
            pthread_cond_wait(&ring_cond[id], &ring_lock);
        if (tls_turns > 0 && errno == want)
            tls_kept++;

        unsigned int w = work(id, tls_turns, token, tls_buf, sizeof tls_buf);
        tls_sum += w;
        token = next_token(token, w);
        tls_turns++;

        errno = 0;
        if (close(-1) == -1 && errno == EBADF)
            tls_ebadf++;
        errno = 0;
        if (open(path, O_RDONLY) == -1 && errno == ENOENT)
            tls_enoent++;
        if (want == EBADF)              /* leave errno at this thread's own value */
            close(-1);

        turn = (id + 1) % nthreads;
        pthread_cond_signal(&ring_cond[turn]);
    }
    pthread_mutex_unlock(&ring_lock);

    results[id].turns = tls_turns;
    results[id].sum = tls_sum;
    results[id].ebadf = tls_ebadf;
    results[id].enoent = tls_enoent;
    results[id].errno_kept = tls_kept;
    memcpy(results[id].last, tls_buf, sizeof tls_buf);
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t tid[MAXTHREADS];
    pthread_attr_t attr;
    struct result replay[MAXTHREADS];
    unsigned int tok, check = 2166136261u;
    long r;
    int i, err, bad = 0;

    nthreads = argc > 1 ? atoi(argv[1]) : 4;
    rounds = argc > 2 ? strtol(argv[2], NULL, 10) : 200;
    if (nthreads < 1 || nthreads > MAXTHREADS || rounds < 0) {
        fprintf(stderr, "usage: threads [N [R]]  (1 <= N <= %d, R >= 0)\n", MAXTHREADS);
        return 2;
    }
    for (i = 0; i < nthreads; i++)
        pthread_cond_init(&ring_cond[i], NULL);

    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK_SIZE);
    for (i = 0; i < nthreads; i++) {
        err = pthread_create(&tid[i], &attr, ring, (void *)(long)i);
        if (err) {
            printf("pthread_create %d: %s\n", i, strerror(err));
            return 1;
        }
    }
    pthread_attr_destroy(&attr);
    for (i = 0; i < nthreads; i++) {
        err = pthread_join(tid[i], NULL);
        if (err) {
            printf("pthread_join %d: %s\n", i, strerror(err));
            return 1;
        }
    }

    /* the main thread's errno is its own too: the threads' failing calls did not touch it */
    errno = 0;
    if (close(-1) != -1 || errno != EBADF)
        bad++;

    /* replay the ring sequentially */
    memset(replay, 0, sizeof replay);
    tok = 0x9e3779b9u;
    for (r = 0; r < rounds; r++)
        for (i = 0; i < nthreads; i++) {
            unsigned int w = work(i, replay[i].turns, tok, replay[i].last, sizeof replay[i].last);
            replay[i].sum += w;
            tok = next_token(tok, w);
            replay[i].turns++;
        }

    printf("threads %d, rounds %ld\n", nthreads, rounds);
    for (i = 0; i < nthreads; i++) {
        struct result *t = &results[i];
        unsigned long waits = t->turns ? t->turns - 1 : 0;
        printf("thread %d: turns %lu sum %08x EBADF %lu ENOENT %lu errno kept %lu/%lu last \"%s\"\n",
               i, t->turns, t->sum, t->ebadf, t->enoent, t->errno_kept, waits, t->last);
        if (t->turns != replay[i].turns || t->sum != replay[i].sum || strcmp(t->last, replay[i].last) != 0
            || t->ebadf != t->turns || t->enoent != t->turns || t->errno_kept != waits) {
            printf("thread %d: MISMATCH (replay: turns %lu sum %08x last \"%s\")\n",
                   i, replay[i].turns, replay[i].sum, replay[i].last);
            bad++;
        }
        check = (check ^ t->sum) * 16777619u;
        check = (check ^ (unsigned int)t->turns) * 16777619u;
    }
    printf("token %08x checksum %08x %s\n", token, check, bad ? "FAIL" : "ok");
    return bad ? 1 : 0;
}
