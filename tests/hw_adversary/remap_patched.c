/* remap_patched: a %gs site in a page of its own is rewritten; the program then maps other bytes over
 * that page (p: private read-only data full of 0x64; s: a read-only shared file mapping) and makes
 * %fs its own, so online-patch gives its sites their prefixes back: a byte that is no longer the
 * rewritten code must not be written. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int victim(void);
__asm__(".pushsection .text.zvictim,\"ax\"\n.balign 4096\n.globl victim\nvictim:\n"
        "mov %gs:-8, %eax\nret\n.balign 4096\n.popsection\n");

int main(int argc, char **argv) {
    int shared = argc > 1 && argv[1][0] == 's';
    unsigned char *page = (unsigned char *)((unsigned long)victim & ~4095ul);
    if ((unsigned char *)main >= page && (unsigned char *)main < page + 4096) return 9;
    victim(); /* the site is patched: its gs prefix is 0x64 now */
    int pre = page[(unsigned char *)victim - page] ; (void)pre;
    unsigned char buf[4096];
    memset(buf, 0x64, sizeof buf);
    void *p;
    if (shared) { /* a read-only shared mapping of a file of 'd's */
        int fd = open("dfile", O_RDWR | O_CREAT | O_TRUNC, 0600);
        write(fd, buf, sizeof buf);
        close(fd);
        fd = open("dfile", O_RDONLY);
        p = mmap(page, 4096, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
    } else { /* read-only private anonymous data, all 'd' */
        p = mmap(page, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p != MAP_FAILED) { memcpy(p, buf, sizeof buf); mprotect(p, 4096, PROT_READ); }
    }
    if (p == MAP_FAILED) { perror("mmap"); return 4; }
    int x;
    /* %fs no longer the twin's: patching stops, every rewritten site gets its prefix back */
    __asm__ volatile("xor %%eax, %%eax\n\tmov %%eax, %%fs\n\tmov %%gs:-8, %%eax\n\tmov %%eax, %0" : "=r"(x) : : "eax");
    for (int i = 0; i < 4096; i++)
        if (page[i] != 0x64) printf("read-only data page changed at +%#x: %#x\n", i, page[i]);
    printf("done\n");
    return 0;
}
