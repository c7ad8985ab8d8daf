"""The Linux personality against the host on what programs of their own commonly use.

One static i386 program (``PERSONALITY_C``) prints what the kernel and the CPU
give it: the x87/SSE start state, signals raised by its own faults and caught
(SIGSEGV, SIGFPE, SIGILL, on an alternate stack), signal queueing and
si_code, alarms and interval timers that interrupt pause, sigsuspend and a
pipe read, sigtimedwait, timed waits that time out while another thread is
blocked, select, clock_nanosleep with an absolute time, process groups, and
the truncate/link/utimensat/flock/fallocate/renameat2 family. Its output
must be the host's (the program run untraced, in the hw backend's jail,
as uid 1000 in the same data tree) under every strategy below. Each line is
deterministic on the host: times are printed only as comparisons.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import GCC32, host_output, require_gcc32, unavailable
from tlslab.experiment import RunSpec, make_domain

PERSONALITY_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static sigjmp_buf jb;
static volatile int got, code, on_alt;
static volatile void *addr;
static char altstack[65536];

static void catch_fault(int s, siginfo_t *si, void *uc) { got = s; code = si->si_code; addr = si->si_addr; siglongjmp(jb, 1); }
static void count(int s, siginfo_t *si, void *uc) { got = s; code = si->si_code; if (si->si_code == SI_QUEUE) addr = si->si_value.sival_ptr; }
static void on_stack(int s) { char here; on_alt = &here >= altstack && &here < altstack + sizeof altstack; }
static void alarmed(int s) { got = s; }

static long ms_since(struct timespec *t0) {
    struct timespec t1; clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000;
}

static void handler(int sig, void (*fn)(int, siginfo_t *, void *), int flags) {
    struct sigaction sa; memset(&sa, 0, sizeof sa); sa.sa_sigaction = fn; sa.sa_flags = SA_SIGINFO | flags;
    sigaction(sig, &sa, NULL);
}

static int pipe_fd[2];
static void *reader(void *arg) { char c; return (void *)(long)read(pipe_fd[0], &c, 1); }

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    /* the FPU as Linux starts a program */
    unsigned short cw; unsigned mxcsr; __asm__ volatile("fnstcw %0" : "=m"(cw)); __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    volatile double x = 2.7, one = 1, three = 3; volatile int i = (int)x;
    printf("fpu cw=%#x mxcsr=%#x cast=%d third=%.17g\n", cw, mxcsr, i, one / three);

    /* faults of its own, caught */
    handler(SIGSEGV, catch_fault, 0); handler(SIGFPE, catch_fault, 0); handler(SIGILL, catch_fault, 0);
    if (!sigsetjmp(jb, 1)) *(volatile int *)0x10 = 1;
    printf("segv sig=%d code=%d addr=%p\n", got, code, (void *)addr);
    if (!sigsetjmp(jb, 1)) { volatile int z = 0; volatile int q = 7 / z; (void)q; }
    printf("fpe sig=%d code=%d\n", got, code);
    if (!sigsetjmp(jb, 1)) __asm__ volatile("ud2");
    printf("ill sig=%d code=%d\n", got, code);

    /* an alternate stack */
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0}; sigaltstack(&ss, NULL);
    struct sigaction sa; memset(&sa, 0, sizeof sa); sa.sa_handler = on_stack; sa.sa_flags = SA_ONSTACK; sigaction(SIGUSR2, &sa, NULL);
    raise(SIGUSR2);
    stack_t now; sigaltstack(NULL, &now);
    printf("altstack used=%d flags=%d size_ok=%d\n", on_alt, now.ss_flags, now.ss_size == sizeof altstack);

    /* who sent it */
    handler(SIGUSR1, count, 0);
    raise(SIGUSR1); printf("raise code_is_tkill=%d\n", code == SI_TKILL);
    kill(getpid(), SIGUSR1); printf("kill code_is_user=%d\n", code == SI_USER);
    union sigval v = {.sival_ptr = (void *)0x1234}; int r = sigqueue(getpid(), SIGUSR1, v);
    printf("sigqueue r=%d code_is_queue=%d value=%p\n", r, code == SI_QUEUE, (void *)addr);

    /* alarms: pause, a pipe read without SA_RESTART, sigsuspend */
    memset(&sa, 0, sizeof sa); sa.sa_handler = alarmed; sigaction(SIGALRM, &sa, NULL);
    printf("alarm(0)=%u\n", alarm(0)); alarm(5); printf("alarm left=%u\n", alarm(0));
    got = 0; alarm(1); r = pause(); printf("pause r=%d eintr=%d sig=%d\n", r, errno == EINTR, got);
    pipe(pipe_fd);
    struct itimerval it = {{0, 0}, {0, 20000}}; setitimer(ITIMER_REAL, &it, NULL);
    char c; r = read(pipe_fd[0], &c, 1); printf("read r=%d eintr=%d\n", r, errno == EINTR);
    sigset_t usr1, old, none; sigemptyset(&usr1); sigaddset(&usr1, SIGUSR1); sigemptyset(&none);
    sigprocmask(SIG_BLOCK, &usr1, &old); got = 0; raise(SIGUSR1);
    printf("blocked: delivered=%d\n", got);
    r = sigsuspend(&none); sigset_t after; sigprocmask(SIG_BLOCK, NULL, &after);
    printf("sigsuspend r=%d eintr=%d sig=%d mask_back=%d\n", r, errno == EINTR, got, sigismember(&after, SIGUSR1));

    /* sigtimedwait: a pending one, then a timeout */
    raise(SIGUSR1); siginfo_t info; r = sigwaitinfo(&usr1, &info);
    printf("sigwaitinfo r=%d code_is_tkill=%d\n", r, info.si_code == SI_TKILL);
    struct timespec t0, ten = {0, 10000000}; clock_gettime(CLOCK_MONOTONIC, &t0);
    r = sigtimedwait(&usr1, &info, &ten); printf("sigtimedwait r=%d eagain=%d waited=%d\n", r, errno == EAGAIN, ms_since(&t0) >= 10);
    sigprocmask(SIG_SETMASK, &old, NULL);

    /* timed waits: alone, and while another thread waits on a pipe */
    sem_t sem; sem_init(&sem, 0, 0); struct timespec dl; clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_nsec += 50000000; if (dl.tv_nsec >= 1000000000) { dl.tv_sec++; dl.tv_nsec -= 1000000000; }
    clock_gettime(CLOCK_MONOTONIC, &t0); r = sem_timedwait(&sem, &dl);
    printf("sem_timedwait r=%d etimedout=%d waited=%d\n", r, errno == ETIMEDOUT, ms_since(&t0) >= 45);
    pthread_t t; pthread_create(&t, NULL, reader, NULL);
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER; pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    clock_gettime(CLOCK_REALTIME, &dl); dl.tv_sec += 1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_mutex_lock(&m); r = pthread_cond_timedwait(&cv, &m, &dl); pthread_mutex_unlock(&m);
    printf("cond_timedwait etimedout=%d waited=%d\n", r == ETIMEDOUT, ms_since(&t0) >= 950);
    write(pipe_fd[1], "x", 1); void *res; pthread_join(t, &res); printf("reader got %ld\n", (long)res);

    /* select */
    fd_set rd; FD_ZERO(&rd); FD_SET(pipe_fd[0], &rd); struct timeval tv = {0, 10000};
    r = select(pipe_fd[0] + 1, &rd, NULL, NULL, &tv); printf("select empty r=%d set=%d\n", r, FD_ISSET(pipe_fd[0], &rd));
    write(pipe_fd[1], "y", 1); FD_ZERO(&rd); FD_SET(pipe_fd[0], &rd); tv.tv_usec = 10000;
    r = select(pipe_fd[0] + 1, &rd, NULL, NULL, &tv); printf("select ready r=%d set=%d\n", r, FD_ISSET(pipe_fd[0], &rd));

    /* clock_nanosleep to an absolute time */
    struct timespec until; clock_gettime(CLOCK_MONOTONIC, &until); t0 = until; until.tv_nsec += 20000000;
    if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
    r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL); long w = ms_since(&t0);
    printf("abstime sleep r=%d waited=%d not_long=%d\n", r, w >= 20, w < 1000);

    /* process groups */
    int was_leader = getpgrp() == getpid(); r = setpgid(0, 0);
    printf("was leader=%d setpgid=%d leader=%d getpgid_ok=%d\n", was_leader, r, getpgrp() == getpid(), getpgid(0) == getpid());
    pid_t child = fork();
    if (child == 0) { int s1 = setsid(); _exit(s1 == getpid() && getsid(0) == getpid() ? 7 : 8); }
    int status; waitpid(child, &status, 0); printf("setsid in child ok=%d\n", WEXITSTATUS(status) == 7);

    /* files */
    int fd = open("pf", O_CREAT | O_RDWR | O_TRUNC, 0644); write(fd, "hello world", 11);
    struct stat st; ftruncate(fd, 5); fstat(fd, &st); printf("ftruncate size=%lld\n", (long long)st.st_size);
    truncate("pf", 3000); stat("pf", &st); printf("truncate size=%lld\n", (long long)st.st_size);
    printf("fallocate r=%d\n", posix_fallocate(fd, 0, 8192)); fstat(fd, &st); printf("fallocated size=%lld\n", (long long)st.st_size);
    printf("flock=%d unlock=%d\n", flock(fd, LOCK_EX), flock(fd, LOCK_UN));
    printf("link=%d\n", link("pf", "pf2")); stat("pf", &st); printf("nlink=%d\n", (int)st.st_nlink);
    unlink("pf2"); stat("pf", &st); printf("nlink after unlink=%d\n", (int)st.st_nlink);
    struct timespec times[2] = {{1000000000, 0}, {1200000000, 500}};
    printf("utimensat=%d\n", utimensat(AT_FDCWD, "pf", times, 0)); stat("pf", &st);
    printf("mtime=%lld.%09ld\n", (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    close(open("pf3", O_CREAT | O_WRONLY, 0644));
    r = syscall(SYS_renameat2, AT_FDCWD, "pf", AT_FDCWD, "pf3", 1 /* RENAME_NOREPLACE */);
    printf("renameat2 noreplace r=%d eexist=%d\n", r, errno == EEXIST);
    /* file times follow the clock the guest reads */
    time_t t_now = time(NULL); fd = open("pt", O_CREAT | O_WRONLY, 0644); struct stat made; fstat(fd, &made);
    sleep(2); write(fd, "z", 1); struct stat later; fstat(fd, &later); struct stat dir; stat(".", &dir);
    printf("created now=%d written later=%d dir changed=%d\n", made.st_mtime >= t_now - 1 && made.st_mtime <= t_now + 1,
           later.st_mtime > made.st_mtime, dir.st_mtime >= t_now - 1);
    close(fd);
    return 0;
}
"""

STRATEGIES = ("native", "emulate", "flip", "online-probe")


@pytest.fixture(scope="module")
def personality_exe(tmp_path_factory):
    require_gcc32()
    exe = tmp_path_factory.mktemp("personality") / "personality"
    src = exe.with_suffix(".c")
    src.write_text(PERSONALITY_C)
    cp = subprocess.run([*GCC32, "-O1", "-pthread", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    return exe


def test_the_personality_matches_the_host(personality_exe):
    spec = RunSpec(str(personality_exe), ())
    want = host_output(spec)
    lines = want.decode().splitlines()
    assert "fpu cw=0x37f mxcsr=0x1f80 cast=2 third=0.33333333333333331" in lines   # the host's, as documented
    assert "segv sig=11 code=1 addr=0x10" in lines and "pause r=-1 eintr=1 sig=14" in lines
    for strategy in STRATEGIES:
        domain, _ = make_domain(RunSpec(**{**spec.to_dict(), "strategy": strategy, "args": ()}))
        result = domain.run()
        assert result.crash is None, (strategy, result.crash.describe())
        assert result.status == 0, (strategy, result.stderr)
        unsupported = result.counters["linux"]["syscalls"]["unsupported"]
        assert not unsupported, (strategy, unsupported)
        assert result.stdout.decode().splitlines() == lines, strategy


def test_a_fault_without_a_handler_still_names_where_and_why(tmp_path):
    """The same faults with no handler installed (or the signal blocked) end the run as before: a crash
    record with the instruction and the reason, not a handler call."""
    require_gcc32()
    src = tmp_path / "nohandler.c"
    src.write_text(r"""
#include <signal.h>
#include <unistd.h>
static void h(int s) { _exit(3); }
int main(int argc, char **argv) {
    if (argc > 1) {   /* a handler, but the signal blocked: Linux kills all the same */
        signal(SIGSEGV, h);
        sigset_t s; sigemptyset(&s); sigaddset(&s, SIGSEGV); sigprocmask(SIG_BLOCK, &s, 0);
    }
    *(volatile int *)0x10 = 1;
    return 0;
}
""")
    exe = tmp_path / "nohandler"
    cp = subprocess.run([*GCC32, "-O1", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    for args in ((), ("blocked",)):
        domain, _ = make_domain(RunSpec(str(exe), args, strategy="emulate"))
        result = domain.run()
        assert result.crash is not None and result.status is None
        assert "SIGSEGV" in result.crash.reason and "0x00000010" in result.crash.reason


PTHREAD_EXIT_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *quits(void *arg) { pthread_exit((void *)42); }
static void *waits(void *arg) { for (;;) pause(); }
int main(void) {
    pthread_t a, b; void *r1, *r2;
    pthread_create(&a, NULL, quits, NULL); pthread_join(a, &r1);
    pthread_create(&b, NULL, waits, NULL); pthread_cancel(b); pthread_join(b, &r2);
    printf("exit value %ld, cancelled %d\n", (long)r1, r2 == PTHREAD_CANCELED);
    return 0;
}
"""


def test_a_dynamic_program_can_end_and_cancel_threads(tmp_path, debian_rootfs):
    """glibc's pthread_exit and pthread_cancel dlopen libgcc_s.so.1 to unwind (the pinned root has it,
    as libc6 depends on it); the same on the host and in the model."""
    require_gcc32()
    src = tmp_path / "pexit.c"
    src.write_text(PTHREAD_EXIT_C)
    exe = tmp_path / "pexit"
    cp = subprocess.run(["gcc", "-m32", "-O1", "-pthread", "-o", str(exe), str(src)], capture_output=True, text=True)
    if cp.returncode != 0:
        unavailable(f"gcc -m32 cannot link a dynamic i386 program here: {cp.stderr.strip()[-200:]}")
    spec = RunSpec(str(exe), ())
    want = host_output(spec)
    assert want == b"exit value 42, cancelled 1\n"
    for strategy in ("native", "flip"):
        domain, _ = make_domain(RunSpec(**{**spec.to_dict(), "strategy": strategy, "args": ()}))
        result = domain.run()
        assert result.crash is None and result.status == 0, (strategy, result.stderr)
        assert result.stdout == want, strategy


def test_the_first_process_can_exec(tmp_path):
    """execve in the run's first process (a shell's `exec`, a program re-running itself through
    /proc/self/exe) replaces its vCPU; the new one keeps the run's wall-clock limit. This used to be an
    internal error (the limit was read from the released vCPU)."""
    for strategy in ("native", "flip"):
        spec = RunSpec("/bin/dash", ("-c", "echo a; exec /bin/echo b"), strategy=strategy, tree=None,
                       rootfs="debian", timeout_seconds=60)
        domain, _ = make_domain(spec)
        result = domain.run()
        assert result.crash is None and result.status == 0 and result.stdout == b"a\nb\n", strategy
    require_gcc32()
    src = tmp_path / "again.c"
    src.write_text(r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc > 1) { printf("again %s\n", argv[1]); return 0; }
    char *av[] = {argv[0], "x", 0};
    execv("/proc/self/exe", av);
    perror("execv");
    return 1;
}
""")
    exe = tmp_path / "again"
    cp = subprocess.run([*GCC32, "-O1", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    domain, _ = make_domain(RunSpec(str(exe), (), strategy="emulate"))
    result = domain.run()
    assert result.crash is None and result.stdout == b"again x\n" and result.status == 0, result.stderr


def test_files_made_in_a_mounted_tree_belong_to_its_filesystem():
    """Under a root filesystem the data tree is a mount of its own (its own st_dev): what the guest
    creates there is on that filesystem, so link(2) and rename(2) within it work (they failed with
    EXDEV: new files carried the default device). Also: hard-link counts, copy_file_range (cat >>),
    nice values."""
    script = ("touch q; ln q q2; stat -c %h q; mv q q3; [ \"$(stat -c %d q3)\" = \"$(stat -c %d .)\" ] && "
              "echo same-fs; rm q2; stat -c %h q3; echo x > f; cat f >> g; cat f >> g; cat g; nice -n 5 nice")
    for strategy in ("native", "emulate"):
        domain, _ = make_domain(RunSpec("/bin/dash", ("-c", script), strategy=strategy, rootfs="debian"))
        result = domain.run()
        assert result.crash is None and result.status == 0, (strategy, result.stderr)
        assert result.stdout == b"2\nsame-fs\n1\nx\nx\n5\n", (strategy, result.stdout, result.stderr)
        assert not result.counters["linux"]["syscalls"]["unsupported"]


SIGNALS_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/select.h>
#include <unistd.h>
static sigset_t usr1;
static volatile int got;
static void h(int s) { got = s; }
static void *waiter(void *a) { int s = 0; int r = sigwait(&usr1, &s); printf("sigwait in a thread r=%d sig=%d\n", r, s); return 0; }
int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    /* a process-directed signal is taken by the thread that sigwaits for it */
    sigemptyset(&usr1); sigaddset(&usr1, SIGUSR1); pthread_sigmask(SIG_BLOCK, &usr1, 0);
    pthread_t t; pthread_create(&t, 0, waiter, 0); usleep(1000); kill(getpid(), SIGUSR1); pthread_join(t, 0);
    /* select is never restarted, SA_RESTART or not */
    signal(SIGALRM, h);   /* glibc's signal(): SA_RESTART */
    int p[2]; pipe(p); fd_set rd; FD_ZERO(&rd); FD_SET(p[0], &rd); alarm(1);
    int r = select(p[0] + 1, &rd, 0, 0, 0); printf("select r=%d eintr=%d got=%d\n", r, errno == EINTR, got);
    /* a pending signal set to be ignored is discarded; sigsuspend's mask is undone either way */
    raise(SIGUSR1); signal(SIGUSR1, SIG_IGN); sigset_t pend; sigpending(&pend);
    printf("discarded=%d\n", !sigismember(&pend, SIGUSR1));
    sigset_t none; sigemptyset(&none); got = 0; alarm(1); r = sigsuspend(&none);
    sigset_t now; sigprocmask(SIG_BLOCK, 0, &now);
    printf("sigsuspend r=%d got=%d usr1 blocked again=%d\n", r, got, sigismember(&now, SIGUSR1));
    return 0;
}
"""


def test_signal_corner_cases_match_the_host(tmp_path):
    require_gcc32()
    src = tmp_path / "signals2.c"
    src.write_text(SIGNALS_C)
    exe = tmp_path / "signals2"
    cp = subprocess.run([*GCC32, "-O1", "-pthread", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    spec = RunSpec(str(exe), ())
    want = host_output(spec)
    assert b"sigwait in a thread r=0 sig=10" in want
    for strategy in ("native", "flip"):
        domain, _ = make_domain(RunSpec(**{**spec.to_dict(), "strategy": strategy, "args": ()}))
        result = domain.run()
        assert result.crash is None and result.status == 0, (strategy, result.crash and result.crash.describe())
        assert result.stdout == want, (strategy, result.stdout)


def test_a_handler_with_no_stack_left_ends_the_process(tmp_path):
    """A SIGSEGV handler cannot run when the stack overflowed (no room for its frame) or points at
    nothing: the process dies of SIGSEGV, as on Linux (the frame write used to escape as a Python
    error); the deep recursion on the way grows the stack quickly (64 KiB per fault)."""
    require_gcc32()
    src = tmp_path / "nostack.c"
    src.write_text(r"""
#include <signal.h>
#include <unistd.h>
static void h(int s) { _exit(5); }
static int rec(int n) { volatile char buf[4096]; buf[0] = n; return rec(n + 1) + buf[0]; }
int main(int argc, char **argv) {
    signal(SIGSEGV, h);
    if (argc > 1) __asm__ volatile("movl $0x2000, %esp; pushl $0");
    return rec(0);
}
""")
    exe = tmp_path / "nostack"
    cp = subprocess.run([*GCC32, "-O1", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    for args in ((), ("bad-esp",)):
        domain, _ = make_domain(RunSpec(str(exe), args, strategy="emulate", timeout_seconds=120))
        result = domain.run()
        assert result.crash is not None and not result.crash.timed_out, result.crash
        assert "SIGSEGV" in result.crash.reason and result.status is None


def test_guest_files_cannot_exhaust_host_memory(tmp_path):
    """The guest's files live in host memory: a write far past the end, a truncate up or a fallocate
    that would make them grow by more than the overlay's 256 MiB in all fails with ENOSPC (a
    sparse file on the host's tmpfs would not; a stated limit), and deleting gives the bytes back."""
    require_gcc32()
    src = tmp_path / "big.c"
    src.write_text(r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    int fd = open("big", O_CREAT | O_RDWR, 0644);
    long long r = pwrite64(fd, "x", 1, 1500LL << 20); printf("pwrite far r=%lld enospc=%d\n", r, errno == ENOSPC);
    errno = 0; r = ftruncate(fd, 300 << 20); printf("ftruncate r=%lld enospc=%d\n", r, errno == ENOSPC);
    r = ftruncate(fd, 200 << 20); printf("ftruncate 200M r=%lld\n", r);
    errno = 0; r = posix_fallocate(fd, 0, 300 << 20); printf("fallocate to 300M r=%lld (ENOSPC=%d)\n", r, ENOSPC);
    close(fd); unlink("big");
    fd = open("big2", O_CREAT | O_RDWR, 0644); r = ftruncate(fd, 200 << 20); printf("after unlink r=%lld\n", r);
    return 0;
}
""")
    exe = tmp_path / "big"
    cp = subprocess.run([*GCC32, "-O1", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    domain, _ = make_domain(RunSpec(str(exe), (), strategy="native"))
    result = domain.run()
    assert result.crash is None and result.status == 0
    assert result.stdout == (b"pwrite far r=-1 enospc=1\nftruncate r=-1 enospc=1\nftruncate 200M r=0\n"
                             b"fallocate to 300M r=28 (ENOSPC=28)\nafter unlink r=0\n"), result.stdout
