/* settls_twin_entry: after the fs-twin ABI is in conflict (%fs loaded with 0, then a -ve %gs fault),
 * a thread is cloned with CLONE_SETTLS aimed at GDT entry 13 (the twin's) with a flat descriptor, and
 * reads the hypervisor hole (a page mapped at 0xFC000000) through %fs = 0x6b. The descriptor must be
 * truncated like any other the guest installs. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <asm/ldt.h>
#include <sys/syscall.h>

static volatile unsigned got = 0, done = 0;
static char stack[65536] __attribute__((aligned(16)));

static int child(void *arg) {
    unsigned v = 0;
    (void)arg;
    /* %fs = 0x6b (GDT entry 13: what the clone installed there), read the hypervisor hole */
    __asm__ volatile("mov $0x6b, %%eax\n\tmov %%eax, %%fs\n\tmov %%fs:0xFC000000, %%eax\n\tmov %%eax, %0"
                     : "=r"(v) : : "eax", "memory");
    got = v;
    done = 1;
    syscall(SYS_exit, 0);
    return 0;
}

int main(int argc, char **argv) {
    int mode = argc > 1 ? atoi(argv[1]) : 1;
    /* a page in the "hypervisor hole" (0xFC000000 nonpae): the guest's own memory on x86-64 */
    unsigned *hole = mmap((void *)0xFC000000, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (hole == MAP_FAILED) { perror("mmap"); return 1; }
    hole[0] = 0xC0FFEE;
    int x;
    if (mode) {
        /* make the fs-twin ABI conflicted: load %fs = 0, then take a -ve %gs fault */
        __asm__ volatile("xor %%eax, %%eax\n\tmov %%eax, %%fs\n\tmov %%gs:-8, %%eax\n\tmov %%eax, %0" : "=r"(x) : : "eax");
    }
    struct user_desc d = {.entry_number = 13, .base_addr = 0, .limit = 0xFFFFF, .seg_32bit = 1,
                          .limit_in_pages = 1, .useable = 1};
    int flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM | CLONE_SETTLS;
    if (clone(child, stack + sizeof stack, flags, NULL, NULL, &d, NULL) < 0) { perror("clone"); return 1; }
    while (!done) sched_yield();
    printf("child read %#x through %%fs:0xFC000000 (%s)\n", got, got == 0xC0FFEE ? "HOLE REACHED" : "?");
    return 0;
}
