/*
 * Hardware oracle for tlslab's segment-limit model (tests/test_oracle.py).
 *
 * Build: gcc -m32 -static -O1 probe.c -o probe   (a 32-bit x86 process)
 *
 * Reads one case per line on stdin:
 *
 *   MODE CONTENTS LIMIT_IN_PAGES SEG_32BIT READ_EXEC_ONLY NOT_PRESENT LIMIT BASE_KIND BASE OFFSET SIZE WRITE
 *
 *   MODE       t = install with set_thread_area (GDT TLS slot),
 *              l = install with modify_ldt (LDT entry 0; allows 16-bit and code
 *                  segments, which set_thread_area refuses)
 *   BASE_KIND  a = BASE is the absolute segment base (reads only),
 *              r = BASE is a byte position inside a region this probe mmaps,
 *                  and the segment base is chosen so that base + OFFSET (mod
 *                  2**32) lands exactly there: an access the segment admits
 *                  then touches mapped memory we own.
 *   numbers    decimal or 0x-hex; SIZE is 1, 2 or 4; flags are 0 or 1
 *              (CONTENTS 0..3, as in struct user_desc).
 *
 * For each case it installs the descriptor, loads it into %fs and performs one
 * movb/movw/movl through %fs:(reg), catching SIGSEGV/SIGBUS. One line out:
 *
 *   ok        BASE         the access completed
 *   gp        BASE TRAPNO  the CPU refused it: #GP(13)/#SS(12) on the access
 *   load      BASE TRAPNO  loading the selector into %fs faulted (#GP 13 or
 *                          #NP 11): not present, or not readable
 *   pf        BASE ADDR    a page fault: the segment check passed, the page is
 *                          not mapped (or not writable)
 *   rejected  ERRNO        the kernel refused the descriptor (not compared)
 *   other     BASE TRAPNO SI_CODE  any other fault (never expected)
 *   bad       LINE         the input line did not parse
 *
 * Exactly one output line per input line, after the first line
 * "region ADDR SIZE".
 *
 * The trap number from the signal context tells #GP from #PF; si_code
 * (SI_KERNEL for #GP, SEGV_MAPERR/ACCERR for #PF) is checked too.
 */
#define _GNU_SOURCE
#include <asm/ldt.h>
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define REGION_SIZE (4u << 20)

static sigjmp_buf jump;
static volatile int fault_trapno;
static volatile int fault_code;
static volatile uint32_t fault_addr;

static void on_fault(int sig, siginfo_t *info, void *ctx)
{
    ucontext_t *uc = ctx;
    (void)sig;
    fault_trapno = uc->uc_mcontext.gregs[REG_TRAPNO];
    fault_code = info->si_code;
    fault_addr = (uint32_t)(uintptr_t)info->si_addr;
    siglongjmp(jump, 1);
}

static void load_fs(unsigned short selector)
{
    __asm__ volatile("movw %w0, %%fs" : : "r"(selector) : "memory");
}

/* One access of `size` bytes at %fs:offset. */
static void access_fs(uint32_t offset, int size, int write)
{
    uint32_t value = 0x5a5a5a5a;
    if (write) {
        switch (size) {
        case 1: __asm__ volatile("movb %b0, %%fs:(%1)" : : "q"(value), "r"(offset) : "memory"); break;
        case 2: __asm__ volatile("movw %w0, %%fs:(%1)" : : "r"(value), "r"(offset) : "memory"); break;
        default: __asm__ volatile("movl %0, %%fs:(%1)" : : "r"(value), "r"(offset) : "memory"); break;
        }
    } else {
        switch (size) {
        case 1: __asm__ volatile("movb %%fs:(%1), %b0" : "=q"(value) : "r"(offset) : "memory"); break;
        case 2: __asm__ volatile("movw %%fs:(%1), %w0" : "+r"(value) : "r"(offset) : "memory"); break;
        default: __asm__ volatile("movl %%fs:(%1), %0" : "=r"(value) : "r"(offset) : "memory"); break;
        }
    }
}

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) || sigaction(SIGBUS, &sa, NULL)) {
        perror("sigaction");
        return 1;
    }

    uint8_t *region = mmap(NULL, REGION_SIZE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    printf("region 0x%08x 0x%08x\n", (uint32_t)(uintptr_t)region, REGION_SIZE);

    int tls_entry = -1;
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char mode, base_kind;
        unsigned contents, pages, seg32, reo, not_present, size, write;
        long long limit, base_in, offset;
        if (sscanf(line, " %c %u %u %u %u %u %lli %c %lli %lli %u %u", &mode, &contents, &pages,
                   &seg32, &reo, &not_present, &limit, &base_kind, &base_in,
                   &offset, &size, &write) != 12
            || (mode != 't' && mode != 'l') || (base_kind != 'a' && base_kind != 'r')
            || (size != 1 && size != 2 && size != 4) || contents > 3
            || (pages | seg32 | reo | not_present | write) > 1
            || limit < 0 || limit > 0xFFFFFFFFLL || offset < 0 || offset > 0xFFFFFFFFLL
            || base_in < 0 || base_in > 0xFFFFFFFFLL
            || (base_kind == 'r' && base_in + size > REGION_SIZE)
            || (base_kind == 'a' && write)) {
            line[strcspn(line, "\n")] = 0;
            printf("bad %s\n", line);
            continue;
        }
        /* volatile: read again after siglongjmp */
        volatile uint32_t off = (uint32_t)offset;
        volatile uint32_t base = base_kind == 'r'
                            ? (uint32_t)(uintptr_t)region + (uint32_t)base_in - off
                            : (uint32_t)base_in;

        struct user_desc ud;
        memset(&ud, 0, sizeof ud);
        ud.base_addr = base;
        ud.limit = (unsigned)limit;
        ud.seg_32bit = seg32;
        ud.contents = contents;
        ud.read_exec_only = reo;
        ud.limit_in_pages = pages;
        ud.seg_not_present = not_present;
        ud.useable = 0;

        load_fs(0); /* never leave %fs holding the selector we are rewriting */
        volatile unsigned short selector;
        long rc;
        if (mode == 't') {
            ud.entry_number = (unsigned)tls_entry;
            rc = syscall(SYS_set_thread_area, &ud);
            if (rc == 0)
                tls_entry = (int)ud.entry_number;
            selector = (unsigned short)((ud.entry_number << 3) | 3);
        } else {
            ud.entry_number = 0;
            rc = syscall(SYS_modify_ldt, 0x11, &ud, sizeof ud); /* 0x11: new mode, keeps base 0/limit 0 */
            selector = (0 << 3) | 4 | 3;
        }
        if (rc != 0) {
            printf("rejected %d\n", errno);
            continue;
        }

        volatile int stage = 0;
        if (sigsetjmp(jump, 1) == 0) {
            load_fs(selector);
            stage = 1;
            access_fs(off, (int)size, (int)write);
            load_fs(0);
            printf("ok 0x%08x\n", base);
        } else {
            load_fs(0);
            if (stage == 0)
                printf("load 0x%08x %d\n", base, fault_trapno);
            else if (fault_trapno == 14 && fault_code != SI_KERNEL)
                printf("pf 0x%08x 0x%08x\n", base, fault_addr);
            else if ((fault_trapno == 13 || fault_trapno == 12) && fault_code == SI_KERNEL)
                printf("gp 0x%08x %d\n", base, fault_trapno);
            else
                printf("other 0x%08x %d %d\n", base, fault_trapno, fault_code);
        }
    }
    return fflush(stdout) ? 1 : 0;
}
