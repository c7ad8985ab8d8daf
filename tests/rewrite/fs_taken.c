/* fs_taken: a program that takes %fs after glibc's errno sites have been rewritten (online-patch tests).
 *
 * Under a patching hypervisor the errno site of close() is rewritten to use %fs (the twin) at its
 * first fault. Then:
 *   - a forked child installs its own descriptor (set_thread_area, first free slot: 7) and loads it
 *     into %fs, fails close() again, and resets %fs to the null selector;
 *   - the parent resets %fs to the null selector (natively a no-op) and fails close() again: the
 *     rewritten site now runs through a null %fs.
 * Natively every close(-1) sets errno to EBADF; the output is the sum.
 */
#include <asm/ldt.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned int area[1024] __attribute__((aligned(4096)));

static void load_fs(unsigned short selector)
{
    __asm__ volatile("movw %0, %%fs" : : "r"(selector));
}

static int fail_close(int times)
{
    int i, sum = 0;
    for (i = 0; i < times; i++) {
        close(-1);
        sum += errno;
    }
    return sum;
}

int main(void)
{
    int sum = fail_close(3), status = 0;
    pid_t child;

    fflush(stdout);
    child = fork();
    if (child == 0) {
        struct user_desc d;
        memset(&d, 0, sizeof d);
        d.entry_number = (unsigned int)-1;
        d.base_addr = (unsigned int)(unsigned long)area;
        d.limit = sizeof area - 1;
        d.seg_32bit = 1;
        d.useable = 1;
        if (syscall(SYS_set_thread_area, &d) != 0)
            _exit(3);
        load_fs((unsigned short)((d.entry_number << 3) | 3));
        sum += fail_close(2);
        load_fs(0);
        printf("child %d\n", sum);
        fflush(stdout);
        _exit(0);
    }
    waitpid(child, &status, 0);
    load_fs(0);
    sum += fail_close(2);
    printf("parent %d, child status %d\n", sum, status);
    return 0;
}
