/* fs-user: a program that uses %fs for its own purposes (hazard guest).
 *
 * glibc's i386 NPTL owns %gs. Jakub Jelinek's 2004 proposal (split +ve and
 * -ve TLS accesses between %fs and %gs, with the same base, or rewrite the
 * 0x65 prefix to 0x64) breaks programs that load their own segment into %fs.
 * This guest does exactly that: it installs its own data descriptor (base =
 * a static buffer, byte-granular limit 0xfff, expand-up) and loads it into
 * %fs, then writes and reads through %fs and prints what it read.
 *
 * Usage: fs-user        install the descriptor with set_thread_area (GDT TLS slot)
 *        fs-user ldt    install it with modify_ldt (LDT entry 0, selector 0x7)
 *
 * Must run natively: on an x86-64 kernel running i386 code both calls work
 * (modify_ldt needs CONFIG_MODIFY_LDT_SYSCALL).
 */
#include <asm/ldt.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static unsigned int area[1024] __attribute__((aligned(4096)));

static unsigned int fs_read(unsigned int off)
{
    unsigned int v;
    __asm__ volatile("movl %%fs:(%1), %0" : "=r"(v) : "r"(off) : "memory");
    return v;
}

static void fs_write(unsigned int off, unsigned int v)
{
    __asm__ volatile("movl %0, %%fs:(%1)" : : "r"(v), "r"(off) : "memory");
}

static unsigned int fs_read_disp(void)
{
    unsigned int v;
    __asm__ volatile("movl %%fs:0x10, %0" : "=r"(v) : : "memory");
    return v;
}

int main(int argc, char **argv)
{
    int use_ldt = argc > 1 && strcmp(argv[1], "ldt") == 0;
    struct user_desc d;
    unsigned short sel, fs_before, fs_after;
    unsigned int i, sum = 0;

    memset(&d, 0, sizeof d);
    d.entry_number = use_ldt ? 0 : (unsigned int)-1;
    d.base_addr = (unsigned int)(unsigned long)area;
    d.limit = sizeof area - 1;        /* byte granular: 0xfff */
    d.seg_32bit = 1;
    d.contents = 0;                   /* data, expand-up */
    d.read_exec_only = 0;
    d.limit_in_pages = 0;
    d.seg_not_present = 0;
    d.useable = 1;

    if (use_ldt) {
        if (syscall(SYS_modify_ldt, 1, &d, sizeof d) != 0) {
            printf("fs-user: modify_ldt failed: %s\n", strerror(errno));
            return 1;
        }
        sel = (unsigned short)((0 << 3) | 4 | 3);     /* LDT, RPL 3 */
    } else {
        if (syscall(SYS_set_thread_area, &d) != 0) {
            printf("fs-user: set_thread_area failed: %s\n", strerror(errno));
            return 1;
        }
        sel = (unsigned short)((d.entry_number << 3) | 3);
    }

    __asm__ volatile("movw %%fs, %0" : "=r"(fs_before));
    __asm__ volatile("movw %0, %%fs" : : "r"(sel));
    __asm__ volatile("movw %%fs, %0" : "=r"(fs_after));

    for (i = 0; i < 16; i++)
        fs_write(i * 4, 0x1000u * i + 0xabu);
    for (i = 0; i < 16; i++)
        sum = sum * 31u + fs_read(i * 4);
    fs_write(sizeof area - 4, 0xdeadbeefu);            /* last word in the limit */

    printf("fs-user: %s descriptor, %%fs %s by the program\n",
           use_ldt ? "LDT" : "GDT (set_thread_area)",
           fs_after == sel && fs_before != sel ? "loaded" : "NOT loaded");
    printf("fs:0x0  = %08x (area[0]  = %08x)\n", fs_read(0), area[0]);
    printf("fs:0x10 = %08x (area[4]  = %08x)\n", fs_read_disp(), area[4]);
    printf("fs:0x3c = %08x (area[15] = %08x)\n", fs_read(0x3c), area[15]);
    printf("fs:0xffc = %08x (area[1023] = %08x)\n", fs_read(0xffc), area[1023]);
    printf("checksum: %08x\n", sum);

    __asm__ volatile("movw %0, %%fs" : : "r"((unsigned short)0));
    return 0;
}
