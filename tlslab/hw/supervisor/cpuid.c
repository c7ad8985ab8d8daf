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
 * any other (leaf, subleaf) outside the table is answered with zeros and
 * counted ("cpuid_unlisted"); an image that could not turn faulting on (a CPU or
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
    int32_t ret = -1;
    int rc = run_guest_syscall(sv, t, NR32_ARCH_PRCTL, ARCH_SET_CPUID_, 0, &ret, gone);
    if (rc == -2) return -2;
    if (rc == 0 && ret == 0) sv->cpuid_images++;
    else sv->cpuid_refused++;
    return 0;
}

/* A SI_KERNEL SIGSEGV of t at code[0..n) with its registers: when it is a
 * cpuid, answer it from the table and return 1; else 0 (not ours). */
int cpuid_fault(struct supervisor *sv, struct thread *t, struct user_regs_struct *regs, const uint8_t *code, int n) {
    if (n < 2 || code[0] != 0x0F || code[1] != 0xA2) return 0;
    uint32_t leaf = (uint32_t)regs->rax, subleaf = (uint32_t)regs->rcx;
    const uint32_t zero[4] = {0, 0, 0, 0};
    const uint32_t *r = zero;
    const uint32_t *first = NULL;
    int uniform = 1; /* the leaf's answers do not depend on the subleaf (ECX is then whatever the caller left) */
    for (size_t i = 0; i < sv->ncpuid; i++) {
        const struct cpuid_answer *a = &sv->cpuid[i];
        if (a->leaf != leaf) continue;
        if (a->subleaf == subleaf) { r = a->r; break; }
        if (!first) first = a->r;
        else if (memcmp(first, a->r, sizeof a->r)) uniform = 0;
    }
    if (r == zero && first && uniform) r = first;
    if (r == zero) sv->cpuid_unlisted++;
    regs->rax = r[0];
    regs->rbx = r[1];
    regs->rcx = r[2];
    regs->rdx = r[3];
    regs->rip = (uint32_t)regs->rip + 2;
    if (ptrace(PTRACE_SETREGS, t->tid, 0, regs) < 0) die_setup(sv, "PTRACE_SETREGS", errno);
    sv->cpuid_answered++;
    rate_retired(sv, t, 1);
    return 1;
}
