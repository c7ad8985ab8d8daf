/*
 * rate.c: online-rate, the rule of RateStrategy in
 * tlslab/hypervisor/strategies/online.py (its specification), and the clock
 * it decides from: guest instructions retired since the address space's
 * previous %gs fault, counted up to RATE_GAP_CAP.
 *
 * The rule (the same integer arithmetic as the model): one mode for the
 * domain; avg += gap - avg / 8 (fixed point, x8); after at least 16 faults in
 * a mode, an average below 100 instructions (800 fixed) switches mode and
 * resets the average to 400 (3200). %fs faults are emulated and are no
 * clock events, as in the model.
 *
 * The clock. A hypervisor reads a retired-instruction counter; this host's
 * CPU offers the supervisor none it may use (no PMU in the VM: perf's
 * instructions:u is not supported), so after each %gs fault the supervisor
 * single-steps the faulting task (PTRACE_SINGLESTEP) until the next fault in
 * its process or RATE_GAP_CAP steps, whichever comes first: a gap is only ever
 * needed up to the cap, which is what makes that affordable (a few hundred
 * thousand steps on lsr, syscalls, malloc). What counts as one instruction is
 * what the model counts:
 *   - a step trap (si_code TRAP_TRACE), and the step report at the exit of a
 *     system call made while stepping (TRAP_BRKPT): the int $0x80 retires;
 *   - a system call resumed to its exit stop (PTRACE_SYSCALL, for the
 *     supervisor's own bookkeeping of set_thread_area and signal calls): its
 *     int $0x80 is counted at that stop (rate_syscall);
 *   - a faulting instruction the supervisor emulated (EIP advanced: the model
 *     retires it, VCpu.retire) or single-stepped (its step trap);
 *   - not: the report at entry to a signal handler (si_code SIGTRAP, from
 *     ptrace_notify: no instruction retired), nor the steps of the
 *     supervisor's own injected system calls (restore_segv waits for those
 *     itself).
 * A SIGTRAP of any other kind is the guest's and is delivered. A guest can
 * fake a step (rt_sigqueueinfo to itself with TRAP_TRACE, or icebp) while it
 * is stepped: that SIGTRAP is then taken as a step, counted and not
 * delivered. Only its own count and its own signal are at stake.
 *
 * Processes and threads. The clock is per process and restarts at exec (the
 * model's is per vCPU, one per address space). With threads the model's vCPU
 * clock counts every thread of the process; here the thread that faulted last
 * is stepped: with threads the gaps may differ, like the per-slot state of the
 * other online rules (online.c).
 */
#include "supervisor.h"

#define RATE_WINDOW 8
#define RATE_DENSE 100
#define RATE_DWELL 16

#ifndef TRAP_BRKPT
#define TRAP_BRKPT 1
#endif
#ifndef TRAP_TRACE
#define TRAP_TRACE 2
#endif

static struct proc *proc_of(const struct supervisor *sv, const struct thread *t) {
    return t->proc >= 0 ? &sv->procs[t->proc] : NULL;
}

/* is t the task whose steps are its process's clock, still below the cap? */
int rate_counting(const struct supervisor *sv, const struct thread *t) {
    const struct proc *p = proc_of(sv, t);
    return t->rate_stepping && p && p->rate_tid == t->tid && p->rate_steps < RATE_GAP_CAP;
}

/* n instructions of t retired for its process's clock */
void rate_retired(struct supervisor *sv, struct thread *t, uint64_t n) {
    if (!rate_counting(sv, t)) return;
    sv->procs[t->proc].rate_steps += n;
    sv->online.rate_steps_total += n;
}

/* A repeated string instruction at code[0..n): 0 if it is none, else
 * REP_PLAIN (movs stos lods ins outs), REP_WHILE_ZF (repe cmps/scas) or
 * REP_WHILE_NZ (repne cmps/scas), | REP_ADDR16 with an address-size prefix
 * (the count is then %cx) */
enum { REP_PLAIN = 1, REP_WHILE_ZF = 2, REP_WHILE_NZ = 3, REP_ADDR16 = 4 };
static int rep_string(const uint8_t *code, int n) {
    struct prefixes p = legacy_prefixes(code, n);
    int rep = p.rep, addr16 = p.addr16, i = p.count;
    if (!rep || i >= n) return 0;
    uint8_t op = code[i];
    int kind;
    if ((op >= 0xA4 && op <= 0xA5) || (op >= 0xAA && op <= 0xAD) || (op >= 0x6C && op <= 0x6F)) kind = REP_PLAIN;
    else if ((op >= 0xA6 && op <= 0xA7) || (op >= 0xAE && op <= 0xAF)) kind = rep == 0xF3 ? REP_WHILE_ZF : REP_WHILE_NZ;
    else return 0;
    return kind | (addr16 ? REP_ADDR16 : 0);
}

/* t's registers where its next step starts (the clock's view of "the
 * instruction the next step executes") */
static void rate_mark(struct thread *t, const struct user_regs_struct *r) {
    t->rate_prev_eip = (uint32_t)r->rip;
    t->rate_prev_ecx = (uint32_t)r->rcx;
    t->rate_prev_valid = 1;
    t->rate_marked = 1;
}

/* The model's count of a repeated string instruction. Unicorn (QEMU's
 * translator outside single-step mode) runs each iteration as one entry of a
 * block holding the instruction, and after the iteration that exhausts the
 * count it enters once more to find the count zero: an instruction that
 * iterated N >= 1 times ending on an exhausted count is counted N + 1 times,
 * where single-stepping reports N steps (cmps/scas ending on their flag
 * condition, and N = 0, are counted alike). The step that has just ended
 * executed the instruction at rate_prev_eip; returns 1 when it finished such
 * an instruction that way. Read only when the count register went from
 * non-zero to zero, so the code is fetched rarely. */
static int model_extra_entry(const struct thread *t, pid_t w, const struct user_regs_struct *r) {
    if (!t->rate_prev_valid || (uint32_t)r->rip == t->rate_prev_eip) return 0;
    uint32_t before = t->rate_prev_ecx, after = (uint32_t)r->rcx;
    int ecx_exhausted = before != 0 && after == 0, cx_exhausted = (before & 0xFFFF) && !(after & 0xFFFF);
    if (!ecx_exhausted && !cx_exhausted) return 0;
    uint8_t code[16];
    int n = fetch_insn(w, t->rate_prev_eip, code);
    int kind = rep_string(code, n);
    if (!kind) return 0;
    uint32_t mask = kind & REP_ADDR16 ? 0xFFFFu : 0xFFFFFFFFu;
    if (!(before & mask) || (after & mask)) return 0;
    int zf = (r->eflags >> 6) & 1;
    kind &= ~REP_ADDR16;
    return kind == REP_PLAIN || (kind == REP_WHILE_ZF && zf) || (kind == REP_WHILE_NZ && !zf);
}

/* how t resumes while its instructions are being counted: single-stepped,
 * unless it runs to a system call's exit stop (counted there) */
enum __ptrace_request rate_resume(struct supervisor *sv, struct thread *t, enum __ptrace_request resume) {
    if (!rate_counting(sv, t)) {
        t->rate_stepping = t->rate_marked = 0;
        return resume;
    }
    if (resume == PTRACE_SYSCALL) {
        t->rate_syscall = 1;
        t->rate_prev_valid = t->rate_marked = 0;
        return resume;
    }
    if (!t->rate_marked) { /* stopped for something else (a fault, a system call): where it resumes */
        struct user_regs_struct r;
        if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) == 0) rate_mark(t, &r);
        else t->rate_prev_valid = 0;
    }
    t->rate_marked = 0;
    return PTRACE_SINGLESTEP;
}

/* A SIGTRAP stop (no event) of a task being stepped for the clock: 0 when it
 * was a step (counted, or a signal handler's entry report: not counted),
 * else SIGTRAP, the guest's own, to deliver. */
int rate_trap(struct supervisor *sv, struct thread *t, pid_t w) {
    siginfo_t si;
    if (ptrace(PTRACE_GETSIGINFO, w, 0, &si) < 0) return SIGTRAP;
    if (si.si_code == TRAP_TRACE || si.si_code == TRAP_BRKPT) {
        struct user_regs_struct r;
        if (ptrace(PTRACE_GETREGS, w, 0, &r) < 0) {
            t->rate_prev_valid = 0;
            rate_retired(sv, t, 1);
            return 0;
        }
        rate_retired(sv, t, 1 + (uint64_t)model_extra_entry(t, w, &r));
        rate_mark(t, &r);
        return 0;
    }
    t->rate_prev_valid = 0;
    if (si.si_code == SIGTRAP) return 0; /* ptrace_notify at a signal handler's entry: nothing retired */
    return SIGTRAP;
}

/* RateStrategy.decide at a %gs fault of t: the gap since its process's
 * previous one (0 for the first), the average, the mode; then the clock
 * starts again on t */
int online_rate_fault(struct supervisor *sv, struct fault *f) {
    if (f->in.seg != TC_GS) return online_emulate(sv, f);
    struct online *on = &sv->online;
    struct proc *p = proc_of(sv, f->t);
    int64_t gap = 0;
    if (p && p->rate_has_last) gap = p->rate_steps < RATE_GAP_CAP ? (int64_t)p->rate_steps : RATE_GAP_CAP;
    if (sv->trace) fprintf(sv->trace, "gap %#x %lld\n", f->eip, (long long)gap);
    on->rate_avg += gap - on->rate_avg / RATE_WINDOW; /* non-negative: C's division is Python's // here */
    on->rate_dwell++;
    if (on->rate_dwell >= RATE_DWELL && on->rate_avg < RATE_DENSE * RATE_WINDOW) {
        on->rate_flip_mode = !on->rate_flip_mode;
        on->rate_dwell = 0;
        on->rate_avg = RATE_DENSE * 4 * RATE_WINDOW;
        if (on->rate_flip_mode) on->count.mode_flip++;
        else on->count.mode_emulate++;
    }
    if (p) {
        /* another thread of the process that was counting keeps rate_stepping: its
         * step trap may be on the way, and rate_trap takes it (uncounted: the clock
         * is this thread's now) before rate_resume lets it run on */
        p->rate_has_last = 1;
        p->rate_tid = f->t->tid;
        p->rate_steps = 0;
        f->t->rate_stepping = 1;
    }
    return on->rate_flip_mode ? online_flip(sv, f) : online_emulate(sv, f);
}
