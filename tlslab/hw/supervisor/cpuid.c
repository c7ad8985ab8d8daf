/*
 * cpuid.c: the guest asks "which processor is this?" and gets the model's
 * answer (--cpuid PATH, a table written by tlslab/machine/cpuid.py: one
 * "leaf subleaf eax ebx ecx edx" line per answer, hex).
 *
 * glibc chooses string functions by cpuid at start-up (memset is
 * __memset_sse2 on the model's vCPU, __memset_sse2_rep on this host), so
 * without this a guest on the CPU retires other instructions than in the
 * model, and online-rate's clock (rate.c) would differ. With a table, every
 * new program image turns CPUID faulting on for itself
 * (arch_prctl(ARCH_SET_CPUID, 0), run by the guest at its exec stop through
 * run_guest_syscall; Linux keeps the setting across fork and clone and
 * resets it at execve), and each cpuid then raises a #GP (a forced SIGSEGV,
 * si_code SI_KERNEL) that the supervisor answers from the table: the four
 * registers set, EIP past the instruction, one instruction retired. A
 * subleaf outside the table gets its leaf's answer when that does not depend
 * on the subleaf (most leaves ignore ECX, and callers leave anything there);
 * a leaf outside it the answer of the highest basic leaf, as the model's vCPU
 * gives; anything else zeros, counted ("cpuid_unlisted"). 64-bit images (a
 * guest may exec one) keep the host's cpuid; an image that could not turn faulting on (a CPU or
 * kernel without it) runs with the host's cpuid and is counted
 * ("cpuid_refused"): the Python side reports both.
 */
#include "supervisor.h"

void load_cpuid_table(struct supervisor *sv, const char *path) {
    FILE *f = fopen(path, "re");
    if (!f) die_setup(sv, "--cpuid table", errno);
    size_t cap = 4096;
    sv->cpuid = calloc(cap, sizeof *sv->cpuid);
    if (!sv->cpuid) die_setup(sv, "malloc (cpuid table)", ENOMEM);
    struct cpuid_answer a;
    int k;
    while ((k = fscanf(f, "%x %x %x %x %x %x", &a.leaf, &a.subleaf, &a.r[0], &a.r[1], &a.r[2], &a.r[3])) == 6) {
        if (sv->ncpuid == cap) die_setup(sv, "--cpuid table: too many answers", E2BIG);
        sv->cpuid[sv->ncpuid++] = a;
    }
    if (k != EOF || ferror(f)) die_setup(sv, "--cpuid table: malformed", EINVAL);
    fclose(f);
}

/* At the exec stop of a new image: have it turn CPUID faulting on. Returns
 * -2 when t is gone (its wait status in *gone), else 0. */
int cpuid_image_start(struct supervisor *sv, struct thread *t, int *gone) {
    struct user_regs_struct r;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0 || r.cs != USER32_CS) return 0; /* a 64-bit image: the host's */
    int32_t ret = -1;
    int rc = run_guest_syscall(sv, t, NR32_ARCH_PRCTL, ARCH_SET_CPUID_, 0, &ret, gone);
    if (rc == -2) return -2;
    if (rc == 0 && ret == 0) sv->cpuid_images++;
    else sv->cpuid_refused++;
    return 0;
}

/* the table's answer for (leaf, subleaf); NULL when it has none */
static const uint32_t *lookup(const struct supervisor *sv, uint32_t leaf, uint32_t subleaf) {
    const uint32_t *first = NULL;
    int uniform = 1; /* the leaf's answers do not depend on the subleaf (ECX is then whatever the caller left) */
    for (size_t i = 0; i < sv->ncpuid; i++) {
        const struct cpuid_answer *a = &sv->cpuid[i];
        if (a->leaf != leaf) continue;
        if (a->subleaf == subleaf) return a->r;
        if (!first) first = a->r;
        else if (memcmp(first, a->r, sizeof a->r)) uniform = 0;
    }
    return first && uniform ? first : NULL;
}

/* A SI_KERNEL SIGSEGV of t at code[0..n) with its registers: when it is a
 * cpuid (after any prefixes but lock, as the CPU takes it), answer it from
 * the table and return 1; else 0 (not ours). A leaf the table does not list
 * is answered as the model answers it: like its highest basic leaf (the
 * table's rows past it show that rule, QEMU's for a leaf beyond the range). */
int cpuid_fault(struct supervisor *sv, struct thread *t, struct user_regs_struct *regs, const uint8_t *code, int n) {
    struct prefixes p = legacy_prefixes(code, n);
    int k = p.count;
    if (p.lock || n < k + 2 || code[k] != 0x0F || code[k + 1] != 0xA2) return 0; /* lock cpuid: #UD, the guest's */
    uint32_t leaf = (uint32_t)regs->rax, subleaf = (uint32_t)regs->rcx;
    static const uint32_t zero[4] = {0, 0, 0, 0};
    const uint32_t *r = lookup(sv, leaf, subleaf);
    if (!r) {
        const uint32_t *top = lookup(sv, 0, 0);  /* EAX of leaf 0: the highest basic leaf */
        if (top) r = lookup(sv, top[0], subleaf);
    }
    if (!r) {
        sv->cpuid_unlisted++;
        r = zero;
    }
    regs->rax = r[0];
    regs->rbx = r[1];
    regs->rcx = r[2];
    regs->rdx = r[3];
    regs->rip = (uint32_t)regs->rip + (uint32_t)k + 2;
    /* ESRCH: killed meanwhile (a sibling's exit_group); its end is reported next */
    if (ptrace(PTRACE_SETREGS, t->tid, 0, regs) < 0 && errno != ESRCH) die_setup(sv, "PTRACE_SETREGS", errno);
    sv->cpuid_answered++;
    rate_retired(sv, t, 1);
    return 1;
}
