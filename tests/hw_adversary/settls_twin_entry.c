/* settls_twin_entry: after the fs-twin ABI is in conflict (%fs loaded with 0, then a -ve %gs fault),
 * a thread is cloned with CLONE_SETTLS aimed at GDT entry 13 (the twin's) with a flat descriptor, and
 * reads the hypervisor hole through %fs = 0x6b. The descriptor must be truncated like any other the
 * guest installs: the read then faults (the guest dies of SIGSEGV) instead of printing HOLE REACHED. */
#define _GNU_SOURCE
#include <asm/ldt.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hole.h"

static volatile unsigned got, done;
static char stack[65536] __attribute__((aligned(16)));

static int child(void *unused)
{
    (void)unused;
    got = read_hole_through(0x6b);
    done = 1;
    syscall(SYS_exit, 0);
    return 0;
}

int main(void)
{
    if (map_hole()) return 1;
    unsigned x;
    /* %fs no longer the twin's, noticed at the next %gs fault */
    __asm__ volatile("xor %%eax, %%eax\n\tmov %%eax, %%fs\n\tmov %%gs:-8, %0" : "=r"(x) : : "eax");
    struct user_desc d = {.entry_number = 13, .base_addr = 0, .limit = 0xFFFFF, .seg_32bit = 1,
                          .limit_in_pages = 1, .useable = 1};
    int flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM | CLONE_SETTLS;
    if (clone(child, stack + sizeof stack, flags, NULL, NULL, &d, NULL) < 0) { perror("clone"); return 1; }
    while (!done) sched_yield();
    printf("child read %#x through %%fs:0xFC000000 (%s)\n", got, got == HOLE_MARKER ? "HOLE REACHED" : "?");
    return 0;
}
