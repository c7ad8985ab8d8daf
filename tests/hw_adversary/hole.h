/* hole.h: what the adversarial guests share. A page of their own at the start of the nonpae hypervisor
 * hole (0xFC000000: on an x86-64 host an i386 process may map it), holding a marker, and the checks:
 * does a selector's descriptor reach the whole 4 GiB (lsl), and what does a read through it at
 * 0xFC000000 give. A guest that reads HOLE_MARKER there has got an untruncated descriptor past the
 * supervisor: each prints HOLE REACHED then. */
#ifndef HW_ADVERSARY_HOLE_H
#define HW_ADVERSARY_HOLE_H

#include <stdio.h>
#include <sys/mman.h>

#define HOLE_START 0xFC000000u
#define HOLE_MARKER 0xC0FFEEu

/* map the page and mark it; 0 on success */
static int map_hole(void)
{
    unsigned *hole = mmap((void *)HOLE_START, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                          -1, 0);
    if (hole == MAP_FAILED) { perror("mmap"); return -1; }
    hole[0] = HOLE_MARKER;
    return 0;
}

/* does the descriptor `sel` selects have a 4 GiB limit (lsl succeeds with 0xFFFFFFFF)? */
static int reaches_everything(unsigned sel)
{
    unsigned lim = 0, ok = 0;
    __asm__ volatile("lsl %2, %0\n\tsetz %b1" : "=r"(lim), "=q"(ok) : "r"(sel));
    return ok && lim == 0xFFFFFFFFu;
}

/* the word at HOLE_START read through %fs = sel */
static unsigned read_hole_through(unsigned sel)
{
    unsigned v;
    __asm__ volatile("mov %1, %%fs\n\tmov %%fs:0xFC000000, %0" : "=r"(v) : "r"(sel) : "memory");
    return v;
}

#endif
