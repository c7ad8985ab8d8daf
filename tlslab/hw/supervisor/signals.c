/*
 * signals.c: the guest's SIGSEGV disposition. A TLS #GP reaches the guest as
 * a forced SIGSEGV, which resets what the guest set up for SIGSEGV; the
 * supervisor follows the guest's signal syscalls to know what that was, and
 * after absorbing such a fault makes the guest put it back (below).
 */
#include "supervisor.h"

#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* A #GP in user mode is a forced SIGSEGV: if the guest has SIGSEGV blocked
 * or ignored, the kernel unblocks it and resets the handler to SIG_DFL
 * (force_sig_info_to_task) before we see the signal-delivery stop. On Xen the
 * TLS #GP goes to the hypervisor and the guest's disposition is untouched.
 * So the supervisor keeps what the guest means its disposition to be --
 *   - the handler table per process, from signal/sigaction/rt_sigaction
 *     (recorded at syscall exit when the change took effect), reset like
 *     the kernel at exec (handlers -> SIG_DFL, SIG_IGN kept, flags/masks
 *     cleared), SA_RESETHAND applied at delivery, copied at fork / shared
 *     by threads;
 *   - per thread, whether SIGSEGV is blocked, from sigprocmask /
 *     rt_sigprocmask, from handler entry (sa_mask, the signal itself unless
 *     SA_NODEFER) and from sigreturn (the mask saved in the signal frame,
 *     read at its seccomp stop; the kernel's SigBlk at its exit if the frame
 *     cannot be read). Not followed: the temporary masks of sigsuspend,
 *     pselect/ppoll/epoll_pwait (a handler run inside them starts from the
 *     mask before the call, here)
 * -- and, after suppressing a TLS fault of a thread whose SIGSEGV was blocked
 * or ignored (exactly the cases in which the kernel reset something),
 * restores it by making the thread execute rt_sigaction / rt_sigprocmask
 * (an `int $0x80` found in its text, arguments on its stack well below ESP,
 * registers and memory put back afterwards). Other guests pay nothing at
 * faults: the check is two loads. */
static int is_handler_fn(uint32_t h) { return h != SIG32_DFL && h != SIG32_IGN; }

/* a free handler table (a copy of copy, or all SIG_DFL), or NULL */
struct sigtab *sigtab_new(struct supervisor *sv, const struct sigtab *copy) {
    for (int i = 0; i < MAX_THREADS; i++) {
        struct sigtab *s = &sv->sigtabs[i];
        if (s->refs) continue;
        if (copy) *s = *copy;
        else memset(s, 0, sizeof *s);
        s->refs = 1;
        return s;
    }
    return NULL;
}

/* what exec (and clone3's CLONE_CLEAR_SIGHAND) does to the handlers */
void sigtab_flush(struct sigtab *s, int new_mm) {
    for (int k = 1; k <= 64; k++) {
        struct ksa32 *a = &s->act[k];
        if (a->handler != SIG32_IGN) a->handler = SIG32_DFL;
        a->flags = a->restorer = a->mask[0] = a->mask[1] = 0;
    }
    if (new_mm) s->int80 = 0;
}

static int sigblk_segv(pid_t tid) { /* the kernel's view: is SIGSEGV blocked in tid? -1 unknown */
    char buf[4096];
    const char *v = proc_status_field(tid, "SigBlk", buf, sizeof buf);
    if (!v) return -1;
    return (int)((strtoull(v, NULL, 16) >> (SIGSEGV - 1)) & 1);
}

/* seccomp stop of a signal syscall: read what it asks for (the kernel copies
 * its arguments right after this stop); it is recorded at the exit */
void start_sig_syscall(struct supervisor *sv, struct thread *t, const struct user_regs_struct *r) {
    uint32_t nr = (uint32_t)r->orig_rax, b = (uint32_t)r->rbx, c = (uint32_t)r->rcx, d = (uint32_t)r->rdx,
             si = (uint32_t)r->rsi;
    sv->signal_syscalls++;
    t->in_sig = 1;
    t->sig_nr = nr;
    t->sig_arg = b;
    t->sig_out = d;
    t->sig_ok = 0;
    memset(&t->sig_new, 0, sizeof t->sig_new);
    switch (nr) {
    case NR32_SIGNAL: /* kernel: SA_ONESHOT | SA_NOMASK, empty mask */
        t->sig_new.handler = c;
        t->sig_new.flags = SA32_RESETHAND | SA32_NODEFER;
        t->sig_out = 0;
        t->sig_ok = 1;
        break;
    case NR32_SIGACTION: { /* struct old_sigaction: handler, mask, flags, restorer */
        uint32_t o[4];
        if (c && read_mem(t->tid, c, o, sizeof o) == 0) {
            t->sig_new.handler = o[0];
            t->sig_new.mask[0] = o[1];
            t->sig_new.flags = o[2];
            t->sig_new.restorer = o[3];
            t->sig_ok = 1;
        }
        break;
    }
    case NR32_RT_SIGACTION:
        if (c && si == 8 && read_mem(t->tid, c, &t->sig_new, sizeof t->sig_new) == 0) t->sig_ok = 1;
        break;
    case NR32_SIGPROCMASK:
        if (c && b <= 2 && read_mem(t->tid, c, &t->sig_set, 4) == 0) t->sig_ok = 1;
        break;
    case NR32_RT_SIGPROCMASK:
        if (c && b <= 2 && si == 8 && read_mem(t->tid, c, &t->sig_set, 4) == 0) t->sig_ok = 1;
        break;
    default: { /* sigreturn, rt_sigreturn: the kernel restores the mask saved in the
                * signal frame (ia32: rt_sigframe at ESP-4, uc_sigmask at +252; sigframe
                * at ESP-8, sc.oldmask at +88); if that cannot be read, /proc at the exit */
        uint32_t sp = (uint32_t)r->rsp, m;
        if (read_mem(t->tid, nr == NR32_RT_SIGRETURN ? sp + 248 : sp + 80, &m, 4) == 0) {
            t->blocked_segv = (m & SEGV_BIT) != 0;
            t->in_sig = 0; /* done: no exit stop needed */
        }
        t->sig_ok = 1;
    }
    }
}

/* its syscall-exit stop: record the change if it took effect (success, or
 * EFAULT from writing the old value: the kernel applied the new one first) */
void finish_sig_syscall(struct thread *t) {
    t->in_sig = 0;
    if (t->sig_nr == NR32_SIGRETURN || t->sig_nr == NR32_RT_SIGRETURN) {
        int b = sigblk_segv(t->tid);
        if (b >= 0) t->blocked_segv = b;
        return;
    }
    struct user_regs_struct r;
    if (!t->sig_ok || ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0) return;
    int32_t ret = (int32_t)r.rax;
    int took = t->sig_nr == NR32_SIGNAL ? !(ret < 0 && ret >= -4095)
                                        : ret == 0 || (ret == -EFAULT && t->sig_out != 0);
    if (!took) return;
    if (t->sig_nr == NR32_SIGNAL || t->sig_nr == NR32_SIGACTION || t->sig_nr == NR32_RT_SIGACTION) {
        if (t->st && t->sig_arg >= 1 && t->sig_arg <= 64) t->st->act[t->sig_arg] = t->sig_new;
        return;
    }
    int segv = (t->sig_set & SEGV_BIT) != 0;
    if (t->sig_arg == 0) { if (segv) t->blocked_segv = 1; }   /* SIG_BLOCK */
    else if (t->sig_arg == 1) { if (segv) t->blocked_segv = 0; } /* SIG_UNBLOCK */
    else t->blocked_segv = segv;                                /* SIG_SETMASK */
}

/* the tracer delivers sig: a handler runs with sa_mask (and sig unless SA_NODEFER) blocked */
void note_delivery(struct thread *t, int sig) {
    if (!t->st || sig < 1 || sig > 64) return;
    struct ksa32 *a = &t->st->act[sig];
    if (!is_handler_fn(a->handler)) return;
    if ((a->mask[0] & SEGV_BIT) || (sig == SIGSEGV && !(a->flags & SA32_NODEFER))) t->blocked_segv = 1;
    if (a->flags & SA32_RESETHAND) a->handler = SIG32_DFL;
}


/* an `int $0x80` (cd 80, anywhere: execution does not care about
 * instruction boundaries) in an executable mapping of the tracee */
static uint32_t find_int80(pid_t tid) {
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/maps", tid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    uint32_t found = 0;
    static uint8_t buf[65536 + 1];
    while (!found && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3 || perms[2] != 'x' || hi > 0xFFFFFFFFul) continue;
        for (unsigned long a = lo; a < hi && !found; a += 65536) {
            size_t n = hi - a > 65536 ? 65536 : hi - a;
            if (read_mem(tid, (uint32_t)a, buf, n + (a + n < hi)) < 0) break;
            uint8_t *p = memmem(buf, n + (a + n < hi), "\xcd\x80", 2);
            if (p) found = (uint32_t)(a + (p - buf));
        }
    }
    fclose(f);
    return found;
}

/* Make t execute `int $0x80` at `at` with these registers; single-step to the
 * syscall's exit. Signals that arrive meanwhile are re-sent afterwards.
 * Returns 0 (result in *ret), -1 failure, -2 the thread is gone (status in *gone). */
static int inject_syscall(struct supervisor *sv, struct thread *t, const struct user_regs_struct *base, uint32_t at,
                          uint32_t nr, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t a4, int32_t *ret, int *gone) {
    struct user_regs_struct r = *base;
    r.rip = at;
    r.rax = nr; r.rbx = a1; r.rcx = a2; r.rdx = a3; r.rsi = a4;
    r.orig_rax = (unsigned long long)-1;
    if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0) return -1;
    if (ptrace(PTRACE_SINGLESTEP, t->tid, 0, 0) < 0) return -1;
    int retried = 0;
    for (int guard = 0; guard < 256; guard++) {
        int st;
        pid_t w = waitpid(t->tid, &st, __WALL);
        if (w < 0) {
            if (errno == EINTR && !sv->timed_out) continue;
            return -1;
        }
        if (WIFEXITED(st) || WIFSIGNALED(st)) { *gone = st; return -2; }
        if (!WIFSTOPPED(st)) continue;
        int sig = WSTOPSIG(st), ev = st >> 16;
        if (sig == SIGTRAP && !ev) { /* the step trap at the syscall's exit */
            struct user_regs_struct now;
            if (ptrace(PTRACE_GETREGS, t->tid, 0, &now) < 0) return -1;
            if ((uint32_t)now.rip == at && !retried) {
                /* nothing ran: the step report at the exit of the system call the
                 * task was stopped in (an exec stop: execve's exit also wrote its
                 * result over EAX). Set the registers again and step */
                retried = 1;
                if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0 || ptrace(PTRACE_SINGLESTEP, t->tid, 0, 0) < 0)
                    return -1;
                continue;
            }
            r = now;
            if ((uint32_t)r.rip != at + 2) return -1;
            *ret = (int32_t)r.rax;
            return 0;
        }
        if (!ev && sig != (SIGTRAP | 0x80) && sv->nrequeue < 16) sv->requeue[sv->nrequeue++] = sig;
        /* our own seccomp stop (rt_sigaction/rt_sigprocmask are traced) or a signal: go on */
        if (ptrace(PTRACE_SINGLESTEP, t->tid, 0, 0) < 0) return -1;
    }
    return -1;
}

/* Make t run one system call of its own (nr, a1, a2) at an `int $0x80` of
 * its text, its registers put back afterwards and signals that arrived
 * meanwhile pending again. Returns 0 (the result in *ret), -1 when it could
 * not (no `int $0x80` mapped, a ptrace failure), -2 when t is gone (its wait
 * status in *gone). */
int run_guest_syscall(struct supervisor *sv, struct thread *t, uint32_t nr, uint32_t a1, uint32_t a2, int32_t *ret,
                      int *gone) {
    struct user_regs_struct saved;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &saved) < 0) return -1;
    uint32_t at = find_int80(t->tid);
    if (!at) return -1;
    sv->nrequeue = 0;
    int rc = inject_syscall(sv, t, &saved, at, nr, a1, a2, 0, 0, ret, gone);
    if (rc == -2) return -2;
    if (ptrace(PTRACE_SETREGS, t->tid, 0, &saved) < 0) {
        if (errno == ESRCH) return -1; /* killed meanwhile (the timeout, a sibling's exit_group): reported next */
        die_setup(sv, "PTRACE_SETREGS", errno);
    }
    for (int i = 0; i < sv->nrequeue; i++) {
        syscall(SYS_tkill, t->tid, sv->requeue[i]);
        sv->signals_requeued++;
    }
    return rc;
}

int needs_restore(const struct thread *t) {
    return t->st && (t->blocked_segv || t->st->act[SIGSEGV].handler == SIG32_IGN);
}

/* after suppressing a TLS fault of t (needs_restore(t)): put back what the
 * kernel's forced SIGSEGV changed. Returns 0, or -2 with *gone = wait status. */
int restore_segv(struct supervisor *sv, struct thread *t, int *gone) {
    struct user_regs_struct saved;
    struct sigtab *s = t->st;
    int want_handler = s->act[SIGSEGV].handler != SIG32_DFL; /* the kernel set SIG_DFL */
    int want_mask = t->blocked_segv;                          /* the kernel unblocked it */
    int rc = 0;
    sv->nrequeue = 0;
    COUNT(sv, segv_restores);
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &saved) < 0) { sv->restore_failures++; return 0; }
    uint8_t chk[2];
    if (!s->int80 || read_mem(t->tid, s->int80, chk, 2) < 0 || chk[0] != 0xcd || chk[1] != 0x80)
        s->int80 = find_int80(t->tid);
    /* scratch: 32 bytes well below ESP (i386 has no red zone; anything below
     * ESP is dead, but it is put back anyway); on ESP itself if that fails */
    uint32_t scratch = ((uint32_t)saved.rsp - 1024) & ~15u;
    uint8_t old[32], args[32] = {0};
    if (read_mem(t->tid, scratch, old, sizeof old) < 0) {
        scratch = (uint32_t)saved.rsp & ~3u;
        if (read_mem(t->tid, scratch, old, sizeof old) < 0) scratch = 0;
    }
    if (!s->int80 || !scratch) { sv->restore_failures++; return 0; }
    memcpy(args, &s->act[SIGSEGV], sizeof s->act[SIGSEGV]); /* 20 bytes: struct sigaction */
    uint32_t set[2] = {SEGV_BIT, 0};
    memcpy(args + 24, set, 8);
    if (write_mem(t->tid, scratch, args, sizeof args) < 0) { sv->restore_failures++; return 0; }
    int32_t ret = 0;
    if (want_handler) {
        rc = inject_syscall(sv, t, &saved, s->int80, NR32_RT_SIGACTION, SIGSEGV, scratch, 0, 8, &ret, gone);
        if (rc == -2) return -2;
        if (rc == 0 && ret == 0) sv->segv_handler_restores++;
        else sv->restore_failures++;
    }
    if (want_mask) {
        rc = inject_syscall(sv, t, &saved, s->int80, NR32_RT_SIGPROCMASK, 0 /* SIG_BLOCK */, scratch + 24, 0, 8,
                            &ret, gone);
        if (rc == -2) return -2;
        if (rc == 0 && ret == 0) sv->segv_mask_restores++;
        else sv->restore_failures++;
    }
    write_mem(t->tid, scratch, old, sizeof old);
    if (ptrace(PTRACE_SETREGS, t->tid, 0, &saved) < 0) die_setup(sv, "PTRACE_SETREGS", errno);
    for (int i = 0; i < sv->nrequeue; i++) { /* signals that arrived meanwhile: pending again */
        syscall(SYS_tkill, t->tid, sv->requeue[i]);
        sv->signals_requeued++;
    }
    return 0;
}
