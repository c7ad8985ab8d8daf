"""The guest's SIGSEGV disposition survives the TLS faults the hw supervisor absorbs.

A #GP in user mode is a forced SIGSEGV: when the guest has SIGSEGV blocked or
ignored, the kernel unblocks it and resets the handler to SIG_DFL before the
tracer sees the stop. On Xen the TLS #GP never reaches the guest kernel's
signal code, so the supervisor puts the disposition back (it tracks the
guest's sigaction/sigprocmask calls and injects rt_sigaction/rt_sigprocmask
after a TLS fault when, and only when, the kernel changed something).

Every program prints what it can observe of its own disposition; the output
must be the same untraced, traced (native) and under emulate and flip.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import unavailable

from tlslab.hw.backend import HwUnavailable, run_hw

pytestmark = [pytest.mark.oracle]

CFLAGS = ["gcc", "-m32", "-static", "-O2"]

# TLS work: a __thread variable and errno (both negative %gs offsets: they fault when truncated)
WORK = r"""
#include <errno.h>
#include <unistd.h>
static __thread int tv;
static void work(int n) { for (int i = 0; i < n; i++) { tv += i; if (close(-1) < 0 && errno == EBADF) tv++; } }
"""

IGNORED_C = WORK + r"""
#include <signal.h>
#include <stdio.h>
int main(void) {
    signal(SIGSEGV, SIG_IGN);
    work(100);
    struct sigaction sa;
    sigaction(SIGSEGV, NULL, &sa);
    printf("tv=%d ignored=%d\n", tv, sa.sa_handler == SIG_IGN);
    return 0;
}
"""

BLOCKED_C = WORK + r"""
#include <signal.h>
#include <stdio.h>
int main(void) {
    sigset_t s, cur;
    sigemptyset(&s);
    sigaddset(&s, SIGSEGV);
    sigprocmask(SIG_BLOCK, &s, NULL);
    work(100);
    sigprocmask(SIG_BLOCK, NULL, &cur);
    struct sigaction sa;
    sigaction(SIGSEGV, NULL, &sa);
    printf("tv=%d blocked=%d default=%d\n", tv, sigismember(&cur, SIGSEGV), sa.sa_handler == SIG_DFL);
    return 0;
}
"""

# own handler; genuine NULL writes; the handler touches TLS while SIGSEGV is blocked (handler entry)
HANDLER_C = WORK + r"""
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static volatile int calls;
static sigjmp_buf env;
static void on_segv(int sig) { calls++; work(3); siglongjmp(env, 1); }
int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sigaction(SIGSEGV, &sa, NULL);
    for (int r = 0; r < rounds; r++) {
        work(50);
        if (sigsetjmp(env, 1) == 0) { *(volatile int *)0 = 1; puts("not reached"); }
        work(50);
    }
    struct sigaction now;
    sigaction(SIGSEGV, NULL, &now);
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    printf("calls=%d kept=%d blocked=%d tv=%d\n", calls, now.sa_handler == on_segv, sigismember(&cur, SIGSEGV), tv);
    return 0;
}
"""

# another signal's handler blocks everything (SIGSEGV too), touches TLS and returns (sigreturn)
OTHER_HANDLER_C = WORK + r"""
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
static volatile int segv_calls, usr_blocked;
static sigjmp_buf env;
static void on_segv(int sig) { segv_calls++; siglongjmp(env, 1); }
static void on_usr1(int sig) {
    sigset_t cur;
    work(5);
    sigprocmask(SIG_BLOCK, NULL, &cur);
    usr_blocked += sigismember(&cur, SIGSEGV);
}
int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sigaction(SIGSEGV, &sa, NULL);
    sa.sa_handler = on_usr1;
    sigfillset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    for (int i = 0; i < 3; i++) raise(SIGUSR1);
    work(10);
    if (sigsetjmp(env, 1) == 0) *(volatile int *)0 = 1;
    struct sigaction now;
    sigaction(SIGSEGV, NULL, &now);
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    printf("usr_blocked=%d segv=%d kept=%d blocked=%d tv=%d\n", usr_blocked, segv_calls, now.sa_handler == on_segv,
           sigismember(&cur, SIGSEGV), tv);
    return 0;
}
"""

FORK_C = WORK + r"""
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
int main(void) {
    sigset_t s, cur;
    signal(SIGSEGV, SIG_IGN);
    sigemptyset(&s);
    sigaddset(&s, SIGSEGV);
    sigprocmask(SIG_BLOCK, &s, NULL);
    fflush(stdout);
    pid_t p = fork();
    work(50);
    struct sigaction sa;
    sigaction(SIGSEGV, NULL, &sa);
    sigprocmask(SIG_BLOCK, NULL, &cur);
    if (p) {  /* the child reports first: the output order must not depend on scheduling */
        int st;
        waitpid(p, &st, 0);
    }
    printf("%s ignored=%d blocked=%d tv=%d\n", p ? "parent" : "child", sa.sa_handler == SIG_IGN,
           sigismember(&cur, SIGSEGV), tv);
    fflush(stdout);
    if (p == 0) _exit(0);
    return 0;
}
"""

THREADS_C = WORK + r"""
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
static int blocked[2];
static void *run(void *arg) {
    long id = (long)arg;
    sigset_t s, cur;
    if (id == 1) { sigemptyset(&s); sigaddset(&s, SIGSEGV); pthread_sigmask(SIG_BLOCK, &s, NULL); }
    work(200);
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    blocked[id] = sigismember(&cur, SIGSEGV);
    return NULL;
}
int main(void) {
    pthread_t t[2];
    for (long i = 0; i < 2; i++) pthread_create(&t[i], NULL, run, (void *)i);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    printf("thread0=%d thread1=%d main=%d\n", blocked[0], blocked[1], sigismember(&cur, SIGSEGV));
    return 0;
}
"""

PROGRAMS = {"ignored": (IGNORED_C, []), "blocked": (BLOCKED_C, []), "handler": (HANDLER_C, []),
            "other_handler": (OTHER_HANDLER_C, []), "fork": (FORK_C, []), "threads": (THREADS_C, ["-pthread"])}


def _unavailable(reason: str):
    unavailable(f"hw backend: {reason}")


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    if shutil.which("gcc") is None:
        _unavailable("no gcc")
    out = tmp_path_factory.mktemp("hwsegv")
    built = {}
    for name, (src, extra) in PROGRAMS.items():
        (out / f"{name}.c").write_text(src)
        r = subprocess.run([*CFLAGS, *extra, "-o", str(out / name), str(out / f"{name}.c")], capture_output=True)
        if r.returncode:
            _unavailable(f"gcc -m32 -static unavailable: {r.stderr.decode()[:200]}")
        built[name] = str(out / name)
    try:
        run_hw(built["ignored"], strategy="native", tree=None)
    except HwUnavailable as exc:
        _unavailable(str(exc))
    return built


def _run(exe: str, strategy: str, *args: str):
    return run_hw(exe, [os.path.basename(exe), *args], strategy=strategy, tree=None, stdout="file")


def _same_everywhere(exe: str, *args: str) -> dict:
    """Untraced is the reference; native, emulate and flip must print the same. Returns the truncating runs."""
    want = _run(exe, "untraced", *args)
    assert want.ok and want.status == 0, want.stderr
    runs = {}
    for strategy in ("native", "emulate", "flip"):
        r = _run(exe, strategy, *args)
        assert r.ok and r.status == 0, (strategy, r.signal, r.summary.get("first_delivered"))
        assert r.stdout == want.stdout, (strategy, r.stdout, want.stdout)
        assert r.summary["restore_failures"] == 0
        if strategy == "native":
            assert r.faults == 0 and r.summary["sigsegv_restores"] == 0
        else:
            assert r.faults > 50 and r.summary["delivered"] == 0
            runs[strategy] = r
    return runs


def test_ignored_sigsegv_stays_ignored(progs):
    runs = _same_everywhere(progs["ignored"])
    for r in runs.values():
        assert r.stdout.endswith(b"ignored=1\n")
        s = r.summary
        assert s["sigsegv_handler_restores"] > 0 and s["sigsegv_mask_restores"] == 0
        assert s["sigsegv_restores"] == s["sigsegv_handler_restores"] <= r.faults


def test_blocked_sigsegv_stays_blocked(progs):
    runs = _same_everywhere(progs["blocked"])
    for r in runs.values():
        assert r.stdout.endswith(b"blocked=1 default=1\n")
        s = r.summary
        assert s["sigsegv_mask_restores"] > 0 and s["sigsegv_handler_restores"] == 0


@pytest.mark.parametrize("rounds", [1, 3])
def test_own_handler_sees_only_the_genuine_fault(progs, rounds):
    """TLS faults never reach the guest's handler; each genuine NULL write does, exactly once.

    The handler itself touches TLS with SIGSEGV blocked (handler entry): without
    restoring, the kernel would reset it to SIG_DFL and the next genuine fault kill the guest.
    """
    runs = _same_everywhere(progs["handler"], str(rounds))
    for r in runs.values():
        assert r.stdout.startswith(f"calls={rounds} kept=1 blocked=0 ".encode())
        assert r.summary["other_sigsegv"] == rounds  # the genuine faults, passed to the guest
        assert r.summary["sigsegv_handler_restores"] > 0 and r.summary["sigsegv_mask_restores"] > 0


def test_other_handler_blocking_sigsegv(progs):
    """A SIGUSR1 handler with a full sa_mask touches TLS and returns via sigreturn."""
    runs = _same_everywhere(progs["other_handler"])
    for r in runs.values():
        assert r.stdout.startswith(b"usr_blocked=3 segv=1 kept=1 blocked=0 ")


def test_forked_child_inherits_the_disposition(progs):
    runs = _same_everywhere(progs["fork"])
    for r in runs.values():
        lines = sorted(line.rsplit(b" tv=", 1)[0] for line in r.stdout.splitlines())
        assert lines == [b"child ignored=1 blocked=1", b"parent ignored=1 blocked=1"]
        assert r.summary["forks"] == 1


def test_threads_keep_their_own_masks(progs):
    runs = _same_everywhere(progs["threads"])
    for r in runs.values():
        assert r.stdout == b"thread0=0 thread1=1 main=0\n"
        assert r.summary["clones"] == 2


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_ordinary_guest_pays_nothing(progs, strategy):
    """A guest that never touches SIGSEGV: no signal syscall is traced, no restore happens."""
    from tlslab.guests import GuestError, resolve_guest

    try:
        exe = str(resolve_guest("syscalls").path)
    except GuestError as exc:
        unavailable(str(exc))
    r = run_hw(exe, ["syscalls", "300"], strategy=strategy)
    assert r.ok and r.faults > 300
    s = r.summary
    assert s["signal_syscalls"] == 0 and s["sigsegv_restores"] == 0 and s["restore_ns"] == 0
