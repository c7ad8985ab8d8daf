/* far_negative: one %gs site meets a small negative offset (rewritten to %fs at its first fault) and
 * then an offset with the top bit set that points above the TCB (the stack), which the expand-down %fs
 * twin rejects: the site must get its gs prefix back, not be restarted forever. */
#include <stdio.h>
__attribute__((noinline)) unsigned load(unsigned off) {
    unsigned v;
    __asm__ volatile("mov %%gs:(%1), %0" : "=r"(v) : "r"(off));
    return v;
}
int main(void) {
    unsigned tcb, local = 0x1234abcd;
    __asm__ volatile("mov %%gs:0, %0" : "=r"(tcb));
    unsigned a = load(-8u);                          /* first -ve fault at the site: patched to %fs */
    unsigned off = (unsigned)&local - tcb;            /* the stack, above the TCB: top bit set */
    unsigned b = load(off);                           /* -ve offset, but above the TCB: the twin rejects it */
    printf("tcb %#x off %#x: %#x %#x\n", tcb, off, a, b);
    return 0;
}
